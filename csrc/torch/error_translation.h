// Core exceptions crossing into torch ops become torch's typed errors, which the dispatcher
// turns into Python exceptions: bad input -> ValueError, everything else -> RuntimeError carrying
// the core's message (which already names the op, the communicator and NCCL's words).
#pragma once

#include <c10/util/Exception.h>

#include "core/error.h"

#define TPEXT_TRANSLATE_ERRORS(...)                                   \
  try {                                                               \
    __VA_ARGS__;                                                           \
  } catch (const ::tpext::core::InvalidArgument& e_) {                \
    TORCH_CHECK_VALUE(false, e_.what());                              \
  } catch (const ::tpext::core::Error& e_) {                          \
    TORCH_CHECK(false, e_.what());                                    \
  }
