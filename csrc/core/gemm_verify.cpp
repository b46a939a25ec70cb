#include "gemm_verify.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "error.h"
#include "gemm_check.h"

namespace tpext::core {
namespace {

float from_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

double bfloat16_value(uint16_t v) { return from_bits(static_cast<uint32_t>(v) << 16); }

// IEEE binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits.
double float16_value(uint16_t v) {
  const int sign = v >> 15 ? -1 : 1;
  const int exponent = (v >> 10) & 0x1f;
  const int mantissa = v & 0x3ff;
  if (exponent == 0x1f) return mantissa ? std::nan("") : sign * INFINITY;
  if (exponent == 0) return sign * std::ldexp(mantissa, -24);  // subnormal: mantissa * 2^-14 / 2^10
  return sign * std::ldexp(1024 + mantissa, exponent - 25);
}

// The first rows of a row-major matrix with row stride `ld`, up to kSampleElements elements. Copied
// on `stream` and waited for there: a plain cudaMemcpy would go through the legacy default stream,
// which also waits for every blocking stream's work (a collective stuck on the comm stream, say).
std::vector<double> sample_rows(const void* p, int64_t rows, int64_t cols, int64_t ld, DataType dtype,
                                cudaStream_t stream) {
  const size_t es = element_size(dtype);
  const int64_t take = std::max<int64_t>(1, std::min<int64_t>(rows, static_cast<int64_t>(kSampleElements) / cols));
  std::vector<unsigned char> host(static_cast<size_t>(take * cols) * es);
  TPEXT_CUDA_CHECK(cudaMemcpy2DAsync(host.data(), static_cast<size_t>(cols) * es, p, static_cast<size_t>(ld) * es,
                                     static_cast<size_t>(cols) * es, static_cast<size_t>(take), cudaMemcpyDeviceToHost,
                                     stream));
  TPEXT_CUDA_CHECK(cudaStreamSynchronize(stream));
  return to_doubles(host.data(), dtype, static_cast<size_t>(take * cols));
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

void poison_outputs(const MatmulDesc& d, const MatmulPointers& p, cudaStream_t stream) {
  const size_t es = element_size(d.dtype);
  const size_t row_bytes = static_cast<size_t>(d.n) * es;
  TPEXT_CUDA_CHECK(cudaMemset2DAsync(p.d, static_cast<size_t>(d.ldd) * es, 0xff, row_bytes,
                                     static_cast<size_t>(d.m), stream));
  if (epilogue_writes_aux(d.epilogue))
    TPEXT_CUDA_CHECK(cudaMemset2DAsync(p.aux, static_cast<size_t>(d.ldaux) * es, 0xff, row_bytes,
                                       static_cast<size_t>(d.m), stream));
  if (epilogue_writes_bgrad(d.epilogue))
    TPEXT_CUDA_CHECK(cudaMemsetAsync(p.bgrad, 0xff, static_cast<size_t>(bgrad_length(d)) * es, stream));
}

OutputSample sample_outputs(const MatmulDesc& d, const MatmulPointers& p, cudaStream_t stream) {
  OutputSample s;
  s.d = sample_rows(p.d, d.m, d.n, d.ldd, d.dtype, stream);
  if (epilogue_writes_aux(d.epilogue)) s.aux = sample_rows(p.aux, d.m, d.n, d.ldaux, d.dtype, stream);
  if (epilogue_writes_bgrad(d.epilogue))
    s.bgrad = sample_rows(p.bgrad, 1, bgrad_length(d), bgrad_length(d), d.dtype, stream);
  return s;
}

std::vector<double> to_doubles(const void* host, DataType dtype, size_t n) {
  std::vector<double> out(n);
  switch (dtype) {
    case DataType::kFloat32: {
      const auto* v = static_cast<const float*>(host);
      for (size_t i = 0; i < n; ++i) out[i] = v[i];
      return out;
    }
    case DataType::kBFloat16: {
      const auto* v = static_cast<const uint16_t*>(host);
      for (size_t i = 0; i < n; ++i) out[i] = bfloat16_value(v[i]);
      return out;
    }
    case DataType::kFloat16: {
      const auto* v = static_cast<const uint16_t*>(host);
      for (size_t i = 0; i < n; ++i) out[i] = float16_value(v[i]);
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
