// Errors raised by the torch-free core. Each carries the whole story in what(): the operation,
// the communicator it ran on, the sizes, and NCCL's or CUDA's own words, so that a user reading
// one line knows what to fix. The adapter maps the classes onto Python exception types.
#pragma once

#include <stdexcept>
#include <string>

#include <cuda_runtime_api.h>
#include <nccl.h>

namespace tpext::core {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Bad input detected before anything was enqueued (maps to ValueError).
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

// An NCCL call failed; result() is the ncclResult_t it returned.
class NcclError : public Error {
 public:
  NcclError(const std::string& msg, ncclResult_t result) : Error(msg), result_(result) {}
  ncclResult_t result() const { return result_; }

 private:
  ncclResult_t result_;
};

// A CUDA runtime call failed.
class CudaError : public Error {
 public:
  CudaError(const std::string& msg, cudaError_t result) : Error(msg), result_(result) {}
  cudaError_t result() const { return result_; }

 private:
  cudaError_t result_;
};

// A deadline passed (communicator init, a collective that never completed); the communicator
// involved has been aborted by the time this is thrown.
class Timeout : public Error {
 public:
  using Error::Error;
};

// Used on a communicator after destroy() or abort().
class Destroyed : public Error {
 public:
  using Error::Error;
};

[[noreturn]] void throw_cuda_error(cudaError_t result, const char* call, const std::string& context);

inline void check_cuda(cudaError_t result, const char* call, const std::string& context = {}) {
  if (result != cudaSuccess) throw_cuda_error(result, call, context);
}

[[noreturn]] void throw_invalid_argument(const std::string& msg);

}  // namespace tpext::core

#define TPEXT_CUDA_CHECK(expr) ::tpext::core::check_cuda((expr), #expr)
// `ctx` (often a describe() that builds a string) is evaluated only when the call failed: these
// checks sit on the per-collective path.
#define TPEXT_CUDA_CHECK_CTX(expr, ctx)                                  \
  do {                                                                   \
    const cudaError_t tpext_r_ = (expr);                                 \
    if (tpext_r_ != cudaSuccess) ::tpext::core::check_cuda(tpext_r_, #expr, (ctx)); \
  } while (0)
