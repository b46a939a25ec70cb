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

// How the row-parallel forward cuts its work into pieces, so that the GEMM of piece i+1 runs while
// piece i is all-reduced:
//  - rows: pieces of y's rows; each piece's GEMM reads the whole weight shard. Right when the GEMM
//    is compute-bound (many rows): the weights are re-read per piece from L2/HBM at little cost.
//  - columns: blocks of y's columns; block j's GEMM reads only rows c0..c1 of w, so the weight
//    shard is still read once in all. Right when the GEMM is bound by reading the weights (few
//    rows, the decode / small-batch case), where row pieces would each re-read all of them. Each
//    block is written to its own contiguous part of a scratch buffer (NCCL needs contiguous
//    memory), all-reduced there, and copied into its columns of y on the comm stream.
enum class PieceAxis { kAuto, kRows, kColumns };

struct RowPlan {
  PieceAxis axis = PieceAxis::kRows;  // kRows or kColumns, never kAuto
  int pieces = 1;
};

// The cut for y[m,n] of `dtype` on `world_size` ranks. chunks > 0 fixes the piece count (rows when
// axis is kAuto); chunks == 0 chooses it: one piece on one rank or below 1 MiB of output (the
// all-reduce is latency: pipelining would only add launches); with axis kColumns, 2 column blocks
// below 2 MiB else 4, each of >= 256 columns; else row pieces from choose_row_chunks. kAuto never
// picks column blocks: measured on 2 H200s (bench/NOTES.md, ee917f2) the mlp-8192 fc2 at 128-1024
// tokens was 7-63 % slower in 4 column blocks than in one piece, because a block's GEMM (e.g.
// 256 x 2048 x 14336) falls to split-K kernels whose sum is ~2x the whole GEMM's time, more than
// the hidden all-reduce saves. Pieces are clamped to multiples of 8 rows/columns; one column block
// is the same as one row piece and is reported as rows. Throws InvalidArgument for chunks < 0.
RowPlan plan_row_parallel(int64_t m, int64_t n, DataType dtype, int world_size, int chunks, PieceAxis axis);

// Bytes of scratch row_parallel_forward needs under `plan`: m*n elements for column blocks, else 0.
size_t row_parallel_scratch_bytes(const RowPlan& plan, int64_t m, int64_t n, DataType dtype);

// Row-parallel forward: y[m,n] = sum over ranks of x_local[m,k_local] · w_local[n,k_local]^T, plus
// bias[n] once, in the pieces plan_row_parallel() chooses. The bias rides on rank 0's GEMM
// epilogue, so it is in the sum exactly once and costs no extra kernel.
struct RowParallelForward {
  const void* x = nullptr;
  const void* w = nullptr;
  const void* bias = nullptr;  // optional
  void* y = nullptr;
  int64_t m = 0, n = 0, k = 0;
  DataType dtype = DataType::kBFloat16;
  bool allow_tf32 = false;
  int chunks = 0;  // 0: chosen by plan_row_parallel()
  PieceAxis axis = PieceAxis::kAuto;
  int comm_sms = 0;  // see overlap_sm_target()
  // Rows of the last row piece relative to each earlier one, in (0, 1]; 0 takes
  // kDefaultRowTailWeight. See chunk_rows(). Column blocks are always equal.
  double tail_weight = 0.0;
  // row_parallel_scratch_bytes() of device memory when the plan cuts columns; unused otherwise.
  // Free for reuse once the caller's stream has passed this op (the comm stream is joined).
  void* scratch = nullptr;
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

// Pieces for the row-parallel forward: one below 32 MiB of output (the all-reduce it could hide is
// worth less than the slower GEMMs beside it cost), two below 128 MiB, else four, so that the
// exposed tail (the last piece's all-reduce) shrinks as the output grows. Each piece keeps at
// least 128 rows: narrower GEMMs lose tensor-core efficiency faster than the overlap gains.
int choose_row_chunks(int64_t m, int64_t n, DataType dtype, int world_size);

// Row ranges of piece i of `chunks` over m rows: the pieces before the last are equal and the
// last has tail_weight times their rows (1: all equal), so its all-reduce, which nothing hides, is
// short while its GEMM still outlasts the previous piece's all-reduce. Boundaries are multiples of
// 8 rows so every piece's pointers keep the 16-byte alignment cuBLASLt's fastest kernels want.
void chunk_rows(int64_t m, int chunks, int i, int64_t* begin, int64_t* end, double tail_weight = 1.0);

// The tail weight of the row pieces when the caller leaves it at 0.
constexpr double kDefaultRowTailWeight = 1.0;

// Throws InvalidArgument, prefixed with `where`, unless 0 <= tail_weight <= 1 (0: the default).
void check_tail_weight(const char* where, double tail_weight);

}  // namespace tpext::core
