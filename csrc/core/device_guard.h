// Makes `device` current for a scope and restores the caller's device on exit: the core is called
// from threads whose current device belongs to the caller, and NCCL/cuBLAS calls need their own.
#pragma once

#include <cuda_runtime_api.h>

#include "error.h"

namespace tpext::core {

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    TPEXT_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) TPEXT_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() {
    int now = previous_;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) (void)cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace tpext::core
