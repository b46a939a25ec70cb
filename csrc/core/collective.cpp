#include "collective.h"

#include <limits>

#include "error.h"

namespace tpext::core {

const char* collective_name(CollectiveKind kind) {
  switch (kind) {
    case CollectiveKind::kAllReduce: return "all_reduce";
    case CollectiveKind::kAllGather: return "all_gather";
    case CollectiveKind::kReduceScatter: return "reduce_scatter";
    case CollectiveKind::kBroadcast: return "broadcast";
  }
  return "unknown";
}

void validate(const Collective& c, int comm_size, const std::function<std::string()>& where) {
  const auto prefix = [&] { return std::string(collective_name(c.kind)) + " on " + where() + ": "; };
  // Throws for an unknown dtype value.
  const size_t elem = element_size(c.dtype);
  if (comm_size <= 0)
    throw_invalid_argument(prefix() + "size: expected a communicator of at least one rank, got " + std::to_string(comm_size));
  const bool scaled = c.kind == CollectiveKind::kAllGather || c.kind == CollectiveKind::kReduceScatter;
  const size_t ranks = scaled ? static_cast<size_t>(comm_size) : 1;
  if (c.count > std::numeric_limits<size_t>::max() / elem / ranks)
    throw_invalid_argument(prefix() + "count: " + std::to_string(c.count) + " elements" +
                           (scaled ? " times " + std::to_string(comm_size) + " ranks" : std::string()) +
                           " overflows size_t bytes");
  if (c.count > 0) {
    if (c.send == nullptr) throw_invalid_argument(prefix() + "send: expected a device pointer, got null");
    if (c.recv == nullptr) throw_invalid_argument(prefix() + "recv: expected a device pointer, got null");
  }
  if (c.kind == CollectiveKind::kBroadcast && (c.root < 0 || c.root >= comm_size))
    throw_invalid_argument(prefix() + "root: expected a rank in [0, " + std::to_string(comm_size) + "), got " +
                           std::to_string(c.root));
  if ((c.kind == CollectiveKind::kAllReduce || c.kind == CollectiveKind::kReduceScatter) && c.op == ReduceOp::kAvg &&
      !is_floating(c.dtype))
    // NCCL would divide in the integer type and silently truncate.
    throw_invalid_argument(prefix() + "op: 'avg' needs a floating-point dtype, got " + dtype_name(c.dtype));
}

size_t input_bytes(const Collective& c, int comm_size) {
  const size_t elem = element_size(c.dtype);
  if (c.kind == CollectiveKind::kReduceScatter) return c.count * elem * static_cast<size_t>(comm_size);
  return c.count * elem;
}

}  // namespace tpext::core
