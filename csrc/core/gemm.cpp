#include "gemm.h"

#include <atomic>
#include <memory>
#include <string>

#include "error.h"
#include "gemm_cache.h"
#include "gemm_check.h"
#include "gemm_plan.h"
#include "gemm_verify.h"

namespace tpext::core {
namespace {

constexpr size_t kMiB = size_t{1} << 20;

std::atomic<int> g_autotune{0};
std::atomic<int> g_autotune_sustain_ms{0};

// Takes the desc rather than a message so that the description is formatted only on failure.
void check_cuda_for(cudaError_t result, const char* call, const MatmulDesc& desc) {
  if (result != cudaSuccess) throw_cuda_error(result, call, describe(desc));
}

}  // namespace

void matmul(const MatmulDesc& desc, const MatmulPointers& ptrs, void* workspace,
            size_t workspace_bytes, cudaStream_t stream) {
  validate_matmul(desc, ptrs, workspace, workspace_bytes);
  if (desc.m == 0 || desc.n == 0) return;
  const MatmulDesc d = with_resolved_leading_dims(desc);
  if (d.k == 0) {
    // The empty product is 0, and so is every output of it (gelu(0) = 0, 0 · gelu'(aux) = 0, empty
    // bias sums = 0): zero bytes, +0.0 in every float type. cuBLASLt does not take k = 0.
    fill_outputs(d, ptrs, 0, stream);
    return;
  }
  int device = -1;
  check_cuda_for(cudaGetDevice(&device), "cudaGetDevice", d);
  // One candidate is no tuning: the same plan as with autotuning off.
  const int requested = g_autotune.load(std::memory_order_relaxed);  // read once: a concurrent set must not split the key
  const int autotune = requested > 1 ? requested : 0;
  const int sustain_ms = autotune > 0 ? g_autotune_sustain_ms.load(std::memory_order_relaxed) : 0;
  const MatmulKey key = make_matmul_key(d, ptrs, device, workspace_bytes, autotune, sustain_ms);
  std::shared_ptr<MatmulPlan> plan = find_plan(key);
  if (!plan) {
    // Built outside the cache lock: a heuristic query must not stall other threads' lookups.
    // A plan that fails to build throws here and leaves nothing cached.
    plan = insert_plan(key, std::make_shared<MatmulPlan>(cublaslt_handle(device), d, ptrs,
                                                         workspace_bytes, autotune, sustain_ms));
  }
  plan->run(ptrs, workspace, workspace_bytes, stream);  // tunes first when this plan has candidates and is untuned
}

size_t matmul_workspace_bytes(int compute_capability_major) {
  return compute_capability_major >= 9 ? 32 * kMiB : 4 * kMiB;
}

size_t matmul_workspace_bytes() {
  int device = 0;
  int major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    (void)cudaGetLastError();  // no usable device: answered with the default, not an error
    return matmul_workspace_bytes(0);
  }
  return matmul_workspace_bytes(major);
}

size_t matmul_cache_size() { return plan_cache_size(); }

void set_matmul_autotune(int candidates) {
  if (candidates < 0 || candidates > kMaxAutotuneCandidates)
    throw_invalid_argument("set_matmul_autotune: candidates: expected 0 (off) to " +
                           std::to_string(kMaxAutotuneCandidates) + " algorithms to time, got " +
                           std::to_string(candidates));
  g_autotune.store(candidates, std::memory_order_relaxed);
}

int matmul_autotune() { return g_autotune.load(std::memory_order_relaxed); }

void set_matmul_autotune_sustain_ms(int ms) {
  if (ms < 0 || ms > kMaxAutotuneSustainMs)
    throw_invalid_argument("set_matmul_autotune_sustain_ms: ms: expected 0 (the short timing) to " +
                           std::to_string(kMaxAutotuneSustainMs) + " milliseconds per timing, got " +
                           std::to_string(ms));
  g_autotune_sustain_ms.store(ms, std::memory_order_relaxed);
}

int matmul_autotune_sustain_ms() { return g_autotune_sustain_ms.load(std::memory_order_relaxed); }

}  // namespace tpext::core
