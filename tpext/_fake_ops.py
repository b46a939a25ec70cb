"""Fake (meta) implementations of the tpext ops, so torch.compile and FakeTensor tracing know
output shapes without running NCCL. The shapes mirror csrc/torch/collective_ops.cpp."""
import torch

from . import _C  # noqa: F401  (registers the ops)


def _group_size(comm: int) -> int:
    return int(_C.comm_info(comm)["size"])


@torch.library.register_fake("tpext::all_reduce")
def _all_reduce_fake(input, comm, op):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


@torch.library.register_fake("tpext::all_gather")
def _all_gather_fake(input, comm, dim):
    shape = list(input.shape)
    shape[dim] *= _group_size(comm)
    return input.new_empty(shape)


@torch.library.register_fake("tpext::reduce_scatter")
def _reduce_scatter_fake(input, comm, op, dim):
    shape = list(input.shape)
    shape[dim] //= _group_size(comm)
    return input.new_empty(shape)


@torch.library.register_fake("tpext::all_reduce_")
def _all_reduce_inplace_fake(self, comm, op):
    return self


@torch.library.register_fake("tpext::broadcast_")
def _broadcast_inplace_fake(self, comm, root):
    return self
