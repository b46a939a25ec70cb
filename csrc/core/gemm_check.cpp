#include "gemm_check.h"

#include "error.h"

namespace tpext::core {
namespace {

bool is_known(Epilogue e) {
  switch (e) {
    case Epilogue::kNone:
    case Epilogue::kBias:
    case Epilogue::kGelu:
    case Epilogue::kBiasGelu:
    case Epilogue::kGeluAux:
    case Epilogue::kBiasGeluAux:
    case Epilogue::kDGelu:
    case Epilogue::kDGeluBgrad:
    case Epilogue::kBgrad:
      return true;
  }
  return false;
}

// The packed leading dimension of each stored matrix is its row length.
int64_t row_length_a(const MatmulDesc& d) { return d.trans_a ? d.m : d.k; }
int64_t row_length_b(const MatmulDesc& d) { return d.trans_b ? d.k : d.n; }

std::string str(int64_t v) { return std::to_string(v); }

[[noreturn]] void reject(const MatmulDesc& d, const std::string& what) {
  throw_invalid_argument("tpext matmul: " + what + " [" + describe(d) + "]");
}

// The checks take C strings and format only on failure: validation runs on every call.
void check_leading_dim(const MatmulDesc& d, const char* name, int64_t ld, int64_t row_length,
                       const char* row_what) {
  if (ld < 0) reject(d, std::string(name) + ": must be >= 0 (0 = packed); got " + str(ld));
  if (ld != 0 && ld < row_length)
    reject(d, std::string(name) + ": must be >= " + str(row_length) + " (" + row_what +
                  ") or 0 for packed; got " + str(ld));
}

// `used`: whether the call touches the buffer; `role` says how, for the message.
void check_pointer(const MatmulDesc& d, const char* name, const void* p, int64_t elements,
                   bool used, const char* role) {
  if (used && elements > 0 && p == nullptr)
    reject(d, std::string(name) + ": must not be null: " + role + " (" + str(elements) +
                  " elements)");
  if (!used && p != nullptr)
    reject(d, std::string(name) + ": must be null for epilogue " + epilogue_name(d.epilogue) +
                  ", which does not use it (a stray pointer would be silently ignored)");
}

}  // namespace

const char* epilogue_name(Epilogue e) {
  switch (e) {
    case Epilogue::kNone: return "none";
    case Epilogue::kBias: return "bias";
    case Epilogue::kGelu: return "gelu";
    case Epilogue::kBiasGelu: return "bias_gelu";
    case Epilogue::kGeluAux: return "gelu_aux";
    case Epilogue::kBiasGeluAux: return "bias_gelu_aux";
    case Epilogue::kDGelu: return "dgelu";
    case Epilogue::kDGeluBgrad: return "dgelu_bgrad";
    case Epilogue::kBgrad: return "bgrad";
  }
  return "unknown";
}

bool epilogue_reads_bias(Epilogue e) {
  return e == Epilogue::kBias || e == Epilogue::kBiasGelu || e == Epilogue::kBiasGeluAux;
}
bool epilogue_writes_aux(Epilogue e) {
  return e == Epilogue::kGeluAux || e == Epilogue::kBiasGeluAux;
}
bool epilogue_reads_aux(Epilogue e) { return e == Epilogue::kDGelu || e == Epilogue::kDGeluBgrad; }
bool epilogue_writes_bgrad(Epilogue e) {
  return e == Epilogue::kBgrad || e == Epilogue::kDGeluBgrad;
}

bool bgrad_epilogue_supported(DataType dtype, int64_t n) { return n >= (dtype == DataType::kFloat16 ? 2 : 1); }

int64_t bgrad_length(const MatmulDesc& d) {
  if (d.epilogue == Epilogue::kBgrad) return d.m;
  if (d.epilogue == Epilogue::kDGeluBgrad) return d.n;
  return 0;
}

MatmulDesc with_resolved_leading_dims(const MatmulDesc& d) {
  MatmulDesc r = d;
  if (r.lda == 0) r.lda = row_length_a(d);
  if (r.ldb == 0) r.ldb = row_length_b(d);
  if (r.ldd == 0) r.ldd = d.n;
  r.ldaux = epilogue_uses_aux(d.epilogue) ? (d.ldaux == 0 ? d.n : d.ldaux) : 0;
  return r;
}

void validate_matmul(const MatmulDesc& d, const MatmulPointers& p, const void* workspace,
                     size_t workspace_bytes) {
  if (d.dtype != DataType::kFloat32 && d.dtype != DataType::kBFloat16 &&
      d.dtype != DataType::kFloat16)
    reject(d, std::string("dtype: must be float32, bfloat16 or float16; got ") +
                  dtype_name(d.dtype));
  if (!is_known(d.epilogue))
    reject(d, "epilogue: unknown value " + str(static_cast<int64_t>(d.epilogue)));
  if (d.m < 0) reject(d, "m: must be >= 0; got " + str(d.m));
  if (d.n < 0) reject(d, "n: must be >= 0; got " + str(d.n));
  if (d.k < 0) reject(d, "k: must be >= 0; got " + str(d.k));
  if (d.sm_count_target < 0)
    reject(d, "sm_count_target: must be >= 0 (0: every SM); got " + str(d.sm_count_target));
  if (d.allow_tf32 && d.dtype != DataType::kFloat32)
    reject(d, std::string("allow_tf32: only applies to float32; got dtype ") + dtype_name(d.dtype));
  if (d.accumulate && d.epilogue != Epilogue::kNone && d.epilogue != Epilogue::kBias &&
      d.epilogue != Epilogue::kBgrad)
    reject(d, std::string("accumulate: not supported with epilogue ") + epilogue_name(d.epilogue) +
                  ": cuBLASLt applies it after adding D (gelu(A·B + D)), not D + gelu(A·B)");
  if (d.epilogue == Epilogue::kBgrad && !d.trans_a)
    reject(d, "trans_a: must be true for epilogue bgrad (A stored k×m, as dY is in the wgrad "
              "dW = dY^T·X); cuBLASLt's bias-gradient reduction (BGRADB) needs this operand "
              "transposed");
  if (d.epilogue == Epilogue::kBgrad && !bgrad_epilogue_supported(d.dtype, d.n))
    reject(d, d.n == 0 ? std::string("n: must be > 0 for epilogue bgrad: with no column no GEMM runs to write the "
                                     "bias gradient; sum it separately")
                       : std::string("n: must not be 1 for epilogue bgrad in float16: cuBLASLt's BGRADB then "
                                     "writes only the first bias-gradient element (seen on H200, CUDA 13.0); "
                                     "sum the bias gradient separately"));
  if (d.k == 0 && epilogue_reads_bias(d.epilogue))
    reject(d, std::string("k: must be > 0 for epilogue ") + epilogue_name(d.epilogue) +
                  ": with k = 0 the result is the broadcast bias, which cuBLASLt cannot produce");
  if (d.k == 1 && epilogue_reads_aux(d.epilogue))
    reject(d, std::string("k: must not be 1 for epilogue ") + epilogue_name(d.epilogue) +
                  ": cuBLASLt has no DGELU kernel for k = 1");

  check_leading_dim(d, "lda", d.lda, row_length_a(d),
                    d.trans_a ? "row length m of A stored k×m" : "row length k of A stored m×k");
  check_leading_dim(d, "ldb", d.ldb, row_length_b(d),
                    d.trans_b ? "row length k of B stored n×k" : "row length n of B stored k×n");
  check_leading_dim(d, "ldd", d.ldd, d.n, "row length n of D");
  if (epilogue_uses_aux(d.epilogue)) {
    check_leading_dim(d, "ldaux", d.ldaux, d.n, "row length n of aux");
    const int64_t ldaux = d.ldaux == 0 ? d.n : d.ldaux;
    if (ldaux % 8 != 0)
      reject(d, "ldaux: cuBLASLt needs the aux row stride to be a multiple of 8 elements; got " +
                    str(ldaux) + (d.ldaux == 0 ? " (packed, = n)" : "") + ": pass ldaux = " +
                    str((ldaux + 7) / 8 * 8) + " and allocate aux with that row stride");
  }

  const Epilogue e = d.epilogue;
  check_pointer(d, "a", p.a, d.m * d.k, true, "A has m·k elements");
  check_pointer(d, "b", p.b, d.k * d.n, true, "B has k·n elements");
  check_pointer(d, "d", p.d, d.m * d.n, true, "D has m·n elements");
  check_pointer(d, "bias", p.bias, d.n, epilogue_reads_bias(e),
                "the epilogue adds a bias of n elements");
  check_pointer(d, "aux", p.aux, d.m * d.n, epilogue_uses_aux(e),
                epilogue_writes_aux(e) ? "the epilogue writes the m×n pre-activation there"
                                       : "the epilogue reads the m×n forward pre-activation there");
  check_pointer(d, "bgrad", p.bgrad, bgrad_length(d), epilogue_writes_bgrad(e),
                "the epilogue writes the bias gradient there");

  if (workspace == nullptr && workspace_bytes > 0)
    reject(d, "workspace: is null but workspace_bytes = " + std::to_string(workspace_bytes) +
                  " (pass 0 bytes for no workspace)");
}

std::string describe(const MatmulDesc& d) {
  std::string s = "matmul m=" + str(d.m) + " n=" + str(d.n) + " k=" + str(d.k);
  s += std::string(" trans_a=") + (d.trans_a ? "true" : "false");
  s += std::string(" trans_b=") + (d.trans_b ? "true" : "false");
  s += " lda=" + str(d.lda) + " ldb=" + str(d.ldb) + " ldd=" + str(d.ldd);
  if (epilogue_uses_aux(d.epilogue)) s += " ldaux=" + str(d.ldaux);
  s += std::string(" dtype=") + dtype_name(d.dtype);
  s += std::string(" epilogue=") + epilogue_name(d.epilogue);
  if (d.accumulate) s += " accumulate=true";
  if (d.allow_tf32) s += " allow_tf32=true";
  if (d.sm_count_target > 0) s += " sm_count_target=" + str(d.sm_count_target);
  return s;
}

}  // namespace tpext::core
