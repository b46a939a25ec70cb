// The tensor-parallel linear layers as torch ops: argument checks, output and workspace
// allocation from the caching allocator, the current stream; the schedules live in core/tp_linear.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <atomic>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "core/gemm.h"
#include "core/gemm_check.h"
#include "core/tp_linear.h"
#include "error_translation.h"
#include "overlap.h"
#include "registry.h"
#include "tensor_checks.h"

namespace tpext::adapter {

namespace {
std::atomic<int> g_overlap_sms{0};
std::atomic<double> g_row_tail_weight{0.0};
}  // namespace

double row_tail_weight() { return g_row_tail_weight.load(std::memory_order_relaxed); }

void set_row_tail_weight(double weight) {
  core::check_tail_weight("set_row_tail_weight: weight", weight);
  g_row_tail_weight.store(weight, std::memory_order_relaxed);
}

int overlap_sms() { return g_overlap_sms.load(std::memory_order_relaxed); }

void set_overlap_sms(int sms) {
  if (sms < 0)
    throw core::InvalidArgument("set_overlap_sms: sms: expected >= 0 SMs left to the collective (0: cuBLASLt's "
                                "choice), got " + std::to_string(sms));
  g_overlap_sms.store(sms, std::memory_order_relaxed);
}

namespace {

using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// The checks run on every call of every op, so a message is built only when its check fails
// (formatting devices, shapes and strides up front cost a few microseconds per call).
template <typename Message>
void require(bool ok, Message&& message) {
  if (!ok) core::throw_invalid_argument(std::forward<Message>(message)());
}

std::string dev(const at::Tensor& t) { return t.device().str(); }

void check_operand(const at::Tensor& t, const char* op, const char* arg, const at::Tensor& ref, int64_t dims) {
  require(t.defined(), [&] { return arg_prefix(op, arg) + "expected a tensor, got None"; });
  require(t.is_cuda(), [&] { return arg_prefix(op, arg) + "expected a CUDA tensor, got one on " + dev(t); });
  require(t.device() == ref.device(),
          [&] { return arg_prefix(op, arg) + "expected a tensor on " + dev(ref) + " (where input is), got " + dev(t); });
  require(t.scalar_type() == ref.scalar_type(), [&] {
    return arg_prefix(op, arg) + "expected dtype " + std::string(c10::toString(ref.scalar_type())) +
           " (the dtype of input), got " + c10::toString(t.scalar_type());
  });
  if (dims > 0)
    require(t.dim() == dims, [&] {
      return arg_prefix(op, arg) + "expected a " + std::to_string(dims) + "-d tensor, got shape " + c10::str(t.sizes());
    });
  require(t.is_contiguous(), [&] {
    return arg_prefix(op, arg) + "expected a contiguous tensor, got strides " + c10::str(t.strides()) + " for sizes " +
           c10::str(t.sizes()) + "; call .contiguous() first";
  });
}

core::DataType gemm_dtype(const at::Tensor& input, const char* op) {
  const auto t = input.scalar_type();
  require(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, [&] {
    return arg_prefix(op, "input") + "expected dtype float32, bfloat16 or float16, got " + c10::toString(t);
  });
  return to_core_dtype(t, op, "input");
}

// input [..., K] and weight [N, K]; returns (M, N, K).
std::tuple<int64_t, int64_t, int64_t> check_linear(const char* op, const at::Tensor& input, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias) {
  require(input.defined() && input.is_cuda(), [&] {
    return arg_prefix(op, "input") + "expected a CUDA tensor, got " + (input.defined() ? "one on " + dev(input) : "None");
  });
  require(input.dim() >= 1, [&] { return arg_prefix(op, "input") + "expected at least 1 dimension, got a scalar"; });
  check_operand(input, op, "input", input, 0);
  (void)gemm_dtype(input, op);
  check_operand(weight, op, "weight", input, 2);
  require(input.size(-1) == weight.size(1), [&] {
    return arg_prefix(op, "input") + "expected last dimension " + std::to_string(weight.size(1)) +
           " (weight.shape[1], the in_features of this shard), got shape " + c10::str(input.sizes());
  });
  if (bias.has_value() && bias->defined()) {
    check_operand(*bias, op, "bias", input, 1);
    require(bias->size(0) == weight.size(0), [&] {
      return arg_prefix(op, "bias") + "expected " + std::to_string(weight.size(0)) + " elements (weight.shape[0]), got " +
             std::to_string(bias->size(0));
    });
  }
  const int64_t k = weight.size(1);
  // The rows are the leading dimensions' product, not numel / k: with no input feature (k = 0, an
  // empty shard) numel is 0 whatever the rows, and m = 0 returned the output unwritten.
  const int64_t m = c10::multiply_integers(input.sizes().slice(0, input.dim() - 1));
  return {m, weight.size(0), k};
}

std::vector<int64_t> with_last(const at::Tensor& t, int64_t last) {
  auto s = t.sizes().vec();
  s.back() = last;
  return s;
}

bool tf32(const at::Tensor& t) { return t.scalar_type() == at::kFloat && at::globalContext().allowTF32CuBLAS(); }

core::Workspace workspace_for(const at::Tensor& like, at::Tensor& holder) {
  holder = at::empty({static_cast<int64_t>(core::matmul_workspace_bytes())}, like.options().dtype(at::kByte));
  return core::Workspace{holder.data_ptr(), static_cast<size_t>(holder.numel())};
}

cudaStream_t stream_of(const at::Tensor& t) { return at::cuda::getCurrentCUDAStream(t.get_device()).stream(); }

void check_comm_device(const core::Communicator& comm, const at::Tensor& input, const char* op) {
  require(input.get_device() == comm.device(), [&] {
    return arg_prefix(op, "input") + "expected a tensor on cuda:" + std::to_string(comm.device()) + " (the device of " +
           comm.describe() + "), got one on " + dev(input);
  });
}

// Column-parallel forward: out = act(input · weight^T + bias), no communication. With GELU, `pre`
// is the pre-activation the backward needs, written by the same GEMM (its aux output); keep_pre
// false (a forward no backward will follow: inference) skips writing it and returns it empty.
std::tuple<at::Tensor, at::Tensor> linear_impl(const at::Tensor& input, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias, const std::string& activation,
                                               bool keep_pre) {
  at::Tensor out, pre;
  TPEXT_TRANSLATE_ERRORS({
    require(activation == "none" || activation == "gelu",
            [&] { return "linear: activation: expected 'none' or 'gelu', got '" + activation + "'"; });
    auto [m, n, k] = check_linear("linear", input, weight, bias);
    c10::cuda::CUDAGuard guard(input.device());
    const bool has_bias = bias.has_value() && bias->defined();
    const bool gelu = activation == "gelu";
    out = at::empty(with_last(input, n), input.options());
    pre = gelu && keep_pre ? at::empty(with_last(input, n), input.options()) : at::empty({0}, input.options());
    if (m == 0 || n == 0) return std::make_tuple(out, pre);
    // cuBLASLt wants the aux (pre-activation) row stride to be a multiple of 8; otherwise the
    // GELU runs as a torch op after a bias-only GEMM into the pre-activation (`pre`, or a scratch
    // when it is not kept). Without aux, any n fuses.
    const bool fused_gelu = gelu && k > 0 && (!keep_pre || n % 8 == 0);
    const at::Tensor unfused = gelu && !fused_gelu ? (keep_pre ? pre : at::empty_like(out)) : at::Tensor();
    core::MatmulDesc d;
    d.m = m;
    d.n = n;
    d.k = k;
    d.trans_b = true;
    d.dtype = gemm_dtype(input, "linear");
    d.allow_tf32 = tf32(input);
    if (fused_gelu && keep_pre) d.epilogue = has_bias ? core::Epilogue::kBiasGeluAux : core::Epilogue::kGeluAux;
    else if (fused_gelu) d.epilogue = has_bias ? core::Epilogue::kBiasGelu : core::Epilogue::kGelu;
    else d.epilogue = has_bias ? core::Epilogue::kBias : core::Epilogue::kNone;
    if (has_bias && k == 0) {
      // An empty shard of in_features: the product is zero and only the bias remains.
      (unfused.defined() ? unfused : out).copy_(bias->expand({m, n}).reshape(out.sizes()));
    } else {
      core::MatmulPointers p;
      p.a = input.data_ptr();
      p.b = weight.data_ptr();
      p.d = unfused.defined() ? unfused.data_ptr() : out.data_ptr();
      p.bias = has_bias ? bias->data_ptr() : nullptr;
      p.aux = fused_gelu && keep_pre ? pre.data_ptr() : nullptr;
      if (fused_gelu && keep_pre) d.ldaux = n;
      at::Tensor ws_holder;
      core::matmul(d, p, workspace_for(input, ws_holder).ptr, ws_holder.numel(), stream_of(input));
    }
    if (unfused.defined()) at::gelu_out(out, unfused, "tanh");
  });
  return std::make_tuple(out, pre);
}

Triple backward_common(core::Communicator* comm, const char* op, const at::Tensor& grad_out, const at::Tensor& input,
                       const at::Tensor& weight, bool bias_grad, bool need_input_grad, bool need_weight_grad) {
  auto [m, n, k] = check_linear(op, input, weight, std::nullopt);
  check_operand(grad_out, op, "grad_out", input, 0);
  require(grad_out.dim() == input.dim() && grad_out.sizes().slice(0, grad_out.dim() - 1) == input.sizes().slice(0, input.dim() - 1) &&
              grad_out.size(-1) == n,
          [&, n = n] {
            return arg_prefix(op, "grad_out") + "expected shape " + c10::str(with_last(input, n)) + ", got " +
                   c10::str(grad_out.sizes());
          });
  require(!bias_grad || need_weight_grad,
          [&] { return arg_prefix(op, "bias_grad") + "needs need_weight_grad (db is computed by the wgrad GEMM)"; });
  if (comm != nullptr) check_comm_device(*comm, input, op);
  c10::cuda::CUDAGuard guard(input.device());
  at::Tensor dx = need_input_grad ? at::empty_like(input) : at::empty({0}, input.options());
  at::Tensor dw = need_weight_grad ? at::empty_like(weight) : at::empty({0}, input.options());
  at::Tensor db = bias_grad ? at::empty({n}, input.options()) : at::empty({0}, input.options());
  // The bias gradient rides on the wgrad GEMM's epilogue, except where that gives none
  // (core::bgrad_epilogue_supported: an empty shard, k = 0, and float16 with one input feature).
  // There torch sums grad_out's rows (in float32 for float16, as the epilogue does).
  const core::DataType dtype = gemm_dtype(input, op);
  const bool db_by_sum = bias_grad && !core::bgrad_epilogue_supported(dtype, k);
  auto sum_db = [&, m = m, n = n] {
    if (db_by_sum) at::sum_out(db, grad_out.reshape({m, n}), 0);
  };
  if (need_input_grad && k > 0 && (m == 0 || n == 0)) dx.zero_();
  if (need_weight_grad && (n == 0 || k == 0)) {
    sum_db();
    return std::make_tuple(dx, dw, db);
  }
  core::LinearBackward a;
  a.dy = grad_out.data_ptr();
  a.x = input.data_ptr();
  a.w = weight.data_ptr();
  a.dx = need_input_grad && m > 0 && n > 0 ? dx.data_ptr() : nullptr;
  a.dw = need_weight_grad ? dw.data_ptr() : nullptr;
  a.db = bias_grad && !db_by_sum ? db.data_ptr() : nullptr;
  a.m = m;
  a.n = n;
  a.k = k;
  a.dtype = dtype;
  a.allow_tf32 = tf32(input);
  a.comm_sms = overlap_sms();
  at::Tensor ws_holder;
  core::Workspace ws = workspace_for(input, ws_holder);
  core::linear_backward(comm, a, ws, stream_of(input));
  sum_db();
  return std::make_tuple(dx, dw, db);
}

Triple linear_backward_impl(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
                            bool bias_grad, bool need_input_grad, bool need_weight_grad) {
  Triple out;
  TPEXT_TRANSLATE_ERRORS({
    out = backward_common(nullptr, "linear_backward", grad_out, input, weight, bias_grad, need_input_grad,
                          need_weight_grad);
  });
  return out;
}

Triple column_parallel_backward_impl(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
                                     bool bias_grad, bool need_weight_grad, int64_t handle) {
  Triple out;
  TPEXT_TRANSLATE_ERRORS({
    auto comm = lookup_communicator(handle, "column_parallel_backward");
    out = backward_common(comm.get(), "column_parallel_backward", grad_out, input, weight, bias_grad, true,
                          need_weight_grad);
  });
  return out;
}

core::PieceAxis piece_axis(const std::string& chunk_by) {
  if (chunk_by == "auto") return core::PieceAxis::kAuto;
  if (chunk_by == "rows") return core::PieceAxis::kRows;
  if (chunk_by == "columns") return core::PieceAxis::kColumns;
  throw core::InvalidArgument("row_parallel_linear: chunk_by: expected 'auto', 'rows' or 'columns', got '" + chunk_by + "'");
}

at::Tensor row_parallel_linear_impl(const at::Tensor& input, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, int64_t handle, int64_t chunks,
                                    const std::string& chunk_by) {
  at::Tensor out;
  TPEXT_TRANSLATE_ERRORS({
    auto comm = lookup_communicator(handle, "row_parallel_linear");
    auto [m, n, k] = check_linear("row_parallel_linear", input, weight, bias);
    check_comm_device(*comm, input, "row_parallel_linear");
    require(chunks >= 0,
            [&] { return "row_parallel_linear: chunks: expected >= 0 (0 = automatic), got " + std::to_string(chunks); });
    const core::PieceAxis axis = piece_axis(chunk_by);
    c10::cuda::CUDAGuard guard(input.device());
    out = at::empty(with_last(input, n), input.options());
    core::RowParallelForward a;
    a.x = input.data_ptr();
    a.w = weight.data_ptr();
    a.bias = bias.has_value() && bias->defined() ? bias->data_ptr() : nullptr;
    a.y = out.data_ptr();
    a.m = m;
    a.n = n;
    a.k = k;
    a.dtype = gemm_dtype(input, "row_parallel_linear");
    a.allow_tf32 = tf32(input);
    a.chunks = static_cast<int>(chunks);
    a.axis = axis;
    a.comm_sms = overlap_sms();
    a.tail_weight = row_tail_weight();
    // Column blocks are all-reduced in a scratch buffer; the comm stream is joined into the
    // caller's before the op returns, so the allocator may hand it out again after that.
    const size_t scratch_bytes =
        core::row_parallel_scratch_bytes(core::plan_row_parallel(m, n, a.dtype, comm->size(), a.chunks, axis), m, n, a.dtype);
    at::Tensor scratch;
    if (scratch_bytes > 0) {
      scratch = at::empty({static_cast<int64_t>(scratch_bytes)}, input.options().dtype(at::kByte));
      a.scratch = scratch.data_ptr();
    }
    at::Tensor ws_holder;
    core::Workspace ws = workspace_for(input, ws_holder);
    core::row_parallel_forward(*comm, a, ws, stream_of(input));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tpext, CUDA, m) {
  m.impl("linear", linear_impl);
  m.impl("linear_backward", linear_backward_impl);
  m.impl("column_parallel_backward", column_parallel_backward_impl);
  m.impl("row_parallel_linear", row_parallel_linear_impl);
}

}  // namespace tpext::adapter
