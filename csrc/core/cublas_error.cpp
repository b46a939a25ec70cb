#include "cublas_error.h"

namespace tpext::core {

void throw_cublas_error(cublasStatus_t status, const char* call, const std::string& what) {
  std::string msg = "tpext cuBLASLt error: ";
  msg += call;
  msg += " failed with ";
  msg += cublasLtGetStatusName(status);
  msg += " (";
  msg += cublasLtGetStatusString(status);
  msg += ")";
  if (!what.empty()) msg += " in " + what;
  throw CublasError(msg, status);
}

}  // namespace tpext::core
