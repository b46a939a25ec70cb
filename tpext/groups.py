"""tpext.Group: a set of ranks (the TP group, the DP group, the world) and its collectives.

CUDA tensors go through tpext's own NCCL communicator (the torch ops in tpext._C), ordered on the
current stream; CPU tensors go through a gloo process group of torch.distributed with the same
interface and semantics, so everything above this layer runs on machines without GPUs.
"""
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from . import _C, debug
from ._C import CommTimeout, TpextError
from .errors import call_native

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
                 nccl: Optional[int], device: Optional[torch.device], timeout_s: float = 600.0):
        self.name = name
        self.ranks = list(ranks)
        self.rank = rank
        self.size = len(ranks)
        # Where this group's tensors live: the NCCL device, else the CPU (gloo).
        self.device = device if device is not None else torch.device("cpu")
        self._gloo = gloo
        self._nccl = nccl
        self._alive = True
        self._timeout_s = timeout_s
        # Set when a gloo call of this group failed (timeout, peer gone): (exception type, message).
        # The gloo process group is then in an undefined state, so every later CPU call raises it.
        self._failure = None
        self._gloo_stats = {k: {"calls": 0, "bytes": 0} for k in COLLECTIVES}

    def __repr__(self) -> str:
        state = "" if self._alive else ", destroyed"
        return f"Group({self.name!r}, rank={self.rank}, size={self.size}, ranks={self.ranks}{state})"

    def describe(self) -> str:
        """For error messages: "group 'tp' (rank 0 of 2, global ranks [0, 1])"."""
        return f"group {self.name!r} (rank {self.rank} of {self.size}, global ranks {self.ranks})"

    # -- collectives -----------------------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduces `tensor` over the group in place and returns it."""
        self._check("all_reduce", tensor, op=op)
        self._agree("all_reduce", tensor, reduce_op=op)
        if tensor.is_cuda:
            call_native(torch.ops.tpext.all_reduce_, tensor, self._nccl, op)
            return tensor
        self._count("all_reduce", tensor.numel() * tensor.element_size())
        self._gloo_all_reduce(tensor, op)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenation of every rank's `tensor` along `dim`, in group-rank order."""
        self._check("all_gather", tensor, dim=dim)
        self._agree("all_gather", tensor, dim=dim % tensor.dim())
        if tensor.is_cuda:
            return call_native(torch.ops.tpext.all_gather, tensor, self._nccl, dim, self.size)
        self._count("all_gather", tensor.numel() * tensor.element_size())
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        self._gloo_run("all_gather", lambda: dist.all_gather(parts, tensor, group=self._gloo))
        return torch.cat(parts, dim=dim)

    def reduce_scatter(self, tensor: torch.Tensor, op: str = "sum", dim: int = 0) -> torch.Tensor:
        """Reduces `tensor` over the group; this rank keeps chunk `rank` of it along `dim`."""
        self._check("reduce_scatter", tensor, op=op, dim=dim)
        d = dim % tensor.dim()
        if tensor.shape[d] % self.size != 0:
            raise ValueError(
                f"reduce_scatter: input: expected size {tensor.shape[d]} along dim {d} to be divisible by "
                f"the group size {self.size}")
        self._agree("reduce_scatter", tensor, reduce_op=op, dim=d)
        if tensor.is_cuda:
            return call_native(torch.ops.tpext.reduce_scatter, tensor, self._nccl, op, dim, self.size)
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
        self._agree("broadcast", tensor, extra=src)
        if tensor.is_cuda:
            call_native(torch.ops.tpext.broadcast_, tensor, self._nccl, src)
            return tensor
        self._count("broadcast", tensor.numel() * tensor.element_size())
        self._gloo_run("broadcast", lambda: dist.broadcast(tensor, src=self.ranks[src], group=self._gloo))
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
            # The native op checks these too; checking here gives the same words on both paths.
            if tensor.device != self.device:
                raise ValueError(f"{what}: tensor: expected a tensor on {self.device} (the GPU of {self.describe()}), "
                                 f"got one on {tensor.device}")
        elif tensor.device.type != "cpu":
            raise ValueError(f"{what}: tensor: expected a CPU or CUDA tensor, got one on {tensor.device}")
        else:
            self._raise_if_failed(what)
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
            self._gloo_run("all_reduce", lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self._gloo))
            tensor.div_(self.size)
        else:
            self._gloo_run("all_reduce", lambda: dist.all_reduce(tensor, op=_GLOO_OPS[op], group=self._gloo))

    def _agree(self, what: str, tensor: torch.Tensor, reduce_op: Optional[str] = None, dim: Optional[int] = None,
               extra: Optional[int] = None) -> None:
        """The cross-rank check of debug.py: always on the gloo path (gloo aborts the process on
        a size mismatch), on the NCCL path with TPEXT_DEBUG=1."""
        if tensor.is_cuda and not debug._enabled:
            return
        debug.check(self, what, tuple(tensor.shape), tensor.dtype, tensor.device.type, reduce_op, dim, extra)

    def _exchange_records(self, record: torch.Tensor, what: str) -> List[List[int]]:
        """Every group rank's `record` (a small int64 CPU tensor, the same size everywhere), in
        group-rank order, over the gloo process group; not counted in stats()."""
        self._raise_if_failed(what)
        out = [torch.empty_like(record) for _ in range(self.size)]
        self._gloo_run(what, lambda: dist.all_gather(out, record, group=self._gloo))
        return [o.tolist() for o in out]

    def _raise_if_failed(self, what: str) -> None:
        if self._failure is not None:
            cls, message = self._failure
            raise cls(f"tpext: {what}: {self.describe()} is unusable after an earlier failure: {message}")

    def _gloo_run(self, what: str, fn):
        """Runs a gloo call; its failure (the group's timeout, a peer that died or left) becomes a
        tpext exception naming this group, and the group is marked unusable."""
        try:
            return fn()
        except RuntimeError as e:
            raise self._gloo_failed(what, e) from e

    def _gloo_failed(self, what: str, error: BaseException) -> BaseException:
        said = " ".join(str(error).split())
        if len(said) > 400:
            said = said[:400] + "..."
        lowered = said.lower()
        where = f"{what} on {self.describe()} (gloo, CPU tensors)"
        if "timed out" in lowered or "timeout" in lowered:
            cls = CommTimeout
            message = (f"tpext timeout: {where} did not complete within the {self._timeout_s:g} s timeout "
                       f"(tpext.init(timeout=...)): a peer rank may have died or stopped, or the ranks called "
                       f"different collectives. gloo said: {said}")
        elif any(k in lowered for k in ("connection", "closed", "reset by peer", "broken pipe", "read error",
                                         "write error", "socket")):
            cls = TpextError
            message = (f"tpext: {where} failed: a peer rank closed its connection (it died, was killed, or left "
                       f"the collective). gloo said: {said}")
        else:
            cls = TpextError
            message = f"tpext: {where} failed: {said}"
        self._failure = (cls, message)
        return cls(message + "; call tpext.destroy() and tpext.init() again")

    def _count(self, kind: str, nbytes: int) -> None:
        self._gloo_stats[kind]["calls"] += 1
        self._gloo_stats[kind]["bytes"] += nbytes

    def _destroy(self) -> None:
        """NCCL communicators are destroyed by bootstrap.destroy(); this only marks the group dead."""
        self._alive = False
