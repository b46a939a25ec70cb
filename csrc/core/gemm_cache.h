// matmul's memory of the GEMMs it has planned. Building a plan (descriptors, layouts, the
// heuristic query) costs far more than small GEMMs themselves, so it is done once per distinct
// problem. The key is everything the plan depends on: every field of the (resolved) desc, the
// device, the workspace size the heuristic was allowed, and the 16-byte alignment class of each
// pointer, since the heuristic picks kernels by alignment; the pointers themselves are set per
// call. Not public API (tests use it).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "gemm.h"
#include "gemm_plan.h"

namespace tpext::core {

struct MatmulKey {
  int device = 0;
  int64_t m = 0, n = 0, k = 0;
  int64_t lda = 0, ldb = 0, ldd = 0, ldaux = 0;  // resolved: never 0 (packed) here
  bool trans_a = false, trans_b = false, accumulate = false, allow_tf32 = false;
  int sm_count_target = 0;
  int autotune = 0;  // matmul_autotune() when the plan was made: a plan tuned or not is another plan
  int autotune_sustain_ms = 0;  // and how it was tuned (0 when autotune is 0)
  DataType dtype = DataType::kFloat32;
  Epilogue epilogue = Epilogue::kNone;
  size_t workspace_bytes = 0;
  uint8_t align_a = 0, align_b = 0, align_d = 0, align_bias = 0, align_aux = 0, align_bgrad = 0;

  bool operator==(const MatmulKey& other) const;
  bool operator!=(const MatmulKey& other) const { return !(*this == other); }
};

struct MatmulKeyHash {
  size_t operator()(const MatmulKey& key) const;
};

// `desc` must be valid; its 0 (packed) leading dimensions are resolved first, so a packed desc
// and the same desc with explicit row lengths share a plan.
MatmulKey make_matmul_key(const MatmulDesc& desc, const MatmulPointers& ptrs, int device,
                          size_t workspace_bytes, int autotune = 0, int autotune_sustain_ms = 0);

// The cached plan for `key`, or null.
std::shared_ptr<MatmulPlan> find_plan(const MatmulKey& key);

// Caches `plan` under `key` and returns the cached plan: another thread's, if it inserted one
// for the same key first. The cache holds at most 4096 plans and starts over when full, so a
// workload whose shapes never repeat (varying sequence lengths) cannot grow it without bound;
// plans in use elsewhere stay alive through their shared_ptr.
std::shared_ptr<MatmulPlan> insert_plan(const MatmulKey& key, std::shared_ptr<MatmulPlan> plan);

size_t plan_cache_size();

}  // namespace tpext::core
