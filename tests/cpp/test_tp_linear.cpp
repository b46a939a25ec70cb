// The tensor-parallel linear schedules of csrc/core/tp_linear: how the row-parallel forward cuts
// its rows (host), and on GPUs, one thread per rank, the overlapped row-parallel forward for every
// chunk count and the column-parallel backward (dx all-reduced under the wgrad GEMM), each against
// a float64 reference computed on the host from the same (dtype-rounded) inputs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "comm_test_util.h"
#include "core/communicator.h"
#include "core/gemm.h"
#include "core/tp_linear.h"
#include "gpu_test_util.h"

namespace tpext::core {
namespace {

using tpext::testing::decode;
using tpext::testing::DeviceBuffer;
using tpext::testing::encode;
using tpext::testing::on_every_rank;
using tpext::testing::Stream;
using tpext::testing::tp_test_ranks;

// ---------------------------------------------------------------------------------------------
// Host: the row pieces
// ---------------------------------------------------------------------------------------------

TEST(RowChunks, PiecesCoverEveryRowOnceOnMultiplesOf8) {
  for (double tail : {1.0, 0.5, 1.0 / 3, 0.05}) {
    for (int64_t m : {1, 7, 8, 9, 127, 128, 129, 1000, 4096, 4097, 16384}) {
      for (int chunks : {1, 2, 3, 4, 7}) {
        const std::string at = "m=" + std::to_string(m) + " chunks=" + std::to_string(chunks) +
                               " tail=" + std::to_string(tail) + " piece ";
        int64_t expect_begin = 0;
        for (int i = 0; i < chunks; ++i) {
          int64_t b = -1, e = -1;
          chunk_rows(m, chunks, i, &b, &e, tail);
          EXPECT_EQ(b, expect_begin) << at << i;
          EXPECT_LE(b, e) << at << i;
          EXPECT_TRUE(e % 8 == 0 || e == m) << at << i << " ends at " << e;
          expect_begin = e;
        }
        EXPECT_EQ(expect_begin, m) << at << "(all): the pieces must end at m";
      }
    }
  }
}

TEST(RowChunks, TheTailWeightShrinksOnlyTheLastPiece) {
  const auto piece = [](int64_t m, int chunks, int i, double tail) {
    int64_t b = 0, e = 0;
    chunk_rows(m, chunks, i, &b, &e, tail);
    return std::make_pair(b, e);
  };
  // 4096 rows in two pieces, the last a third of the first: 3 : 1.
  EXPECT_EQ(piece(4096, 2, 0, 1.0 / 3), std::make_pair(int64_t{0}, int64_t{3072}));
  EXPECT_EQ(piece(4096, 2, 1, 1.0 / 3), std::make_pair(int64_t{3072}, int64_t{4096}));
  // 16384 rows in four, the last half a leading piece: 3 x 4688 (4681.1 rounded up to 8) + 2320.
  for (int i = 0; i < 3; ++i) EXPECT_EQ(piece(16384, 4, i, 0.5).second - piece(16384, 4, i, 0.5).first, 4688) << i;
  EXPECT_EQ(piece(16384, 4, 3, 0.5), std::make_pair(int64_t{14064}, int64_t{16384}));
  // Weight 1 is the equal split it always was.
  EXPECT_EQ(piece(4096, 2, 0, 1.0), std::make_pair(int64_t{0}, int64_t{2048}));
  EXPECT_EQ(piece(1000, 3, 2, 1.0), std::make_pair(int64_t{672}, int64_t{1000}));
}

TEST(RowChunks, OnePieceWhenSmallMoreAsTheOutputGrows) {
  EXPECT_EQ(choose_row_chunks(256, 8192, DataType::kBFloat16, 2), 1) << "4 MiB output: latency-bound";
  EXPECT_EQ(choose_row_chunks(1024, 8192, DataType::kBFloat16, 2), 1) << "16 MiB output: one piece measured faster";
  EXPECT_EQ(choose_row_chunks(2048, 8192, DataType::kBFloat16, 2), 2) << "32 MiB output";
  EXPECT_EQ(choose_row_chunks(4096, 8192, DataType::kBFloat16, 2), 2) << "64 MiB output";
  EXPECT_EQ(choose_row_chunks(8192, 8192, DataType::kBFloat16, 2), 4) << "128 MiB output";
  EXPECT_EQ(choose_row_chunks(16384, 8192, DataType::kBFloat16, 2), 4) << "256 MiB output";
  EXPECT_EQ(choose_row_chunks(300, 32768, DataType::kFloat32, 2), 2) << "37.5 MiB in 300 rows: 2 x 150";
  EXPECT_EQ(choose_row_chunks(256, 131072, DataType::kFloat32, 2), 2) << "128 MiB in 256 rows: pieces keep >= 128 rows";
  EXPECT_EQ(choose_row_chunks(16384, 8192, DataType::kBFloat16, 1), 1) << "no collective to hide on one rank";
  for (int64_t m : {1, 100, 255, 1000, 4096, 16384, 65536}) {
    const int c = choose_row_chunks(m, 8192, DataType::kBFloat16, 2);
    EXPECT_GE(c, 1);
    EXPECT_TRUE(c == 1 || m / c >= 128) << "m=" << m << " gave " << c << " pieces of under 128 rows";
  }
}

TEST(RowPlan, RowPiecesUnlessColumnsAreAskedForOneWhenLatencyBound) {
  const auto bf16 = DataType::kBFloat16;
  // Automatic: never column blocks (their split-K GEMMs cost more than they hide, bench/NOTES.md).
  auto plan = plan_row_parallel(256, 8192, bf16, 2, 0, PieceAxis::kAuto);  // 4 MiB: one piece
  EXPECT_EQ(plan.axis, PieceAxis::kRows);
  EXPECT_EQ(plan.pieces, choose_row_chunks(256, 8192, bf16, 2));
  EXPECT_EQ(plan.pieces, 1);
  EXPECT_EQ(row_parallel_scratch_bytes(plan, 256, 8192, bf16), 0u);
  plan = plan_row_parallel(256, 8192, bf16, 2, 0, PieceAxis::kColumns);  // asked for: 4 blocks
  EXPECT_EQ(plan.axis, PieceAxis::kColumns);
  EXPECT_EQ(plan.pieces, 4);
  EXPECT_EQ(row_parallel_scratch_bytes(plan, 256, 8192, bf16), size_t{256} * 8192 * 2);
  plan = plan_row_parallel(96, 8192, bf16, 2, 0, PieceAxis::kColumns);  // 1.5 MiB
  EXPECT_EQ(plan.axis, PieceAxis::kColumns);
  EXPECT_EQ(plan.pieces, 2);
  plan = plan_row_parallel(480, 8192, bf16, 2, 0, PieceAxis::kAuto);  // 7.5 MiB, few tokens: rows
  EXPECT_EQ(plan.axis, PieceAxis::kRows);
  plan = plan_row_parallel(16, 8192, bf16, 2, 0, PieceAxis::kAuto);  // 256 KiB: latency-bound
  EXPECT_EQ(plan.axis, PieceAxis::kRows);
  EXPECT_EQ(plan.pieces, 1);
  EXPECT_EQ(row_parallel_scratch_bytes(plan, 16, 8192, bf16), 0u);
  plan = plan_row_parallel(16384, 8192, bf16, 2, 0, PieceAxis::kAuto);
  EXPECT_EQ(plan.axis, PieceAxis::kRows);
  EXPECT_EQ(plan.pieces, choose_row_chunks(16384, 8192, bf16, 2));
  plan = plan_row_parallel(256, 8192, bf16, 1, 0, PieceAxis::kAuto);  // nothing to hide on one rank
  EXPECT_EQ(plan.axis, PieceAxis::kRows);
  EXPECT_EQ(plan.pieces, 1);
  plan = plan_row_parallel(300, 600, bf16, 2, 0, PieceAxis::kColumns);  // blocks keep >= 256 columns
  EXPECT_EQ(plan.pieces, 1) << "360 KB";
  plan = plan_row_parallel(400, 600, DataType::kFloat32, 2, 0, PieceAxis::kColumns);  // 960 KB: still one
  EXPECT_EQ(plan.pieces, 1);
  plan = plan_row_parallel(2000, 600, DataType::kFloat32, 2, 0, PieceAxis::kColumns);  // 4.8 MB, 600 cols
  EXPECT_EQ(plan.axis, PieceAxis::kColumns);
  EXPECT_EQ(plan.pieces, 2);
  // An explicit count: rows unless columns are asked for; clamped to pieces of >= 8.
  plan = plan_row_parallel(256, 8192, bf16, 2, 3, PieceAxis::kAuto);
  EXPECT_EQ(plan.axis, PieceAxis::kRows);
  EXPECT_EQ(plan.pieces, 3);
  plan = plan_row_parallel(256, 40, bf16, 1, 100, PieceAxis::kColumns);
  EXPECT_EQ(plan.axis, PieceAxis::kColumns);
  EXPECT_EQ(plan.pieces, 5);
  plan = plan_row_parallel(256, 8, bf16, 2, 4, PieceAxis::kColumns);  // one block is one row piece
  EXPECT_EQ(plan.axis, PieceAxis::kRows);
  EXPECT_EQ(plan.pieces, 1);
  try {
    plan_row_parallel(256, 8192, bf16, 2, -1, PieceAxis::kAuto);
    ADD_FAILURE() << "chunks -1 was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("chunks"), std::string::npos) << e.what();
  }
}

// float16 with one input feature, and any dtype with none: the bias gradient cannot ride on the
// wgrad GEMM (cuBLASLt's BGRADB writes one element; no GEMM runs), so db is refused before anything
// is enqueued: fake pointers and no stream, and still an InvalidArgument naming db, not a CUDA error.
TEST(LinearBackwardArgs, RefusesTheBiasGradientOfOneFloat16Feature) {
  LinearBackward a;
  int dummy[4] = {};
  a.dy = a.x = a.w = dummy;
  a.dw = a.db = dummy;
  a.m = 64;
  a.n = 8;
  a.k = 1;
  a.dtype = DataType::kFloat16;
  try {
    linear_backward(nullptr, a, Workspace{nullptr, 0}, nullptr);
    ADD_FAILURE() << "db for float16 with k = 1 was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("linear_backward: db:"), std::string::npos) << e.what();
  }
  a.k = 0;
  for (DataType dt : {DataType::kFloat32, DataType::kBFloat16, DataType::kFloat16}) {
    a.dtype = dt;
    try {
      linear_backward(nullptr, a, Workspace{nullptr, 0}, nullptr);
      ADD_FAILURE() << "db with k = 0 was accepted in " << dtype_name(dt);
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("linear_backward: db:"), std::string::npos) << e.what();
    }
  }
}

TEST(OverlapSms, ZeroLeavesTheChoiceToCublasLtAndNegativeIsRejected) {
  // Host-side: neither asks the device anything.
  EXPECT_EQ(overlap_sm_target(0, 0), 0);
  try {
    overlap_sm_target(0, -1);
    ADD_FAILURE() << "comm_sms -1 was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("comm_sms"), std::string::npos) << e.what();
  }
}

TEST(OverlapSmsGpu, LeavesTheRequestedSmsAndRejectsAllOfThem) {
  TPEXT_REQUIRE_GPUS(1);
  int sms = 0;
  ASSERT_EQ(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), cudaSuccess);
  EXPECT_EQ(overlap_sm_target(0, 16), sms - 16);
  EXPECT_THROW(overlap_sm_target(0, sms), InvalidArgument);
}

// ---------------------------------------------------------------------------------------------
// GPU: one thread per rank
// ---------------------------------------------------------------------------------------------

// `count` random values in [-1, 1) rounded to `dt`, as doubles (what the GPU will see exactly).
std::vector<double> rounded(size_t count, DataType dt, uint32_t seed) {
  const auto f = tpext::testing::random_floats(count, seed);
  return decode(encode(std::vector<double>(f.begin(), f.end()), dt), dt);
}

struct Device {
  int device;
  DeviceBuffer buf;
  Device(int dev, const std::vector<double>& values, DataType dt) : device(dev) {
    const auto bytes = encode(values, dt);
    buf = DeviceBuffer(dev, bytes.size());
    DeviceGuard g(dev);
    TPEXT_CUDA_CHECK(cudaMemcpy(buf.get(), bytes.data(), bytes.size(), cudaMemcpyHostToDevice));
  }
  Device(int dev, size_t count, DataType dt) : device(dev), buf(dev, count * element_size(dt)) {
    DeviceGuard g(dev);
    TPEXT_CUDA_CHECK(cudaMemset(buf.get(), 0xff, count * element_size(dt)));  // NaN-ish: unwritten shows
  }
  std::vector<double> read(size_t count, DataType dt, cudaStream_t s) const {
    std::vector<unsigned char> bytes(count * element_size(dt));
    DeviceGuard g(device);
    TPEXT_CUDA_CHECK(cudaStreamSynchronize(s));
    TPEXT_CUDA_CHECK(cudaMemcpy(bytes.data(), buf.get(), bytes.size(), cudaMemcpyDeviceToHost));
    return decode(bytes, dt);
  }
};

// Compares got with want element-wise: |got - want| <= tol * scale[i] (scale: the sum of the
// absolute products that made element i, so rounding in any order is inside it).
void expect_close(const std::vector<double>& got, const std::vector<double>& want, const std::vector<double>& scale,
                  double tol, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int shown = 0;
  size_t bad = 0;
  std::ostringstream first;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(got[i] - want[i]);
    if (!(err <= tol * scale[i] + 1e-30)) {
      ++bad;
      if (shown++ < 5) first << " [" << i << "] got " << got[i] << " want " << want[i] << " (bound " << tol * scale[i] << ")";
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " elements off:" << first.str();
}

double tolerance(DataType dt) { return dt == DataType::kFloat32 ? 2e-5 : 1.2e-2; }

DeviceBuffer workspace(int device) { return DeviceBuffer(device, matmul_workspace_bytes()); }

CommOptions options(const char* name) {
  CommOptions o;
  o.name = name;
  o.timeout_s = 60;
  o.blocking_collectives = true;  // the data path the torch ops use
  return o;
}

// Row-parallel forward on n ranks: rank r holds x_r [m, k_r] and w_r [n_out, k_r] with uneven
// k_r; y = sum_r x_r w_r^T + bias on every rank, for each chunk count.
// window_bytes > 0: the communicator has a symmetric NCCL window of that size, which the pieces
// go through when the whole output fits.
void row_parallel_case(int n, int64_t m, int64_t n_out, int64_t k_total, DataType dt, bool bias,
                       size_t window_bytes = 0) {
  std::vector<int64_t> k_of(n), k_begin(n);
  for (int r = 0, begin = 0; r < n; ++r) {
    k_of[r] = k_total / n + (r < k_total % n ? 1 : 0);
    k_begin[r] = begin;
    begin += static_cast<int>(k_of[r]);
  }
  const auto x_full = rounded(static_cast<size_t>(m * k_total), dt, 11);   // [m, k_total]
  const auto w_full = rounded(static_cast<size_t>(n_out * k_total), dt, 12);  // [n_out, k_total]
  const auto b = rounded(static_cast<size_t>(n_out), dt, 13);
  std::vector<double> want(m * n_out), scale(m * n_out);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n_out; ++j) {
      double acc = bias ? b[j] : 0.0, mag = bias ? std::fabs(b[j]) : 0.0;
      for (int64_t q = 0; q < k_total; ++q) {
        const double p = x_full[i * k_total + q] * w_full[j * k_total + q];
        acc += p;
        mag += std::fabs(p);
      }
      want[i * n_out + j] = acc;
      scale[i * n_out + j] = mag + std::fabs(acc);
    }
  const UniqueId id = make_unique_id();
  const std::string tag = "n=" + std::to_string(n) + " m=" + std::to_string(m) + " n_out=" + std::to_string(n_out) +
                          " k=" + std::to_string(k_total) + " " + dtype_name(dt) + (bias ? " bias" : "") +
                          " window=" + std::to_string(window_bytes);
  on_every_rank(n, [&](int r) {
    CommOptions opts = options("row-parallel");
    opts.window_bytes = window_bytes;
    auto comm = Communicator::create(id, r, n, r, opts);
    // One rank has nothing to all-reduce, so no window.
    EXPECT_EQ(comm->window_bytes(), n > 1 ? window_bytes : 0) << "rank " << r;
    EXPECT_EQ(comm->window() != nullptr, n > 1 && window_bytes > 0) << "rank " << r;
    std::vector<double> x_r(m * k_of[r]), w_r(n_out * k_of[r]);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t q = 0; q < k_of[r]; ++q) x_r[i * k_of[r] + q] = x_full[i * k_total + k_begin[r] + q];
    for (int64_t j = 0; j < n_out; ++j)
      for (int64_t q = 0; q < k_of[r]; ++q) w_r[j * k_of[r] + q] = w_full[j * k_total + k_begin[r] + q];
    Device x(r, x_r, dt), w(r, w_r, dt), bb(r, b, dt);
    Stream s(r);
    DeviceBuffer ws = workspace(r);
    // comm_sms 16: the pieces after the first are sized to leave 16 SMs to the all-reduce; the
    // result must not change with it. Column blocks (the last cases) go through the scratch buffer.
    // tail < 1 shrinks the last row piece (ignored for column blocks, which stay equal).
    struct Cut {
      int chunks;
      PieceAxis axis;
      int comm_sms;
      double tail = 0.0;
    };
    const std::vector<Cut> cuts{{1, PieceAxis::kRows, 0},        {2, PieceAxis::kRows, 0},
                                {3, PieceAxis::kRows, 0},        {4, PieceAxis::kRows, 0},
                                {7, PieceAxis::kRows, 0},        {3, PieceAxis::kRows, 16},
                                {2, PieceAxis::kRows, 0, 0.25},  {4, PieceAxis::kRows, 16, 0.5},
                                {2, PieceAxis::kColumns, 0},     {3, PieceAxis::kColumns, 0},
                                {5, PieceAxis::kColumns, 0},     {3, PieceAxis::kColumns, 16, 0.5}};
    for (const Cut& cut : cuts) {
      const int chunks = cut.chunks, comm_sms = cut.comm_sms;
      const RowPlan plan = plan_row_parallel(m, n_out, dt, n, chunks, cut.axis);
      const size_t scratch_bytes = row_parallel_scratch_bytes(plan, m, n_out, dt);
      if (cut.axis == PieceAxis::kColumns) {
        EXPECT_GT(scratch_bytes, 0u) << tag << " columns=" << chunks;
      }
      DeviceBuffer scratch(r, scratch_bytes);
      Device y(r, static_cast<size_t>(m * n_out), dt);
      RowParallelForward a;
      a.x = x.buf.get();
      a.w = w.buf.get();
      a.bias = bias ? bb.buf.get() : nullptr;
      a.y = y.buf.get();
      a.m = m;
      a.n = n_out;
      a.k = k_of[r];
      a.dtype = dt;
      a.chunks = chunks;
      a.axis = cut.axis;
      a.comm_sms = comm_sms;
      a.tail_weight = cut.tail;
      a.scratch = scratch.get();
      {
        DeviceGuard g(r);
        row_parallel_forward(*comm, a, Workspace{ws.get(), ws.bytes()}, s.get());
      }
      expect_close(y.read(m * n_out, dt, s.get()), want, scale, tolerance(dt),
                   tag + (cut.axis == PieceAxis::kColumns ? " column blocks=" : " row chunks=") +
                       std::to_string(chunks) + " comm_sms=" + std::to_string(comm_sms) +
                       " tail=" + std::to_string(cut.tail) + " rank " + std::to_string(r));
    }
    {
      // A tail weight outside [0, 1] is refused before anything is enqueued.
      RowParallelForward a;
      a.x = x.buf.get();
      a.w = w.buf.get();
      a.y = a.scratch = nullptr;
      a.m = m;
      a.n = n_out;
      a.k = k_of[r];
      a.dtype = dt;
      a.chunks = 2;
      Device y(r, static_cast<size_t>(m * n_out), dt);
      a.y = y.buf.get();
      for (double bad : {1.5, -0.25}) {
        a.tail_weight = bad;
        DeviceGuard g(r);
        EXPECT_THROW(row_parallel_forward(*comm, a, Workspace{ws.get(), ws.bytes()}, s.get()), InvalidArgument)
            << tag << " tail_weight=" << bad;
      }
    }
    comm->destroy();
  });
}

TEST(RowParallelForwardGpu, EveryChunkCountMatchesTheFullProductFp32) {
  TPEXT_REQUIRE_GPUS(1);
  const int n = tp_test_ranks();
  row_parallel_case(n, 1000, 96, 250, DataType::kFloat32, true);
  row_parallel_case(n, 64, 40, 33, DataType::kFloat32, false);
}

TEST(RowParallelForwardGpu, EveryChunkCountMatchesTheFullProductBf16) {
  TPEXT_REQUIRE_GPUS(1);
  const int n = tp_test_ranks();
  row_parallel_case(n, 1024, 128, 256, DataType::kBFloat16, true);
  row_parallel_case(n, 1000, 64, 130, DataType::kBFloat16, false);
}

TEST(RowParallelForwardGpu, ThroughASymmetricWindowAndPastIt) {
  TPEXT_REQUIRE_GPUS(1);
  const int n = tp_test_ranks();
  // 256 KiB of bf16 output in a 1 MiB window; 1000 x 96 fp32 (384 KB) past a 256 KiB one.
  row_parallel_case(n, 1024, 128, 256, DataType::kBFloat16, true, size_t{1} << 20);
  row_parallel_case(n, 1000, 96, 250, DataType::kFloat32, true, size_t{256} << 10);
}

// Column-parallel backward on n ranks: rank r holds w_r [n_r, k] (its output rows) and dy_r
// [m, n_r]; dx = sum_r dy_r w_r on every rank, dw_r = dy_r^T x, db_r = column sums of dy_r.
void column_backward_case(int n, int64_t m, int64_t n_total, int64_t k, DataType dt, int comm_sms = 0) {
  std::vector<int64_t> n_of(n), n_begin(n);
  for (int r = 0, begin = 0; r < n; ++r) {
    n_of[r] = n_total / n + (r < n_total % n ? 1 : 0);
    n_begin[r] = begin;
    begin += static_cast<int>(n_of[r]);
  }
  const auto x = rounded(static_cast<size_t>(m * k), dt, 21);         // [m, k]
  const auto w_full = rounded(static_cast<size_t>(n_total * k), dt, 22);  // [n_total, k]
  const auto dy_full = rounded(static_cast<size_t>(m * n_total), dt, 23);  // [m, n_total]
  std::vector<double> dx_want(m * k), dx_scale(m * k);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t q = 0; q < k; ++q) {
      double acc = 0, mag = 0;
      for (int64_t j = 0; j < n_total; ++j) {
        const double p = dy_full[i * n_total + j] * w_full[j * k + q];
        acc += p;
        mag += std::fabs(p);
      }
      dx_want[i * k + q] = acc;
      dx_scale[i * k + q] = mag + std::fabs(acc);
    }
  const UniqueId id = make_unique_id();
  const std::string tag = "n=" + std::to_string(n) + " m=" + std::to_string(m) + " n_out=" + std::to_string(n_total) +
                          " k=" + std::to_string(k) + " " + dtype_name(dt) + " comm_sms=" + std::to_string(comm_sms);
  on_every_rank(n, [&](int r) {
    auto comm = Communicator::create(id, r, n, r, options("column-backward"));
    const int64_t nr = n_of[r];
    std::vector<double> w_r(nr * k), dy_r(m * nr);
    for (int64_t j = 0; j < nr; ++j)
      for (int64_t q = 0; q < k; ++q) w_r[j * k + q] = w_full[(n_begin[r] + j) * k + q];
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < nr; ++j) dy_r[i * nr + j] = dy_full[i * n_total + n_begin[r] + j];
    std::vector<double> dw_want(nr * k), dw_scale(nr * k), db_want(nr), db_scale(nr);
    for (int64_t j = 0; j < nr; ++j) {
      double sacc = 0, smag = 0;
      for (int64_t i = 0; i < m; ++i) sacc += dy_r[i * nr + j], smag += std::fabs(dy_r[i * nr + j]);
      db_want[j] = sacc;
      db_scale[j] = smag + std::fabs(sacc);
      for (int64_t q = 0; q < k; ++q) {
        double acc = 0, mag = 0;
        for (int64_t i = 0; i < m; ++i) {
          const double p = dy_r[i * nr + j] * x[i * k + q];
          acc += p;
          mag += std::fabs(p);
        }
        dw_want[j * k + q] = acc;
        dw_scale[j * k + q] = mag + std::fabs(acc);
      }
    }
    Device xd(r, x, dt), wd(r, w_r, dt), dyd(r, dy_r, dt);
    Device dx(r, static_cast<size_t>(m * k), dt), dw(r, static_cast<size_t>(nr * k), dt), db(r, static_cast<size_t>(nr), dt);
    Stream s(r);
    DeviceBuffer ws = workspace(r);
    LinearBackward a;
    a.dy = dyd.buf.get();
    a.x = xd.buf.get();
    a.w = wd.buf.get();
    a.dx = dx.buf.get();
    a.dw = dw.buf.get();
    a.db = db.buf.get();
    a.m = m;
    a.n = nr;
    a.k = k;
    a.dtype = dt;
    a.comm_sms = comm_sms;  // the wgrad GEMM beside the dx all-reduce leaves that many SMs
    {
      DeviceGuard g(r);
      linear_backward(comm.get(), a, Workspace{ws.get(), ws.bytes()}, s.get());
    }
    const std::string who = tag + " rank " + std::to_string(r);
    expect_close(dx.read(m * k, dt, s.get()), dx_want, dx_scale, tolerance(dt), who + " dx (all-reduced)");
    expect_close(dw.read(nr * k, dt, s.get()), dw_want, dw_scale, tolerance(dt), who + " dw");
    expect_close(db.read(nr, dt, s.get()), db_want, db_scale, tolerance(dt), who + " db");
    comm->destroy();
  });
}

TEST(ColumnParallelBackwardGpu, DxAllReducedDwDbLocal) {
  TPEXT_REQUIRE_GPUS(1);
  const int n = tp_test_ranks();
  column_backward_case(n, 256, 96, 64, DataType::kFloat32);
  column_backward_case(n, 200, 130, 72, DataType::kBFloat16);
  column_backward_case(n, 200, 130, 72, DataType::kBFloat16, 16);
}

}  // namespace
}  // namespace tpext::core
