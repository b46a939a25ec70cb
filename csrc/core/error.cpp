#include "error.h"

namespace tpext::core {

void throw_cuda_error(cudaError_t result, const char* call, const std::string& context) {
  std::string msg = "tpext CUDA error: ";
  msg += call;
  msg += " failed with ";
  msg += cudaGetErrorName(result);
  msg += " (";
  msg += cudaGetErrorString(result);
  msg += ")";
  if (!context.empty()) msg += " in " + context;
  // Clear the sticky-free error state so the next call does not report this one again.
  (void)cudaGetLastError();
  throw CudaError(msg, result);
}

void throw_invalid_argument(const std::string& msg) { throw InvalidArgument(msg); }

}  // namespace tpext::core
