// cuBLAS(Lt) failures as exceptions. The message carries the call, cuBLAS's status name and
// words, and the GEMM it was for (shape, dtype, epilogue), so one line tells what failed.
#pragma once

#include <string>

#include <cublasLt.h>

#include "error.h"

namespace tpext::core {

class CublasError : public Error {
 public:
  CublasError(const std::string& msg, cublasStatus_t status) : Error(msg), status_(status) {}
  cublasStatus_t status() const { return status_; }

 private:
  cublasStatus_t status_;
};

// `what` describes the operation, e.g. "matmul m=.. n=.. k=.. dtype=..".
[[noreturn]] void throw_cublas_error(cublasStatus_t status, const char* call,
                                     const std::string& what);

}  // namespace tpext::core

// `what` is evaluated only on failure: formatting the shape on every successful call would
// cost more than some of the GEMMs it describes.
#define TPEXT_CUBLAS_CHECK(expr, what)                                            \
  do {                                                                            \
    const cublasStatus_t tpext_status_ = (expr);                                  \
    if (tpext_status_ != CUBLAS_STATUS_SUCCESS)                                   \
      ::tpext::core::throw_cublas_error(tpext_status_, #expr, (what));            \
  } while (0)
