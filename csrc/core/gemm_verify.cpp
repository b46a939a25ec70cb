#include "gemm_verify.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "error.h"
#include "gemm_check.h"

namespace tpext::core {
namespace {

// Enqueues on `stream` the copy of the first rows of a row-major matrix with row stride `ld`, up
// to kSampleElements elements, into `host` (resized); returns the element count.
size_t enqueue_sample(const void* p, int64_t rows, int64_t cols, int64_t ld, DataType dtype,
                      std::vector<unsigned char>& host, cudaStream_t stream) {
  const size_t es = element_size(dtype);
  const int64_t take = std::max<int64_t>(1, std::min<int64_t>(rows, static_cast<int64_t>(kSampleElements) / cols));
  host.resize(static_cast<size_t>(take * cols) * es);
  TPEXT_CUDA_CHECK(cudaMemcpy2DAsync(host.data(), static_cast<size_t>(cols) * es, p, static_cast<size_t>(ld) * es,
                                     static_cast<size_t>(cols) * es, static_cast<size_t>(take), cudaMemcpyDeviceToHost,
                                     stream));
  return static_cast<size_t>(take * cols);
}

bool output_agrees(const std::vector<double>& got, const std::vector<double>& ref, double tolerance) {
  if (got.size() != ref.size()) return false;
  double scale = 0.0;
  for (double r : ref)
    if (std::isfinite(r)) scale = std::max(scale, std::fabs(r));
  const double bound = tolerance * scale;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(ref[i])) continue;  // the first choice's own overflow says nothing of the candidate
    if (!(std::fabs(got[i] - ref[i]) <= bound)) return false;  // NaN fails here too
  }
  return true;
}

}  // namespace

void fill_outputs(const MatmulDesc& d, const MatmulPointers& p, int byte, cudaStream_t stream) {
  const size_t es = element_size(d.dtype);
  const size_t row_bytes = static_cast<size_t>(d.n) * es;
  const size_t rows = static_cast<size_t>(d.m);
  if (!d.accumulate)
    TPEXT_CUDA_CHECK_CTX(cudaMemset2DAsync(p.d, static_cast<size_t>(d.ldd) * es, byte, row_bytes, rows, stream),
                         describe(d));
  if (epilogue_writes_aux(d.epilogue))
    TPEXT_CUDA_CHECK_CTX(cudaMemset2DAsync(p.aux, static_cast<size_t>(d.ldaux) * es, byte, row_bytes, rows, stream),
                         describe(d));
  if (epilogue_writes_bgrad(d.epilogue))
    TPEXT_CUDA_CHECK_CTX(cudaMemsetAsync(p.bgrad, byte, static_cast<size_t>(bgrad_length(d)) * es, stream),
                         describe(d));
}

OutputSample sample_outputs(const MatmulDesc& d, const MatmulPointers& p, cudaStream_t stream) {
  // Copied on `stream` and waited for there, once for all three: a plain cudaMemcpy would go
  // through the legacy default stream, which also waits for every blocking stream's work (a
  // collective stuck on the comm stream, say).
  std::vector<unsigned char> d_bytes, aux_bytes, bgrad_bytes;
  const size_t d_n = enqueue_sample(p.d, d.m, d.n, d.ldd, d.dtype, d_bytes, stream);
  const size_t aux_n =
      epilogue_writes_aux(d.epilogue) ? enqueue_sample(p.aux, d.m, d.n, d.ldaux, d.dtype, aux_bytes, stream) : 0;
  const int64_t bgrad_len = bgrad_length(d);
  const size_t bgrad_n = epilogue_writes_bgrad(d.epilogue)
                             ? enqueue_sample(p.bgrad, 1, bgrad_len, bgrad_len, d.dtype, bgrad_bytes, stream)
                             : 0;
  TPEXT_CUDA_CHECK(cudaStreamSynchronize(stream));
  return {to_doubles(d_bytes.data(), d.dtype, d_n), to_doubles(aux_bytes.data(), d.dtype, aux_n),
          to_doubles(bgrad_bytes.data(), d.dtype, bgrad_n)};
}

std::vector<double> to_doubles(const void* host, DataType dtype, size_t n) {
  std::vector<double> out(n);
  switch (dtype) {
    case DataType::kFloat32: {
      const auto* v = static_cast<const float*>(host);
      for (size_t i = 0; i < n; ++i) out[i] = v[i];
      return out;
    }
    case DataType::kBFloat16: {  // CUDA's own host conversions (cuda_bf16.h, cuda_fp16.h)
      const auto* v = static_cast<const __nv_bfloat16*>(host);
      for (size_t i = 0; i < n; ++i) out[i] = __bfloat162float(v[i]);
      return out;
    }
    case DataType::kFloat16: {
      const auto* v = static_cast<const __half*>(host);
      for (size_t i = 0; i < n; ++i) out[i] = __half2float(v[i]);
      return out;
    }
    default: break;
  }
  throw_invalid_argument(std::string("to_doubles: dtype: expected float32, bfloat16 or float16, got ") +
                         dtype_name(dtype));
}

double agreement_tolerance(const MatmulDesc& d) {
  // A few units in the last place of the output type at the largest magnitude: bfloat16 keeps 8
  // significant bits, float16 11, TF32 inputs 11; float32 accumulated in another order differs by
  // far less than 1e-4 of the largest element at any k these layers see.
  // GELU's epilogues evaluate tanh approximately (~2^-11 relative in float32, GemmGpu's bounds),
  // and two kernels need not do it alike.
  const bool gelu = d.epilogue != Epilogue::kNone && d.epilogue != Epilogue::kBias && d.epilogue != Epilogue::kBgrad;
  switch (d.dtype) {
    case DataType::kBFloat16: return 2e-2;
    case DataType::kFloat16: return 4e-3;
    default: return d.allow_tf32 || gelu ? 4e-3 : 1e-4;
  }
}

bool samples_agree(const OutputSample& got, const OutputSample& ref, double tolerance) {
  return output_agrees(got.d, ref.d, tolerance) && output_agrees(got.aux, ref.aux, tolerance) &&
         output_agrees(got.bgrad, ref.bgrad, tolerance);
}

}  // namespace tpext::core
