// Tests of the cuBLASLt GEMM (csrc/core/gemm.h).
//
// Host tests run anywhere: matmul must reject bad input before it touches CUDA, so every
// rejection is checked on machines without a GPU too. GPU tests compare against a reference
// computed on the host in double from random inputs (rounded to the tested dtype first, so the
// reference sees exactly what the GPU sees), and poison every output with NaN bytes first, so
// an element the GEMM never wrote cannot pass.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest-spi.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "core/cublas_error.h"
#include "core/error.h"
#include "core/gemm.h"
#include "core/gemm_cache.h"
#include "core/gemm_check.h"
#include "core/gemm_plan.h"
#include "core/gemm_verify.h"
#include "gpu_test_util.h"

namespace tpext::core {
namespace {

using tpext::testing::random_floats;
using tpext::testing::visible_gpu_count;

constexpr size_t kMiB = size_t{1} << 20;

const Epilogue kAllEpilogues[] = {
    Epilogue::kNone,        Epilogue::kBias,   Epilogue::kGelu,
    Epilogue::kBiasGelu,    Epilogue::kGeluAux, Epilogue::kBiasGeluAux,
    Epilogue::kDGelu,       Epilogue::kDGeluBgrad, Epilogue::kBgrad,
};

// ------------------------------------------------------------------------------------------
// Host tests: validation, naming, the cache key. None of them may need a GPU.
// ------------------------------------------------------------------------------------------

// Plausible device addresses that are never dereferenced: validation must reject before any
// pointer is used, and the valid descs are only handed to validate_matmul.
void* fake_ptr(int slot) {
  const uintptr_t base = 0x7f0000000000;
  return reinterpret_cast<void*>(base + static_cast<uintptr_t>(slot) * 0x100000);
}

MatmulDesc valid_desc(Epilogue e = Epilogue::kNone) {
  MatmulDesc d;
  d.m = 4;
  d.n = 8;
  d.k = 16;
  d.dtype = DataType::kBFloat16;
  d.epilogue = e;
  d.trans_a = e == Epilogue::kBgrad;
  return d;
}

MatmulPointers pointers_for(Epilogue e) {
  MatmulPointers p;
  p.a = fake_ptr(1);
  p.b = fake_ptr(2);
  p.d = fake_ptr(3);
  if (epilogue_reads_bias(e)) p.bias = fake_ptr(4);
  if (epilogue_uses_aux(e)) p.aux = fake_ptr(5);
  if (epilogue_writes_bgrad(e)) p.bgrad = fake_ptr(6);
  return p;
}

// matmul itself (not just validate_matmul) must throw InvalidArgument naming `field`: that it
// does so on a GPU-less machine proves the check runs before any CUDA call.
void expect_rejected(const MatmulDesc& d, const MatmulPointers& p, const std::string& field,
                     void* workspace = nullptr, size_t workspace_bytes = 0) {
  try {
    matmul(d, p, workspace, workspace_bytes, nullptr);
    ADD_FAILURE() << "accepted " << describe(d) << "; expected InvalidArgument naming " << field;
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("tpext matmul: " + field + ":"), std::string::npos)
        << "the message does not name " << field << ": " << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected InvalidArgument naming " << field << ", got: " << e.what();
  }
}

void expect_valid(const MatmulDesc& d, const MatmulPointers& p, const void* workspace = nullptr,
                  size_t workspace_bytes = 0) {
  EXPECT_NO_THROW(validate_matmul(d, p, workspace, workspace_bytes)) << describe(d);
}

TEST(GemmValidation, AcceptsEveryEpilogueWithItsBuffers) {
  for (Epilogue e : kAllEpilogues) expect_valid(valid_desc(e), pointers_for(e));
}

TEST(GemmValidation, RejectsNegativeSizes) {
  MatmulDesc d = valid_desc();
  d.m = -1;
  expect_rejected(d, pointers_for(d.epilogue), "m");
  d = valid_desc();
  d.n = -3;
  expect_rejected(d, pointers_for(d.epilogue), "n");
  d = valid_desc();
  d.k = -1;
  expect_rejected(d, pointers_for(d.epilogue), "k");
}

TEST(GemmValidation, RejectsLeadingDimsShorterThanARow) {
  const MatmulPointers p = pointers_for(Epilogue::kNone);
  MatmulDesc d = valid_desc();  // m=4 n=8 k=16
  d.lda = 15;                   // A stored m×k: rows of k = 16
  expect_rejected(d, p, "lda");
  d.trans_a = true;  // A stored k×m: rows of m = 4, so 8 is now fine
  d.lda = 8;
  expect_valid(d, p);
  d.lda = 3;
  expect_rejected(d, p, "lda");

  d = valid_desc();
  d.ldb = 7;  // B stored k×n: rows of n = 8
  expect_rejected(d, p, "ldb");
  d.trans_b = true;  // B stored n×k: rows of k = 16
  d.ldb = 8;
  expect_rejected(d, p, "ldb");
  d.ldb = 16;
  expect_valid(d, p);

  d = valid_desc();
  d.ldd = 7;
  expect_rejected(d, p, "ldd");
  d.ldd = 9;  // padded rows are fine
  expect_valid(d, p);

  d = valid_desc();
  d.lda = -1;
  expect_rejected(d, p, "lda");
  d = valid_desc();
  d.ldd = -16;
  expect_rejected(d, p, "ldd");
}

TEST(GemmValidation, AuxRowStrideMustCoverARowAndBeAMultipleOf8) {
  for (Epilogue e : {Epilogue::kGeluAux, Epilogue::kBiasGeluAux, Epilogue::kDGelu,
                     Epilogue::kDGeluBgrad}) {
    SCOPED_TRACE(epilogue_name(e));
    const MatmulPointers p = pointers_for(e);
    MatmulDesc d = valid_desc(e);  // n = 8: packed ldaux = 8 is fine
    expect_valid(d, p);
    d.ldaux = 4;
    expect_rejected(d, p, "ldaux");
    d.ldaux = 12;
    expect_rejected(d, p, "ldaux");
    d.ldaux = 24;
    expect_valid(d, p);
    d.ldaux = -8;
    expect_rejected(d, p, "ldaux");

    d = valid_desc(e);
    d.n = 3;  // packed aux rows of 3 elements: cuBLASLt cannot, and the message says what to pass
    try {
      matmul(d, p, nullptr, 0, nullptr);
      ADD_FAILURE() << "accepted a packed aux with n = 3";
    } catch (const InvalidArgument& err) {
      EXPECT_NE(std::string(err.what()).find("ldaux = 8"), std::string::npos) << err.what();
    }
    d.ldaux = 8;
    expect_valid(d, p);
  }
  MatmulDesc d = valid_desc(Epilogue::kBias);  // no aux: ldaux is not read
  d.ldaux = 3;
  expect_valid(d, pointers_for(Epilogue::kBias));
}

TEST(GemmValidation, RejectsNullOperands) {
  MatmulPointers p = pointers_for(Epilogue::kNone);
  p.a = nullptr;
  expect_rejected(valid_desc(), p, "a");
  p = pointers_for(Epilogue::kNone);
  p.b = nullptr;
  expect_rejected(valid_desc(), p, "b");
  p = pointers_for(Epilogue::kNone);
  p.d = nullptr;
  expect_rejected(valid_desc(), p, "d");
}

TEST(GemmValidation, RejectsMissingEpilogueBuffers) {
  for (Epilogue e : kAllEpilogues) {
    SCOPED_TRACE(epilogue_name(e));
    if (epilogue_reads_bias(e)) {
      MatmulPointers p = pointers_for(e);
      p.bias = nullptr;
      expect_rejected(valid_desc(e), p, "bias");
    }
    if (epilogue_uses_aux(e)) {
      MatmulPointers p = pointers_for(e);
      p.aux = nullptr;
      expect_rejected(valid_desc(e), p, "aux");
    }
    if (epilogue_writes_bgrad(e)) {
      MatmulPointers p = pointers_for(e);
      p.bgrad = nullptr;
      expect_rejected(valid_desc(e), p, "bgrad");
    }
  }
}

TEST(GemmValidation, RejectsBuffersTheEpilogueDoesNotUse) {
  for (Epilogue e : kAllEpilogues) {
    SCOPED_TRACE(epilogue_name(e));
    if (!epilogue_reads_bias(e)) {
      MatmulPointers p = pointers_for(e);
      p.bias = fake_ptr(7);
      expect_rejected(valid_desc(e), p, "bias");
    }
    if (!epilogue_uses_aux(e)) {
      MatmulPointers p = pointers_for(e);
      p.aux = fake_ptr(7);
      expect_rejected(valid_desc(e), p, "aux");
    }
    if (!epilogue_writes_bgrad(e)) {
      MatmulPointers p = pointers_for(e);
      p.bgrad = fake_ptr(7);
      expect_rejected(valid_desc(e), p, "bgrad");
    }
  }
}

TEST(GemmValidation, RejectsUnsupportedDtypes) {
  for (DataType dt : {DataType::kFloat64, DataType::kInt8, DataType::kUInt8, DataType::kInt32,
                      DataType::kInt64}) {
    MatmulDesc d = valid_desc();
    d.dtype = dt;
    expect_rejected(d, pointers_for(d.epilogue), "dtype");
  }
  for (DataType dt : {DataType::kFloat32, DataType::kBFloat16, DataType::kFloat16}) {
    MatmulDesc d = valid_desc();
    d.dtype = dt;
    expect_valid(d, pointers_for(d.epilogue));
  }
}

TEST(GemmValidation, Tf32OnlyForFloat32) {
  MatmulDesc d = valid_desc();
  d.allow_tf32 = true;
  for (DataType dt : {DataType::kBFloat16, DataType::kFloat16}) {
    d.dtype = dt;
    expect_rejected(d, pointers_for(d.epilogue), "allow_tf32");
  }
  d.dtype = DataType::kFloat32;
  expect_valid(d, pointers_for(d.epilogue));
}

TEST(GemmValidation, SmCountTargetIsZeroOrPositive) {
  MatmulDesc d = valid_desc();
  d.sm_count_target = -1;
  expect_rejected(d, pointers_for(d.epilogue), "sm_count_target");
  d.sm_count_target = 100;
  expect_valid(d, pointers_for(d.epilogue));
  EXPECT_NE(describe(d).find("sm_count_target=100"), std::string::npos) << describe(d);
}

TEST(GemmValidation, RejectsNullWorkspaceWithBytes) {
  const MatmulPointers p = pointers_for(Epilogue::kNone);
  expect_rejected(valid_desc(), p, "workspace", nullptr, 1024);
  expect_valid(valid_desc(), p, nullptr, 0);
  expect_valid(valid_desc(), p, fake_ptr(9), 1024);
}

TEST(GemmValidation, AccumulateOnlyWhereItMeansDPlusResult) {
  for (Epilogue e : kAllEpilogues) {
    SCOPED_TRACE(epilogue_name(e));
    MatmulDesc d = valid_desc(e);
    d.accumulate = true;
    if (e == Epilogue::kNone || e == Epilogue::kBias || e == Epilogue::kBgrad)
      expect_valid(d, pointers_for(e));
    else
      expect_rejected(d, pointers_for(e), "accumulate");
  }
}

// cuBLASLt's BGRADB writes one element of m for float16 with n = 1 (GemmGpu.BiasGradientOfThin-
// WgradGemms shows it on a GPU), and with n = 0 no GEMM runs: both rejected before any CUDA call;
// the neighbours stay valid.
TEST(GemmValidation, BgradRejectsOneColumnInFloat16) {
  MatmulDesc d = valid_desc(Epilogue::kBgrad);
  d.n = 1;
  d.dtype = DataType::kFloat16;
  expect_rejected(d, pointers_for(Epilogue::kBgrad), "n");
  EXPECT_FALSE(bgrad_epilogue_supported(DataType::kFloat16, 1));
  for (DataType dt : {DataType::kBFloat16, DataType::kFloat32}) {
    d.dtype = dt;
    expect_valid(d, pointers_for(Epilogue::kBgrad));
  }
  d.dtype = DataType::kFloat16;
  d.n = 2;
  expect_valid(d, pointers_for(Epilogue::kBgrad));
  for (DataType dt : {DataType::kFloat32, DataType::kBFloat16, DataType::kFloat16}) {  // no column: no GEMM runs
    d.dtype = dt;
    d.n = 0;
    expect_rejected(d, pointers_for(Epilogue::kBgrad), "n");
    EXPECT_FALSE(bgrad_epilogue_supported(dt, 0));
  }
  MatmulDesc plain = d;  // the same GEMM without the epilogue is fine at n = 1
  plain.n = 1;
  plain.epilogue = Epilogue::kNone;
  expect_valid(plain, pointers_for(Epilogue::kNone));
}

TEST(GemmValidation, BgradNeedsTransposedA) {
  MatmulDesc d = valid_desc(Epilogue::kBgrad);
  d.trans_a = false;
  expect_rejected(d, pointers_for(Epilogue::kBgrad), "trans_a");
}

TEST(GemmValidation, KZeroAndKOne) {
  for (Epilogue e : kAllEpilogues) {
    SCOPED_TRACE(epilogue_name(e));
    MatmulDesc d = valid_desc(e);
    d.k = 0;  // the broadcast bias alone would need a kernel of our own: rejected
    if (epilogue_reads_bias(e))
      expect_rejected(d, pointers_for(e), "k");
    else
      expect_valid(d, pointers_for(e));
    d.k = 1;  // cuBLASLt has no DGELU kernel for k = 1
    if (epilogue_reads_aux(e))
      expect_rejected(d, pointers_for(e), "k");
    else
      expect_valid(d, pointers_for(e));
  }
}

TEST(GemmValidation, RejectsUnknownEpilogue) {
  MatmulDesc d = valid_desc();
  d.epilogue = static_cast<Epilogue>(42);
  expect_rejected(d, pointers_for(Epilogue::kNone), "epilogue");
}

TEST(GemmValidation, MessageDescribesTheProblem) {
  MatmulDesc d = valid_desc(Epilogue::kBias);
  d.ldd = 5;
  try {
    matmul(d, pointers_for(Epilogue::kBias), nullptr, 0, nullptr);
    ADD_FAILURE() << "accepted ldd = 5 < n = 8";
  } catch (const InvalidArgument& e) {
    const std::string msg = e.what();
    for (const char* part : {"ldd: must be >= 8", "got 5", "m=4 n=8 k=16", "dtype=bfloat16",
                             "epilogue=bias"})
      EXPECT_NE(msg.find(part), std::string::npos) << "missing '" << part << "' in: " << msg;
  }
}

// m == 0 or n == 0 returns before CUDA: on a machine without a GPU any CUDA call would throw.
TEST(GemmValidation, EmptyProblemsReturnWithoutTouchingCuda) {
  MatmulDesc d = valid_desc();
  d.m = 0;
  MatmulPointers p = pointers_for(Epilogue::kNone);
  p.a = nullptr;  // no elements: null is fine
  p.d = nullptr;
  EXPECT_NO_THROW(matmul(d, p, nullptr, 0, nullptr));
  d = valid_desc(Epilogue::kBias);
  d.n = 0;
  p = pointers_for(Epilogue::kBias);
  p.b = nullptr;
  p.d = nullptr;
  p.bias = nullptr;
  EXPECT_NO_THROW(matmul(d, p, nullptr, 0, nullptr));
  d = valid_desc();
  d.m = 0;
  d.n = 0;
  d.k = 0;
  EXPECT_NO_THROW(matmul(d, MatmulPointers{}, nullptr, 0, nullptr));
}

TEST(GemmWorkspace, SizesFollowTheArchitecture) {
  EXPECT_EQ(matmul_workspace_bytes(9), 32 * kMiB);   // Hopper
  EXPECT_EQ(matmul_workspace_bytes(10), 32 * kMiB);  // Blackwell
  EXPECT_EQ(matmul_workspace_bytes(8), 4 * kMiB);    // Ampere, Ada
  EXPECT_EQ(matmul_workspace_bytes(7), 4 * kMiB);
  const size_t here = matmul_workspace_bytes();
  EXPECT_TRUE(here == 4 * kMiB || here == 32 * kMiB) << here;
  if (visible_gpu_count() == 0) {
    EXPECT_EQ(here, 4 * kMiB);
  }
}

TEST(GemmNames, EpilogueNamesAreStableAndDistinct) {
  EXPECT_STREQ(epilogue_name(Epilogue::kNone), "none");
  EXPECT_STREQ(epilogue_name(Epilogue::kBiasGeluAux), "bias_gelu_aux");
  EXPECT_STREQ(epilogue_name(Epilogue::kDGeluBgrad), "dgelu_bgrad");
  EXPECT_STREQ(epilogue_name(Epilogue::kBgrad), "bgrad");
  std::vector<std::string> seen;
  for (Epilogue e : kAllEpilogues) {
    const std::string name = epilogue_name(e);
    for (const std::string& other : seen) EXPECT_NE(name, other);
    seen.push_back(name);
  }
}

TEST(GemmCacheKey, AlignmentClass) {
  EXPECT_EQ(alignment_class(nullptr), 0);
  EXPECT_EQ(alignment_class(reinterpret_cast<void*>(0x1000)), 16);
  EXPECT_EQ(alignment_class(reinterpret_cast<void*>(0x1010)), 16);
  EXPECT_EQ(alignment_class(reinterpret_cast<void*>(0x1008)), 8);
  EXPECT_EQ(alignment_class(reinterpret_cast<void*>(0x1004)), 4);
  EXPECT_EQ(alignment_class(reinterpret_cast<void*>(0x1002)), 2);
  EXPECT_EQ(alignment_class(reinterpret_cast<void*>(0x1001)), 1);
}

TEST(GemmCacheKey, IdenticalProblemsShareAKey) {
  const MatmulDesc d = valid_desc(Epilogue::kBiasGeluAux);
  const MatmulPointers p = pointers_for(d.epilogue);
  const MatmulKey key = make_matmul_key(d, p, 0, 1024);
  EXPECT_EQ(key, make_matmul_key(d, p, 0, 1024));
  EXPECT_EQ(MatmulKeyHash{}(key), MatmulKeyHash{}(make_matmul_key(d, p, 0, 1024)));

  MatmulDesc explicit_lds = d;  // packed (0) and the same strides spelled out are one problem
  explicit_lds.lda = d.k;
  explicit_lds.ldb = d.n;
  explicit_lds.ldd = d.n;
  explicit_lds.ldaux = d.n;
  EXPECT_EQ(key, make_matmul_key(explicit_lds, p, 0, 1024));

  MatmulPointers moved = p;  // other addresses of the same alignment class: same plan
  moved.a = fake_ptr(11);
  moved.d = static_cast<char*>(fake_ptr(12)) + 256;
  EXPECT_EQ(key, make_matmul_key(d, moved, 0, 1024));

  MatmulDesc no_aux = valid_desc(Epilogue::kBias);  // ldaux is not read without aux
  const MatmulPointers pb = pointers_for(Epilogue::kBias);
  MatmulDesc no_aux_ld = no_aux;
  no_aux_ld.ldaux = 40;
  EXPECT_EQ(make_matmul_key(no_aux, pb, 0, 0), make_matmul_key(no_aux_ld, pb, 0, 0));
}

TEST(GemmCacheKey, EveryFieldSplitsTheKey) {
  const MatmulDesc base = valid_desc(Epilogue::kBias);
  const MatmulPointers p = pointers_for(Epilogue::kBias);
  const MatmulKey key = make_matmul_key(base, p, 0, 1024);

  std::vector<MatmulDesc> variants(14, base);
  variants[0].m = 5;
  variants[1].n = 16;
  variants[2].k = 32;
  variants[3].trans_a = true;
  variants[4].trans_b = true;
  variants[5].lda = 24;
  variants[6].ldb = 24;
  variants[7].ldd = 24;
  variants[8].dtype = DataType::kFloat16;
  variants[9].epilogue = Epilogue::kBiasGelu;
  variants[10].accumulate = true;
  variants[11].dtype = DataType::kFloat32;
  variants[12].dtype = DataType::kFloat32;
  variants[12].allow_tf32 = true;
  variants[13].sm_count_target = 100;  // a kernel sized for fewer SMs is another plan
  for (const MatmulDesc& v : variants) {
    EXPECT_NE(key, make_matmul_key(v, p, 0, 1024)) << describe(v);
  }
  EXPECT_NE(make_matmul_key(variants[11], p, 0, 1024), make_matmul_key(variants[12], p, 0, 1024))
      << "allow_tf32";
  MatmulDesc aux = valid_desc(Epilogue::kGeluAux);
  MatmulDesc aux_padded = aux;
  aux_padded.ldaux = 16;
  const MatmulPointers pa = pointers_for(Epilogue::kGeluAux);
  EXPECT_NE(make_matmul_key(aux, pa, 0, 0), make_matmul_key(aux_padded, pa, 0, 0));

  EXPECT_NE(key, make_matmul_key(base, p, 1, 1024)) << "device";
  EXPECT_NE(key, make_matmul_key(base, p, 0, 2048)) << "workspace_bytes";
  EXPECT_NE(key, make_matmul_key(base, p, 0, 1024, 8)) << "autotune";
  EXPECT_NE(make_matmul_key(base, p, 0, 1024, 8), make_matmul_key(base, p, 0, 1024, 8, 50)) << "autotune_sustain_ms";

  // The heuristic picks kernels by alignment, so each pointer's class is part of the key.
  auto shifted = [](const void* ptr) { return static_cast<char*>(const_cast<void*>(ptr)) + 8; };
  MatmulPointers q = p;
  q.a = shifted(p.a);
  EXPECT_NE(key, make_matmul_key(base, q, 0, 1024)) << "a";
  q = p;
  q.b = shifted(p.b);
  EXPECT_NE(key, make_matmul_key(base, q, 0, 1024)) << "b";
  q = p;
  q.d = shifted(p.d);
  EXPECT_NE(key, make_matmul_key(base, q, 0, 1024)) << "d";
  q = p;
  q.bias = shifted(p.bias);
  EXPECT_NE(key, make_matmul_key(base, q, 0, 1024)) << "bias";
  const MatmulDesc dgelu = valid_desc(Epilogue::kDGeluBgrad);
  const MatmulPointers pg = pointers_for(Epilogue::kDGeluBgrad);
  const MatmulKey key_g = make_matmul_key(dgelu, pg, 0, 0);
  q = pg;
  q.aux = shifted(pg.aux);
  EXPECT_NE(key_g, make_matmul_key(dgelu, q, 0, 0)) << "aux";
  q = pg;
  q.bgrad = shifted(pg.bgrad);
  EXPECT_NE(key_g, make_matmul_key(dgelu, q, 0, 0)) << "bgrad";
}

TEST(GemmErrors, CublasErrorCarriesCallStatusAndShape) {
  try {
    throw_cublas_error(CUBLAS_STATUS_NOT_SUPPORTED, "cublasLtMatmul", describe(valid_desc()));
  } catch (const CublasError& e) {
    const Error& base = e;  // the adapter catches every core failure as Error
    const std::string msg = base.what();
    EXPECT_EQ(e.status(), CUBLAS_STATUS_NOT_SUPPORTED);
    for (const char* part : {"cublasLtMatmul", "CUBLAS_STATUS_NOT_SUPPORTED", "m=4 n=8 k=16",
                             "dtype=bfloat16"})
      EXPECT_NE(msg.find(part), std::string::npos) << "missing '" << part << "' in: " << msg;
  }
}

// Without a GPU a valid call gets as far as CUDA and fails there, with CUDA's words and the
// shape, caches nothing, and fails the same way again: no state is left half-built.
TEST(GemmErrors, ValidCallWithoutGpuThrowsAndCachesNothing) {
  if (visible_gpu_count() > 0) GTEST_SKIP() << "this machine has a GPU";
  MatmulDesc d = valid_desc(Epilogue::kBias);
  const size_t before = matmul_cache_size();
  for (int attempt = 0; attempt < 2; ++attempt) {
    try {
      matmul(d, pointers_for(d.epilogue), nullptr, 0, nullptr);
      ADD_FAILURE() << "a matmul without a GPU returned";
    } catch (const InvalidArgument& e) {
      ADD_FAILURE() << "valid input rejected: " << e.what();
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("m=4 n=8 k=16"), std::string::npos) << e.what();
    }
  }
  d = valid_desc();
  d.k = 0;  // the zero-fill path reports CUDA failures too
  try {
    matmul(d, pointers_for(Epilogue::kNone), nullptr, 0, nullptr);
    ADD_FAILURE() << "a k = 0 matmul without a GPU returned";
  } catch (const InvalidArgument& e) {
    ADD_FAILURE() << "valid input rejected: " << e.what();
  } catch (const CudaError& e) {
    EXPECT_NE(std::string(e.what()).find("cudaMemset2DAsync"), std::string::npos) << e.what();
  }
  EXPECT_EQ(matmul_cache_size(), before);
}

// ------------------------------------------------------------------------------------------
// GPU tests: against a double-precision host reference.
// ------------------------------------------------------------------------------------------

size_t sz(int64_t v) { return static_cast<size_t>(v); }

void store(DataType dt, float x, uint8_t* out) {
  switch (dt) {
    case DataType::kFloat32: std::memcpy(out, &x, 4); return;
    case DataType::kBFloat16: {
      const __nv_bfloat16 h = __float2bfloat16(x);
      std::memcpy(out, &h, 2);
      return;
    }
    case DataType::kFloat16: {
      const __half h = __float2half(x);
      std::memcpy(out, &h, 2);
      return;
    }
    default: throw std::logic_error("test: unexpected dtype");
  }
}

float load(DataType dt, const uint8_t* in) {
  switch (dt) {
    case DataType::kFloat32: {
      float x;
      std::memcpy(&x, in, 4);
      return x;
    }
    case DataType::kBFloat16: {
      __nv_bfloat16 h;
      std::memcpy(&h, in, 2);
      return __bfloat162float(h);
    }
    case DataType::kFloat16: {
      __half h;
      std::memcpy(&h, in, 2);
      return __half2float(h);
    }
    default: throw std::logic_error("test: unexpected dtype");
  }
}

float round_to(DataType dt, float x) {
  uint8_t bytes[4];
  store(dt, x, bytes);
  return load(dt, bytes);
}

constexpr double kPi = 3.14159265358979323846;

double gelu(double x) {
  const double c = std::sqrt(2.0 / kPi);
  return 0.5 * x * (1.0 + std::tanh(c * (x + 0.044715 * x * x * x)));
}

double gelu_grad(double x) {
  const double c = std::sqrt(2.0 / kPi);
  const double t = std::tanh(c * (x + 0.044715 * x * x * x));
  return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x);
}

class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) {
    TPEXT_CUDA_CHECK(cudaMalloc(&base_, bytes == 0 ? 16 : bytes));
  }
  ~DeviceBuffer() {
    if (base_ != nullptr) (void)cudaFree(base_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  char* get() const { return static_cast<char*>(base_); }

 private:
  void* base_ = nullptr;
};

class Stream {
 public:
  Stream() { TPEXT_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking)); }
  ~Stream() {
    if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
  }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

// What each GPU test needs: its own stream and a workspace of the recommended size.
struct GpuEnv {
  Stream stream;
  size_t workspace_bytes = matmul_workspace_bytes();
  DeviceBuffer workspace{workspace_bytes};
};

// A row-major rows×cols matrix with row stride ld, as values already rounded to the dtype.
struct HostMatrix {
  int64_t rows = 0, cols = 0, ld = 0;
  std::vector<float> values;  // rows·ld; entries at column >= cols are padding
  float at(int64_t r, int64_t c) const { return values[sz(r * ld + c)]; }
};

// Finite, so a kernel that wrongly reads padding gets a visibly wrong answer.
constexpr float kPaddingGarbage = 1000.0f;

HostMatrix random_matrix(DataType dt, int64_t rows, int64_t cols, int64_t ld, uint32_t seed,
                         float scale = 1.0f) {
  HostMatrix m{rows, cols, ld, random_floats(sz(rows * ld), seed)};
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < ld; ++c) {
      float& v = m.values[sz(r * ld + c)];
      v = round_to(dt, c < cols ? scale * v : kPaddingGarbage);
    }
  return m;
}

// Outputs keep their padding as 0xFF bytes so the test can see that it was not written.
std::vector<uint8_t> encode(DataType dt, const HostMatrix& m, bool poison_padding) {
  const size_t es = element_size(dt);
  std::vector<uint8_t> bytes(m.values.size() * es, 0xFF);
  for (int64_t r = 0; r < m.rows; ++r)
    for (int64_t c = 0; c < m.ld; ++c) {
      const size_t i = sz(r * m.ld + c);
      if (c < m.cols || !poison_padding) store(dt, m.values[i], &bytes[i * es]);
    }
  return bytes;
}

// Device memory for one operand, `offset` bytes into its allocation so tests can hand out
// pointers that are only element-aligned.
struct DeviceMatrix {
  DeviceMatrix(size_t bytes_, size_t offset)
      : buffer(bytes_ + offset), ptr(buffer.get() + offset), bytes(bytes_) {}
  void upload(const std::vector<uint8_t>& host, cudaStream_t s) {
    if (host.empty()) return;
    TPEXT_CUDA_CHECK(cudaMemcpyAsync(ptr, host.data(), host.size(), cudaMemcpyHostToDevice, s));
  }
  void poison(cudaStream_t s) {  // 0xFF.. is NaN in float32, bfloat16 and float16
    if (bytes > 0) TPEXT_CUDA_CHECK(cudaMemsetAsync(ptr, 0xFF, bytes, s));
  }
  std::vector<uint8_t> download(cudaStream_t s) const {
    std::vector<uint8_t> host(bytes);
    if (bytes > 0)
      TPEXT_CUDA_CHECK(cudaMemcpyAsync(host.data(), ptr, bytes, cudaMemcpyDeviceToHost, s));
    TPEXT_CUDA_CHECK(cudaStreamSynchronize(s));
    return host;
  }
  DeviceBuffer buffer;
  char* ptr;
  size_t bytes;
};

// The logical rows×cols values of a downloaded row-major buffer with row stride ld.
std::vector<float> logical_values(DataType dt, const std::vector<uint8_t>& bytes, int64_t rows,
                                  int64_t cols, int64_t ld) {
  const size_t es = element_size(dt);
  std::vector<float> out;
  out.reserve(sz(rows * cols));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out.push_back(load(dt, &bytes[sz(r * ld + c) * es]));
  return out;
}

// Padding bytes of an output that are no longer 0xFF: the GEMM wrote outside the matrix.
size_t touched_padding_bytes(DataType dt, const std::vector<uint8_t>& bytes, int64_t rows,
                             int64_t cols, int64_t ld) {
  const size_t es = element_size(dt);
  size_t touched = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (size_t i = sz(r * ld + cols) * es; i < sz((r + 1) * ld) * es; ++i)
      touched += bytes[i] != 0xFF;
  return touched;
}

// ||got - ref|| / ||ref|| below tol, and no NaN left from the poison; a reference of exact
// zeros (the k = 0 cases) demands exact zeros.
void expect_matches(const std::string& what, const std::vector<float>& got,
                    const std::vector<double>& ref, double tol) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  size_t unwritten = 0;
  double err2 = 0.0, ref2 = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(got[i])) {
      ++unwritten;
      continue;
    }
    const double e = static_cast<double>(got[i]) - ref[i];
    err2 += e * e;
    ref2 += ref[i] * ref[i];
  }
  EXPECT_EQ(unwritten, size_t{0}) << what << ": " << unwritten << " of " << got.size()
                                  << " elements were never written (still NaN)";
  if (ref2 == 0.0) {
    EXPECT_EQ(err2, 0.0) << what << " should be exactly zero";
  } else {
    const double rel = std::sqrt(err2 / ref2);
    EXPECT_LT(rel, tol) << what << ": relative error " << rel << " (" << got.size() << " elements)";
  }
}

double gemm_tolerance(DataType dt, bool tf32) {
  if (dt == DataType::kFloat32) return tf32 ? 5e-3 : 1e-5;
  return 1e-2;
}

// cuBLASLt evaluates GELU's tanh with the hardware approximation (tanh.approx.f32, relative
// error near 2^-11), not to float32 precision, so outputs that pass through GELU or its
// derivative get a looser float32 bound than the GEMM itself.
double activation_tolerance(DataType dt, bool tf32) {
  return dt == DataType::kFloat32 && !tf32 ? 2e-3 : gemm_tolerance(dt, tf32);
}

int64_t round_up8(int64_t x) { return (x + 7) / 8 * 8; }

struct Case {
  int64_t m = 1, n = 1, k = 1;
  bool trans_a = false, trans_b = false;
  DataType dtype = DataType::kFloat32;
  bool allow_tf32 = false;
  Epilogue epilogue = Epilogue::kNone;
  bool accumulate = false;
  int64_t pad = 0;      // extra elements per row of A, B, D (0: packed, ld passed as 0)
  size_t misalign = 0;  // elements every pointer sits past the start of its allocation
  uint32_t seed = 1;
};

// A case from the fields the loops below vary; the rest keep Case's defaults.
Case gemm_case(int64_t m, int64_t n, int64_t k, bool trans_a, bool trans_b, DataType dt, Epilogue e, int64_t pad,
               uint32_t seed) {
  Case c;
  c.m = m;
  c.n = n;
  c.k = k;
  c.trans_a = trans_a;
  c.trans_b = trans_b;
  c.dtype = dt;
  c.epilogue = e;
  c.pad = pad;
  c.seed = seed;
  return c;
}

std::string describe_case(const Case& c) {
  std::ostringstream s;
  s << c.m << "x" << c.n << "x" << c.k << " trans_a=" << c.trans_a << " trans_b=" << c.trans_b
    << " " << dtype_name(c.dtype) << (c.allow_tf32 ? "+tf32" : "") << " epilogue="
    << epilogue_name(c.epilogue) << " accumulate=" << c.accumulate << " pad=" << c.pad
    << " misalign=" << c.misalign << " seed=" << c.seed;
  return s.str();
}

MatmulDesc desc_for(const Case& c) {
  MatmulDesc d;
  d.m = c.m;
  d.n = c.n;
  d.k = c.k;
  d.trans_a = c.trans_a;
  d.trans_b = c.trans_b;
  d.dtype = c.dtype;
  d.allow_tf32 = c.allow_tf32;
  d.epilogue = c.epilogue;
  d.accumulate = c.accumulate;
  if (c.pad > 0) {
    d.lda = (c.trans_a ? c.m : c.k) + c.pad;
    d.ldb = (c.trans_b ? c.k : c.n) + c.pad;
    d.ldd = c.n + c.pad;
  }
  // cuBLASLt wants the aux row stride to be a multiple of 8, so aux is never packed for odd n.
  if (epilogue_uses_aux(c.epilogue)) d.ldaux = round_up8(c.n) + (c.pad > 0 ? 8 : 0);
  return d;
}

struct Reference {
  std::vector<double> d, aux, bgrad;
};

// The definition, in double: op(A)·op(B), then the epilogue as gemm.h documents it.
Reference reference_for(const Case& c, const HostMatrix& a, const HostMatrix& b,
                        const HostMatrix& bias, const HostMatrix& aux_in, const HostMatrix& d0) {
  const int64_t m = c.m, n = c.n, k = c.k;
  std::vector<double> op_a(sz(m * k)), op_b_t(sz(n * k));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t kk = 0; kk < k; ++kk)
      op_a[sz(i * k + kk)] = c.trans_a ? a.at(kk, i) : a.at(i, kk);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t kk = 0; kk < k; ++kk)
      op_b_t[sz(j * k + kk)] = c.trans_b ? b.at(j, kk) : b.at(kk, j);

  Reference ref;
  ref.d.resize(sz(m * n));
  if (epilogue_writes_aux(c.epilogue)) ref.aux.resize(sz(m * n));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0.0;
      for (int64_t kk = 0; kk < k; ++kk)
        acc += op_a[sz(i * k + kk)] * op_b_t[sz(j * k + kk)];
      const double pre = acc + (epilogue_reads_bias(c.epilogue) ? bias.at(0, j) : 0.0);
      double out = acc;
      switch (c.epilogue) {
        case Epilogue::kNone:
        case Epilogue::kBgrad: out = acc; break;
        case Epilogue::kBias: out = pre; break;
        case Epilogue::kGelu:
        case Epilogue::kBiasGelu:
        case Epilogue::kGeluAux:
        case Epilogue::kBiasGeluAux: out = gelu(pre); break;
        case Epilogue::kDGelu:
        case Epilogue::kDGeluBgrad: out = acc * gelu_grad(aux_in.at(i, j)); break;
      }
      if (c.accumulate) out += d0.at(i, j);
      ref.d[sz(i * n + j)] = out;
      if (epilogue_writes_aux(c.epilogue)) ref.aux[sz(i * n + j)] = pre;
    }
  if (c.epilogue == Epilogue::kBgrad) {  // Σ over k of op(A)'s row i
    ref.bgrad.assign(sz(m), 0.0);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t kk = 0; kk < k; ++kk) ref.bgrad[sz(i)] += op_a[sz(i * k + kk)];
  }
  if (c.epilogue == Epilogue::kDGeluBgrad) {  // Σ over the m rows of D's column j
    ref.bgrad.assign(sz(n), 0.0);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) ref.bgrad[sz(j)] += ref.d[sz(i * n + j)];
  }
  return ref;
}

// Runs one case through matmul and checks D, aux and bgrad: values, every element written,
// padding untouched.
// Enqueues `desc` on `stream` inside a CUDA graph capture, then launches the graph once.
void matmul_in_graph(const MatmulDesc& desc, const MatmulPointers& p, void* workspace, size_t workspace_bytes,
                     cudaStream_t stream) {
  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), cudaSuccess);
  matmul(desc, p, workspace, workspace_bytes, stream);
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  (void)cudaGraphExecDestroy(exec);
  (void)cudaGraphDestroy(graph);
}

// How a case's GEMM is enqueued: through matmul(), in a graph, or one plan candidate directly.
using Enqueue = std::function<void(const MatmulDesc&, const MatmulPointers&)>;

void run_case_with(const Case& c, cudaStream_t stream, const Enqueue& enqueue) {
  SCOPED_TRACE(describe_case(c));
  const MatmulDesc desc = desc_for(c);
  const MatmulDesc strides = with_resolved_leading_dims(desc);  // how the test lays memory out
  const DataType dt = c.dtype;
  const size_t es = element_size(dt);
  const Epilogue e = c.epilogue;

  const HostMatrix a =  // stored m×k, or k×m when transposed
      random_matrix(dt, c.trans_a ? c.k : c.m, c.trans_a ? c.m : c.k, strides.lda, c.seed);
  const HostMatrix b =  // stored k×n, or n×k when transposed
      random_matrix(dt, c.trans_b ? c.n : c.k, c.trans_b ? c.k : c.n, strides.ldb, c.seed + 1);
  const HostMatrix d0 = random_matrix(dt, c.m, c.n, strides.ldd, c.seed + 2);
  const HostMatrix bias = random_matrix(dt, 1, c.n, c.n, c.seed + 3);
  // DGELU's input: forward pre-activations, spread over [-2, 2) to cover GELU's bend.
  const HostMatrix aux_in = random_matrix(dt, c.m, c.n, strides.ldaux, c.seed + 4, 2.0f);
  const int64_t bgrad_len = bgrad_length(desc);

  const size_t offset = c.misalign * es;
  DeviceMatrix da(a.values.size() * es, offset), db(b.values.size() * es, offset);
  DeviceMatrix dd(d0.values.size() * es, offset), dbias(bias.values.size() * es, offset);
  DeviceMatrix daux(aux_in.values.size() * es, offset);
  DeviceMatrix dbgrad(sz(bgrad_len) * es, offset);
  cudaStream_t s = stream;
  da.upload(encode(dt, a, false), s);
  db.upload(encode(dt, b, false), s);
  if (c.accumulate)
    dd.upload(encode(dt, d0, /*poison_padding=*/true), s);
  else
    dd.poison(s);
  if (epilogue_reads_bias(e)) dbias.upload(encode(dt, bias, false), s);
  if (epilogue_reads_aux(e)) daux.upload(encode(dt, aux_in, false), s);
  if (epilogue_writes_aux(e)) daux.poison(s);
  dbgrad.poison(s);

  MatmulPointers p;
  p.a = da.ptr;
  p.b = db.ptr;
  p.d = dd.ptr;
  if (epilogue_reads_bias(e)) p.bias = dbias.ptr;
  if (epilogue_uses_aux(e)) p.aux = daux.ptr;
  if (epilogue_writes_bgrad(e)) p.bgrad = dbgrad.ptr;
  enqueue(desc, p);

  const Reference ref = reference_for(c, a, b, bias, aux_in, d0);
  const bool activation = e != Epilogue::kNone && e != Epilogue::kBias && e != Epilogue::kBgrad;
  const double gemm_tol = gemm_tolerance(dt, c.allow_tf32);
  const double act_tol = activation_tolerance(dt, c.allow_tf32);

  const std::vector<uint8_t> d_bytes = dd.download(s);
  expect_matches("D", logical_values(dt, d_bytes, c.m, c.n, strides.ldd), ref.d,
                 activation ? act_tol : gemm_tol);
  EXPECT_EQ(touched_padding_bytes(dt, d_bytes, c.m, c.n, strides.ldd), size_t{0})
      << "D padding written";
  if (epilogue_writes_aux(e)) {
    const std::vector<uint8_t> aux_bytes = daux.download(s);
    expect_matches("aux", logical_values(dt, aux_bytes, c.m, c.n, strides.ldaux), ref.aux,
                   gemm_tol);
    EXPECT_EQ(touched_padding_bytes(dt, aux_bytes, c.m, c.n, strides.ldaux), size_t{0})
        << "aux padding written";
  }
  if (epilogue_writes_bgrad(e)) {
    const std::vector<uint8_t> bgrad_bytes = dbgrad.download(s);
    expect_matches("bgrad", logical_values(dt, bgrad_bytes, 1, bgrad_len, bgrad_len), ref.bgrad,
                   e == Epilogue::kDGeluBgrad ? act_tol : gemm_tol);
  }
}

void run_case(const Case& c, cudaStream_t stream, void* workspace, size_t workspace_bytes, bool in_graph = false) {
  run_case_with(c, stream, [&](const MatmulDesc& desc, const MatmulPointers& p) {
    if (in_graph)
      matmul_in_graph(desc, p, workspace, workspace_bytes, stream);
    else
      matmul(desc, p, workspace, workspace_bytes, stream);
  });
}

struct Shape {
  int64_t m, n, k;
};

const DataType kDtypes[] = {DataType::kFloat32, DataType::kBFloat16, DataType::kFloat16};

TEST(GemmGpu, AllTransposesShapesAndDtypes) {
  TPEXT_REQUIRE_GPUS(1);
  GpuEnv env;
  struct Precision {
    DataType dtype;
    bool tf32;
  };
  const Precision precisions[] = {{DataType::kFloat32, false}, {DataType::kFloat32, true},
                                  {DataType::kBFloat16, false}, {DataType::kFloat16, false}};
  const Shape shapes[] = {{1, 3, 5}, {17, 33, 65}, {256, 512, 384}};
  uint32_t seed = 100;
  for (const Precision& pr : precisions)
    for (const Shape& sh : shapes)
      for (int t = 0; t < 4; ++t)
        for (int64_t pad : {0, 3}) {
          Case c = gemm_case(sh.m, sh.n, sh.k, (t & 1) != 0, (t & 2) != 0, pr.dtype, Epilogue::kNone, pad, seed += 10);
          c.allow_tf32 = pr.tf32;
          run_case(c, env.stream.get(), env.workspace.get(), env.workspace_bytes);
        }
}

// Every epilogue in every dtype. The transposes covered per epilogue are those of its use in
// a linear layer and more: all four for the bias/GELU forms, trans_a = false for aux and DGELU
// (forward and dgrad layouts), trans_a = true for bgrad (the only one cuBLASLt offers).
TEST(GemmGpu, EveryEpilogue) {
  TPEXT_REQUIRE_GPUS(1);
  GpuEnv env;
  const Shape shapes[] = {{2, 3, 5}, {17, 33, 65}, {64, 96, 128}};
  uint32_t seed = 5000;
  for (DataType dt : kDtypes)
    for (Epilogue e : kAllEpilogues) {
      if (e == Epilogue::kNone) continue;  // covered above
      for (int t = 0; t < 4; ++t) {
        const bool trans_a = (t & 1) != 0, trans_b = (t & 2) != 0;
        if (e == Epilogue::kBgrad && !trans_a) continue;
        if (epilogue_uses_aux(e) && trans_a) continue;
        for (const Shape& sh : shapes)
          for (int64_t pad : {0, 5}) {
            run_case(gemm_case(sh.m, sh.n, sh.k, trans_a, trans_b, dt, e, pad, seed += 10), env.stream.get(),
                     env.workspace.get(), env.workspace_bytes);
          }
      }
    }
}

TEST(GemmGpu, AccumulateAddsToD) {
  TPEXT_REQUIRE_GPUS(1);
  GpuEnv env;
  const Shape shapes[] = {{17, 33, 65}, {64, 96, 128}};
  uint32_t seed = 9000;
  for (DataType dt : kDtypes)
    for (Epilogue e : {Epilogue::kNone, Epilogue::kBias, Epilogue::kBgrad})
      for (int t = 0; t < 4; ++t) {
        const bool trans_a = (t & 1) != 0, trans_b = (t & 2) != 0;
        if (e == Epilogue::kBgrad && !trans_a) continue;
        for (const Shape& sh : shapes)
          for (int64_t pad : {0, 2}) {
            Case c = gemm_case(sh.m, sh.n, sh.k, trans_a, trans_b, dt, e, pad, seed += 10);
            c.accumulate = true;
            run_case(c, env.stream.get(), env.workspace.get(), env.workspace_bytes);
          }
      }
}

// Pointers one element past an aligned address: the heuristic must be told (alignment hints)
// and pick kernels that cope.
TEST(GemmGpu, ElementAlignedPointers) {
  TPEXT_REQUIRE_GPUS(1);
  GpuEnv env;
  uint32_t seed = 12000;
  for (DataType dt : kDtypes)
    for (Epilogue e : {Epilogue::kNone, Epilogue::kBias})
      for (int t = 0; t < 4; ++t)
        for (int64_t pad : {0, 3}) {
          Case c = gemm_case(17, 33, 65, (t & 1) != 0, (t & 2) != 0, dt, e, pad, seed += 10);
          c.misalign = 1;
          run_case(c, env.stream.get(), env.workspace.get(), env.workspace_bytes);
        }
}

// k = 0: the empty product. D becomes 0 (or stays as it was when accumulating), aux and bgrad
// become 0, and padding stays untouched.
TEST(GemmGpu, EmptyReductionWritesZeros) {
  TPEXT_REQUIRE_GPUS(1);
  GpuEnv env;
  uint32_t seed = 15000;
  struct Variant {
    Epilogue epilogue;
    bool accumulate;
  };
  const Variant variants[] = {{Epilogue::kNone, false},  {Epilogue::kNone, true},
                              {Epilogue::kGelu, false},  {Epilogue::kGeluAux, false},
                              {Epilogue::kDGelu, false}, {Epilogue::kDGeluBgrad, false},
                              {Epilogue::kBgrad, false}, {Epilogue::kBgrad, true}};
  for (DataType dt : kDtypes)
    for (const Variant& v : variants)
      for (int64_t pad : {0, 3}) {
        Case c;
        c.m = 9;
        c.n = 20;
        c.k = 0;
        c.trans_a = v.epilogue == Epilogue::kBgrad;
        c.dtype = dt;
        c.epilogue = v.epilogue;
        c.accumulate = v.accumulate;
        c.pad = pad;
        c.seed = seed += 10;
        run_case(c, env.stream.get(), env.workspace.get(), env.workspace_bytes);
      }
}

// No workspace at all (null, 0 bytes): the heuristic must settle for algorithms needing none.
TEST(GemmGpu, NoWorkspace) {
  TPEXT_REQUIRE_GPUS(1);
  GpuEnv env;
  uint32_t seed = 18000;
  for (DataType dt : kDtypes)
    for (Epilogue e : {Epilogue::kNone, Epilogue::kBias})
      for (const Shape& sh : {Shape{64, 96, 128}, Shape{256, 512, 384}}) {
        run_case(gemm_case(sh.m, sh.n, sh.k, false, e == Epilogue::kBias, dt, e, 0, seed += 10), env.stream.get(),
                 nullptr, 0);
      }
}

// A packed row-major rows×cols device tensor for the end-to-end linear-layer test.
struct Tensor {
  Tensor(DataType dt_, int64_t rows_, int64_t cols_)
      : dt(dt_), rows(rows_), cols(cols_), mem(sz(rows_ * cols_) * element_size(dt_), 0) {}
  // Uploads random values (rounded to dt) and returns them.
  std::vector<float> fill_random(uint32_t seed, cudaStream_t s) {
    const HostMatrix h = random_matrix(dt, rows, cols, cols, seed);
    mem.upload(encode(dt, h, false), s);
    return h.values;
  }
  std::vector<float> read(cudaStream_t s) const {
    return logical_values(dt, mem.download(s), rows, cols, cols);
  }
  DataType dt;
  int64_t rows, cols;
  DeviceMatrix mem;
};

// A column-parallel fc1 (bias + GELU, pre-activation kept) then fc2 (bias), forward and
// backward, each GEMM checked against the layer's own index formula. Each reference uses the
// GPU's previous outputs as inputs, so every GEMM is judged on its own rounding only.
TEST(GemmGpu, LinearLayerForwardAndBackward) {
  TPEXT_REQUIRE_GPUS(1);
  GpuEnv env;
  const cudaStream_t s = env.stream.get();
  void* ws = env.workspace.get();
  const size_t wsb = env.workspace_bytes;
  const int64_t T = 48, In = 64, Hid = 96, Out = 40;  // tokens, features
  for (DataType dt : kDtypes) {
    SCOPED_TRACE(dtype_name(dt));
    const double gemm_tol = gemm_tolerance(dt, false), act_tol = activation_tolerance(dt, false);
    auto idx = [](int64_t r, int64_t c, int64_t cols) { return sz(r * cols + c); };
    // A layer's weight gradient dW = dY^T·In (outs x ins) with its bias gradient from the kBgrad
    // epilogue, db = Σ_t dY, against the host sums of the same inputs.
    auto check_wgrad = [&](const std::string& layer, const Tensor& dy, const std::vector<float>& hdy,
                           const Tensor& in, const std::vector<float>& hin, int64_t outs, int64_t ins) {
      Tensor dw(dt, outs, ins), db(dt, 1, outs);
      dw.mem.poison(s);
      db.mem.poison(s);
      MatmulDesc wg;
      wg.m = outs;
      wg.n = ins;
      wg.k = T;
      wg.trans_a = true;
      wg.dtype = dt;
      wg.epilogue = Epilogue::kBgrad;
      MatmulPointers pw;
      pw.a = dy.mem.ptr;
      pw.b = in.mem.ptr;
      pw.d = dw.mem.ptr;
      pw.bgrad = db.mem.ptr;
      matmul(wg, pw, ws, wsb, s);
      std::vector<double> ref_dw(sz(outs * ins), 0.0), ref_db(sz(outs), 0.0);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t o = 0; o < outs; ++o) {
          ref_db[sz(o)] += hdy[idx(t, o, outs)];
          for (int64_t i = 0; i < ins; ++i) ref_dw[idx(o, i, ins)] += double(hdy[idx(t, o, outs)]) * hin[idx(t, i, ins)];
        }
      expect_matches(layer + " weight grad", dw.read(s), ref_dw, gemm_tol);
      expect_matches(layer + " bias grad (bgrad)", db.read(s), ref_db, gemm_tol);
    };

    Tensor x(dt, T, In), w1(dt, Hid, In), b1(dt, 1, Hid);
    Tensor w2(dt, Out, Hid), b2(dt, 1, Out), dz(dt, T, Out);
    const std::vector<float> hx = x.fill_random(1, s), hw1 = w1.fill_random(2, s);
    const std::vector<float> hb1 = b1.fill_random(3, s), hw2 = w2.fill_random(4, s);
    const std::vector<float> hb2 = b2.fill_random(5, s), hdz = dz.fill_random(6, s);

    // fc1 forward: H = gelu(X·W1^T + b1), Pre = X·W1^T + b1.
    Tensor h(dt, T, Hid), pre(dt, T, Hid);
    h.mem.poison(s);
    pre.mem.poison(s);
    MatmulDesc fc1;
    fc1.m = T;
    fc1.n = Hid;
    fc1.k = In;
    fc1.trans_b = true;
    fc1.dtype = dt;
    fc1.epilogue = Epilogue::kBiasGeluAux;
    MatmulPointers p1;
    p1.a = x.mem.ptr;
    p1.b = w1.mem.ptr;
    p1.d = h.mem.ptr;
    p1.bias = b1.mem.ptr;
    p1.aux = pre.mem.ptr;
    matmul(fc1, p1, ws, wsb, s);
    std::vector<double> ref_pre(sz(T * Hid)), ref_h(ref_pre.size());
    for (int64_t t = 0; t < T; ++t)
      for (int64_t o = 0; o < Hid; ++o) {
        double v = hb1[sz(o)];
        for (int64_t i = 0; i < In; ++i) v += double(hx[idx(t, i, In)]) * hw1[idx(o, i, In)];
        ref_pre[idx(t, o, Hid)] = v;
        ref_h[idx(t, o, Hid)] = gelu(v);
      }
    const std::vector<float> gh = h.read(s), gpre = pre.read(s);
    expect_matches("fc1 pre-activation", gpre, ref_pre, gemm_tol);
    expect_matches("fc1 output", gh, ref_h, act_tol);

    // fc2 forward: Z = H·W2^T + b2.
    Tensor z(dt, T, Out);
    z.mem.poison(s);
    MatmulDesc fc2;
    fc2.m = T;
    fc2.n = Out;
    fc2.k = Hid;
    fc2.trans_b = true;
    fc2.dtype = dt;
    fc2.epilogue = Epilogue::kBias;
    MatmulPointers p2;
    p2.a = h.mem.ptr;
    p2.b = w2.mem.ptr;
    p2.d = z.mem.ptr;
    p2.bias = b2.mem.ptr;
    matmul(fc2, p2, ws, wsb, s);
    std::vector<double> ref_z(sz(T * Out));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t o = 0; o < Out; ++o) {
        double v = hb2[sz(o)];
        for (int64_t i = 0; i < Hid; ++i) v += double(gh[idx(t, i, Hid)]) * hw2[idx(o, i, Hid)];
        ref_z[idx(t, o, Out)] = v;
      }
    expect_matches("fc2 output", z.read(s), ref_z, gemm_tol);

    check_wgrad("fc2", dz, hdz, h, gh, Out, Hid);  // dW2 = dZ^T·H, db2 = Σ_t dZ

    // fc2 dgrad fused with fc1's GELU backward: dPre = (dZ·W2) ⊙ gelu'(Pre), db1 = Σ_t dPre.
    Tensor dpre(dt, T, Hid), db1(dt, 1, Hid);
    dpre.mem.poison(s);
    db1.mem.poison(s);
    MatmulDesc dg2;
    dg2.m = T;
    dg2.n = Hid;
    dg2.k = Out;
    dg2.dtype = dt;
    dg2.epilogue = Epilogue::kDGeluBgrad;
    MatmulPointers pd2;
    pd2.a = dz.mem.ptr;
    pd2.b = w2.mem.ptr;
    pd2.d = dpre.mem.ptr;
    pd2.aux = pre.mem.ptr;
    pd2.bgrad = db1.mem.ptr;
    matmul(dg2, pd2, ws, wsb, s);
    std::vector<double> ref_dpre(sz(T * Hid)), ref_db1(sz(Hid), 0.0);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < Hid; ++i) {
        double dh = 0.0;
        for (int64_t o = 0; o < Out; ++o) dh += double(hdz[idx(t, o, Out)]) * hw2[idx(o, i, Hid)];
        const double v = dh * gelu_grad(gpre[idx(t, i, Hid)]);
        ref_dpre[idx(t, i, Hid)] = v;
        ref_db1[sz(i)] += v;
      }
    const std::vector<float> gdpre = dpre.read(s);
    expect_matches("fc1 pre-activation grad", gdpre, ref_dpre, act_tol);
    expect_matches("fc1 bias grad (dgelu_bgrad)", db1.read(s), ref_db1, act_tol);

    check_wgrad("fc1", dpre, gdpre, x, hx, Hid, In);  // dW1 = dPre^T·X, and db1 again from kBgrad

    // fc1 dgrad: dX = dPre·W1.
    Tensor dx(dt, T, In);
    dx.mem.poison(s);
    MatmulDesc dg1;
    dg1.m = T;
    dg1.n = In;
    dg1.k = Hid;
    dg1.dtype = dt;
    MatmulPointers pd1;
    pd1.a = dpre.mem.ptr;
    pd1.b = w1.mem.ptr;
    pd1.d = dx.mem.ptr;
    matmul(dg1, pd1, ws, wsb, s);
    std::vector<double> ref_dx(sz(T * In), 0.0);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < In; ++i)
        for (int64_t o = 0; o < Hid; ++o)
          ref_dx[idx(t, i, In)] += double(gdpre[idx(t, o, Hid)]) * hw1[idx(o, i, In)];
    expect_matches("fc1 input grad", dx.read(s), ref_dx, gemm_tol);
  }
}

// Sets the process-wide autotune count (and how candidates are timed) for one test and puts both back.
struct AutotuneScope {
  explicit AutotuneScope(int candidates, int sustain_ms = 0)
      : previous(matmul_autotune()), previous_sustain_ms(matmul_autotune_sustain_ms()) {
    set_matmul_autotune(candidates);
    set_matmul_autotune_sustain_ms(sustain_ms);
  }
  ~AutotuneScope() {
    set_matmul_autotune(previous);
    set_matmul_autotune_sustain_ms(previous_sustain_ms);
  }
  int previous, previous_sustain_ms;
};

TEST(GemmAutotune, CandidateCountIsChecked) {
  const int before = matmul_autotune();
  for (int bad : {-1, kMaxAutotuneCandidates + 1}) {
    try {
      set_matmul_autotune(bad);
      ADD_FAILURE() << bad << " was accepted";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("candidates"), std::string::npos) << e.what();
    }
    EXPECT_EQ(matmul_autotune(), before) << "a rejected value must leave the setting alone";
  }
  AutotuneScope scope(kMaxAutotuneCandidates);
  EXPECT_EQ(matmul_autotune(), kMaxAutotuneCandidates);
}

TEST(GemmAutotune, SustainTimeIsChecked) {
  const int before = matmul_autotune_sustain_ms();
  for (int bad : {-1, kMaxAutotuneSustainMs + 1}) {
    try {
      set_matmul_autotune_sustain_ms(bad);
      ADD_FAILURE() << bad << " was accepted";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("ms: expected 0"), std::string::npos) << e.what();
    }
    EXPECT_EQ(matmul_autotune_sustain_ms(), before) << "a rejected value must leave the setting alone";
  }
  AutotuneScope scope(8, 50);
  EXPECT_EQ(matmul_autotune_sustain_ms(), 50);
}

// Whichever algorithm the timing picks, every epilogue, layout and dtype still matches the
// reference; accumulating GEMMs (not tuned) too. Then the plan of one large problem must have
// had several algorithms to choose from and be marked tuned.
// Both timings: the short one (sustain_ms 0) and the sustained one, whose plans of a bias-gradient
// epilogue are tuned too (checked against the first choice's outputs before one is kept).
void expect_autotuned_plans_correct(int sustain_ms, uint32_t seed) {
  GpuEnv env;
  AutotuneScope scope(8, sustain_ms);
  const Shape shapes[] = {{17, 33, 65}, {256, 512, 384}};
  for (DataType dt : kDtypes)
    for (Epilogue e : kAllEpilogues)
      for (int t = 0; t < 4; ++t) {
        const bool trans_a = (t & 1) != 0, trans_b = (t & 2) != 0;
        if (e == Epilogue::kBgrad && !trans_a) continue;
        if (epilogue_uses_aux(e) && trans_a) continue;
        for (const Shape& sh : shapes) {
          run_case(gemm_case(sh.m, sh.n, sh.k, trans_a, trans_b, dt, e, 0, seed += 10), env.stream.get(),
                   env.workspace.get(), env.workspace_bytes);
          if (e == Epilogue::kNone || e == Epilogue::kBias) {
            Case c = gemm_case(sh.m, sh.n, sh.k, trans_a, trans_b, dt, e, 0, seed += 10);
            c.accumulate = true;
            run_case(c, env.stream.get(), env.workspace.get(), env.workspace_bytes);
          }
        }
      }
  int device = 0;
  ASSERT_EQ(cudaGetDevice(&device), cudaSuccess);
  for (const Case& big : {gemm_case(256, 512, 384, false, true, DataType::kBFloat16, Epilogue::kBiasGeluAux, 0, 1),
                          gemm_case(256, 512, 384, true, false, DataType::kBFloat16, Epilogue::kBgrad, 0, 1)}) {
    SCOPED_TRACE(describe_case(big));
    // run_case's buffers are fresh allocations: 16-byte aligned, as the fake pointers are.
    const auto plan = find_plan(make_matmul_key(desc_for(big), pointers_for(big.epilogue), device,
                                                env.workspace_bytes, 8, sustain_ms));
    ASSERT_NE(plan, nullptr) << "no plan cached under the autotune key";
    EXPECT_GT(plan->candidate_count(), 1u) << "the heuristic offered one algorithm: nothing was tuned";
    EXPECT_TRUE(plan->tuned());
    EXPECT_LT(plan->chosen(), plan->candidate_count());
    std::cout << "[autotune sustain_ms=" << sustain_ms << "] " << describe_case(big) << ": chose "
              << plan->chosen() << " of " << plan->candidate_count() << ", " << plan->rejected()
              << " rejected by the output check\n";
  }
}

TEST(GemmGpu, AutotunedPlansStayCorrect) {
  TPEXT_REQUIRE_GPUS(1);
  expect_autotuned_plans_correct(0, 30000);
}

// 1 ms per timing: what is tested is the mechanism (rotated rounds, the per-call time, the check),
// not which algorithm wins.
TEST(GemmGpu, SustainedAutotunedPlansStayCorrect) {
  TPEXT_REQUIRE_GPUS(1);
  expect_autotuned_plans_correct(1, 35000);
}

// Thin weight-gradient GEMMs with the bias-gradient epilogue, as a row-parallel rank holding one to
// three input features runs them (dW = dY^T X, m output features, n local inputs, k tokens). On 2
// H200s (0ba7028) an autotuned plan of this kind wrote a wrong bias gradient. This test found why
// (5673920): in float16 with n = 1, 20 of the 32 candidates over these four shapes (all of them
// algorithm 13; the heuristic's first choice at 64 x 1 x 4096 and 1024 x 1 x 2048 among them)
// write the first of the m bias-gradient elements only; bfloat16, float32 and n = 2, 3 were
// right. So matmul() rejects that case (bgrad_epilogue_supported), and the tuner keeps a candidate
// only once its outputs agreed with the first choice's (gemm_verify.h). Every
// candidate is run here on fresh poisoned buffers, once and twice in a row (an algorithm that adds
// into its output would double it), its failures captured and printed rather than failed: a wrong
// candidate is cuBLASLt's, and only matters if matmul() can run it, which must then be right.
TEST(GemmGpu, BiasGradientOfThinWgradGemms) {
  TPEXT_REQUIRE_GPUS(1);
  GpuEnv env;
  int device = 0;
  ASSERT_EQ(cudaGetDevice(&device), cudaSuccess);
  const Shape shapes[] = {{5, 1, 6}, {5, 1, 64}, {5, 2, 6}, {5, 3, 100}, {64, 1, 4096}, {1024, 1, 2048}};
  uint32_t seed = 50000;
  size_t wrong_candidates = 0;
  for (DataType dt : kDtypes)
    for (Epilogue e : {Epilogue::kBgrad, Epilogue::kNone})
      for (const Shape& sh : shapes) {
        const Case c = gemm_case(sh.m, sh.n, sh.k, /*trans_a=*/true, false, dt, e, 0, seed += 10);
        const MatmulDesc resolved = with_resolved_leading_dims(desc_for(c));
        size_t candidates = 1;
        for (size_t i = 0; i < candidates; ++i) {
          bool candidate_wrong = false;
          for (int runs : {1, 2}) {
            std::string config;
            ::testing::TestPartResultArray failures;
            {
              ::testing::ScopedFakeTestPartResultReporter capture(
                  ::testing::ScopedFakeTestPartResultReporter::INTERCEPT_ONLY_CURRENT_THREAD, &failures);
              run_case_with(c, env.stream.get(), [&](const MatmulDesc&, const MatmulPointers& p) {
                MatmulPlan plan(cublaslt_handle(device), resolved, p, env.workspace_bytes, kMaxAutotuneCandidates);
                candidates = plan.candidate_count();
                config = plan.describe_candidate(i);
                for (int r = 0; r < runs; ++r)
                  ASSERT_EQ(plan.run_candidate(i, p, env.workspace.get(), env.workspace_bytes, env.stream.get()),
                            CUBLAS_STATUS_SUCCESS) << "candidate " << i << " refused";
              });
            }
            if (failures.size() == 0) continue;
            candidate_wrong = true;
            std::cout << "[cuBLASLt candidate wrong] " << describe_case(c) << " candidate " << i << " of "
                      << candidates << " (" << config << "), " << runs << " run(s): "
                      << failures.GetTestPartResult(0).message() << "\n";
            // What matmul() may run: any candidate, tuned (bias-gradient plans too, behind the
            // output check, which this does not count on). float16 with n = 1 and bgrad is
            // rejected instead.
            const bool reachable = e == Epilogue::kNone || bgrad_epilogue_supported(dt, sh.n);
            if (reachable)
              ADD_FAILURE() << "a wrong algorithm matmul() can run: " << describe_case(c) << " candidate " << i
                            << " (" << config << ")";
          }
          wrong_candidates += candidate_wrong;  // once per candidate, however many of its runs failed
        }
        AutotuneScope scope(8);
        if (e == Epilogue::kBgrad && !bgrad_epilogue_supported(dt, sh.n)) {
          expect_rejected(desc_for(c), pointers_for(e), "n");
          continue;
        }
        for (int call = 0; call < 2; ++call) {  // tunes (or not), then reuses the plan
          Case again = c;
          again.seed = seed += 10;
          run_case(again, env.stream.get(), env.workspace.get(), env.workspace_bytes);
        }
      }
  std::cout << "[thin wgrad] candidates that computed a wrong result: " << wrong_candidates << "\n";
}

// Inside a CUDA graph capture there is no timing (it would need a host wait): the captured GEMM
// runs the heuristic's first choice and is right; the first eager call afterwards tunes.
TEST(GemmGpu, AutotuneWaitsForAnEagerCall) {
  TPEXT_REQUIRE_GPUS(1);
  GpuEnv env;
  AutotuneScope scope(8);
  int device = 0;
  ASSERT_EQ(cudaGetDevice(&device), cudaSuccess);
  // A shape no other test uses, so the capture below makes its plan.
  const Case c = gemm_case(200, 328, 264, false, true, DataType::kBFloat16, Epilogue::kBias, 0, 40000);
  const MatmulKey key = make_matmul_key(desc_for(c), pointers_for(c.epilogue), device, env.workspace_bytes, 8);
  ASSERT_EQ(find_plan(key), nullptr) << "the shape was planned before this test";
  run_case(c, env.stream.get(), env.workspace.get(), env.workspace_bytes, /*in_graph=*/true);
  const auto plan = find_plan(key);
  ASSERT_NE(plan, nullptr);
  if (plan->candidate_count() > 1) {
    EXPECT_FALSE(plan->tuned()) << "timed inside a capture";
  }
  EXPECT_EQ(plan->chosen(), 0u);
  Case again = c;
  again.seed = 40010;
  run_case(again, env.stream.get(), env.workspace.get(), env.workspace_bytes);
  EXPECT_TRUE(plan->tuned());
}

// The tuner's output check (gemm_verify.h) on real GEMMs: a GEMM agrees with itself run again, and
// outputs poisoned and left unwritten (every element the epilogue writes: D, aux, bgrad) never
// agree with it. The last enqueue is the real one, which run_case_with then checks.
TEST(GemmGpu, OutputCheckSeesUnwrittenOutputs) {
  TPEXT_REQUIRE_GPUS(1);
  GpuEnv env;
  const cudaStream_t s = env.stream.get();
  uint32_t seed = 45000;
  for (DataType dt : kDtypes)
    for (Epilogue e : {Epilogue::kNone, Epilogue::kBiasGeluAux, Epilogue::kBgrad, Epilogue::kDGeluBgrad}) {
      const bool trans_a = e == Epilogue::kBgrad;
      const Case c = gemm_case(40, 24, 72, trans_a, !trans_a, dt, e, 3, seed += 10);
      run_case_with(c, s, [&](const MatmulDesc& desc, const MatmulPointers& p) {
        const MatmulDesc d = with_resolved_leading_dims(desc);
        const double tol = agreement_tolerance(d);
        matmul(desc, p, env.workspace.get(), env.workspace_bytes, s);
        const OutputSample ref = sample_outputs(d, p, s);
        EXPECT_EQ(ref.d.size(), size_t(c.m * c.n)) << "a small D is sampled whole";
        EXPECT_EQ(ref.aux.size(), epilogue_writes_aux(e) ? size_t(c.m * c.n) : 0u);
        EXPECT_EQ(ref.bgrad.size(), epilogue_writes_bgrad(e) ? size_t(bgrad_length(d)) : 0u);
        poison_outputs(d, p, s);
        const OutputSample poisoned = sample_outputs(d, p, s);
        for (const std::vector<double>* out : {&poisoned.d, &poisoned.aux, &poisoned.bgrad})
          for (double v : *out) ASSERT_TRUE(std::isnan(v)) << "poison left a number: " << v;
        EXPECT_FALSE(samples_agree(poisoned, ref, tol));
        matmul(desc, p, env.workspace.get(), env.workspace_bytes, s);
        EXPECT_TRUE(samples_agree(sample_outputs(d, p, s), ref, tol)) << "the same GEMM again disagrees";
      });
    }
}

TEST(GemmGpu, SecondIdenticalCallReusesThePlan) {
  TPEXT_REQUIRE_GPUS(1);
  GpuEnv env;
  // A workspace size no other test and no earlier repetition (--gtest_repeat) uses, so every
  // key below is new to the cache when this test starts.
  static size_t repetition = 0;
  const size_t ws_bytes = env.workspace_bytes - 4096 * ++repetition;
  void* ws = env.workspace.get();
  const cudaStream_t s = env.stream.get();

  Case c;
  c.m = 37;
  c.n = 41;
  c.k = 43;
  c.dtype = DataType::kFloat32;
  c.epilogue = Epilogue::kBias;
  c.seed = 1;
  const size_t before = matmul_cache_size();
  run_case(c, s, ws, ws_bytes);
  EXPECT_EQ(matmul_cache_size(), before + 1);
  c.seed = 2;  // new buffers, new values, same alignment class: the same plan
  run_case(c, s, ws, ws_bytes);
  EXPECT_EQ(matmul_cache_size(), before + 1);
  c.misalign = 1;  // 4-byte-aligned pointers: another plan
  run_case(c, s, ws, ws_bytes);
  EXPECT_EQ(matmul_cache_size(), before + 2);
  c.misalign = 0;
  run_case(c, s, ws, ws_bytes - 256);  // another workspace limit: another plan
  EXPECT_EQ(matmul_cache_size(), before + 3);

  // Different shapes in turn, twice: each right every time, one plan each.
  const Shape shapes[] = {{5, 7, 9}, {33, 17, 8}, {128, 64, 32}, {7, 300, 19}};
  for (int round = 0; round < 2; ++round)
    for (const Shape& sh : shapes) {
      Case v;
      v.m = sh.m;
      v.n = sh.n;
      v.k = sh.k;
      v.dtype = DataType::kBFloat16;
      v.trans_b = true;
      v.seed = static_cast<uint32_t>(round * 100 + sh.m);
      run_case(v, s, ws, ws_bytes);
    }
  EXPECT_EQ(matmul_cache_size(), before + 3 + 4);
}

// Threads share one plan (same desc and alignment) but not their pointers: the bias pointer
// set on the cached descriptor must be each call's own.
TEST(GemmGpu, ThreadsSharingAPlanKeepTheirOwnPointers) {
  TPEXT_REQUIRE_GPUS(1);
  int device = 0;
  TPEXT_CUDA_CHECK(cudaGetDevice(&device));
  std::vector<std::thread> threads;
  for (uint32_t t = 0; t < 4; ++t) {
    threads.emplace_back([t, device] {
      try {
        TPEXT_CUDA_CHECK(cudaSetDevice(device));
        GpuEnv env;  // own stream and workspace: a workspace must not serve two streams at once
        for (uint32_t i = 0; i < 8; ++i) {
          Case c;
          c.m = 64;
          c.n = 96;
          c.k = 128;
          c.trans_b = true;
          c.dtype = DataType::kBFloat16;
          c.epilogue = i % 2 == 0 ? Epilogue::kBias : Epilogue::kBgrad;
          c.trans_a = c.epilogue == Epilogue::kBgrad;
          c.seed = 20000 + 100 * t + i;
          run_case(c, env.stream.get(), env.workspace.get(), env.workspace_bytes);
        }
      } catch (const std::exception& e) {
        ADD_FAILURE() << "thread " << t << ": " << e.what();
      }
    });
  }
  for (std::thread& th : threads) th.join();
}

// A rejected call leaves nothing behind: the same stream and workspace then run a valid one.
TEST(GemmGpu, UsableAfterARejectedCall) {
  TPEXT_REQUIRE_GPUS(1);
  GpuEnv env;
  Case c;
  c.m = 16;
  c.n = 24;
  c.k = 32;
  c.dtype = DataType::kBFloat16;
  c.epilogue = Epilogue::kBias;
  MatmulDesc bad = desc_for(c);
  bad.ldd = 3;
  EXPECT_THROW(matmul(bad, pointers_for(Epilogue::kBias), env.workspace.get(), env.workspace_bytes,
                      env.stream.get()),
               InvalidArgument);
  run_case(c, env.stream.get(), env.workspace.get(), env.workspace_bytes);
}

}  // namespace
}  // namespace tpext::core
