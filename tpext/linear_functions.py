"""The autograd Functions of the tensor-parallel linear layers (Megatron-LM, 1909.08053).

    column:  y_r = act(x W_r^T + b_r)         backward: dx = all_reduce(sum_r dy_r W_r)
    row:     y   = all_reduce(x_r W_r^T) + b    backward: dx_r = dy W_r (no communication)

Each Function has two paths with the same structure: `native` (CUDA tensors of float32, bfloat16
or float16: the tpext ops, one fused GEMM + collective schedule each) and the torch path (any
other tensor: F.linear and friends, collectives through tpext.Group, so gloo on the CPU). The
caller picks the path (layers.py): the choice decides which collectives run, so it must be the
same on every rank of the group, which is why it depends on nothing rank-local.

Saved for backward, and only when that gradient is wanted: the input (for dW), the weight (for
dx), the pre-activation (for the GELU's derivative). The native backward ops take both input and
weight whatever is wanted (they read shapes from them), so that path saves both.

The all-reduce of the column-parallel dx runs exactly when the input needs a gradient; input
requires_grad must therefore agree across the ranks of the group, as it does in SPMD code.
"""
import math

import torch
import torch.nn.functional as F

from . import debug, tuning
from .errors import call_native

NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def use_native(input: torch.Tensor, every_shard_nonempty: bool) -> bool:
    """The native ops serve CUDA tensors of their dtypes. An empty shard anywhere in the group
    (more ranks than features) goes the torch path on every rank: the native schedules skip the
    GEMM, and with it the collective, of an empty shard."""
    return input.is_cuda and input.dtype in NATIVE_DTYPES and every_shard_nonempty


def _rows(t: torch.Tensor) -> torch.Tensor:
    # Not reshape(-1, n): that is ambiguous for the empty shard of a layer with more ranks than features.
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _torch_weight_grads(grad, input, need_w, need_b):
    g = _rows(grad)
    dw = g.t().matmul(_rows(input)) if need_w else None
    db = g.sum(0) if need_b else None
    return dw, db


def column_parallel_forward(input, weight, bias, activation, native, keep_pre=True):
    """(output, pre-activation) of this rank's column shard: act(input W_r^T + b_r), no
    communication. The pre-activation is what the GELU backward reads; keep_pre=False lets the
    native GEMM skip writing it (then it comes back empty). Shared by the autograd Function and
    the modules' forward when no gradient will flow (which skips the Function's bookkeeping, a
    noticeable part of a small layer's host time)."""
    if native:
        return call_native(torch.ops.tpext.linear, input, weight, bias, activation, keep_pre)
    pre = F.linear(input, weight, bias)
    return (F.gelu(pre, approximate="tanh") if activation == "gelu" else pre), pre


class ColumnParallelLinearFunction(torch.autograd.Function):
    """apply(input, weight, bias, group, activation: 'none' | 'gelu', native, reduce_grad=True,
    backward_follows=True) -> this rank's output shard. The copy-to-region crossing is fused in: the
    backward all-reduces dx, unless reduce_grad is False (the caller's copy_to_tensor_parallel_region
    does it once for several layers reading the same input). backward_follows=False (see
    grad_will_flow) lets the native GELU GEMM skip writing the pre-activation only backward reads."""

    @staticmethod
    def forward(ctx, input, weight, bias, group, activation, native, reduce_grad=True, backward_follows=True):
        out, pre = column_parallel_forward(input, weight, bias, activation, native, backward_follows)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        ctx.save_for_backward(input if (need_w or native) else None,
                              weight if (need_x or native) else None,
                              pre if activation == "gelu" and backward_follows else None)
        ctx.group, ctx.activation, ctx.native, ctx.reduce_grad = group, activation, native, reduce_grad
        return out

    @staticmethod
    def backward(ctx, grad):
        input, weight, pre = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad = grad.contiguous()
        if ctx.activation == "gelu":
            grad = torch.ops.aten.gelu_backward(grad, pre, approximate="tanh")
        dx = dw = db = None
        if ctx.native:
            # The bias gradient rides on the weight-gradient GEMM's epilogue.
            want_w = need_w or need_b
            if need_x and not ctx.reduce_grad:
                dx, dw, db = call_native(torch.ops.tpext.linear_backward, grad, input, weight, need_b, True, want_w)
            elif need_x:
                if debug._enabled:  # TPEXT_DEBUG=1: the ranks must all-reduce dx of one shape
                    debug.check(ctx.group, "column_parallel_backward", tuple(input.shape), grad.dtype, "cuda",
                                reduce_op="sum")
                dx, dw, db = call_native(torch.ops.tpext.column_parallel_backward, grad, input, weight, need_b,
                                         want_w, ctx.group._nccl)
            elif want_w:
                _, dw, db = call_native(torch.ops.tpext.linear_backward, grad, input, weight, need_b, False, True)
        else:
            if need_x:
                dx = grad.matmul(weight)
                if ctx.reduce_grad:
                    dx = ctx.group.all_reduce(dx)
            dw, db = _torch_weight_grads(grad, input, need_w, need_b)
        return (dx if need_x else None, dw if need_w else None, db if need_b else None, None, None, None, None, None)


def grad_will_flow(*tensors) -> bool:
    """Whether autograd records the op these tensors go into: grad mode on and one of them requiring
    grad. Inside an autograd.Function's forward grad mode is off and ctx.needs_input_grad only
    says requires_grad, so the caller asks this before apply."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def row_parallel_forward(input, weight, bias, group, chunks, native, chunk_by="auto"):
    """The full output, the same on every rank: all_reduce(input_r W_r^T) + b, the native op in
    `chunks` pieces (rows or columns, chunk_by; 0 = automatic) that overlap the GEMMs, the
    replicated bias added once. Shared by the autograd Function and the no-gradient forward."""
    if native:
        if debug._enabled:  # TPEXT_DEBUG=1: the ranks must all-reduce outputs of one shape
            debug.check(group, "row_parallel_linear", tuple(input.shape[:-1]) + (weight.shape[0],), input.dtype,
                        "cuda", reduce_op="sum", dim=debug.CHUNK_BY.index(chunk_by), extra=chunks)
        return call_native(torch.ops.tpext.row_parallel_linear, input, weight, bias, group._nccl, chunks, chunk_by)
    out = group.all_reduce(F.linear(input, weight))
    if bias is not None:
        out.add_(bias)
    return out


class RowParallelLinearFunction(torch.autograd.Function):
    """apply(input, weight, bias, group, chunks, native, chunk_by="auto") -> the full output, the
    same on every rank (row_parallel_forward). The reduce-from-region crossing is fused in: the
    forward all-reduces the partial products; the backward needs no communication."""

    @staticmethod
    def forward(ctx, input, weight, bias, group, chunks, native, chunk_by="auto"):
        out = row_parallel_forward(input, weight, bias, group, chunks, native, chunk_by)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        ctx.save_for_backward(input if (need_w or native) else None, weight if (need_x or native) else None)
        ctx.native = native
        return out

    @staticmethod
    def backward(ctx, grad):
        input, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad = grad.contiguous()
        dx = dw = db = None
        if ctx.native:
            # The bias is replicated, so its gradient must come out bitwise the same on every rank.
            # The weight-gradient GEMM's epilogue gives that only while every rank runs the same
            # algorithm; autotuning may pick another per rank, so torch sums it then.
            sum_bias_in_torch = need_b and tuning.gemm_autotune_on()
            need_b_native = need_b and not sum_bias_in_torch
            if need_x or need_w or need_b_native:
                dx, dw, db = call_native(torch.ops.tpext.linear_backward, grad, input, weight, need_b_native, need_x,
                                         need_w or need_b_native)
            if sum_bias_in_torch:
                _, db = _torch_weight_grads(grad, input, False, True)
        else:
            if need_x:
                dx = grad.matmul(weight)
            dw, db = _torch_weight_grads(grad, input, need_w, need_b)
        return (dx if need_x else None, dw if need_w else None, db if need_b else None, None, None, None, None)
