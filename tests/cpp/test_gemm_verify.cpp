// The arithmetic of the autotuner's output check (core/gemm_verify.h), on the host: decoding the
// three float types, the tolerance, and when two samples agree. No GPU needed; the GPU side
// (poisoning and sampling real outputs) is GemmGpu.OutputCheckSeesUnwrittenOutputs.

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/gemm_verify.h"

namespace tpext::core {
namespace {

const double kNaN = std::numeric_limits<double>::quiet_NaN();

TEST(GemmVerify, DecodesEveryFloatType) {
  const float f32[] = {1.0f, -2.5f, 3.0e-39f};  // the last one subnormal
  const std::vector<double> a = to_doubles(f32, DataType::kFloat32, 3);
  EXPECT_EQ(a, (std::vector<double>{1.0, -2.5, double(3.0e-39f)}));

  // bfloat16: the high half of float32's bits.
  const uint16_t bf16[] = {0x3f80, 0xc020, 0x7f80, 0xffff};  // 1, -2.5, +inf, NaN
  const std::vector<double> b = to_doubles(bf16, DataType::kBFloat16, 4);
  EXPECT_EQ(b[0], 1.0);
  EXPECT_EQ(b[1], -2.5);
  EXPECT_TRUE(std::isinf(b[2]) && b[2] > 0);
  EXPECT_TRUE(std::isnan(b[3])) << "all-ones bytes, the tuner's poison, must read as NaN";

  // float16: 1 sign, 5 exponent bits (bias 15), 10 mantissa bits.
  const uint16_t f16[] = {0x3c00, 0xc100, 0x0001, 0x03ff, 0x7bff, 0xfc00, 0xffff, 0x8000};
  const std::vector<double> h = to_doubles(f16, DataType::kFloat16, 8);
  EXPECT_EQ(h[0], 1.0);
  EXPECT_EQ(h[1], -2.5);
  EXPECT_EQ(h[2], std::ldexp(1.0, -24)) << "the smallest subnormal";
  EXPECT_EQ(h[3], std::ldexp(1023.0, -24)) << "the largest subnormal";
  EXPECT_EQ(h[4], 65504.0) << "the largest finite value";
  EXPECT_TRUE(std::isinf(h[5]) && h[5] < 0);
  EXPECT_TRUE(std::isnan(h[6]));
  EXPECT_EQ(h[7], 0.0);
  EXPECT_TRUE(std::signbit(h[7]));
}

TEST(GemmVerify, OtherTypesAreRejectedNamingDtype) {
  const int32_t ints[] = {1};
  try {
    (void)to_doubles(ints, DataType::kInt32, 1);
    ADD_FAILURE() << "int32 was decoded";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("dtype"), std::string::npos) << e.what();
  }
}

TEST(GemmVerify, ToleranceFollowsTheOutputType) {
  MatmulDesc d;
  d.dtype = DataType::kBFloat16;
  const double bf16 = agreement_tolerance(d);
  d.dtype = DataType::kFloat16;
  const double f16 = agreement_tolerance(d);
  d.dtype = DataType::kFloat32;
  const double f32 = agreement_tolerance(d);
  d.allow_tf32 = true;
  const double tf32 = agreement_tolerance(d);
  d.allow_tf32 = false;
  d.epilogue = Epilogue::kGelu;
  const double f32_gelu = agreement_tolerance(d);
  // One unit in the last place of each type at the largest magnitude must pass: bf16 2^-8, fp16 2^-11.
  EXPECT_GT(bf16, std::ldexp(1.0, -8));
  EXPECT_GT(f16, std::ldexp(1.0, -11));
  // And a wrong result of any size that matters must not: a tenth of the largest element.
  for (double t : {bf16, f16, f32, tf32, f32_gelu}) EXPECT_LT(t, 0.1);
  EXPECT_LT(f32, f16);
  EXPECT_GT(tf32, f32);
  EXPECT_GT(f32_gelu, f32) << "cuBLASLt's GELU evaluates tanh approximately";
}

TEST(GemmVerify, SamplesAgreeOutputByOutput) {
  OutputSample ref;
  ref.d = {4.0, -2.0, 0.5, 0.0};
  ref.bgrad = {10.0, -1.0};
  const double tol = 0.01;  // bounds: 0.04 in D, 0.1 in bgrad (each output's own largest magnitude)
  EXPECT_TRUE(samples_agree(ref, ref, tol));

  OutputSample close = ref;
  close.d[2] += 0.039;
  close.bgrad[1] -= 0.099;
  EXPECT_TRUE(samples_agree(close, ref, tol));

  OutputSample far = ref;
  far.d[3] = 0.041;  // small against D's 4.0, but beyond 1 %
  EXPECT_FALSE(samples_agree(far, ref, tol));
  far = ref;
  far.bgrad[1] = -1.11;
  EXPECT_FALSE(samples_agree(far, ref, tol)) << "bgrad is judged by its own scale, not D's";

  OutputSample unwritten = ref;
  unwritten.bgrad[0] = kNaN;
  EXPECT_FALSE(samples_agree(unwritten, ref, tol)) << "a NaN where the reference has a number";
  unwritten = ref;
  unwritten.d[0] = std::numeric_limits<double>::infinity();
  EXPECT_FALSE(samples_agree(unwritten, ref, tol));

  OutputSample ref_overflow = ref;
  ref_overflow.d[1] = std::numeric_limits<double>::infinity();
  OutputSample got = ref;
  got.d[1] = kNaN;
  EXPECT_TRUE(samples_agree(got, ref_overflow, tol)) << "where the first choice overflowed there is nothing to compare";

  OutputSample shorter = ref;
  shorter.bgrad.pop_back();
  EXPECT_FALSE(samples_agree(shorter, ref, tol));
  OutputSample extra = ref;
  extra.aux = {1.0};
  EXPECT_FALSE(samples_agree(extra, ref, tol)) << "an output the reference lacks";
}

}  // namespace
}  // namespace tpext::core
