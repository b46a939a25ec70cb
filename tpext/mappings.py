"""Crossing into and out of the tensor-parallel region (Megatron-LM's mappings), as autograd
Functions whose forward and backward are conjugate data movements:

    copy_to      forward: identity              backward: all-reduce (sum) of the gradient
    reduce_from  forward: all-reduce (sum)      backward: identity
    scatter_to   forward: keep my slice         backward: all-gather of the slices
    gather_from  forward: all-gather            backward: keep my slice

Slices are along the last dimension and may be uneven (torch.tensor_split sizes, see
partition.py). Everything goes through tpext.Group, so CUDA tensors take the NCCL path and CPU
tensors the gloo path. The linear layers fuse copy_to / reduce_from into their own Functions
(linear_functions.py); these are for the code around them.
"""
from typing import Optional, Sequence

import torch

from . import bootstrap
from .groups import Group
from .partition import all_gather_uneven, split_sizes


def resolve_group(group: Optional[Group], what: str) -> Group:
    """`group`, or this rank's TP group; a clear error when tpext is not initialised or the group
    is gone."""
    if group is None:
        if not bootstrap.is_initialized():
            raise RuntimeError(f"{what}: group: tpext is not initialised; call tpext.init() first "
                               f"(or pass group=)")
        group = bootstrap.get_tp_group()
    if not isinstance(group, Group):
        raise TypeError(f"{what}: group: expected a tpext.Group or None (the TP group), got {type(group).__name__}")
    if not group._alive:
        raise RuntimeError(f"{what}: group: {group.name!r} was destroyed by tpext.destroy(); call tpext.init() again "
                           f"and rebuild the layer")
    return group


# -- the data movements ------------------------------------------------------------------------


def _reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    # A copy: autograd's input (or incoming gradient) must not change under its feet.
    return group.all_reduce(x.clone(memory_format=torch.contiguous_format))


def _split_along_last_dim(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x.tensor_split(group.size, dim=-1)[group.rank].contiguous()


def _gather_along_last_dim(x: torch.Tensor, group: Group, sizes: Sequence[int]) -> torch.Tensor:
    return all_gather_uneven(x, group, sizes, -1)


def _slice_along_last_dim(x: torch.Tensor, group: Group, sizes: Sequence[int]) -> torch.Tensor:
    start = sum(sizes[:group.rank])
    return x.narrow(-1, start, sizes[group.rank]).contiguous()


# -- the region crossings ----------------------------------------------------------------------


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        ctx.sizes = split_sizes(x.shape[-1], group.size)
        return _split_along_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_along_last_dim(grad.contiguous(), ctx.group, ctx.sizes), None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, sizes):
        ctx.group, ctx.sizes = group, sizes
        return _gather_along_last_dim(x, group, sizes)

    @staticmethod
    def backward(ctx, grad):
        return _slice_along_last_dim(grad, ctx.group, ctx.sizes), None, None


def _tensor(x, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: input: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError(f"{what}: input: expected at least one dimension, got a scalar")


def copy_to_tensor_parallel_region(x: torch.Tensor, group: Optional[Group] = None) -> torch.Tensor:
    """Identity forward; the backward sums the gradient over the TP group (the input of a
    column-parallel computation is used by every rank)."""
    _tensor(x, "copy_to_tensor_parallel_region")
    return _CopyToRegion.apply(x, resolve_group(group, "copy_to_tensor_parallel_region"))


def reduce_from_tensor_parallel_region(x: torch.Tensor, group: Optional[Group] = None) -> torch.Tensor:
    """Sum over the TP group forward (partial results of a row-parallel computation); identity
    backward."""
    _tensor(x, "reduce_from_tensor_parallel_region")
    return _ReduceFromRegion.apply(x, resolve_group(group, "reduce_from_tensor_parallel_region"))


def scatter_to_tensor_parallel_region(x: torch.Tensor, group: Optional[Group] = None) -> torch.Tensor:
    """This rank's slice of the last dimension (torch.tensor_split, uneven allowed) forward; the
    backward all-gathers the slices' gradients."""
    _tensor(x, "scatter_to_tensor_parallel_region")
    return _ScatterToRegion.apply(x, resolve_group(group, "scatter_to_tensor_parallel_region"))


def gather_from_tensor_parallel_region(x: torch.Tensor, group: Optional[Group] = None,
                                       sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Concatenation of every rank's `x` along the last dimension forward; the backward keeps this
    rank's slice. `sizes`: every rank's last-dimension size, in group-rank order (what the
    tensor_split layout gives, e.g. split_sizes(out_features, tp_size)); None means every rank
    holds as many as this one. Ranks must agree on `sizes`: a rank cannot see another's shape
    without an extra collective."""
    what = "gather_from_tensor_parallel_region"
    _tensor(x, what)
    group = resolve_group(group, what)
    if sizes is None:
        sizes = [x.shape[-1]] * group.size
    sizes = [int(s) for s in sizes]
    if len(sizes) != group.size:
        raise ValueError(f"{what}: sizes: expected {group.size} sizes (one per rank of {group}), got {sizes}")
    if x.shape[-1] != sizes[group.rank]:
        raise ValueError(f"{what}: input: expected last dimension {sizes[group.rank]} (sizes[{group.rank}]), "
                         f"got shape {tuple(x.shape)}")
    return _GatherFromRegion.apply(x, group, tuple(sizes))
