// The GEMM of the tensor-parallel linear layers, in PyTorch's row-major terms, on cuBLASLt.
//
//   forward   Y[M,N]  = X[M,K] · W[N,K]^T (+ b)(+ GELU)   a = X,  b = W,  trans_b = true
//   dgrad     dX[M,K] = dY[M,N] · W[N,K]                  a = dY, b = W
//   wgrad     dW[N,K] = dY[M,N]^T · X[M,K]  (+ db)        a = dY, b = X,  trans_a = true, kBgrad
//
// Everything is checked before anything is enqueued; the work is enqueued on `stream` and never
// synchronised. cuBLASLt does all the arithmetic (no hand-written kernels): descriptors, layouts
// and the heuristic's algorithm are built once per distinct problem and cached.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "dtype.h"

namespace tpext::core {

// op(A) is m×k, op(B) is k×n, D is m×n; "rows" below are D's m rows.
enum class Epilogue {
  kNone,         // D = op(A)·op(B)
  kBias,         // D = op(A)·op(B) + bias                 bias: n elements, added to every row
  kGelu,         // D = gelu(op(A)·op(B))                  tanh approximation (cuBLASLt's GELU)
  kBiasGelu,     // D = gelu(op(A)·op(B) + bias)
  kGeluAux,      // as kGelu; aux = the pre-activation     aux: m×n row-major, row stride ldaux
  kBiasGeluAux,  // as kBiasGelu; aux = the pre-activation including the bias
  kDGelu,        // D = (op(A)·op(B)) * gelu'(aux)         aux: the forward pre-activation (input)
  kDGeluBgrad,   // as kDGelu; bgrad[j] = sum over the m rows of D[:, j]      (n elements)
  kBgrad,        // D = op(A)·op(B); bgrad[i] = sum over k of op(A)[i, :]     (m elements)
                 //   = sum over the token rows of dY in the wgrad case above: the bias grad.
                 //   Needs trans_a = true (see gemm_plan.cpp for why).
};

struct MatmulDesc {
  int64_t m = 0, n = 0, k = 0;  // D is m×n row-major
  bool trans_a = false;         // A stored m×k row-major (false) or k×m row-major (true)
  bool trans_b = false;         // B stored k×n row-major (false) or n×k row-major (true)
  // Row strides in elements; 0 = packed (the stored row length). ldaux is read only by the
  // epilogues with aux, and cuBLASLt needs it to be a multiple of 8.
  int64_t lda = 0, ldb = 0, ldd = 0, ldaux = 0;
  DataType dtype = DataType::kFloat32;  // of A, B, D, bias, aux, bgrad; accumulation is fp32
  Epilogue epilogue = Epilogue::kNone;
  // D += result (beta = 1). Only with kNone, kBias and kBgrad (bgrad is still overwritten):
  // cuBLASLt applies GELU/DGELU after adding D, which would be gelu(A·B + D), not D + gelu(A·B).
  bool accumulate = false;
  bool allow_tf32 = false;  // float32 only: CUBLAS_COMPUTE_32F_FAST_TF32
  // 0: the GEMM may use every SM. n > 0: cuBLASLt sizes it for n SMs
  // (CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET), leaving the rest to a collective running beside it;
  // without that, a persistent GEMM's CTAs hold every SM and the collective waits for its end.
  int sm_count_target = 0;
};

// Device pointers on the current device. bias, aux and bgrad must be set exactly when the
// epilogue uses them (a stray pointer is rejected: it is a bias the caller expected applied).
struct MatmulPointers {
  const void* a = nullptr;
  const void* b = nullptr;
  void* d = nullptr;
  const void* bias = nullptr;  // kBias, kBiasGelu, kBiasGeluAux
  void* aux = nullptr;         // written by kGeluAux, kBiasGeluAux; read by kDGelu, kDGeluBgrad
  void* bgrad = nullptr;       // written by kBgrad (m elements), kDGeluBgrad (n elements)
};

// Enqueues D = epilogue(op(A)·op(B)) on `stream`, on the current device.
// - m == 0 or n == 0: returns without touching CUDA.
// - k == 0: the empty product is 0, so D (unless accumulating), the aux output and bgrad are
//   zero-filled with cudaMemset*Async; the bias epilogues are rejected, since gelu(bias)/bias
//   broadcast would need a kernel of our own. This keeps an empty micro-batch's wgrad correct.
// - kDGelu/kDGeluBgrad need k >= 2 (cuBLASLt has no DGELU kernel for k == 1).
// Throws InvalidArgument (naming the field and what was expected) before enqueueing anything,
// CudaError / CublasError (naming the call, the status and the shape) on library failures;
// none of them leave state behind, so later calls work.
// `workspace` (device memory, may be null when workspace_bytes == 0) must not be in use by
// other work on other streams while this GEMM runs.
void matmul(const MatmulDesc& desc, const MatmulPointers& ptrs, void* workspace,
            size_t workspace_bytes, cudaStream_t stream);

// The workspace the adapter should allocate for matmul on the current device: 32 MiB for
// compute capability 9 and newer, 4 MiB before, as the cuBLAS documentation recommends
// (cublasSetWorkspace): Hopper's fastest kernels (split-K / stream-K reductions) need more
// scratch, and the heuristic silently skips any algorithm that does not fit. Without a usable
// device it returns the 4 MiB default rather than failing: sizing a buffer is not the place
// to report a missing GPU, the GEMM itself will.
size_t matmul_workspace_bytes();
size_t matmul_workspace_bytes(int compute_capability_major);

// Stable lower-case names ("none", "bias", "gelu", "bias_gelu", "gelu_aux", "bias_gelu_aux",
// "dgelu", "dgelu_bgrad", "bgrad") shared with the Python layer and used in error messages.
const char* epilogue_name(Epilogue e);

// Number of cached cuBLASLt plans, all devices together (for tests and diagnostics).
size_t matmul_cache_size();

// Autotuning, process-wide, off by default. With `candidates` = n >= 2, the first call of each
// distinct GEMM that runs outside CUDA-graph capture asks the heuristic for its best n algorithms,
// runs each once on that call's own operands and drops those whose outputs disagree with the first
// choice's (gemm_verify.h), times the rest (CUDA events, host waits) and keeps the fastest for
// every later call of the same problem. The timing is short by default (three rounds of two runs,
// each algorithm's best round; another algorithm is kept only when at least 3 % faster) or
// sustained (set_matmul_autotune_sustain_ms). GEMMs that accumulate into D keep the first choice
// untimed (the timed runs would add into D). The heuristic's first choice is not always the
// fastest (bench/gemm_compare.py: tpext's bias+GELU+aux GEMM 3-8 % behind torch's GEMM + GELU at
// some sizes; bench/gemm_sustained_probe.cpp: weight-gradient GEMMs 3-6 % behind another tile
// under sustained load). Costs: the host wait once per problem, and the choice can differ between
// runs and ranks, so results are no longer bitwise reproducible across processes; hence opt-in.
// 0 or 1: the heuristic's first choice. Throws InvalidArgument outside [0, 16].
void set_matmul_autotune(int candidates);
int matmul_autotune();
constexpr int kMaxAutotuneCandidates = 16;

// How autotuning times each candidate. 0 (the default): the short timing above, a few runs, which
// costs little per problem but sees the GPU at the clocks of a short burst. ms > 0: each candidate
// runs back to back for ms milliseconds (the GPU's clocks and power settle, as in a training step
// that holds it at its power limit), then as long again timed; three rounds in rotated order; a
// candidate is kept only when faster than the first choice in every round and by at least 1 % at
// the median. Tuning then costs about 6 x ms per candidate and problem, once. A plan tuned one way
// is another plan than one tuned the other. Throws InvalidArgument outside [0, 10000].
void set_matmul_autotune_sustain_ms(int ms);
int matmul_autotune_sustain_ms();
constexpr int kMaxAutotuneSustainMs = 10000;

}  // namespace tpext::core
