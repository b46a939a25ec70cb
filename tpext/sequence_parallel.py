"""Sequence parallelism (Korthikanti et al., arXiv 2205.05198): outside the tensor-parallel
regions, activations are split along the sequence instead of replicated, so the norms, residual
adds and dropouts of a transformer layer work on 1/tp of the tokens. Each all-reduce of the
tensor-parallel layer becomes a reduce-scatter (leaving the TP region) and an all-gather (entering
it): the same bytes, the same results.

    x = scatter_to_sequence_parallel_region(x)           # [b, s, h] -> this rank's [b, s/tp, h]
    layer = tpext.ParallelTransformerLayer(512, 8, 2048, sequence_parallel=True)
    y = gather_from_sequence_parallel_region(layer(x))   # [b, s, h]

Activations are batch-first, the sequence is dim 1, and it must divide by the TP size (every rank
holds the same number of tokens). The crossings, forward and backward conjugate:

    scatter_to      forward: keep my slice          backward: all-gather
    gather_from     forward: all-gather             backward: reduce-scatter (sum)
    reduce_scatter  forward: reduce-scatter (sum)   backward: all-gather

Parameters used on the sequence slice (norm weights) see only this rank's tokens; their
gradients are summed over the TP group by a hook (sync_sequence_parallel_grads), as Megatron's
all-reduce of the sequence-parallel LayerNorm gradients does.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import ParallelAttention, register_grad_hook
from .groups import Group
from .layers import _positive_int
from .mappings import resolve_group
from .mlp import ParallelMLP
from .partition import mark_replicated

SEQUENCE_DIM = 1


def _check_divisible(what: str, x: torch.Tensor, group: Group, full: bool) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: input: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{what}: input: expected a [batch, seq, ...] tensor, got shape {tuple(x.shape)}")
    if full and x.shape[SEQUENCE_DIM] % group.size != 0:
        raise ValueError(f"{what}: input: expected a sequence length (dim {SEQUENCE_DIM}) divisible by the TP size "
                         f"{group.size}, got shape {tuple(x.shape)}; pad the sequence")


def _slice(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x.chunk(group.size, dim=SEQUENCE_DIM)[group.rank].contiguous()


def _gather(x: torch.Tensor, group: Group) -> torch.Tensor:
    return group.all_gather(x.contiguous(), SEQUENCE_DIM)


def _reduce_scatter(x: torch.Tensor, group: Group) -> torch.Tensor:
    return group.reduce_scatter(x.contiguous(), "sum", SEQUENCE_DIM)


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _slice(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.group), None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group), None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.group), None


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: Optional[Group] = None) -> torch.Tensor:
    """This rank's slice of the sequence (dim 1) of the full `x`; backward all-gathers."""
    what = "scatter_to_sequence_parallel_region"
    group = resolve_group(group, what)
    _check_divisible(what, x, group, True)
    return _ScatterToSequence.apply(x, group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group: Optional[Group] = None) -> torch.Tensor:
    """The full sequence from every rank's slice (all-gather along dim 1); backward reduce-scatters
    (sums) the gradient, since every rank's tensor-parallel computation used all of it."""
    what = "gather_from_sequence_parallel_region"
    group = resolve_group(group, what)
    _check_divisible(what, x, group, False)
    return _GatherFromSequence.apply(x, group)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: Optional[Group] = None) -> torch.Tensor:
    """Sum over the group of the partial results `x` [b, s, ...], this rank keeping its slice of
    the sequence (the row-parallel output); backward all-gathers."""
    what = "reduce_scatter_to_sequence_parallel_region"
    group = resolve_group(group, what)
    _check_divisible(what, x, group, True)
    return _ReduceScatterToSequence.apply(x, group)


class _AddSequenceParallelBias(torch.autograd.Function):
    """out = x + bias on this rank's sequence slice. The bias is replicated, but each rank's
    gradient covers only its own tokens: backward sums it over the group, so every rank holds the
    gradient the layer without sequence parallelism would give."""

    @staticmethod
    def forward(ctx, x, bias, group):
        ctx.group = group
        return x + bias

    @staticmethod
    def backward(ctx, grad):
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad, ctx.group.all_reduce(grad_bias.contiguous()), None


def add_sequence_parallel_bias(x: torch.Tensor, bias: Optional[torch.Tensor], group: Group) -> torch.Tensor:
    """`x` + `bias` (a replicated row-parallel bias) on a sequence slice, its gradient summed over
    `group`; `x` unchanged when there is no bias."""
    if bias is None:
        return x
    if not bias.requires_grad:
        return x + bias
    return _AddSequenceParallelBias.apply(x, bias, group)


def sync_sequence_parallel_grads(module: nn.Module, group: Group) -> None:
    """Marks `module`'s parameters replicated and sums their gradients over `group` on every
    backward: used on a sequence slice, each rank's gradient covers only its own tokens."""
    for p in module.parameters():
        mark_replicated(p)
        p.sequence_parallel = True
        register_grad_hook(p, lambda g, group=group: group.all_reduce(g.contiguous().clone()))


def mlp_forward(mlp: ParallelMLP, x: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """`mlp`(x); with sequence_parallel, x is this rank's sequence slice and so is the result: the
    input is all-gathered, fc1 applied locally, fc2's partial products reduce-scattered."""
    if not sequence_parallel:
        return mlp(x)
    fc1, fc2, group = mlp.linear_fc1, mlp.linear_fc2, mlp.group
    full = gather_from_sequence_parallel_region(x.contiguous(), group)
    # Weights applied directly: the gather's backward already sums dx over the ranks, which the
    # column layer's own backward all-reduce would do a second time.
    h = F.linear(full, fc1.weight, fc1.bias)
    if mlp.activation == "gelu":
        h = F.gelu(h, approximate="tanh")  # in fc1's epilogue on ParallelMLP's own path
    h = mlp.activate(h)
    out = reduce_scatter_to_sequence_parallel_region(F.linear(h, fc2.weight), group)
    return add_sequence_parallel_bias(out, fc2.bias, group)


class ParallelTransformerLayer(nn.Module):
    """A pre-norm transformer layer on the TP layers:

        h = x + attention(norm1(x)),   out = h + mlp(norm2(h))

    attention: ParallelAttention (rotary, causal, GQA through num_kv_heads); mlp: ParallelMLP
    ("swiglu" or "gelu"); norm: "rmsnorm" or "layernorm" (nn.RMSNorm / nn.LayerNorm, replicated).
    Input and output [batch, seq, hidden]; with sequence_parallel, this rank's [batch, seq/tp,
    hidden] slice, the norms and residuals computed on the slice, and the result equal to the
    slice of the layer without sequence parallelism. Fresh weights: the attention's, then the
    MLP's, drawn as ParallelAttention and ParallelMLP draw them.
    """

    def __init__(self, hidden_size: int, num_heads: int, ffn_hidden_size: int, num_kv_heads: Optional[int] = None,
                 norm: str = "rmsnorm", activation: str = "swiglu", bias: bool = False, eps: float = 1e-5,
                 rope_theta: Optional[float] = 10000.0, sequence_parallel: bool = False,
                 group: Optional[Group] = None, device=None, dtype=None):
        super().__init__()
        what = type(self).__name__
        _positive_int(what, "hidden_size", hidden_size)
        if norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"{what}: norm: expected 'rmsnorm' or 'layernorm', got {norm!r}")
        group = resolve_group(group, what)
        self.sequence_parallel = bool(sequence_parallel)
        self.attention = ParallelAttention(hidden_size, num_heads, num_kv_heads, bias=bias, rope_theta=rope_theta,
                                           sequence_parallel=sequence_parallel, group=group, device=device,
                                           dtype=dtype)
        self.mlp = ParallelMLP(hidden_size, ffn_hidden_size, activation, bias, group, device, dtype)
        dev = device if device is not None else self.attention.o_proj.weight.device
        make = (lambda: nn.RMSNorm(hidden_size, eps=eps, device=dev, dtype=dtype)) if norm == "rmsnorm" else \
            (lambda: nn.LayerNorm(hidden_size, eps=eps, device=dev, dtype=dtype))
        self.norm1, self.norm2 = make(), make()
        for n in (self.norm1, self.norm2):
            if sequence_parallel:
                sync_sequence_parallel_grads(n, group)
            else:
                for p in n.parameters():
                    mark_replicated(p)

    @property
    def group(self) -> Group:
        return self.attention.group

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = hidden_states + self.attention(self.norm1(hidden_states), attention_mask, position_ids)
        return h + mlp_forward(self.mlp, self.norm2(h), self.sequence_parallel)

    def extra_repr(self) -> str:
        return f"sequence_parallel={self.sequence_parallel}"
