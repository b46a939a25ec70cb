"""How a tensor is cut across the TP group, and how the pieces are put back together.

Any size splits on any TP size the way torch.tensor_split does: the first `total % parts` ranks
hold one element more, so 10 outputs on 4 ranks are 3, 3, 2, 2 and 3 on 4 are 1, 1, 1, 0.

A parameter that holds a shard carries its layout, so anyone (a checkpoint writer, a test, a
gradient all-gather) can rebuild the full tensor without knowing which layer made it:

    tensor_model_parallel  True for a shard, False for a replicated parameter (row bias)
    partition_dim          the dimension cut across ranks (None when replicated)
    partition_sizes        every rank's size along partition_dim, in group-rank order
    partition_stride       how many independent full tensors are stacked along partition_dim:
                           each is split across ranks separately and a rank's shard is its pieces
                           of all of them, stacked (SwiGLU's fused gate and up: stride 2)
"""
from typing import List, Optional, Sequence

import torch

from .groups import Group


def split_sizes(total: int, parts: int) -> List[int]:
    """Sizes of torch.tensor_split(range(total), parts): the first total % parts get one more."""
    if not isinstance(total, int) or isinstance(total, bool) or total < 0:
        raise ValueError(f"split_sizes: total: expected an int >= 0, got {total!r}")
    if not isinstance(parts, int) or isinstance(parts, bool) or parts < 1:
        raise ValueError(f"split_sizes: parts: expected an int >= 1, got {parts!r}")
    base, extra = divmod(total, parts)
    return [base + (1 if r < extra else 0) for r in range(parts)]


def shard(full: torch.Tensor, dim: int, rank: int, parts: int, stride: int = 1) -> torch.Tensor:
    """Rank `rank`'s shard of `full` (a fresh contiguous tensor): each of the `stride` stacked
    blocks along `dim` is tensor_split into `parts` and this rank's pieces are concatenated."""
    if full.shape[dim] % stride != 0:
        raise ValueError(f"shard: full: expected size {full.shape[dim]} along dim {dim} to be a multiple of "
                         f"stride {stride}")
    blocks = full.chunk(stride, dim=dim) if stride > 1 else (full,)
    pieces = [b.tensor_split(parts, dim=dim)[rank] for b in blocks]
    return torch.cat(pieces, dim=dim) if stride > 1 else pieces[0].clone(memory_format=torch.contiguous_format)


def unshard(parts: Sequence[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """The full tensor from every rank's shard (group-rank order); the inverse of shard()."""
    if stride == 1:
        return torch.cat(list(parts), dim=dim)
    # Each rank's shard is `stride` equal pieces; block j of the full tensor is piece j of every rank.
    split = [p.chunk(stride, dim=dim) if p.shape[dim] > 0 else (p,) * stride for p in parts]
    return torch.cat([torch.cat([s[j] for s in split], dim=dim) for j in range(stride)], dim=dim)


def all_gather_uneven(tensor: torch.Tensor, group: Group, sizes: Sequence[int], dim: int) -> torch.Tensor:
    """Concatenation along `dim` of every rank's `tensor`, rank r contributing sizes[r] along it.

    One all-gather: every rank pads its piece to the largest size, gathers, and drops the padding.
    When the sizes are equal nothing is padded."""
    d = dim % tensor.dim()
    if tensor.shape[d] != sizes[group.rank]:
        raise ValueError(f"all_gather_uneven: tensor: expected size {sizes[group.rank]} along dim {d} on group rank "
                         f"{group.rank} (sizes {list(sizes)}), got shape {tuple(tensor.shape)}")
    widest = max(sizes)
    if widest == 0:
        shape = list(tensor.shape)
        shape[d] = 0
        return tensor.new_empty(shape)
    if all(s == widest for s in sizes):
        return group.all_gather(tensor.contiguous(), d)
    shape = list(tensor.shape)
    shape[d] = widest
    padded = tensor.new_zeros(shape)
    padded.narrow(d, 0, tensor.shape[d]).copy_(tensor)
    gathered = group.all_gather(padded, d)
    return torch.cat([gathered.narrow(d, r * widest, s) for r, s in enumerate(sizes)], dim=d)


def gather_shards(tensor: torch.Tensor, like: Optional[torch.Tensor] = None,
                  group: Optional[Group] = None) -> torch.Tensor:
    """The full tensor of which `tensor` is this rank's shard, laid out as the parameter `like`
    (default: `tensor` itself), e.g. gather_shards(layer.weight) or gather_shards(layer.weight.grad,
    layer.weight). A replicated parameter comes back as it is. Collective over `group` (default:
    the TP group): every rank must call it."""
    like = tensor if like is None else like
    if not hasattr(like, "tensor_model_parallel"):
        raise ValueError("gather_shards: like: expected a parameter of a tpext layer (it carries "
                         "tensor_model_parallel, partition_dim, partition_sizes), got a plain tensor")
    if not like.tensor_model_parallel:
        return tensor
    if group is None:
        from .bootstrap import get_tp_group
        group = get_tp_group()
    stride, dim = like.partition_stride, like.partition_dim
    sizes = [s * stride for s in like.partition_sizes]
    if len(sizes) != group.size:
        raise ValueError(f"gather_shards: group: expected a group of {len(sizes)} ranks (the parameter's partition), "
                         f"got {group}")
    full = all_gather_uneven(tensor, group, sizes, dim)
    if stride == 1:
        return full
    return unshard(list(full.split(sizes, dim=dim)), dim, stride)


def mark_tensor_parallel(param: torch.Tensor, dim: int, sizes: Sequence[int], stride: int = 1) -> torch.Tensor:
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_sizes = tuple(sizes)
    param.partition_stride = stride
    return param


def mark_replicated(param: torch.Tensor) -> torch.Tensor:
    """Every rank of the TP group holds the whole tensor (and, in training, the same gradient)."""
    param.tensor_model_parallel = False
    param.partition_dim = None
    param.partition_sizes = None
    param.partition_stride = 1
    return param


def is_tensor_parallel(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))
