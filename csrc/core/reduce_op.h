// Reductions the collectives accept, and their NCCL names. Parsed from the strings the Python
// layer uses ("sum", "max", "min", "avg", "prod") so one spelling holds everywhere.
#pragma once

#include <string>

#include <nccl.h>

#include "dtype.h"

namespace tpext::core {

enum class ReduceOp { kSum, kProd, kMax, kMin, kAvg };

ReduceOp parse_reduce_op(const std::string& name);  // InvalidArgument naming `op` if unknown
const char* reduce_op_name(ReduceOp op);
// NCCL's op for `op` on `dt`; InvalidArgument if the pair is not supported (avg on integers).
ncclRedOp_t to_nccl(ReduceOp op, DataType dt);

}  // namespace tpext::core
