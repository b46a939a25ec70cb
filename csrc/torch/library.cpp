// Every schema of the tpext op namespace, in one place. `comm` is a communicator handle from
// tpext._C.comm_create / comm_split. Implementations live beside their topic (collective_ops.cpp);
// fake (meta) implementations for torch.compile live in tpext/_fake_ops.py.
#include <torch/library.h>

TORCH_LIBRARY(tpext, m) {
  m.def("all_reduce_(Tensor(a!) self, int comm, str op) -> ()");
  m.def("all_reduce(Tensor input, int comm, str op) -> Tensor");
  // group_size is the communicator's size, repeated so that output shapes follow from the
  // arguments alone: a compiled graph (and inductor's on-disk cache) never asks the handle.
  m.def("all_gather(Tensor input, int comm, int dim, int group_size) -> Tensor");
  m.def("reduce_scatter(Tensor input, int comm, str op, int dim, int group_size) -> Tensor");
  m.def("broadcast_(Tensor(a!) self, int comm, int root) -> ()");
}

// The tensor-parallel linear layers (csrc/torch/linear_ops.cpp). Empty tensors (numel 0) stand
// for outputs that were not asked for.
TORCH_LIBRARY_FRAGMENT(tpext, m) {
  m.def("linear(Tensor input, Tensor weight, Tensor? bias, str activation, bool keep_pre=True) -> (Tensor, Tensor)");
  m.def("linear_backward(Tensor grad_out, Tensor input, Tensor weight, bool bias_grad, bool need_input_grad, "
        "bool need_weight_grad) -> (Tensor, Tensor, Tensor)");
  m.def("column_parallel_backward(Tensor grad_out, Tensor input, Tensor weight, bool bias_grad, "
        "bool need_weight_grad, int comm) -> (Tensor, Tensor, Tensor)");
  m.def("row_parallel_linear(Tensor input, Tensor weight, Tensor? bias, int comm, int chunks, str chunk_by=\"auto\") -> Tensor");
}
