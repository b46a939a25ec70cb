#include "reduce_op.h"

#include "error.h"

namespace tpext::core {

ReduceOp parse_reduce_op(const std::string& name) {
  if (name == "sum") return ReduceOp::kSum;
  if (name == "prod" || name == "product") return ReduceOp::kProd;
  if (name == "max") return ReduceOp::kMax;
  if (name == "min") return ReduceOp::kMin;
  if (name == "avg" || name == "mean") return ReduceOp::kAvg;
  throw_invalid_argument("op: expected one of 'sum', 'prod', 'max', 'min', 'avg', got '" + name + "'");
}

const char* reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return "sum";
    case ReduceOp::kProd: return "prod";
    case ReduceOp::kMax: return "max";
    case ReduceOp::kMin: return "min";
    case ReduceOp::kAvg: return "avg";
  }
  return "unknown";
}

ncclRedOp_t to_nccl(ReduceOp op, DataType dt) {
  switch (op) {
    case ReduceOp::kSum: return ncclSum;
    case ReduceOp::kProd: return ncclProd;
    case ReduceOp::kMax: return ncclMax;
    case ReduceOp::kMin: return ncclMin;
    case ReduceOp::kAvg:
      // NCCL divides in the element type; for integers that silently truncates, which a user
      // asking for a mean would not expect.
      if (!is_floating(dt))
        throw_invalid_argument(std::string("op: 'avg' needs a floating-point dtype, got ") + dtype_name(dt));
      return ncclAvg;
  }
  throw_invalid_argument("op: unknown ReduceOp value " + std::to_string(static_cast<int>(op)));
}

}  // namespace tpext::core
