// The collectives as torch ops on CUDA tensors. Each runs on the communicator's stream fenced
// against the current stream of the tensor's device, so it is ordered like any other torch op and
// its output is ready on that stream when it returns.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "core/communicator.h"
#include "core/reduce_op.h"
#include "error_translation.h"
#include "registry.h"
#include "tensor_checks.h"

namespace tpext::adapter {
namespace {

cudaStream_t current_stream(const core::Communicator& comm) {
  return at::cuda::getCurrentCUDAStream(comm.device()).stream();
}

void all_reduce_inplace_impl(at::Tensor& self, int64_t handle, const std::string& op) {
  TPEXT_TRANSLATE_ERRORS({
    auto comm = lookup_communicator(handle, "all_reduce_");
    check_collective_tensor(self, *comm, "all_reduce_", "self");
    const auto reduce = core::parse_reduce_op(op);
    c10::cuda::CUDAGuard guard(comm->device());
    comm->all_reduce(self.data_ptr(), self.data_ptr(), static_cast<size_t>(self.numel()),
                     to_core_dtype(self.scalar_type(), "all_reduce_", "self"), reduce, current_stream(*comm));
  });
}

at::Tensor all_reduce_impl(const at::Tensor& input, int64_t handle, const std::string& op) {
  at::Tensor out;
  TPEXT_TRANSLATE_ERRORS({
    auto comm = lookup_communicator(handle, "all_reduce");
    check_collective_tensor(input, *comm, "all_reduce", "input");
    const auto reduce = core::parse_reduce_op(op);
    c10::cuda::CUDAGuard guard(comm->device());
    out = at::empty_like(input, at::MemoryFormat::Contiguous);
    comm->all_reduce(input.data_ptr(), out.data_ptr(), static_cast<size_t>(input.numel()),
                     to_core_dtype(input.scalar_type(), "all_reduce", "input"), reduce, current_stream(*comm));
  });
  return out;
}

// Concatenation along `dim` in rank order. NCCL gathers whole buffers one after another, which is
// concatenation along dim 0; other dims are a transpose of that layout.
void check_group_size(const core::Communicator& comm, int64_t group_size, const char* op) {
  if (group_size != comm.size())
    core::throw_invalid_argument(std::string(op) + ": group_size: expected " + std::to_string(comm.size()) +
                                 " (the size of " + comm.describe() + "), got " + std::to_string(group_size));
}

at::Tensor all_gather_impl(const at::Tensor& input, int64_t handle, int64_t dim, int64_t group_size) {
  at::Tensor out;
  TPEXT_TRANSLATE_ERRORS({
    auto comm = lookup_communicator(handle, "all_gather");
    check_group_size(*comm, group_size, "all_gather");
    check_collective_tensor(input, *comm, "all_gather", "input");
    const int64_t d = normalize_dim(dim, input, "all_gather", "input");
    c10::cuda::CUDAGuard guard(comm->device());
    const int64_t world = comm->size();
    std::vector<int64_t> stacked{world};
    for (int64_t s : input.sizes()) stacked.push_back(s);
    at::Tensor buf = at::empty(stacked, input.options());
    comm->all_gather(input.data_ptr(), buf.data_ptr(), static_cast<size_t>(input.numel()),
                     to_core_dtype(input.scalar_type(), "all_gather", "input"), current_stream(*comm));
    std::vector<int64_t> shape = input.sizes().vec();
    shape[d] *= world;
    out = d == 0 ? buf.view(shape) : buf.movedim(0, d).reshape(shape);
  });
  return out;
}

// Sum (or op) over ranks, then rank r keeps chunk r along `dim`.
at::Tensor reduce_scatter_impl(const at::Tensor& input, int64_t handle, const std::string& op, int64_t dim,
                               int64_t group_size) {
  at::Tensor out;
  TPEXT_TRANSLATE_ERRORS({
    auto comm = lookup_communicator(handle, "reduce_scatter");
    check_group_size(*comm, group_size, "reduce_scatter");
    check_collective_tensor(input, *comm, "reduce_scatter", "input");
    const int64_t d = normalize_dim(dim, input, "reduce_scatter", "input");
    const auto reduce = core::parse_reduce_op(op);
    const int64_t world = comm->size();
    if (input.size(d) % world != 0)
      core::throw_invalid_argument("reduce_scatter: input: expected size " + std::to_string(input.size(d)) +
                                   " along dim " + std::to_string(d) + " to be divisible by the group size " +
                                   std::to_string(world));
    c10::cuda::CUDAGuard guard(comm->device());
    std::vector<int64_t> shape = input.sizes().vec();
    shape[d] /= world;
    at::Tensor send = input;
    if (d != 0) {
      std::vector<int64_t> split = input.sizes().vec();
      split[d] = world;
      split.insert(split.begin() + d + 1, shape[d]);
      send = input.view(split).movedim(d, 0).contiguous();
    }
    out = at::empty(shape, input.options());
    comm->reduce_scatter(send.data_ptr(), out.data_ptr(), static_cast<size_t>(out.numel()),
                         to_core_dtype(input.scalar_type(), "reduce_scatter", "input"), reduce, current_stream(*comm));
  });
  return out;
}

void broadcast_inplace_impl(at::Tensor& self, int64_t handle, int64_t root) {
  TPEXT_TRANSLATE_ERRORS({
    auto comm = lookup_communicator(handle, "broadcast_");
    check_collective_tensor(self, *comm, "broadcast_", "self");
    if (root < 0 || root >= comm->size())
      core::throw_invalid_argument("broadcast_: root: expected a rank of the group in [0, " +
                                   std::to_string(comm->size()) + "), got " + std::to_string(root));
    c10::cuda::CUDAGuard guard(comm->device());
    comm->broadcast(self.data_ptr(), self.data_ptr(), static_cast<size_t>(self.numel()),
                    to_core_dtype(self.scalar_type(), "broadcast_", "self"), static_cast<int>(root),
                    current_stream(*comm));
  });
}

[[noreturn]] void not_cuda(const char* op) {
  TORCH_CHECK_VALUE(false, op, ": expected CUDA tensors; CPU tensors go through the gloo path of tpext.Group");
}

}  // namespace

TORCH_LIBRARY_IMPL(tpext, CUDA, m) {
  m.impl("all_reduce_", all_reduce_inplace_impl);
  m.impl("all_reduce", all_reduce_impl);
  m.impl("all_gather", all_gather_impl);
  m.impl("reduce_scatter", reduce_scatter_impl);
  m.impl("broadcast_", broadcast_inplace_impl);
}

TORCH_LIBRARY_IMPL(tpext, CPU, m) {
  m.impl("all_reduce_", [](at::Tensor& self, int64_t, const std::string&) { not_cuda("all_reduce_"); });
  m.impl("all_reduce", [](const at::Tensor&, int64_t, const std::string&) -> at::Tensor { not_cuda("all_reduce"); });
  m.impl("all_gather", [](const at::Tensor&, int64_t, int64_t, int64_t) -> at::Tensor { not_cuda("all_gather"); });
  m.impl("reduce_scatter", [](const at::Tensor&, int64_t, const std::string&, int64_t, int64_t) -> at::Tensor {
    not_cuda("reduce_scatter");
  });
  m.impl("broadcast_", [](at::Tensor& self, int64_t, int64_t) { not_cuda("broadcast_"); });
}

}  // namespace tpext::adapter
