// Communicators live in a process-wide table and Python holds integer handles to them: torch
// custom ops take only tensors and scalars, and a handle that outlives tpext.destroy() must fail
// with a clear message instead of touching freed memory.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "core/communicator.h"

namespace tpext::adapter {

int64_t register_communicator(std::unique_ptr<core::Communicator> comm);
// Throws core::InvalidArgument naming `what` when the handle is unknown or was released.
std::shared_ptr<core::Communicator> lookup_communicator(int64_t handle, const char* what);
// Removes the handle; returns the communicator so the caller decides between destroy and abort.
std::shared_ptr<core::Communicator> release_communicator(int64_t handle);
std::vector<int64_t> live_handles();

}  // namespace tpext::adapter
