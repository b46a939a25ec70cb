// One collective as a test case: what every rank sends, what each rank must receive (computed on
// the host in double), and one rank's device buffers for it. Shared by the grouped (one thread
// drives every GPU) and the per-thread (one thread per rank) suites, so both check the very same
// arithmetic.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "comm_test_util.h"
#include "core/collective.h"
#include "core/device_guard.h"
#include "core/dtype.h"
#include "core/reduce_op.h"

namespace tpext::testing {

using core::Collective;
using core::CollectiveKind;
using core::ReduceOp;

struct CollectiveCase {
  CollectiveKind kind = CollectiveKind::kAllReduce;
  DataType dtype = DataType::kFloat32;
  ReduceOp op = ReduceOp::kSum;
  int root = 0;
  size_t count = 0;  // NCCL's meaning, as in core::Collective
  bool in_place = false;
};

inline std::string describe(const CollectiveCase& c) {
  std::string s = std::string(core::collective_name(c.kind)) + " " + core::dtype_name(c.dtype);
  if (c.kind == CollectiveKind::kAllReduce || c.kind == CollectiveKind::kReduceScatter)
    s += std::string(" op=") + core::reduce_op_name(c.op);
  if (c.kind == CollectiveKind::kBroadcast) s += " root=" + std::to_string(c.root);
  return s + " count=" + std::to_string(c.count) + (c.in_place ? " in-place" : " out-of-place");
}

inline size_t send_elems(const CollectiveCase& c, int n) {
  return c.kind == CollectiveKind::kReduceScatter ? c.count * static_cast<size_t>(n) : c.count;
}
inline size_t recv_elems(const CollectiveCase& c, int n) {
  return c.kind == CollectiveKind::kAllGather ? c.count * static_cast<size_t>(n) : c.count;
}

inline bool reduces(const CollectiveCase& c) {
  return c.kind == CollectiveKind::kAllReduce || c.kind == CollectiveKind::kReduceScatter;
}

// Sums and averages in fp16/bf16/integers use small integers so that the sum is exact and the
// comparison can be too; fp32/fp64 sums use fractional values and a rounding bound instead.
inline bool exact_sum_inputs(DataType dt) { return dt != DataType::kFloat32 && dt != DataType::kFloat64; }

// What every rank sends, inputs[rank], each exactly representable in c.dtype. Deterministic in
// `seed`, so threads that each need every rank's inputs can regenerate them.
inline std::vector<std::vector<double>> make_inputs(const CollectiveCase& c, int n, uint32_t seed) {
  std::vector<std::vector<double>> inputs(n);
  const size_t elems = send_elems(c, n);
  for (int r = 0; r < n; ++r) {
    const uint32_t s = seed * 7919u + static_cast<uint32_t>(r) * 104729u + 1u;
    if (!reduces(c) || c.op == ReduceOp::kMax || c.op == ReduceOp::kMin) {
      inputs[r] = rounded_random(elems, c.dtype, s);
    } else if (c.op == ReduceOp::kProd) {
      inputs[r] = signed_ones_and_twos(elems, s);
    } else if (exact_sum_inputs(c.dtype)) {
      inputs[r] = small_integers(elems, 8, s);
    } else {
      inputs[r] = rounded_random(elems, c.dtype, s);
    }
  }
  return inputs;
}

struct Expected {
  std::vector<double> value;
  std::vector<double> tol;
};

// Reduction of one element over ranks, with the largest error NCCL may make in c.dtype:
// - max/min/prod (of powers of two) and sums of small integers are exact;
// - an fp32/fp64 sum in any order is within (n-1) roundings of the partial sums, bounded by
//   n * eps * sum|x|;
// - avg multiplies each input by 1/n in the element type, then sums: each product and each partial
//   sum adds a rounding, bounded by (n+1) * eps * sum|x| / n, plus the final rounding eps*|avg|.
inline void reduce_column(const CollectiveCase& c, const std::vector<double>& xs, double* value, double* tol) {
  const double n = static_cast<double>(xs.size());
  const double eps = machine_epsilon(c.dtype);
  double sum = 0, abs_sum = 0, prod = 1, mx = xs[0], mn = xs[0];
  for (double x : xs) {
    sum += x;
    abs_sum += std::fabs(x);
    prod *= x;
    mx = std::max(mx, x);
    mn = std::min(mn, x);
  }
  *tol = 0;
  switch (c.op) {
    case ReduceOp::kSum:
      *value = sum;
      if (!exact_sum_inputs(c.dtype)) *tol = n * eps * abs_sum;
      break;
    case ReduceOp::kProd: *value = prod; break;
    case ReduceOp::kMax: *value = mx; break;
    case ReduceOp::kMin: *value = mn; break;
    case ReduceOp::kAvg:
      *value = sum / n;
      *tol = (n + 1) * eps * abs_sum / n + eps * std::fabs(*value);
      break;
  }
}

// What rank `rank` holds after the collective.
inline Expected reference(const CollectiveCase& c, int rank, const std::vector<std::vector<double>>& inputs) {
  const int n = static_cast<int>(inputs.size());
  Expected out;
  out.value.resize(recv_elems(c, n));
  out.tol.assign(out.value.size(), 0.0);
  std::vector<double> column(n);
  switch (c.kind) {
    case CollectiveKind::kAllReduce:
    case CollectiveKind::kReduceScatter: {
      // reduce_scatter: rank r owns block r of every rank's input.
      const size_t base = c.kind == CollectiveKind::kReduceScatter ? static_cast<size_t>(rank) * c.count : 0;
      for (size_t i = 0; i < c.count; ++i) {
        for (int q = 0; q < n; ++q) column[q] = inputs[q][base + i];
        reduce_column(c, column, &out.value[i], &out.tol[i]);
      }
      break;
    }
    case CollectiveKind::kAllGather:
      for (int q = 0; q < n; ++q) std::copy(inputs[q].begin(), inputs[q].end(), out.value.begin() + q * c.count);
      break;
    case CollectiveKind::kBroadcast: out.value = inputs[c.root]; break;
  }
  return out;
}

// One rank's device side of a case on `stream`: the output is poisoned and the input uploaded on
// that stream, so the collective that follows on it must be ordered after both.
//
// In place follows NCCL: all_reduce / broadcast use one buffer; all_gather sends from block `rank`
// of the output; reduce_scatter receives into block `rank` of the input.
class RankBuffers {
 public:
  RankBuffers(const CollectiveCase& c, int rank, int n, int device, const std::vector<double>& input,
              cudaStream_t stream)
      : device_(device), dtype_(c.dtype), input_(encode(input, c.dtype)) {
    const size_t e = core::element_size(c.dtype);
    const size_t send_bytes = send_elems(c, n) * e;
    recv_bytes_ = recv_elems(c, n) * e;
    core::DeviceGuard guard(device);
    coll_.kind = c.kind;
    coll_.count = c.count;
    coll_.dtype = c.dtype;
    coll_.op = c.op;
    coll_.root = c.root;
    if (!c.in_place) {
      send_ = DeviceBuffer(device, send_bytes);
      recv_ = DeviceBuffer(device, recv_bytes_);
      TPEXT_CUDA_CHECK(cudaMemsetAsync(recv_.get(), poison_byte(c.dtype), recv_bytes_, stream));
      TPEXT_CUDA_CHECK(cudaMemcpyAsync(send_.get(), input_.data(), send_bytes, cudaMemcpyHostToDevice, stream));
      coll_.send = send_.get();
      coll_.recv = recv_.get();
      return;
    }
    const size_t block = c.count * e;
    const size_t total = std::max(send_bytes, recv_bytes_);
    recv_ = DeviceBuffer(device, total);
    TPEXT_CUDA_CHECK(cudaMemsetAsync(recv_.get(), poison_byte(c.dtype), total, stream));
    const size_t send_offset = c.kind == CollectiveKind::kAllGather ? rank * block : 0;
    const size_t recv_offset = c.kind == CollectiveKind::kReduceScatter ? rank * block : 0;
    TPEXT_CUDA_CHECK(
        cudaMemcpyAsync(recv_.at(send_offset), input_.data(), send_bytes, cudaMemcpyHostToDevice, stream));
    coll_.send = recv_.at(send_offset);
    coll_.recv = recv_.at(recv_offset);
  }

  const Collective& collective() const { return coll_; }

  // The output, read back on `stream` (so after the collective), decoded.
  std::vector<double> result(cudaStream_t stream) const {
    core::DeviceGuard guard(device_);
    std::vector<unsigned char> bytes(recv_bytes_);
    if (!bytes.empty()) {
      TPEXT_CUDA_CHECK(cudaMemcpyAsync(bytes.data(), coll_.recv, recv_bytes_, cudaMemcpyDeviceToHost, stream));
      TPEXT_CUDA_CHECK(cudaStreamSynchronize(stream));
    }
    return decode(bytes, dtype_);
  }

  // Out of place only: the input must come back unchanged.
  ::testing::AssertionResult input_untouched(cudaStream_t stream) const {
    core::DeviceGuard guard(device_);
    std::vector<unsigned char> bytes(input_.size());
    if (!bytes.empty()) {
      TPEXT_CUDA_CHECK(cudaMemcpyAsync(bytes.data(), send_.get(), bytes.size(), cudaMemcpyDeviceToHost, stream));
      TPEXT_CUDA_CHECK(cudaStreamSynchronize(stream));
    }
    return same_bytes(bytes.data(), input_.data(), bytes.size());
  }

 private:
  int device_;
  DataType dtype_;
  std::vector<unsigned char> input_;  // kept alive until the upload is surely done
  size_t recv_bytes_ = 0;
  DeviceBuffer send_;
  DeviceBuffer recv_;
  Collective coll_;
};

// Compares what rank `rank` got with the host reference.
inline void expect_rank_result(const CollectiveCase& c, int rank, const std::vector<std::vector<double>>& inputs,
                               const RankBuffers& buffers, cudaStream_t stream) {
  const int n = static_cast<int>(inputs.size());
  const Expected want = reference(c, rank, inputs);
  EXPECT_TRUE(all_close(buffers.result(stream), want.value, want.tol))
      << describe(c) << ", rank " << rank << " of " << n;
  if (!c.in_place) {
    EXPECT_TRUE(buffers.input_untouched(stream)) << describe(c) << ", rank " << rank << ": the input was written";
  }
}

}  // namespace tpext::testing
