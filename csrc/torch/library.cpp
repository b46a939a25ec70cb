// Every schema of the tpext op namespace, in one place. `comm` is a communicator handle from
// tpext._C.comm_create / comm_split. Implementations live beside their topic (collective_ops.cpp);
// fake (meta) implementations for torch.compile live in tpext/_fake_ops.py.
#include <torch/library.h>

TORCH_LIBRARY(tpext, m) {
  m.def("all_reduce_(Tensor(a!) self, int comm, str op) -> Tensor(a!)");
  m.def("all_reduce(Tensor input, int comm, str op) -> Tensor");
  m.def("all_gather(Tensor input, int comm, int dim) -> Tensor");
  m.def("reduce_scatter(Tensor input, int comm, str op, int dim) -> Tensor");
  m.def("broadcast_(Tensor(a!) self, int comm, int root) -> Tensor(a!)");
}
