#include "gemm_plan.h"

#include <string>
#include <unordered_map>

#include "cublas_error.h"
#include "gemm_check.h"

// Row-major to column-major. cuBLASLt is column-major, and a row-major r×c matrix with row
// stride ld is, byte for byte, a column-major c×r matrix with leading dimension ld. So
//   D = op(A)·op(B)   (row-major, m×n)   is   D^T = op(B)^T · op(A)^T   (column-major, n×m)
// and we hand cuBLASLt our B as its A and our A as its B, with m and n swapped:
//   cuBLAS A = our B: stored k×n row-major = column-major n×k         -> OP_N (trans_b false)
//                     stored n×k row-major = column-major k×n         -> OP_T (trans_b true)
//   cuBLAS B = our A: stored m×k row-major = column-major k×m         -> OP_N (trans_a false)
//                     stored k×m row-major = column-major m×k         -> OP_T (trans_a true)
//   D:                m×n row-major        = column-major n×m, ld = ldd
// Epilogue vectors follow: cuBLASLt's bias has one entry per row of its D = our n columns,
// broadcast over our m rows, which is a linear layer's bias. The GELU aux matrix has D's
// shape: row-major m×n with row stride ldaux.
//
// Bias gradients. cuBLASLt offers BGRADA (sum of its op(A) over k: n values, the column sums of
// our op(B)) and BGRADB (sum of its op(B) over k; its op(B) is op(A)^T, so m values:
// bgrad[i] = Σ_k op(A)[i, k]). In wgrad, dW[N,K] = dY^T·X with A = dY stored M×N (trans_a), the
// bias grad db[N] = Σ over the M tokens of dY = Σ_k op(A)[i, k]: that is BGRADB, so kBgrad is
// BGRADB. cuBLASLt implements BGRADB only for a transposed B operand (TransformerEngine's and
// llm.c's wgrad use it exactly so; nvmath-python transposes B internally for it), which is our
// trans_a = true: validation demands it. DGELU_BGRAD is simpler: it sums D over its columns,
// i.e. one value per our column j, summed over our m rows: the pre-activation's bias grad.

namespace tpext::core {
namespace {

cudaDataType_t cuda_type(DataType dt) {
  switch (dt) {
    case DataType::kFloat32: return CUDA_R_32F;
    case DataType::kBFloat16: return CUDA_R_16BF;
    case DataType::kFloat16: return CUDA_R_16F;
    default: break;
  }
  throw_invalid_argument(std::string("dtype: no cuBLASLt matmul for ") + dtype_name(dt));
}

cublasLtEpilogue_t cublas_epilogue(Epilogue e) {
  switch (e) {
    case Epilogue::kNone: return CUBLASLT_EPILOGUE_DEFAULT;
    case Epilogue::kBias: return CUBLASLT_EPILOGUE_BIAS;
    case Epilogue::kGelu: return CUBLASLT_EPILOGUE_GELU;
    case Epilogue::kBiasGelu: return CUBLASLT_EPILOGUE_GELU_BIAS;
    case Epilogue::kGeluAux: return CUBLASLT_EPILOGUE_GELU_AUX;
    case Epilogue::kBiasGeluAux: return CUBLASLT_EPILOGUE_GELU_AUX_BIAS;
    case Epilogue::kDGelu: return CUBLASLT_EPILOGUE_DGELU;
    case Epilogue::kDGeluBgrad: return CUBLASLT_EPILOGUE_DGELU_BGRAD;
    case Epilogue::kBgrad: return CUBLASLT_EPILOGUE_BGRADB;  // see the comment at the top
  }
  throw_invalid_argument("epilogue: unknown value " + std::to_string(static_cast<int>(e)));
}

template <typename T>
void set_attribute(cublasLtMatmulDesc_t op, cublasLtMatmulDescAttributes_t attr, const T& value,
                   const std::string& what) {
  TPEXT_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, attr, &value, sizeof(value)), what);
}

template <typename T>
void set_preference(cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attr,
                    const T& value, const std::string& what) {
  TPEXT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &value, sizeof(value)), what);
}

// A column-major rows×cols layout.
std::unique_ptr<cublasLtMatrixLayoutOpaque_t, CublasLtDeleter> make_layout(
    cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld, const std::string& what) {
  cublasLtMatrixLayout_t layout = nullptr;
  TPEXT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&layout, type, static_cast<uint64_t>(rows),
                                                static_cast<uint64_t>(cols), ld),
                     what);
  return std::unique_ptr<cublasLtMatrixLayoutOpaque_t, CublasLtDeleter>(layout);
}

}  // namespace

void CublasLtDeleter::operator()(cublasLtMatmulDescOpaque_t* p) const {
  (void)cublasLtMatmulDescDestroy(p);
}
void CublasLtDeleter::operator()(cublasLtMatrixLayoutOpaque_t* p) const {
  (void)cublasLtMatrixLayoutDestroy(p);
}
void CublasLtDeleter::operator()(cublasLtMatmulPreferenceOpaque_t* p) const {
  (void)cublasLtMatmulPreferenceDestroy(p);
}

cublasLtHandle_t cublaslt_handle(int device) {
  static std::mutex mu;
  // Never destroyed: a static destructor would run cublasLtDestroy during CUDA's own teardown
  // at exit, which can fail or crash; the process exit reclaims the handles anyway.
  static auto* handles = new std::unordered_map<int, cublasLtHandle_t>();
  std::lock_guard<std::mutex> lock(mu);
  auto it = handles->find(device);
  if (it != handles->end()) return it->second;
  cublasLtHandle_t handle = nullptr;
  TPEXT_CUBLAS_CHECK(cublasLtCreate(&handle),
                     "creating the cuBLASLt handle of device " + std::to_string(device));
  handles->emplace(device, handle);
  return handle;
}

uint8_t alignment_class(const void* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  if (address == 0) return 0;
  uint8_t alignment = 16;
  while (alignment > 1 && address % alignment != 0) alignment /= 2;
  return alignment;
}

MatmulPlan::MatmulPlan(cublasLtHandle_t handle, const MatmulDesc& desc, const MatmulPointers& ptrs,
                       size_t workspace_bytes, int candidates, int sustain_ms)
    : handle_(handle), desc_(desc), what_(describe(desc)), sustain_ms_(sustain_ms) {
  const cudaDataType_t type = cuda_type(desc.dtype);
  const cublasComputeType_t compute =
      desc.allow_tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;

  cublasLtMatmulDesc_t op = nullptr;
  TPEXT_CUBLAS_CHECK(cublasLtMatmulDescCreate(&op, compute, CUDA_R_32F), what_);
  op_.reset(op);
  const int32_t trans_cublas_a = desc.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int32_t trans_cublas_b = desc.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  set_attribute(op, CUBLASLT_MATMUL_DESC_TRANSA, trans_cublas_a, what_);
  set_attribute(op, CUBLASLT_MATMUL_DESC_TRANSB, trans_cublas_b, what_);
  const uint32_t epilogue = cublas_epilogue(desc.epilogue);
  set_attribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue, what_);
  if (epilogue_uses_aux(desc.epilogue)) {
    const int64_t ldaux = desc.ldaux;
    set_attribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, ldaux, what_);
  }
  if (desc.sm_count_target > 0) {
    // Before the heuristic query, which then picks a kernel sized for that many SMs.
    const int32_t sms = desc.sm_count_target;
    set_attribute(op, CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET, sms, what_);
  }
  // Bias, aux and bgrad keep their default data type: D's, which is our dtype.
  set_epilogue_pointers(ptrs);

  layout_cublas_a_ = desc.trans_b ? make_layout(type, desc.k, desc.n, desc.ldb, what_)
                                  : make_layout(type, desc.n, desc.k, desc.ldb, what_);
  layout_cublas_b_ = desc.trans_a ? make_layout(type, desc.m, desc.k, desc.lda, what_)
                                  : make_layout(type, desc.k, desc.m, desc.lda, what_);
  layout_d_ = make_layout(type, desc.n, desc.m, desc.ldd, what_);

  cublasLtMatmulPreference_t raw_pref = nullptr;
  TPEXT_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&raw_pref), what_);
  std::unique_ptr<cublasLtMatmulPreferenceOpaque_t, CublasLtDeleter> pref(raw_pref);
  const uint64_t max_workspace = workspace_bytes;
  set_preference(raw_pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, max_workspace, what_);
  // Without these the heuristic assumes 256-byte-aligned buffers and may pick a kernel that
  // needs more alignment than a tensor view starting mid-allocation has.
  const uint32_t align_cublas_a = alignment_class(ptrs.b);
  const uint32_t align_cublas_b = alignment_class(ptrs.a);
  const uint32_t align_d = alignment_class(ptrs.d);
  set_preference(raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_cublas_a, what_);
  set_preference(raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_cublas_b, what_);
  set_preference(raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_d, what_);
  set_preference(raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_d, what_);

  const int wanted = candidates < 1 ? 1 : candidates;
  std::vector<cublasLtMatmulHeuristicResult_t> results(static_cast<size_t>(wanted));
  int found = 0;
  const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(
      handle_, op, layout_cublas_a_.get(), layout_cublas_b_.get(), layout_d_.get(),
      layout_d_.get(), raw_pref, wanted, results.data(), &found);
  if (status == CUBLAS_STATUS_SUCCESS) {
    for (int i = 0; i < found; ++i)
      if (results[static_cast<size_t>(i)].state == CUBLAS_STATUS_SUCCESS) candidates_.push_back(results[static_cast<size_t>(i)].algo);
  }
  if (status == CUBLAS_STATUS_NOT_SUPPORTED || (status == CUBLAS_STATUS_SUCCESS && candidates_.empty())) {
    std::string msg = "tpext cuBLASLt error: cublasLtMatmulAlgoGetHeuristic found no algorithm";
    msg += " for " + what_ + " with workspace_bytes=" + std::to_string(workspace_bytes);
    msg += " and pointer alignments a=" + std::to_string(align_cublas_b) + " b=" +
           std::to_string(align_cublas_a) + " d=" + std::to_string(align_d) + " bytes";
    throw CublasError(msg, CUBLAS_STATUS_NOT_SUPPORTED);
  }
  if (status != CUBLAS_STATUS_SUCCESS)
    throw_cublas_error(status, "cublasLtMatmulAlgoGetHeuristic", what_);
  tuned_ = candidates_.size() == 1;  // nothing to choose between
}

void MatmulPlan::set_epilogue_pointers(const MatmulPointers& ptrs) {
  if (epilogue_reads_bias(desc_.epilogue)) {
    const void* bias = ptrs.bias;
    set_attribute(op_.get(), CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias, what_);
  }
  if (epilogue_writes_bgrad(desc_.epilogue)) {
    void* bgrad = ptrs.bgrad;  // cuBLASLt writes the bias gradient through the bias pointer
    set_attribute(op_.get(), CUBLASLT_MATMUL_DESC_BIAS_POINTER, bgrad, what_);
  }
  if (epilogue_uses_aux(desc_.epilogue)) {
    void* aux = ptrs.aux;
    set_attribute(op_.get(), CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, aux, what_);
  }
}

cublasStatus_t MatmulPlan::enqueue(const cublasLtMatmulAlgo_t& algo, const MatmulPointers& ptrs, void* workspace,
                                   size_t workspace_bytes, cudaStream_t stream) {
  const float alpha = 1.0f;
  const float beta = desc_.accumulate ? 1.0f : 0.0f;  // beta = 0: D is not read, may be garbage
  set_epilogue_pointers(ptrs);
  return cublasLtMatmul(handle_, op_.get(), &alpha, ptrs.b, layout_cublas_a_.get(), ptrs.a, layout_cublas_b_.get(),
                        &beta, ptrs.d, layout_d_.get(), ptrs.d, layout_d_.get(), &algo, workspace, workspace_bytes,
                        stream);
}

void MatmulPlan::run(const MatmulPointers& ptrs, void* workspace, size_t workspace_bytes,
                     cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!tuned_ && candidates_.size() > 1) tune_locked(ptrs, workspace, workspace_bytes, stream);
  TPEXT_CUBLAS_CHECK(enqueue(candidates_[chosen_], ptrs, workspace, workspace_bytes, stream), what_);
}

cublasStatus_t MatmulPlan::run_candidate(size_t i, const MatmulPointers& ptrs, void* workspace,
                                         size_t workspace_bytes, cudaStream_t stream) {
  if (i >= candidates_.size())
    throw_invalid_argument("run_candidate: i: expected below " + std::to_string(candidates_.size()) + ", got " +
                           std::to_string(i));
  std::lock_guard<std::mutex> lock(mu_);
  return enqueue(candidates_[i], ptrs, workspace, workspace_bytes, stream);
}

std::string MatmulPlan::describe_candidate(size_t i) const {
  if (i >= candidates_.size())
    throw_invalid_argument("describe_candidate: i: expected below " + std::to_string(candidates_.size()) +
                           ", got " + std::to_string(i));
  const cublasLtMatmulAlgo_t& algo = candidates_[i];
  auto config = [&algo](cublasLtMatmulAlgoConfigAttributes_t attr) -> long long {
    uint32_t value = 0;  // every attribute read here is 32 bits wide or less
    size_t written = 0;
    if (cublasLtMatmulAlgoConfigGetAttribute(&algo, attr, &value, sizeof(value), &written) != CUBLAS_STATUS_SUCCESS)
      return -1;
    return static_cast<long long>(value);
  };
  return "algo " + std::to_string(config(CUBLASLT_ALGO_CONFIG_ID)) + " tile " +
         std::to_string(config(CUBLASLT_ALGO_CONFIG_TILE_ID)) + " splitk " +
         std::to_string(config(CUBLASLT_ALGO_CONFIG_SPLITK_NUM)) + " reduction " +
         std::to_string(config(CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME));
}

bool MatmulPlan::tuned() const {
  std::lock_guard<std::mutex> lock(mu_);
  return tuned_;
}

size_t MatmulPlan::chosen() const {
  std::lock_guard<std::mutex> lock(mu_);
  return chosen_;
}

}  // namespace tpext::core
