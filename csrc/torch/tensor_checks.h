// Argument checks that turn a wrong tensor into an exception naming the argument and what was
// expected, before anything is enqueued.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "core/communicator.h"
#include "core/dtype.h"

namespace tpext::adapter {

// "op: arg: ", the start of every argument error the ops raise.
std::string arg_prefix(const char* op, const char* arg);

core::DataType to_core_dtype(at::ScalarType t, const char* op, const char* arg);

// `t` is a contiguous CUDA tensor on the communicator's device with a dtype the collectives move.
void check_collective_tensor(const at::Tensor& t, const core::Communicator& comm, const char* op, const char* arg);

// Normalises a possibly negative dimension against `t`; ValueError naming `arg` when out of range.
int64_t normalize_dim(int64_t dim, const at::Tensor& t, const char* op, const char* arg);

}  // namespace tpext::adapter
