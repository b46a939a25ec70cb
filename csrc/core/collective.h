// One collective call described as data, so the same validation, statistics and launch path serve
// a single communicator and a group of them driven from one thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

#include "dtype.h"
#include "reduce_op.h"

namespace tpext::core {

enum class CollectiveKind { kAllReduce = 0, kAllGather, kReduceScatter, kBroadcast };
constexpr int kNumCollectiveKinds = 4;

const char* collective_name(CollectiveKind kind);

// `count` follows NCCL: all_reduce / broadcast: elements in send and in recv; all_gather: elements
// each rank sends (recv holds size * count); reduce_scatter: elements each rank receives (send
// holds size * count). `root` is used by broadcast only.
struct Collective {
  CollectiveKind kind = CollectiveKind::kAllReduce;
  const void* send = nullptr;
  void* recv = nullptr;
  size_t count = 0;
  DataType dtype = DataType::kFloat32;
  ReduceOp op = ReduceOp::kSum;
  int root = 0;
  // Runs beside a GEMM of the caller's (a row-parallel piece before the last, the column-parallel
  // dx beside the wgrad GEMM): goes through the CTA-capped twin when the communicator has one
  // (CommOptions::overlap_max_ctas). The others run alone and take every CTA NCCL wants.
  bool beside_gemm = false;
};

// Throws InvalidArgument naming the field when `c` cannot run on a communicator of `comm_size`.
// `where` (the communicator's description) is called only to word a failure: this runs before
// every collective.
void validate(const Collective& c, int comm_size, const std::function<std::string()>& where);

// Bytes this rank hands to the network layer for `c` (its input), the figure the stats report.
size_t input_bytes(const Collective& c, int comm_size);

}  // namespace tpext::core
