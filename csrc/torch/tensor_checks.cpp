#include "tensor_checks.h"

#include <string>

#include "core/error.h"

namespace tpext::adapter {

std::string arg_prefix(const char* op, const char* arg) { return std::string(op) + ": " + arg + ": "; }

core::DataType to_core_dtype(at::ScalarType t, const char* op, const char* arg) {
  switch (t) {
    case at::kFloat: return core::DataType::kFloat32;
    case at::kDouble: return core::DataType::kFloat64;
    case at::kHalf: return core::DataType::kFloat16;
    case at::kBFloat16: return core::DataType::kBFloat16;
    case at::kChar: return core::DataType::kInt8;
    case at::kByte: return core::DataType::kUInt8;
    case at::kInt: return core::DataType::kInt32;
    case at::kLong: return core::DataType::kInt64;
    default: break;
  }
  core::throw_invalid_argument(arg_prefix(op, arg) +
                               "expected dtype float32, float64, float16, bfloat16, int8, uint8, int32 or int64, got " +
                               std::string(c10::toString(t)));
}

void check_collective_tensor(const at::Tensor& t, const core::Communicator& comm, const char* op, const char* arg) {
  // The prefix is built only on a failure: this runs on every collective call.
  auto where = [&] { return arg_prefix(op, arg); };
  if (!t.defined()) core::throw_invalid_argument(where() + "expected a tensor, got an undefined one");
  if (!t.is_cuda())
    core::throw_invalid_argument(where() + "expected a CUDA tensor on cuda:" + std::to_string(comm.device()) +
                                 " (the device of " + comm.describe() + "), got a tensor on " + t.device().str());
  if (t.get_device() != comm.device())
    core::throw_invalid_argument(where() + "expected a tensor on cuda:" + std::to_string(comm.device()) + " (the device of " +
                                 comm.describe() + "), got one on " + t.device().str());
  if (!t.is_contiguous())
    core::throw_invalid_argument(where() + "expected a contiguous tensor, got strides " + c10::str(t.strides()) +
                                 " for sizes " + c10::str(t.sizes()) + "; call .contiguous() first");
  (void)to_core_dtype(t.scalar_type(), op, arg);
}

int64_t normalize_dim(int64_t dim, const at::Tensor& t, const char* op, const char* arg) {
  const int64_t nd = t.dim();
  if (nd == 0) core::throw_invalid_argument(arg_prefix(op, arg) + "expected a tensor with at least one dimension, got a scalar");
  if (dim < -nd || dim >= nd)
    core::throw_invalid_argument(std::string(op) + ": dim: expected a dimension in [" + std::to_string(-nd) + ", " +
                                 std::to_string(nd) + ") for a " + std::to_string(nd) + "-d tensor, got " + std::to_string(dim));
  return dim < 0 ? dim + nd : dim;
}

}  // namespace tpext::adapter
