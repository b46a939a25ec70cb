"""Cross-entropy over vocabulary-parallel logits (Megatron-LM's vocab-parallel cross-entropy):
each rank holds the logits of its slice of the vocabulary, and the loss comes from three numbers
per token reduced over the TP group, never from the full logits:

    m    = max over the vocabulary          (all-reduce max)
    p    = the target's logit - m           (only the rank holding the target has it; all-reduce sum)
    z    = sum of exp(logit - m)            (all-reduce sum, in the same call as p)
    loss = log(z) - p

The backward is local: softmax - one_hot(target) on this rank's slice. Two all-reduces of
[tokens] floats forward, none backward. Computed in float32 whatever the logits' dtype.
"""
from typing import Optional, Sequence

import torch

from .groups import Group
from .mappings import resolve_group

_REDUCTIONS = ("mean", "sum", "none")


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_start, ignore_index):
        x = logits.float()
        n_local = x.shape[-1]
        if n_local > 0:
            local_max = x.max(dim=-1).values
        else:
            local_max = x.new_full(x.shape[:-1], float("-inf"))
        group.all_reduce(local_max, "max")
        shifted = x - local_max.unsqueeze(-1)
        mine = (target >= vocab_start) & (target < vocab_start + n_local)
        local_target = torch.where(mine, target - vocab_start, torch.zeros_like(target))
        exp = shifted.exp()
        both = torch.empty((2,) + tuple(x.shape[:-1]), dtype=torch.float32, device=x.device)
        if n_local > 0:
            both[0] = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1) * mine
        else:
            both[0] = 0.0
        both[1] = exp.sum(dim=-1)
        group.all_reduce(both)
        target_logit, sum_exp = both[0], both[1]
        valid = target != ignore_index
        loss = (sum_exp.log() - target_logit) * valid
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), mine, local_target, valid)
        ctx.logits_dtype = logits.dtype
        ctx.consumed = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.consumed:
            raise RuntimeError("vocab_parallel_cross_entropy: backward ran a second time through the same loss "
                               "(retain_graph=True): the softmax saved for it became the first backward's gradient "
                               "(in place, to keep one logits-sized buffer); compute the loss again instead")
        ctx.consumed = True
        softmax, mine, local_target, valid = ctx.saved_tensors
        grad = softmax  # saved for this single backward; reused in place
        if grad.shape[-1] > 0:
            grad.scatter_add_(-1, local_target.unsqueeze(-1), -mine.to(grad.dtype).unsqueeze(-1))
        grad.mul_((grad_loss * valid).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group: Optional[Group] = None, *,
                                 vocab_sizes: Optional[Sequence[int]] = None, ignore_index: int = -100,
                                 reduction: str = "mean") -> torch.Tensor:
    """F.cross_entropy(full_logits, target) from this rank's slice of the logits.

    logits: [..., vocab slice] (e.g. ParallelLMHead(gather_output=False) output); target: [...]
    token ids of the full vocabulary (ignore_index: no loss, no gradient). vocab_sizes: every
    rank's slice size in group-rank order (e.g. head.partition_sizes); None: every rank holds as
    many as this one. reduction: "mean" (over the tokens not ignored), "sum" or "none"
    (per-token losses). The loss is float32; the gradient of the logits has their dtype."""
    what = "vocab_parallel_cross_entropy"
    group = resolve_group(group, what)
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point or logits.dim() < 1:
        raise TypeError(f"{what}: logits: expected a floating-point tensor [..., vocab slice], got "
                        f"{getattr(logits, 'dtype', type(logits).__name__)}")
    if not isinstance(target, torch.Tensor) or target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(f"{what}: target: expected a tensor of integer token ids, got "
                        f"{getattr(target, 'dtype', type(target).__name__)}")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"{what}: target: expected shape {tuple(logits.shape[:-1])} (logits without the vocabulary "
                         f"dim), got {tuple(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"{what}: target: expected a tensor on {logits.device} (where logits are), got {target.device}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{what}: reduction: expected one of {', '.join(map(repr, _REDUCTIONS))}, got {reduction!r}")
    if vocab_sizes is None:
        vocab_sizes = [logits.shape[-1]] * group.size
    vocab_sizes = [int(s) for s in vocab_sizes]
    if len(vocab_sizes) != group.size or vocab_sizes[group.rank] != logits.shape[-1]:
        raise ValueError(f"{what}: vocab_sizes: expected {group.size} sizes with this rank's (#{group.rank}) equal to "
                         f"the logits' last dimension {logits.shape[-1]}, got {vocab_sizes}")
    vocab = sum(vocab_sizes)
    if not target.is_cuda and target.numel():
        bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
        if bool(bad.any()):
            raise IndexError(f"{what}: target: expected ids in [0, {vocab}) or ignore_index={ignore_index}, got "
                             f"{int(target[bad][0])}")
    start = sum(vocab_sizes[:group.rank])
    loss = _VocabParallelCrossEntropy.apply(logits.contiguous(), target, group, start, ignore_index)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    # Like F.cross_entropy: the mean over the tokens that count (NaN when none does).
    return loss.sum() / (target != ignore_index).sum()
