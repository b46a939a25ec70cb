"""ColumnParallelLinear and RowParallelLinear: nn.Linear with its weight cut across the TP group.

    col = tpext.ColumnParallelLinear(1024, 4096)               # W split along out_features
    row = tpext.RowParallelLinear(4096, 1024)                  # W split along in_features
    y = row(col(x))                                            # one all-reduce forward, one backward
    col = tpext.ColumnParallelLinear.from_linear(nn.Linear(1024, 4096))  # shard existing weights

Shapes: any in/out size on any TP size; rank r holds split_sizes(size, tp)[r] of the cut
dimension (torch.tensor_split, see partition.py), recorded on the parameters with the partition
dim. A fresh layer is initialised exactly as nn.Linear(in_features, out_features) built under the
same RNG state on the same device (the full weight is drawn, this rank keeps its shard), so a TP
model and its single-GPU twin start identical.

Devices: the parameters live on the group's device (the GPU of an NCCL group) unless `device`
says otherwise; CPU parameters take the torch path through gloo. Inputs must match the weight's
dtype and device, be contiguous, and have the expected last dimension; anything else raises a
ValueError naming the argument before any work is done.
"""
from typing import List, Optional, Sequence

import torch
from torch import nn

from .debug import CHUNK_BY
from .groups import Group
from .linear_functions import (ColumnParallelLinearFunction, RowParallelLinearFunction, column_parallel_forward,
                               grad_will_flow, row_parallel_forward, use_native)
from .mappings import _gather_along_last_dim, _GatherFromRegion, _ScatterToRegion, resolve_group
from .partition import mark_replicated, mark_tensor_parallel, shard, split_sizes

_ACTIVATIONS = (None, "gelu")


# -- argument checks shared by both layers ------------------------------------------------------


def _positive_int(what: str, name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what}: {name}: expected an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{what}: {name}: expected a positive int, got {value}")
    return value


def _resolve_device(what: str, device, group: Group) -> torch.device:
    """None: the group's device (the GPU of an NCCL group, else the CPU). A CUDA device must be
    the group's GPU: the native ops run on that communicator."""
    if device is None:
        return group.device
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{what}: device: expected a torch.device or a device string such as 'cpu' or 'cuda:0', "
                         f"got {device!r}") from None
    if device.type == "cuda":
        if group._nccl is None:
            raise ValueError(f"{what}: device: expected cpu (or meta): {group} has no NCCL communicator "
                             f"(tpext.init(backend='gloo') or no GPU), got {device}")
        if device.index is None:
            return group.device
        if device != group.device:
            raise ValueError(f"{what}: device: expected {group.device} (the GPU of {group}), got {device}")
    elif device.type not in ("cpu", "meta"):
        raise ValueError(f"{what}: device: expected a CUDA device, cpu or meta, got {device}")
    return device


def _resolve_dtype(what: str, dtype) -> torch.dtype:
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{what}: dtype: expected a floating-point torch.dtype, got {dtype!r}")
    return dtype


def _check_input(what: str, input, weight: torch.Tensor, last: int, last_means, group: Group) -> None:
    """Raises naming the argument when `input` cannot go into a layer holding `weight`. last_means
    says what `last` is: a string, or a function making one (formatted only on a failure: this
    runs on every forward)."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{what}: input: expected a torch.Tensor, got {type(input).__name__}")
    if input.dim() == 0:
        raise ValueError(f"{what}: input: expected at least one dimension (the last is the features), got a scalar")
    if input.dtype != weight.dtype:
        raise ValueError(f"{what}: input: expected dtype {weight.dtype} (the dtype of weight), got {input.dtype}")
    if input.device != weight.device:
        raise ValueError(f"{what}: input: expected a tensor on {weight.device} (where weight is), got one on "
                         f"{input.device}")
    if not input.is_contiguous():
        raise ValueError(f"{what}: input: expected a contiguous tensor, got strides {tuple(input.stride())} for sizes "
                         f"{tuple(input.shape)}; call .contiguous() first")
    if input.shape[-1] != last:
        last_means = last_means() if callable(last_means) else last_means
        raise ValueError(f"{what}: input: expected last dimension {last} ({last_means}), "
                         f"got shape {tuple(input.shape)}")
    if not group._alive:
        raise RuntimeError(f"{what}: group: {group.name!r} was destroyed by tpext.destroy(); call tpext.init() again "
                           f"and rebuild the layer")


def _full_linears(in_features: int, out_features: int, bias: bool, count: int, device, dtype) -> List[nn.Linear]:
    """`count` nn.Linear built one after the other: the RNG draws of a fresh full model."""
    return [nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype) for _ in range(count)]


def _check_linear(what: str, linear, name: str = "linear") -> nn.Linear:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{what}: {name}: expected a torch.nn.Linear, got {type(linear).__name__}")
    return linear


def _target_device(what: str, group: Group, linear: nn.Linear, name: str = "linear") -> torch.device:
    """Where a sharded copy of `linear` goes: the GPU of an NCCL group, else where `linear` is
    (which must then not be a GPU: without NCCL there is nothing to run CUDA tensors on)."""
    if group._nccl is not None:
        return group.device
    device = linear.weight.device
    if device.type == "cuda":
        raise ValueError(f"{what}: {name}: expected a layer on the CPU: {group} has no NCCL communicator "
                         f"(tpext.init(backend='gloo') or no GPU), got one on {device}")
    return device


# -- the layers ----------------------------------------------------------------------------------


def _set_parameters(layer: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    like: Optional[nn.Linear]) -> None:
    """New parameters for a TP `layer`, marked by its _mark(); frozen where those of `like` (the
    full layer they come from) are."""
    layer.weight = nn.Parameter(weight, requires_grad=like is None or like.weight.requires_grad)
    layer.bias = None
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=like is None or like.bias.requires_grad)
    layer._mark()


class ColumnParallelLinear(nn.Module):
    """Y = act(X W^T + b) with W (and b) split along out_features: rank r computes its slice of the
    output features; no communication forward, dX is all-reduced over the group backward.

    gather_output: all-gather the output slices (uneven ones included) into the full output;
        otherwise each rank returns its own slice, ready for a RowParallelLinear.
    activation: None or "gelu" (tanh approximation, F.gelu(approximate="tanh"); fused into the
        GEMM epilogue on the native path), applied to this rank's slice.
    stride: the weight stacks `stride` independent linears of out_features // stride outputs each
        (SwiGLU's gate and up, stride 2): each is split across the ranks separately, and a rank's
        output is its slice of the first, then its slice of the second... Initialised as
        `stride` nn.Linear(in_features, out_features // stride) built in order.
    disable_grad_reduce: dX is not all-reduced here (megatron-core's flag of that name): several
        column layers reading one input share a single all-reduce, done by a
        copy_to_tensor_parallel_region the caller puts in front of all of them.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = False,
                 group: Optional[Group] = None, device=None, dtype=None, *, activation: Optional[str] = None,
                 stride: int = 1, disable_grad_reduce: bool = False):
        super().__init__()
        what = type(self).__name__
        self.in_features = _positive_int(what, "in_features", in_features)
        self.out_features = _positive_int(what, "out_features", out_features)
        if activation not in _ACTIVATIONS:
            raise ValueError(f"{what}: activation: expected None or 'gelu', got {activation!r}")
        _positive_int(what, "stride", stride)
        if out_features % stride != 0:
            raise ValueError(f"{what}: out_features: expected a multiple of stride {stride}, got {out_features}")
        if gather_output and stride != 1:
            raise ValueError(f"{what}: gather_output: needs stride 1 (a stacked output is consumed sharded), "
                             f"got stride {stride}")
        self.group = resolve_group(group, what)
        self.gather_output = bool(gather_output)
        self.disable_grad_reduce = bool(disable_grad_reduce)
        self.activation = activation
        self.stride = stride
        self.partition_sizes = tuple(split_sizes(out_features // stride, self.group.size))
        self.output_size_per_partition = stride * self.partition_sizes[self.group.rank]
        self._every_shard_nonempty = min(self.partition_sizes) > 0
        device, dtype = _resolve_device(what, device, self.group), _resolve_dtype(what, dtype)
        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, in_features, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.output_size_per_partition, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self._mark()
        self.reset_parameters()

    def _mark(self) -> None:
        mark_tensor_parallel(self.weight, 0, self.partition_sizes, self.stride)
        if self.bias is not None:
            mark_tensor_parallel(self.bias, 0, self.partition_sizes, self.stride)

    def reset_parameters(self) -> None:
        """Draws the full weights as `stride` nn.Linear built in order would, keeps this rank's shard."""
        if self.weight.is_meta:
            return  # nothing to draw (nn.Linear on meta draws nothing either); from_linear starts here
        full = _full_linears(self.in_features, self.out_features // self.stride, self.bias is not None, self.stride,
                             self.weight.device, self.weight.dtype)
        w, b = self._shards([f.weight for f in full], [f.bias for f in full])
        with torch.no_grad():
            self.weight.copy_(w)
            if self.bias is not None:
                self.bias.copy_(b)

    def _shards(self, weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]]):
        """This rank's shard of the stacked full `weights` and `biases`."""
        rank, size = self.group.rank, self.group.size
        with torch.no_grad():
            w = shard(torch.cat([t.detach() for t in weights]), 0, rank, size, self.stride)
            b = None
            if self.bias is not None:
                b = shard(torch.cat([t.detach() for t in biases]), 0, rank, size, self.stride)
        return w, b

    def _set_parameters(self, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        like: Optional[nn.Linear] = None) -> None:
        _set_parameters(self, weight, bias, like)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: Optional[Group] = None, *, gather_output: bool = False,
                    activation: Optional[str] = None) -> "ColumnParallelLinear":
        """This rank's shard of `linear` (any device and dtype; the copy lands on the GPU of an NCCL
        group, else on `linear`'s device): the TP layer computes what `linear` computes."""
        _check_linear(cls.__name__, linear)
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    gather_output=gather_output, group=group, device="meta", dtype=linear.weight.dtype,
                    activation=activation)
        device = _target_device(cls.__name__ + ".from_linear", layer.group, linear)
        w, b = layer._shards([linear.weight], [linear.bias])
        layer._set_parameters(w.to(device), b.to(device) if b is not None else None, linear)
        return layer

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight, bias, group = self.weight, self.bias, self.group  # parameters are looked up through nn.Module
        _check_input(type(self).__name__, input, weight, self.in_features, "in_features", group)
        native = use_native(input, self._every_shard_nonempty)
        activation = self.activation or "none"
        if grad_will_flow(input, weight, bias):
            out = ColumnParallelLinearFunction.apply(input, weight, bias, group, activation, native,
                                                     not getattr(self, "disable_grad_reduce", False), True)
            return _GatherFromRegion.apply(out, group, self.partition_sizes) if self.gather_output else out
        # Nothing to differentiate (no_grad, inference, frozen weights): the same computation
        # without the autograd Functions' bookkeeping, and without the pre-activation the GELU
        # backward would read.
        out, _ = column_parallel_forward(input, weight, bias, activation, native, keep_pre=False)
        return _gather_along_last_dim(out, group, self.partition_sizes) if self.gather_output else out

    def extra_repr(self) -> str:
        act = f", activation={self.activation!r}" if self.activation else ""
        stride = f", stride={self.stride}" if self.stride != 1 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"(this rank: {self.output_size_per_partition}), bias={self.bias is not None}, "
                f"gather_output={self.gather_output}{act}{stride}, tp={self.group.rank}/{self.group.size}")


class RowParallelLinear(nn.Module):
    """Y = X W^T + b with W split along in_features: rank r multiplies its slice of the input
    features, the partial products are all-reduced (sum) forward; the backward needs no
    communication. The bias is replicated (every rank holds all of it, added once).

    input_is_parallel: the input arrives already split (the output of a ColumnParallelLinear);
        otherwise it is the full input and each rank keeps its slice (its gradient is all-gathered
        backward).
    chunks, chunk_by: the native forward cuts its output into `chunks` pieces, each all-reduced
        while the next one's GEMM runs; 0 picks the count from the problem size. chunk_by "rows"
        cuts the tokens (for many tokens, where the GEMMs are compute-bound), "columns" the output
        features (for few tokens, where each GEMM is bound by reading its slice of the weights,
        which row pieces would re-read), "auto" (default) row pieces with the count from the size
        (column blocks measured slower on H200: their GEMMs fall to split-K kernels; bench/NOTES.md).
        The result does not depend on either, beyond rounding.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_is_parallel: bool = True,
                 group: Optional[Group] = None, device=None, dtype=None, *, chunks: int = 0,
                 chunk_by: str = "auto"):
        super().__init__()
        what = type(self).__name__
        self.in_features = _positive_int(what, "in_features", in_features)
        self.out_features = _positive_int(what, "out_features", out_features)
        if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 0:
            raise ValueError(f"{what}: chunks: expected an int >= 0 (0 = automatic), got {chunks!r}")
        if chunk_by not in CHUNK_BY:
            raise ValueError(f"{what}: chunk_by: expected one of {', '.join(map(repr, CHUNK_BY))}, got {chunk_by!r}")
        self.group = resolve_group(group, what)
        self.input_is_parallel = bool(input_is_parallel)
        self.chunks = chunks
        self.chunk_by = chunk_by
        self.partition_sizes = tuple(split_sizes(in_features, self.group.size))
        self.input_size_per_partition = self.partition_sizes[self.group.rank]
        self._every_shard_nonempty = min(self.partition_sizes) > 0
        device, dtype = _resolve_device(what, device, self.group), _resolve_dtype(what, dtype)
        self.weight = nn.Parameter(torch.empty(out_features, self.input_size_per_partition, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self._mark()
        self.reset_parameters()

    def _mark(self) -> None:
        mark_tensor_parallel(self.weight, 1, self.partition_sizes)
        if self.bias is not None:
            mark_replicated(self.bias)

    def reset_parameters(self) -> None:
        """Draws the full weights as nn.Linear would, keeps this rank's shard (and all of the bias)."""
        if self.weight.is_meta:
            return  # nothing to draw (nn.Linear on meta draws nothing either); from_linear starts here
        (full,) = _full_linears(self.in_features, self.out_features, self.bias is not None, 1,
                                self.weight.device, self.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(self._shard(full.weight))
            if self.bias is not None:
                self.bias.copy_(full.bias)

    def _shard(self, weight: torch.Tensor) -> torch.Tensor:
        return shard(weight.detach(), 1, self.group.rank, self.group.size)

    def _set_parameters(self, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        like: Optional[nn.Linear] = None) -> None:
        _set_parameters(self, weight, bias, like)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: Optional[Group] = None, *, input_is_parallel: bool = True,
                    chunks: int = 0, chunk_by: str = "auto") -> "RowParallelLinear":
        """This rank's shard of `linear` (any device and dtype; the copy lands on the GPU of an NCCL
        group, else on `linear`'s device): the TP layer computes what `linear` computes."""
        _check_linear(cls.__name__, linear)
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    input_is_parallel=input_is_parallel, group=group, device="meta", dtype=linear.weight.dtype,
                    chunks=chunks, chunk_by=chunk_by)
        device = _target_device(cls.__name__ + ".from_linear", layer.group, linear)
        bias = linear.bias.detach().to(device, copy=True) if linear.bias is not None else None
        layer._set_parameters(layer._shard(linear.weight).to(device), bias, linear)
        return layer

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight, bias, group = self.weight, self.bias, self.group  # parameters are looked up through nn.Module
        what = type(self).__name__
        if self.input_is_parallel:
            _check_input(what, input, weight, self.input_size_per_partition,
                         lambda: f"this rank's shard of in_features={self.in_features}, input_is_parallel=True", group)
        else:
            _check_input(what, input, weight, self.in_features, "in_features, input_is_parallel=False", group)
            input = _ScatterToRegion.apply(input, group)
        native = use_native(input, self._every_shard_nonempty)
        if grad_will_flow(input, weight, bias):
            return RowParallelLinearFunction.apply(input, weight, bias, group, self.chunks, native, self.chunk_by)
        return row_parallel_forward(input, weight, bias, group, self.chunks, native, self.chunk_by)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (this rank: {self.input_size_per_partition}), "
                f"out_features={self.out_features}, bias={self.bias is not None}, "
                f"input_is_parallel={self.input_is_parallel}, chunks={self.chunks}, chunk_by={self.chunk_by!r}, "
                f"tp={self.group.rank}/{self.group.size}")
