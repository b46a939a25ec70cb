// Element types the core moves and multiplies. One enum for both NCCL and cuBLASLt, so the
// adapter converts a tensor's dtype once.
#pragma once

#include <cstddef>
#include <string>

#include <nccl.h>

namespace tpext::core {

enum class DataType { kFloat32, kFloat64, kFloat16, kBFloat16, kInt8, kUInt8, kInt32, kInt64 };

size_t element_size(DataType dt);
const char* dtype_name(DataType dt);
ncclDataType_t to_nccl(DataType dt);
bool is_floating(DataType dt);

}  // namespace tpext::core
