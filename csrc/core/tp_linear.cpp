#include "tp_linear.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "device_guard.h"
#include "error.h"
#include "gemm_check.h"

namespace tpext::core {
namespace {

const char* offset(const void* p, int64_t elems, DataType dt) {
  return static_cast<const char*>(p) + elems * static_cast<int64_t>(element_size(dt));
}
char* offset(void* p, int64_t elems, DataType dt) {
  return static_cast<char*>(p) + elems * static_cast<int64_t>(element_size(dt));
}

void check_gemm_dtype(DataType dt, bool allow_tf32, const char* where) {
  if (dt != DataType::kFloat32 && dt != DataType::kBFloat16 && dt != DataType::kFloat16)
    throw_invalid_argument(std::string(where) + ": dtype: expected float32, bfloat16 or float16, got " + dtype_name(dt));
  if (allow_tf32 && dt != DataType::kFloat32)
    throw_invalid_argument(std::string(where) + ": allow_tf32: only meaningful for float32, got " + dtype_name(dt));
}

void check_sizes(int64_t m, int64_t n, int64_t k, const char* where) {
  if (m < 0 || n < 0 || k < 0)
    throw_invalid_argument(std::string(where) + ": sizes: expected m, n, k >= 0, got m=" + std::to_string(m) +
                           " n=" + std::to_string(n) + " k=" + std::to_string(k));
}

}  // namespace

void chunk_rows(int64_t m, int chunks, int i, int64_t* begin, int64_t* end, double tail_weight) {
  // Leading pieces of ceil(m / (chunks - 1 + tail_weight)) rows rounded up to 8; the last takes
  // what is left. tail_weight 1 is the plain equal split.
  const double shares = chunks - 1 + tail_weight;
  const int64_t lead = tail_weight == 1.0 ? (m + chunks - 1) / chunks
                                          : static_cast<int64_t>(std::ceil(static_cast<double>(m) / shares));
  const int64_t per = (lead + 7) / 8 * 8;
  *begin = std::min<int64_t>(m, per * i);
  *end = std::min<int64_t>(m, per * (i + 1));
}

void check_tail_weight(const char* where, double tail_weight) {
  if (!(tail_weight >= 0.0 && tail_weight <= 1.0))
    throw_invalid_argument(std::string(where) + ": expected a share in (0, 1] of a piece's rows (0: the default), " +
                           "got " + std::to_string(tail_weight));
}

namespace {
void check_comm_sms(const std::string& where, int comm_sms) {
  if (comm_sms < 0)
    throw_invalid_argument(where + "comm_sms: expected >= 0 SMs left to the collective (0: none), got " +
                           std::to_string(comm_sms));
}
}  // namespace

int overlap_sm_target(int device, int comm_sms) {
  check_comm_sms("", comm_sms);
  if (comm_sms == 0) return 0;
  int sms = 0;
  TPEXT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (comm_sms >= sms)
    throw_invalid_argument("comm_sms: expected fewer than the " + std::to_string(sms) + " SMs of cuda:" +
                           std::to_string(device) + ", got " + std::to_string(comm_sms));
  return sms - comm_sms;
}

int choose_row_chunks(int64_t m, int64_t n, DataType dtype, int world_size) {
  if (world_size <= 1) return 1;
  const int64_t bytes = m * n * static_cast<int64_t>(element_size(dtype));
  // Each piece after the first runs at a reduced SM target beside the previous all-reduce, and
  // cuBLASLt's tiles fit that target worse than every SM (~15 % slower per piece on H200); the
  // pieces only pay where the hidden all-reduce is worth more. Measured on 2 H200s, mlp-8192 fc2
  // forward (bench/NOTES.md, attempt 8): 16 MiB of output (1024 tokens) was 11 % faster in one
  // piece than in two, 64 MiB (4096) 5 % faster in two than in 1, 3 or 4, 256 MiB (16384) faster
  // in four than in eight.
  if (bytes < (int64_t{32} << 20)) return 1;
  int chunks = bytes < (int64_t{128} << 20) ? 2 : 4;
  while (chunks > 1 && m / chunks < 128) --chunks;
  return chunks;
}

RowPlan plan_row_parallel(int64_t m, int64_t n, DataType dtype, int world_size, int chunks, PieceAxis axis) {
  if (chunks < 0)
    throw_invalid_argument("row_parallel_forward: chunks: expected >= 0 (0 = automatic), got " + std::to_string(chunks));
  RowPlan plan;
  const int64_t bytes = m * n * static_cast<int64_t>(element_size(dtype));
  if (chunks > 0) {
    plan.axis = axis == PieceAxis::kColumns ? PieceAxis::kColumns : PieceAxis::kRows;
    plan.pieces = chunks;
  } else if (world_size <= 1 || bytes < (int64_t{1} << 20)) {
    plan.pieces = 1;
  } else if (axis == PieceAxis::kColumns) {
    plan.axis = PieceAxis::kColumns;
    plan.pieces = bytes < (int64_t{2} << 20) ? 2 : 4;
    while (plan.pieces > 1 && n / plan.pieces < 256) --plan.pieces;
  } else {
    plan.pieces = choose_row_chunks(m, n, dtype, world_size);
  }
  const int64_t len = plan.axis == PieceAxis::kColumns ? n : m;
  plan.pieces = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(plan.pieces, (len + 7) / 8)));
  if (plan.pieces == 1) plan.axis = PieceAxis::kRows;
  return plan;
}

size_t row_parallel_scratch_bytes(const RowPlan& plan, int64_t m, int64_t n, DataType dtype) {
  return plan.axis == PieceAxis::kColumns ? static_cast<size_t>(m * n) * element_size(dtype) : 0;
}

namespace {

// One piece of the row-parallel forward: out[rows, cols] = x[rows, k] · w[cols, k]^T (+ bias[cols])
// on the caller's stream, then its all-reduce in place on the comm stream. sm_target: the SMs the
// GEMM may use (0: all), fewer when it runs beside the previous piece's all-reduce. beside_gemm:
// the next piece's GEMM runs beside this all-reduce (every piece but the last).
void gemm_then_all_reduce(Communicator& comm, const RowParallelForward& a, int64_t rows, int64_t cols,
                          const void* x, const void* w, void* out, const void* bias, int sm_target, bool beside_gemm,
                          Workspace ws, cudaStream_t caller) {
  MatmulDesc d;
  d.m = rows;
  d.n = cols;
  d.k = a.k;
  d.trans_b = true;
  d.dtype = a.dtype;
  d.allow_tf32 = a.allow_tf32;
  d.epilogue = bias != nullptr ? Epilogue::kBias : Epilogue::kNone;
  d.sm_count_target = sm_target;
  MatmulPointers p;
  p.a = x;
  p.b = w;
  p.d = out;
  p.bias = bias;
  matmul(d, p, ws.ptr, ws.bytes, caller);
  comm.fence_in(caller);
  Collective c;
  c.kind = CollectiveKind::kAllReduce;
  c.send = out;
  c.recv = out;
  c.count = static_cast<size_t>(rows * cols);
  c.dtype = a.dtype;
  c.beside_gemm = beside_gemm;
  comm.enqueue(c);
}

}  // namespace

void row_parallel_forward(Communicator& comm, const RowParallelForward& a, Workspace ws, cudaStream_t caller) {
  const char* where = "row_parallel_forward";
  check_sizes(a.m, a.n, a.k, where);
  check_gemm_dtype(a.dtype, a.allow_tf32, where);
  const RowPlan plan = plan_row_parallel(a.m, a.n, a.dtype, comm.size(), a.chunks, a.axis);
  if (a.m == 0 || a.n == 0) return;
  if (a.y == nullptr || (a.k > 0 && (a.x == nullptr || a.w == nullptr)))
    throw_invalid_argument("row_parallel_forward: x, w, y: expected device pointers, got null");
  const bool by_columns = plan.axis == PieceAxis::kColumns;
  if (by_columns && a.scratch == nullptr)
    throw_invalid_argument("row_parallel_forward: scratch: expected row_parallel_scratch_bytes() of device memory "
                           "for column blocks, got null");
  const bool with_bias = a.bias != nullptr && comm.rank() == 0;
  if (a.k == 0 && with_bias) {
    // The empty product is zero; the bias alone is y on rank 0. Rather than a kernel of our own,
    // reject: a row-parallel layer with an empty shard on rank 0 is a configuration error (more
    // ranks than input features).
    throw_invalid_argument("row_parallel_forward: k: rank 0 holds an empty input shard (k == 0) but must add the bias; "
                           "use fewer ranks than input features");
  }
  check_tail_weight("row_parallel_forward: tail_weight", a.tail_weight);
  double tail_weight = a.tail_weight == 0.0 ? kDefaultRowTailWeight : a.tail_weight;
  if (by_columns) tail_weight = 1.0;
  // Pieces after the first run beside the previous piece's all-reduce.
  const int beside_sms = overlap_sm_target(comm.device(), a.comm_sms);
  const size_t es = element_size(a.dtype);

  DeviceGuard guard(comm.device());
  // Row pieces go through the communicator's symmetric window when the whole output fits: the
  // GEMMs write their partial sums there, the all-reduces run in place on NCCL's symmetric
  // kernels, and each piece is copied into y on the comm stream right after its all-reduce. The
  // window is shared by every op on this communicator, so the GEMMs first wait for whatever the
  // comm stream still has in flight (an earlier op's copies, from any stream). Under capture that
  // wait would name work outside the graph; the graph's own ops are ordered by their fences.
  const size_t out_bytes = static_cast<size_t>(a.m * a.n) * es;
  char* window = !by_columns && out_bytes <= comm.window_bytes()  // no window (0 bytes) on one rank
                     ? static_cast<char*>(comm.window())
                     : nullptr;
  if (window != nullptr) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    TPEXT_CUDA_CHECK(cudaStreamIsCapturing(caller, &capture));
    if (capture == cudaStreamCaptureStatusNone) comm.fence_out(caller);
  }
  const int64_t extent = by_columns ? a.n : a.m;  // rows, or the same cut along the columns
  for (int i = 0; i < plan.pieces; ++i) {
    int64_t b = 0, e = 0;
    chunk_rows(extent, plan.pieces, i, &b, &e, tail_weight);
    if (e <= b) continue;
    const int sm_target = i > 0 && comm.size() > 1 ? beside_sms : 0;
    // The pieces cover [0, extent) in order, so a piece ending before it has a non-empty successor
    // whose GEMM runs beside this all-reduce; the last non-empty piece's all-reduce runs alone.
    const bool beside_gemm = e < extent;
    if (!by_columns) {
      void* out = offset(window != nullptr ? static_cast<void*>(window) : a.y, b * a.n, a.dtype);
      gemm_then_all_reduce(comm, a, e - b, a.n, offset(a.x, b * a.k, a.dtype), a.w, out, with_bias ? a.bias : nullptr,
                           sm_target, beside_gemm, ws, caller);
      if (window != nullptr)
        TPEXT_CUDA_CHECK(cudaMemcpyAsync(offset(a.y, b * a.n, a.dtype), out, static_cast<size_t>((e - b) * a.n) * es,
                                         cudaMemcpyDeviceToDevice, comm.stream()));
      continue;
    }
    // Column block [b, e): its rows of w are contiguous; it lands packed [m, e-b] in the scratch
    // (NCCL needs contiguous memory), is all-reduced there, then copied into its columns of y on
    // the comm stream while the next block multiplies.
    const int64_t cols = e - b;
    void* block = offset(a.scratch, a.m * b, a.dtype);
    gemm_then_all_reduce(comm, a, a.m, cols, a.x, offset(a.w, b * a.k, a.dtype), block,
                         with_bias ? offset(a.bias, b, a.dtype) : nullptr, sm_target, beside_gemm, ws, caller);
    TPEXT_CUDA_CHECK(cudaMemcpy2DAsync(offset(a.y, b, a.dtype), static_cast<size_t>(a.n) * es, block,
                                       static_cast<size_t>(cols) * es, static_cast<size_t>(cols) * es,
                                       static_cast<size_t>(a.m), cudaMemcpyDeviceToDevice, comm.stream()));
  }
  comm.fence_out(caller);
}

void linear_backward(Communicator* comm, const LinearBackward& a, Workspace ws, cudaStream_t caller) {
  const char* where = comm ? "column_parallel_backward" : "linear_backward";
  check_sizes(a.m, a.n, a.k, where);
  check_gemm_dtype(a.dtype, a.allow_tf32, where);
  if (a.db != nullptr && a.dw == nullptr)
    throw_invalid_argument(std::string(where) + ": db: the bias gradient rides on the weight-gradient GEMM; pass dw too");
  if (a.db != nullptr && !bgrad_epilogue_supported(a.dtype, a.k))  // before the dgrad GEMM is enqueued
    throw_invalid_argument(std::string(where) + ": db: the wgrad GEMM cannot give the bias gradient with k = " +
                           std::to_string(a.k) + " input features in " + dtype_name(a.dtype) +
                           " (none for k = 0; cuBLASLt's epilogue is wrong for float16 with k = 1); "
                           "pass db = nullptr and sum dy's rows instead");
  const bool reduces_dx = comm != nullptr && a.dx != nullptr && a.m > 0 && a.k > 0;
  check_comm_sms(std::string(where) + ": ", a.comm_sms);  // checked even where no collective runs
  // The wgrad GEMM runs beside the dx all-reduce (when there is one to run beside).
  const int beside_sms = reduces_dx && comm->size() > 1 ? overlap_sm_target(comm->device(), a.comm_sms) : 0;
  std::unique_ptr<DeviceGuard> guard;
  if (comm) guard = std::make_unique<DeviceGuard>(comm->device());

  // dgrad first, so its all-reduce can start while wgrad runs.
  if (a.dx != nullptr && a.m > 0 && a.k > 0) {
    MatmulDesc d;
    d.m = a.m;
    d.n = a.k;
    d.k = a.n;
    d.dtype = a.dtype;
    d.allow_tf32 = a.allow_tf32;
    MatmulPointers p;
    p.a = a.dy;  // [m, n]
    p.b = a.w;   // [n, k]
    p.d = a.dx;
    matmul(d, p, ws.ptr, ws.bytes, caller);
    if (comm != nullptr) {
      comm->fence_in(caller);
      Collective c;
      c.kind = CollectiveKind::kAllReduce;
      c.send = a.dx;
      c.recv = a.dx;
      c.count = static_cast<size_t>(a.m * a.k);
      c.dtype = a.dtype;
      c.beside_gemm = a.dw != nullptr && a.n > 0;  // the wgrad GEMM below runs beside it
      comm->enqueue(c);
    }
  }
  if (a.dw != nullptr && a.n > 0 && a.k > 0) {
    MatmulDesc d;
    d.m = a.n;
    d.n = a.k;
    d.k = a.m;
    d.trans_a = true;  // dy stored [m, n]; op(A) = dy^T [n, m]
    d.dtype = a.dtype;
    d.allow_tf32 = a.allow_tf32;
    d.epilogue = a.db != nullptr ? Epilogue::kBgrad : Epilogue::kNone;
    d.sm_count_target = beside_sms;
    MatmulPointers p;
    p.a = a.dy;
    p.b = a.x;  // [m, k]
    p.d = a.dw;
    p.bgrad = a.db;
    // The dgrad all-reduce still runs on the comm stream; wgrad writes other memory, so sharing
    // the workspace with the dgrad GEMM (same caller stream, finished) is safe.
    matmul(d, p, ws.ptr, ws.bytes, caller);
  }
  if (comm != nullptr && a.dx != nullptr && a.m > 0 && a.k > 0) comm->fence_out(caller);
}

}  // namespace tpext::core
