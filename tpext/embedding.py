"""The vocabulary split across the TP group: VocabParallelEmbedding (input) and ParallelLMHead
(output), which may share one weight (tied embeddings).

    emb = tpext.VocabParallelEmbedding(vocab_size, hidden)        # rank r holds rows of its vocab slice
    head = tpext.ParallelLMHead(hidden, vocab_size, tied_to=emb)   # the same shard, as logits
    logits = head(h)                                               # gather_output=True: all of the vocab
    head = tpext.ParallelLMHead(hidden, vocab_size, gather_output=False)
    loss = tpext.vocab_parallel_cross_entropy(head(h), labels, vocab_sizes=head.partition_sizes)

Any vocabulary size on any TP size: rank r holds split_sizes(vocab, tp)[r] consecutive token ids
(torch.tensor_split; the weight is marked with partition_dim 0 and those sizes). The embedding
looks up the ids that fall in its slice, zeroes the others, and all-reduces (sum) the partial
embeddings; with sequence_parallel it reduce-scatters them along the sequence instead. Fresh
weights equal those of nn.Embedding / nn.Linear built under the same RNG state.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .groups import Group
from .layers import ColumnParallelLinear, _check_linear, _positive_int, _resolve_device, _resolve_dtype
from .mappings import reduce_from_tensor_parallel_region, resolve_group
from .partition import mark_tensor_parallel, shard, split_sizes


class VocabParallelEmbedding(nn.Module):
    """nn.Embedding(num_embeddings, embedding_dim, padding_idx) with the rows split across the TP
    group. Ids outside [0, num_embeddings) raise on CPU tensors; on CUDA they are not checked
    (that would synchronise with the host) and embed to zeros."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = None,
                 group: Optional[Group] = None, device=None, dtype=None, *, sequence_parallel: bool = False):
        super().__init__()
        what = type(self).__name__
        self.num_embeddings = _positive_int(what, "num_embeddings", num_embeddings)
        self.embedding_dim = _positive_int(what, "embedding_dim", embedding_dim)
        if padding_idx is not None:
            if not isinstance(padding_idx, int) or not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"{what}: padding_idx: expected None or an id in [{-num_embeddings}, "
                                 f"{num_embeddings}), got {padding_idx!r}")
            padding_idx %= num_embeddings
        self.padding_idx = padding_idx
        self.sequence_parallel = bool(sequence_parallel)
        self.group = resolve_group(group, what)
        self.partition_sizes = tuple(split_sizes(num_embeddings, self.group.size))
        self.vocab_start = sum(self.partition_sizes[:self.group.rank])
        self.vocab_end = self.vocab_start + self.partition_sizes[self.group.rank]
        device, dtype = _resolve_device(what, device, self.group), _resolve_dtype(what, dtype)
        self.weight = nn.Parameter(torch.empty(self.vocab_end - self.vocab_start, embedding_dim, device=device,
                                               dtype=dtype))
        mark_tensor_parallel(self.weight, 0, self.partition_sizes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draws the full table as nn.Embedding would (padding row zero), keeps this rank's rows."""
        if self.weight.is_meta:
            return
        full = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, device=self.weight.device,
                            dtype=self.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(full.weight[self.vocab_start:self.vocab_end])

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, group: Optional[Group] = None, *,
                       sequence_parallel: bool = False) -> "VocabParallelEmbedding":
        """This rank's rows of `embedding` (on the GPU of an NCCL group, else where it is). Options
        other than padding_idx (max_norm, scale_grad_by_freq, sparse) are not supported."""
        what = f"{cls.__name__}.from_embedding"
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"{what}: embedding: expected a torch.nn.Embedding, got {type(embedding).__name__}")
        if embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse:
            raise ValueError(f"{what}: embedding: max_norm, scale_grad_by_freq and sparse are not supported")
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, group, device="meta",
                    dtype=embedding.weight.dtype, sequence_parallel=sequence_parallel)
        device = layer.group.device if layer.group._nccl is not None else embedding.weight.device
        with torch.no_grad():
            w = embedding.weight.detach()[layer.vocab_start:layer.vocab_end].to(device, copy=True)
        layer.weight = nn.Parameter(w, requires_grad=embedding.weight.requires_grad)  # frozen stays frozen
        mark_tensor_parallel(layer.weight, 0, layer.partition_sizes)
        return layer

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        what = type(self).__name__
        if not isinstance(input, torch.Tensor) or input.dtype.is_floating_point or input.dtype == torch.bool:
            raise TypeError(f"{what}: input: expected a tensor of integer token ids, got "
                            f"{getattr(input, 'dtype', type(input).__name__)}")
        if input.device != self.weight.device:
            raise ValueError(f"{what}: input: expected ids on {self.weight.device} (where weight is), got "
                             f"{input.device}")
        if not input.is_cuda and input.numel() and (input.min() < 0 or input.max() >= self.num_embeddings):
            raise IndexError(f"{what}: input: expected token ids in [0, {self.num_embeddings}), got values in "
                             f"[{int(input.min())}, {int(input.max())}]")
        mine = (input >= self.vocab_start) & (input < self.vocab_end)
        if self.weight.shape[0] == 0:
            # More ranks than tokens: nothing to look up here. Zeros computed from the (empty) weight,
            # so the output requires grad exactly where the other ranks' does (their backward must
            # not wait on this one) and the weight gets its (empty) gradient like every other rank's.
            partial = self.weight.new_zeros(*input.shape, 0) @ self.weight
        else:
            local = torch.where(mine, input - self.vocab_start, torch.zeros_like(input))
            pad = self.padding_idx
            pad = pad - self.vocab_start if pad is not None and self.vocab_start <= pad < self.vocab_end else None
            partial = F.embedding(local, self.weight, pad)
            partial = partial * mine.unsqueeze(-1).to(partial.dtype)
        if self.sequence_parallel:
            from .sequence_parallel import reduce_scatter_to_sequence_parallel_region
            return reduce_scatter_to_sequence_parallel_region(partial, self.group)
        return reduce_from_tensor_parallel_region(partial, self.group)

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return (f"{self.num_embeddings}, {self.embedding_dim}{pad} (this rank: ids [{self.vocab_start}, "
                f"{self.vocab_end})), sequence_parallel={self.sequence_parallel}, "
                f"tp={self.group.rank}/{self.group.size}")


class ParallelLMHead(ColumnParallelLinear):
    """The output projection hidden -> vocab, column-parallel over the vocabulary.

    gather_output=True all-gathers the logits (what generation and a full-vocabulary loss need);
    False returns this rank's [..., vocab slice] for vocab_parallel_cross_entropy, which never
    builds the full logits. tied_to: a VocabParallelEmbedding whose weight (the same Parameter)
    this head uses, as tied input/output embeddings are. Inputs need not be contiguous (a slice
    of the last positions, as generation takes)."""

    def __init__(self, hidden_size: int, vocab_size: int, bias: bool = False, gather_output: bool = True,
                 group: Optional[Group] = None, device=None, dtype=None, *,
                 tied_to: Optional[VocabParallelEmbedding] = None):
        what = type(self).__name__
        if tied_to is not None:
            if not isinstance(tied_to, VocabParallelEmbedding):
                raise TypeError(f"{what}: tied_to: expected a tpext.VocabParallelEmbedding, got "
                                f"{type(tied_to).__name__}")
            dtype = tied_to.weight.dtype if dtype is None else dtype
            device = "meta"  # the weight comes from the embedding; nothing to draw
        super().__init__(hidden_size, vocab_size, bias, gather_output, group, device, dtype)
        if tied_to is not None:
            self.tie(tied_to)
            if self.bias is not None:
                self.bias = nn.Parameter(torch.zeros(self.output_size_per_partition, device=self.weight.device,
                                                     dtype=self.weight.dtype))
                self._mark()

    def tie(self, embedding: VocabParallelEmbedding) -> None:
        """Uses `embedding`'s weight (the same Parameter) from now on."""
        what = f"{type(self).__name__}.tie"
        if not isinstance(embedding, VocabParallelEmbedding):
            raise TypeError(f"{what}: embedding: expected a tpext.VocabParallelEmbedding, got {type(embedding).__name__}")
        if (embedding.num_embeddings, embedding.embedding_dim) != (self.out_features, self.in_features):
            raise ValueError(f"{what}: embedding: expected {self.out_features} x {self.in_features} (vocab x hidden), "
                             f"got {embedding.num_embeddings} x {embedding.embedding_dim}")
        if embedding.group is not self.group:
            raise ValueError(f"{what}: embedding: expected the head's group {self.group}, got {embedding.group}")
        self.weight = embedding.weight
        self._tied = True

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: Optional[Group] = None, *, gather_output: bool = True,
                    tied_to: Optional[VocabParallelEmbedding] = None) -> "ParallelLMHead":
        """This rank's vocabulary slice of the output projection `linear` [vocab, hidden]; with
        tied_to, the weight is the embedding's (which must hold the same values) and only the bias
        is taken from `linear`."""
        what = f"{cls.__name__}.from_linear"
        _check_linear(what, linear)
        head = cls(linear.in_features, linear.out_features, linear.bias is not None, gather_output, group,
                   device="meta", dtype=linear.weight.dtype, tied_to=tied_to)
        device = head.group.device if head.group._nccl is not None else linear.weight.device
        rank, size = head.group.rank, head.group.size
        with torch.no_grad():
            w = head.weight if tied_to is not None else nn.Parameter(
                shard(linear.weight.detach(), 0, rank, size).to(device), requires_grad=linear.weight.requires_grad)
            b = shard(linear.bias.detach(), 0, rank, size).to(device) if linear.bias is not None else None
        head.weight = w
        # A frozen full layer gives frozen shards, as ColumnParallelLinear.from_linear does.
        head.bias = nn.Parameter(b, requires_grad=linear.bias.requires_grad) if b is not None else None
        head._mark()
        return head

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input.contiguous() if isinstance(input, torch.Tensor) else input)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", tied" if getattr(self, "_tied", False) else "")
