// One GEMM problem turned into cuBLASLt objects: the operation descriptor, the matrix layouts
// and the algorithm the heuristic picked for them. Built once per problem (see gemm_cache.h)
// and then run with each call's pointers. Not public API.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <cublasLt.h>

#include "gemm.h"

namespace tpext::core {

// The cuBLASLt handle of `device` (which must be the current device), created on first use and
// kept for the life of the process. One handle serves every thread: cuBLAS handles may be
// shared between threads as long as nobody changes their configuration, and a cuBLASLt handle
// has none (stream, workspace and math mode all travel with each call).
cublasLtHandle_t cublaslt_handle(int device);

// Largest power of two dividing the address, capped at 16 (the widest vector access a kernel
// needs); 0 for null. What cuBLASLt's heuristic needs to know about a pointer.
uint8_t alignment_class(const void* p);

struct CublasLtDeleter {
  void operator()(cublasLtMatmulDescOpaque_t* p) const;
  void operator()(cublasLtMatrixLayoutOpaque_t* p) const;
  void operator()(cublasLtMatmulPreferenceOpaque_t* p) const;
};

class MatmulPlan {
 public:
  // `desc` has resolved leading dimensions and has been validated, with m, n, k > 0. `ptrs` are
  // the first call's: the heuristic reads the alignment of every pointer, bias and aux included.
  // `candidates` > 1 keeps that many of the heuristic's algorithms for run() to choose from, timed
  // the short way (sustain_ms = 0) or under sustained load (see set_matmul_autotune_sustain_ms).
  MatmulPlan(cublasLtHandle_t handle, const MatmulDesc& desc, const MatmulPointers& ptrs,
             size_t workspace_bytes, int candidates = 1, int sustain_ms = 0);
  MatmulPlan(const MatmulPlan&) = delete;
  MatmulPlan& operator=(const MatmulPlan&) = delete;

  // Enqueues the GEMM on `stream` with this call's pointers (same alignment classes as the
  // first call's, which the cache key guarantees). Safe to call from several threads. A plan with
  // several candidates that is not tuned yet first checks and times them on this call's operands
  // and keeps the fastest (see set_matmul_autotune; gemm_tune.cpp), waiting on the host for it; not
  // while `stream` is being captured into a CUDA graph (the first choice runs, the next eager call
  // tunes). The checked and timed runs write D, aux and bgrad, which the chosen algorithm's run
  // then writes again.
  void run(const MatmulPointers& ptrs, void* workspace, size_t workspace_bytes,
           cudaStream_t stream);

  bool tuned() const;
  // How many algorithms the heuristic offered to choose from (1 when not autotuning).
  size_t candidate_count() const { return candidates_.size(); }
  // Index into those of the algorithm run() uses: 0 (the heuristic's first choice) until tuned.
  size_t chosen() const;
  // Candidates that ran while tuning but whose outputs disagreed with the first choice's
  // (gemm_verify.h), so were never kept. 0 until tuned.
  size_t rejected() const;
  // Enqueues candidate i (< candidate_count()) as run() enqueues the chosen one, without tuning:
  // for tests that check every algorithm the heuristic offers.
  cublasStatus_t run_candidate(size_t i, const MatmulPointers& ptrs, void* workspace, size_t workspace_bytes,
                               cudaStream_t stream);
  // Candidate i's cuBLASLt configuration (algorithm id, tile, split-K count, reduction scheme).
  std::string describe_candidate(size_t i) const;

 private:
  void set_epilogue_pointers(const MatmulPointers& ptrs);
  // Checks and times the candidates and sets chosen_ and tuned_ (see run; gemm_tune.cpp); the
  // caller holds mu_.
  void tune_locked(const MatmulPointers& ptrs, void* workspace, size_t workspace_bytes, cudaStream_t stream);
  // Which candidates run and agree with the first choice's outputs on these operands (all false
  // when the first choice itself cannot run); counts the others in rejected_.
  std::vector<bool> checked_candidates_locked(const MatmulPointers& ptrs, void* workspace, size_t workspace_bytes,
                                              cudaStream_t stream);
  // The candidate to keep among the usable ones, by the short or the sustained timing.
  size_t fastest_short_locked(const std::vector<bool>& usable, const MatmulPointers& ptrs, void* workspace,
                              size_t workspace_bytes, cudaStream_t stream);
  size_t fastest_sustained_locked(const std::vector<bool>& usable, const MatmulPointers& ptrs, void* workspace,
                                  size_t workspace_bytes, cudaStream_t stream);
  // One cublasLtMatmul with `algo`; the caller holds mu_.
  cublasStatus_t enqueue(const cublasLtMatmulAlgo_t& algo, const MatmulPointers& ptrs, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream);

  cublasLtHandle_t handle_;
  MatmulDesc desc_;
  std::string what_;  // describe(desc_), formatted once for the error messages of run()
  std::unique_ptr<cublasLtMatmulDescOpaque_t, CublasLtDeleter> op_;
  // In cuBLASLt's column-major terms: its A is our B, its B is our A (see gemm_plan.cpp).
  std::unique_ptr<cublasLtMatrixLayoutOpaque_t, CublasLtDeleter> layout_cublas_a_;
  std::unique_ptr<cublasLtMatrixLayoutOpaque_t, CublasLtDeleter> layout_cublas_b_;
  std::unique_ptr<cublasLtMatrixLayoutOpaque_t, CublasLtDeleter> layout_d_;
  std::vector<cublasLtMatmulAlgo_t> candidates_;  // the heuristic's order; [0] its first choice
  int sustain_ms_ = 0;
  size_t chosen_ = 0;
  size_t rejected_ = 0;
  bool tuned_ = false;
  // The bias/aux pointers live in op_, so setting them and enqueueing must not interleave
  // between threads. cublasLtMatmul reads the descriptor during the call only, so the lock is
  // held for the enqueue, never for the GPU work (except tune's timing, once per plan).
  mutable std::mutex mu_;
};

}  // namespace tpext::core
