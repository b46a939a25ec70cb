// Checking one cuBLASLt algorithm's results against another's before the autotuner may keep it.
// The heuristic's lower-ranked algorithms are not all right for every problem (float16 bias
// gradients of one column wrote one element of m on 2 H200s, bench/NOTES.md attempt 5), so a
// candidate is only chosen after its outputs (a sample of D, the aux output, every bias-gradient
// element) agreed with the first choice's on the same operands, each output first filled with
// NaN so that an element it leaves unwritten cannot pass. Not public API.
#pragma once

#include <cstddef>
#include <vector>

#include <cuda_runtime_api.h>

#include "gemm.h"

namespace tpext::core {

// Host copies of what a GEMM wrote, as doubles: the first rows of D (and of the aux output) up to
// about kSampleElements elements, and the whole bias gradient.
struct OutputSample {
  std::vector<double> d, aux, bgrad;
};
constexpr size_t kSampleElements = size_t{1} << 16;

// Fills every element the GEMM writes with `byte` on `stream`: D (unless it accumulates into D,
// which is then an input), the aux output and the bias gradient, row by row (padding untouched).
// Byte 0 is +0.0 in float32, bfloat16 and float16 alike (matmul's empty product, k == 0); 0xff is
// NaN in all three. `desc` is resolved. CUDA failures throw CudaError naming the GEMM.
void fill_outputs(const MatmulDesc& desc, const MatmulPointers& ptrs, int byte, cudaStream_t stream);

// fill_outputs with NaN: what the tuner does before each candidate runs.
inline void poison_outputs(const MatmulDesc& desc, const MatmulPointers& ptrs, cudaStream_t stream) {
  fill_outputs(desc, ptrs, 0xff, stream);
}

// Copies the sample on `stream` and waits for it there. `desc` is resolved.
OutputSample sample_outputs(const MatmulDesc& desc, const MatmulPointers& ptrs, cudaStream_t stream);

// `n` elements of `dtype` (float32, bfloat16 or float16) in host memory, as doubles.
std::vector<double> to_doubles(const void* host, DataType dtype, size_t n);

// How far two correct algorithms' outputs may differ, relative to the largest reference magnitude
// of that output: both accumulate in float32 in different orders, then round to the output type.
double agreement_tolerance(const MatmulDesc& desc);

// Whether every element of `got` is within tolerance * max|ref| of `ref`, output by output (a NaN
// or infinity where the reference is finite never is; sizes must match).
bool samples_agree(const OutputSample& got, const OutputSample& ref, double tolerance);

}  // namespace tpext::core
