// What each epilogue reads and writes, and the checks matmul runs before it touches CUDA.
// Shared by the matmul pieces (gemm.cpp, gemm_plan.cpp, gemm_cache.cpp); not public API.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "gemm.h"

namespace tpext::core {

bool epilogue_reads_bias(Epilogue e);   // kBias, kBiasGelu, kBiasGeluAux
bool epilogue_writes_aux(Epilogue e);   // kGeluAux, kBiasGeluAux
bool epilogue_reads_aux(Epilogue e);    // kDGelu, kDGeluBgrad
bool epilogue_writes_bgrad(Epilogue e); // kBgrad, kDGeluBgrad
inline bool epilogue_uses_aux(Epilogue e) {
  return epilogue_writes_aux(e) || epilogue_reads_aux(e);
}

// Whether matmul() gives the bias gradient (kBgrad, BGRADB) of a problem with n columns (our D's:
// the local input features of a wgrad) in this dtype. Not with n = 0: no GEMM runs, and nothing
// would write it. Not for float16 with n = 1: on H200 with CUDA 13.0's cuBLASLt it writes the
// first of the m gradient elements only, with the heuristic's first choice as with others (tests/cpp
// GemmGpu.BiasGradientOfThinWgradGemms); bfloat16, float32 and n >= 2 were right. validate_matmul
// rejects both; callers sum the bias gradient separately there.
bool bgrad_epilogue_supported(DataType dtype, int64_t n);

// Elements in bgrad: m for kBgrad (one per row of op(A)), n for kDGeluBgrad (one per column
// of D), 0 for the others.
int64_t bgrad_length(const MatmulDesc& desc);

// `desc` with every 0 leading dimension replaced by the stored row length, and ldaux by 0 when
// the epilogue has no aux (so it cannot split the plan cache). Call on a validated desc.
MatmulDesc with_resolved_leading_dims(const MatmulDesc& desc);

// Throws InvalidArgument naming the field and the expectation. Makes no CUDA call, so every
// rejection also works on a machine without a GPU.
void validate_matmul(const MatmulDesc& desc, const MatmulPointers& ptrs, const void* workspace,
                     size_t workspace_bytes);

// "matmul m=.. n=.. k=.. trans_a=.. trans_b=.. lda=.. ldb=.. ldd=.. ldaux=.. dtype=..
// epilogue=.. accumulate=.. allow_tf32=.." for error messages.
std::string describe(const MatmulDesc& desc);

}  // namespace tpext::core
