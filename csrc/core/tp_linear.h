// The communication schedules of the tensor-parallel linear layers (Megatron-LM, 1909.08053),
// torch-free: raw device pointers, sizes, a dtype and the caller's stream. GEMMs run on the
// caller's stream, collectives on the communicator's stream; the two are fenced with events and
// joined before return, so everything is ordered on the caller's stream as one op.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "communicator.h"
#include "gemm.h"

namespace tpext::core {

struct Workspace {
  void* ptr = nullptr;
  size_t bytes = 0;
};

// Row-parallel forward: y[m,n] = sum over ranks of x_local[m,k_local] · w_local[n,k_local]^T, plus
// bias[n] once. The m rows are cut into `chunks` pieces: the GEMM of piece i+1 runs on the caller's
// stream while the all-reduce of piece i runs on the comm stream. The bias rides on rank 0's GEMM
// epilogue, so it is in the sum exactly once and costs no extra kernel.
struct RowParallelForward {
  const void* x = nullptr;
  const void* w = nullptr;
  const void* bias = nullptr;  // optional
  void* y = nullptr;
  int64_t m = 0, n = 0, k = 0;
  DataType dtype = DataType::kBFloat16;
  bool allow_tf32 = false;
  int chunks = 0;  // 0: choose_row_chunks()
  int comm_sms = 0;  // see overlap_sm_target()
};
void row_parallel_forward(Communicator& comm, const RowParallelForward& args, Workspace ws, cudaStream_t caller);

// Column-parallel backward: dx[m,k] = all_reduce(dy[m,n_local] · w[n_local,k]) and, locally,
// dw[n_local,k] = dy^T · x (+ db[n_local] = column sums of dy). The all-reduce of dx runs on the
// comm stream while the wgrad GEMM runs on the caller's stream. dw may be null (frozen weight).
// With comm == nullptr it is the row-parallel backward: the same GEMMs and no collective.
struct LinearBackward {
  const void* dy = nullptr;
  const void* x = nullptr;
  const void* w = nullptr;
  void* dx = nullptr;  // optional
  void* dw = nullptr;  // optional
  void* db = nullptr;  // optional; needs dw
  int64_t m = 0, n = 0, k = 0;
  DataType dtype = DataType::kBFloat16;
  bool allow_tf32 = false;
  int comm_sms = 0;  // see overlap_sm_target(); applies to the wgrad GEMM beside the dx all-reduce
};
void linear_backward(Communicator* comm, const LinearBackward& args, Workspace ws, cudaStream_t caller);

// The SM target of a GEMM that runs beside a collective on `device`, leaving `comm_sms` SMs to
// the collective: 0 (every SM, cuBLASLt's choice) when comm_sms is 0, else the device's SM count
// minus comm_sms. Throws InvalidArgument unless 0 <= comm_sms < the SM count. The GEMMs that run
// alone (the first row piece, dgrad) always get every SM.
int overlap_sm_target(int device, int comm_sms);

// Pieces for the row-parallel forward: one when the all-reduce is latency-bound (pipelining would
// only add launches and shrink the GEMMs), more as the output grows so that the exposed tail (the
// last piece's all-reduce) shrinks. Each piece keeps at least 128 rows: narrower GEMMs lose
// tensor-core efficiency faster than the overlap gains.
int choose_row_chunks(int64_t m, int64_t n, DataType dtype, int world_size);

// Row ranges of piece i of `chunks` over m rows: boundaries are multiples of 8 rows so every
// piece's pointers keep the 16-byte alignment cuBLASLt's fastest kernels want.
void chunk_rows(int64_t m, int chunks, int i, int64_t* begin, int64_t* end);

}  // namespace tpext::core
