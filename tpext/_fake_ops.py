"""Fake (meta) implementations of the tpext ops, so torch.compile and FakeTensor tracing know
output shapes without running NCCL. The shapes mirror csrc/torch/collective_ops.cpp."""
import torch

from . import _C  # noqa: F401  (registers the ops)


@torch.library.register_fake("tpext::all_reduce")
def _all_reduce_fake(input, comm, op):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


@torch.library.register_fake("tpext::all_gather")
def _all_gather_fake(input, comm, dim, group_size):
    shape = list(input.shape)
    shape[dim] *= group_size
    return input.new_empty(shape)


@torch.library.register_fake("tpext::reduce_scatter")
def _reduce_scatter_fake(input, comm, op, dim, group_size):
    shape = list(input.shape)
    shape[dim] //= group_size
    return input.new_empty(shape)


@torch.library.register_fake("tpext::all_reduce_")
def _all_reduce_inplace_fake(self, comm, op):
    return None


@torch.library.register_fake("tpext::broadcast_")
def _broadcast_inplace_fake(self, comm, root):
    return None


def _with_last(t, last):
    return list(t.shape[:-1]) + [last]


@torch.library.register_fake("tpext::linear")
def _linear_fake(input, weight, bias, activation, keep_pre=True):
    out = input.new_empty(_with_last(input, weight.shape[0]))
    pre = input.new_empty(_with_last(input, weight.shape[0])) if activation == "gelu" and keep_pre else \
        input.new_empty(0)
    return out, pre


def _backward_fake(grad_out, input, weight, bias_grad, need_input_grad, need_weight_grad):
    dx = torch.empty_like(input) if need_input_grad else input.new_empty(0)
    dw = torch.empty_like(weight) if need_weight_grad else input.new_empty(0)
    db = input.new_empty(weight.shape[0]) if bias_grad else input.new_empty(0)
    return dx, dw, db


@torch.library.register_fake("tpext::linear_backward")
def _linear_backward_fake(grad_out, input, weight, bias_grad, need_input_grad, need_weight_grad):
    return _backward_fake(grad_out, input, weight, bias_grad, need_input_grad, need_weight_grad)


@torch.library.register_fake("tpext::column_parallel_backward")
def _column_parallel_backward_fake(grad_out, input, weight, bias_grad, need_weight_grad, comm):
    return _backward_fake(grad_out, input, weight, bias_grad, True, need_weight_grad)


@torch.library.register_fake("tpext::row_parallel_linear")
def _row_parallel_linear_fake(input, weight, bias, comm, chunks, chunk_by="auto"):
    return input.new_empty(_with_last(input, weight.shape[0]))
