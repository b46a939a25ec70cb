"""tpext.Group: a set of ranks (the TP group, the DP group, the world) and its collectives.

CUDA tensors go through tpext's own NCCL communicator (the torch ops in tpext._C), ordered on the
current stream; CPU tensors go through a gloo process group of torch.distributed with the same
interface and semantics, so everything above this layer runs on machines without GPUs.
"""
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from . import _C

REDUCE_OPS = ("sum", "prod", "max", "min", "avg")
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast")
_SUPPORTED_DTYPES = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16,
    torch.int8, torch.uint8, torch.int32, torch.int64,
)
_GLOO_OPS = {
    "sum": dist.ReduceOp.SUM,
    "prod": dist.ReduceOp.PRODUCT,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
}


class Group:
    """Ranks `ranks` (global ranks, in group-rank order); this process is group rank `rank`."""

    def __init__(self, name: str, ranks: List[int], rank: int, gloo: Optional[dist.ProcessGroup],
                 nccl: Optional[int], device: Optional[torch.device]):
        self.name = name
        self.ranks = list(ranks)
        self.rank = rank
        self.size = len(ranks)
        # Where this group's tensors live: the NCCL device, else the CPU (gloo).
        self.device = device if device is not None else torch.device("cpu")
        self._gloo = gloo
        self._nccl = nccl
        self._alive = True
        self._gloo_stats = {k: {"calls": 0, "bytes": 0} for k in COLLECTIVES}

    def __repr__(self) -> str:
        state = "" if self._alive else ", destroyed"
        return f"Group({self.name!r}, rank={self.rank}, size={self.size}, ranks={self.ranks}{state})"

    # -- collectives -----------------------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduces `tensor` over the group in place and returns it."""
        self._check("all_reduce", tensor, op=op)
        if tensor.is_cuda:
            torch.ops.tpext.all_reduce_(tensor, self._nccl, op)
            return tensor
        self._count("all_reduce", tensor.numel() * tensor.element_size())
        self._gloo_all_reduce(tensor, op)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenation of every rank's `tensor` along `dim`, in group-rank order."""
        self._check("all_gather", tensor, dim=dim)
        if tensor.is_cuda:
            return torch.ops.tpext.all_gather(tensor, self._nccl, dim, self.size)
        self._count("all_gather", tensor.numel() * tensor.element_size())
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor, group=self._gloo)
        return torch.cat(parts, dim=dim)

    def reduce_scatter(self, tensor: torch.Tensor, op: str = "sum", dim: int = 0) -> torch.Tensor:
        """Reduces `tensor` over the group; this rank keeps chunk `rank` of it along `dim`."""
        self._check("reduce_scatter", tensor, op=op, dim=dim)
        d = dim % tensor.dim()
        if tensor.shape[d] % self.size != 0:
            raise ValueError(
                f"reduce_scatter: input: expected size {tensor.shape[d]} along dim {d} to be divisible by "
                f"the group size {self.size}")
        if tensor.is_cuda:
            return torch.ops.tpext.reduce_scatter(tensor, self._nccl, op, dim, self.size)
        self._count("reduce_scatter", tensor.numel() * tensor.element_size())
        # gloo has no reduce-scatter on every torch version; reducing all and keeping our chunk gives
        # the same values.
        full = tensor.clone()
        self._gloo_all_reduce(full, op)
        return full.chunk(self.size, dim=d)[self.rank].contiguous()

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrites `tensor` in place with group rank `src`'s `tensor` and returns it."""
        self._check("broadcast", tensor)
        if not isinstance(src, int) or isinstance(src, bool) or not 0 <= src < self.size:
            raise ValueError(f"broadcast: src: expected a group rank in [0, {self.size}), got {src!r}")
        if tensor.is_cuda:
            torch.ops.tpext.broadcast_(tensor, self._nccl, src)
            return tensor
        self._count("broadcast", tensor.numel() * tensor.element_size())
        dist.broadcast(tensor, src=self.ranks[src], group=self._gloo)
        return tensor

    # -- statistics ------------------------------------------------------------------------------

    def stats(self) -> Dict[str, Dict[str, int]]:
        """Per collective kind: how many ran on this group and how many input bytes they moved."""
        out = {k: dict(v) for k, v in self._gloo_stats.items()}
        if self._nccl is not None and self._alive:
            for kind, v in _C.comm_stats(self._nccl).items():
                out[kind]["calls"] += v["calls"]
                out[kind]["bytes"] += v["bytes"]
        return out

    def reset_stats(self) -> None:
        for v in self._gloo_stats.values():
            v["calls"] = v["bytes"] = 0
        if self._nccl is not None and self._alive:
            _C.comm_reset_stats(self._nccl)

    # -- internals -------------------------------------------------------------------------------

    def _check(self, what: str, tensor, op: Optional[str] = None, dim: Optional[int] = None) -> None:
        if not self._alive:
            raise RuntimeError(
                f"{what}: group {self.name!r} was destroyed by tpext.destroy(); call tpext.init() again")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{what}: tensor: expected a torch.Tensor, got {type(tensor).__name__}")
        if op is not None and op not in REDUCE_OPS:
            raise ValueError(f"{what}: op: expected one of {', '.join(map(repr, REDUCE_OPS))}, got {op!r}")
        if dim is not None:
            if not isinstance(dim, int) or isinstance(dim, bool):
                raise TypeError(f"{what}: dim: expected an int, got {type(dim).__name__}")
            if tensor.dim() == 0:
                raise ValueError(f"{what}: tensor: expected a tensor with at least one dimension, got a scalar")
            if not -tensor.dim() <= dim < tensor.dim():
                raise ValueError(
                    f"{what}: dim: expected a dimension in [{-tensor.dim()}, {tensor.dim()}) for a "
                    f"{tensor.dim()}-d tensor, got {dim}")
        if tensor.is_cuda:
            if self._nccl is None:
                raise ValueError(
                    f"{what}: tensor: expected a CPU tensor (tpext was initialised without NCCL, "
                    f"backend='gloo'), got one on {tensor.device}")
            return  # the native op checks device, dtype and contiguity
        if tensor.device.type != "cpu":
            raise ValueError(f"{what}: tensor: expected a CPU or CUDA tensor, got one on {tensor.device}")
        if tensor.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(
                f"{what}: tensor: expected dtype float32, float64, float16, bfloat16, int8, uint8, int32 or "
                f"int64, got {tensor.dtype}")
        if not tensor.is_contiguous():
            raise ValueError(
                f"{what}: tensor: expected a contiguous tensor, got strides {tuple(tensor.stride())} for sizes "
                f"{tuple(tensor.shape)}; call .contiguous() first")
        if op == "avg" and not tensor.dtype.is_floating_point:
            raise ValueError(f"{what}: op: 'avg' needs a floating-point dtype, got {tensor.dtype}")

    def _gloo_all_reduce(self, tensor: torch.Tensor, op: str) -> None:
        if op == "avg":
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self._gloo)
            tensor.div_(self.size)
        else:
            dist.all_reduce(tensor, op=_GLOO_OPS[op], group=self._gloo)

    def _count(self, kind: str, nbytes: int) -> None:
        self._gloo_stats[kind]["calls"] += 1
        self._gloo_stats[kind]["bytes"] += nbytes

    def _destroy(self) -> None:
        """NCCL communicators are destroyed by bootstrap.destroy(); this only marks the group dead."""
        self._alive = False
