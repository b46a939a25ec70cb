#include "gemm_cache.h"

#include <functional>
#include <mutex>
#include <tuple>
#include <unordered_map>

#include "gemm_check.h"

namespace tpext::core {
namespace {

constexpr size_t kMaxPlans = 4096;

auto tie(const MatmulKey& k) {
  return std::tie(k.device, k.m, k.n, k.k, k.lda, k.ldb, k.ldd, k.ldaux, k.trans_a, k.trans_b,
                  k.accumulate, k.allow_tf32, k.sm_count_target, k.autotune, k.autotune_sustain_ms, k.dtype, k.epilogue,
                  k.workspace_bytes, k.align_a, k.align_b, k.align_d, k.align_bias, k.align_aux, k.align_bgrad);
}

struct PlanCache {
  std::mutex mu;
  std::unordered_map<MatmulKey, std::shared_ptr<MatmulPlan>, MatmulKeyHash> plans;
};

PlanCache& plan_cache() {
  // Never destroyed, like the handles the plans refer to (see cublaslt_handle).
  static auto* cache = new PlanCache();
  return *cache;
}

}  // namespace

bool MatmulKey::operator==(const MatmulKey& other) const { return tie(*this) == tie(other); }

size_t MatmulKeyHash::operator()(const MatmulKey& k) const {
  size_t h = 0;
  auto mix = [&h](uint64_t v) {
    h ^= std::hash<uint64_t>{}(v) + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
  };
  mix(static_cast<uint64_t>(k.device));
  mix(static_cast<uint64_t>(k.m));
  mix(static_cast<uint64_t>(k.n));
  mix(static_cast<uint64_t>(k.k));
  mix(static_cast<uint64_t>(k.lda));
  mix(static_cast<uint64_t>(k.ldb));
  mix(static_cast<uint64_t>(k.ldd));
  mix(static_cast<uint64_t>(k.ldaux));
  mix((uint64_t{k.trans_a} << 0) | (uint64_t{k.trans_b} << 1) | (uint64_t{k.accumulate} << 2) |
      (uint64_t{k.allow_tf32} << 3));
  mix((static_cast<uint64_t>(k.dtype) << 8) | static_cast<uint64_t>(k.epilogue));
  mix(static_cast<uint64_t>(k.sm_count_target));
  mix(static_cast<uint64_t>(k.autotune));
  mix(static_cast<uint64_t>(k.autotune_sustain_ms));
  mix(static_cast<uint64_t>(k.workspace_bytes));
  mix((uint64_t{k.align_a} << 0) | (uint64_t{k.align_b} << 8) | (uint64_t{k.align_d} << 16) |
      (uint64_t{k.align_bias} << 24) | (uint64_t{k.align_aux} << 32) |
      (uint64_t{k.align_bgrad} << 40));
  return h;
}

MatmulKey make_matmul_key(const MatmulDesc& desc, const MatmulPointers& ptrs, int device,
                          size_t workspace_bytes, int autotune, int autotune_sustain_ms) {
  const MatmulDesc d = with_resolved_leading_dims(desc);
  MatmulKey key;
  key.device = device;
  key.m = d.m;
  key.n = d.n;
  key.k = d.k;
  key.lda = d.lda;
  key.ldb = d.ldb;
  key.ldd = d.ldd;
  key.ldaux = d.ldaux;
  key.trans_a = d.trans_a;
  key.trans_b = d.trans_b;
  key.accumulate = d.accumulate;
  key.allow_tf32 = d.allow_tf32;
  key.sm_count_target = d.sm_count_target;
  key.autotune = autotune;
  key.autotune_sustain_ms = autotune_sustain_ms;
  key.dtype = d.dtype;
  key.epilogue = d.epilogue;
  key.workspace_bytes = workspace_bytes;
  key.align_a = alignment_class(ptrs.a);
  key.align_b = alignment_class(ptrs.b);
  key.align_d = alignment_class(ptrs.d);
  key.align_bias = alignment_class(ptrs.bias);
  key.align_aux = alignment_class(ptrs.aux);
  key.align_bgrad = alignment_class(ptrs.bgrad);
  return key;
}

std::shared_ptr<MatmulPlan> find_plan(const MatmulKey& key) {
  PlanCache& cache = plan_cache();
  std::lock_guard<std::mutex> lock(cache.mu);
  auto it = cache.plans.find(key);
  return it == cache.plans.end() ? nullptr : it->second;
}

std::shared_ptr<MatmulPlan> insert_plan(const MatmulKey& key, std::shared_ptr<MatmulPlan> plan) {
  PlanCache& cache = plan_cache();
  std::lock_guard<std::mutex> lock(cache.mu);
  auto it = cache.plans.find(key);
  if (it != cache.plans.end()) return it->second;
  if (cache.plans.size() >= kMaxPlans) cache.plans.clear();
  return cache.plans.emplace(key, std::move(plan)).first->second;
}

size_t plan_cache_size() {
  PlanCache& cache = plan_cache();
  std::lock_guard<std::mutex> lock(cache.mu);
  return cache.plans.size();
}

}  // namespace tpext::core
