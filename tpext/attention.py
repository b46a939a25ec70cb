"""Attention over the TP group, split by heads (Megatron-LM): Q, K and V are column-parallel, each
rank computes whole heads, the output projection is row-parallel (one all-reduce forward, one
backward), and the attention itself is torch's scaled_dot_product_attention on the local heads.

    attn = tpext.ParallelAttention(hidden_size=512, num_heads=8, num_kv_heads=2)   # GQA
    y = attn(x, attention_mask=pad_mask)                                          # x: [batch, seq, hidden]

How heads land on ranks (head_layout), for H query heads, K KV heads (H a multiple of K, G = H/K
query heads per KV head) over a TP group of t ranks:

- K >= t: whole KV groups are split the tensor_split way (K=3 on t=2: 2 and 1 groups), each
  rank taking the G query heads of each of its KV heads. Nothing is replicated; uneven when
  t does not divide K.
- K < t (fewer KV heads than ranks, MQA included): the query heads are split the tensor_split
  way (at least one per rank: H >= t is required) and each rank holds copies of the KV heads its
  query heads read. Those KV weights are replicated across ranks: their gradients are summed over
  the group (a hook on the parameter) so the copies stay equal through training.

Every shard is a list of row ranges of the full weight (a head is head_dim consecutive rows).
Where that is the plain tensor_split-like layout (contiguous pieces in rank order, or `stride`
stacked blocks each cut so, as a fused [q|k|v] of equal parts) the parameter carries the usual
partition_dim / partition_sizes / partition_stride; otherwise (replicated KV heads, fused GQA)
it also carries partition_ranges: every rank's (start, stop) ranges along partition_dim, which
tpext's gather and checkpoint code reads first.
"""
import math
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .groups import Group
from .layers import ColumnParallelLinear, RowParallelLinear, _positive_int
from .mappings import copy_to_tensor_parallel_region, resolve_group
from .partition import mark_replicated, mark_tensor_parallel, split_sizes

Ranges = Tuple[Tuple[int, int], ...]


# -- which heads a rank computes ------------------------------------------------------------------


@dataclass(frozen=True)
class RankHeads:
    """The heads of one rank: query heads `q` (global indices, in order), KV heads `kv` in local
    order (a head may appear twice: local query head j reads local KV head j // n_rep)."""
    q: Tuple[int, ...]
    kv: Tuple[int, ...]
    n_rep: int


def head_layout(num_heads: int, num_kv_heads: int, tp_size: int) -> List[RankHeads]:
    """The heads of every rank of a TP group of `tp_size` (see the module docstring)."""
    what = "head_layout"
    _positive_int(what, "num_heads", num_heads)
    _positive_int(what, "num_kv_heads", num_kv_heads)
    _positive_int(what, "tp_size", tp_size)
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"{what}: num_kv_heads: expected a divisor of num_heads={num_heads}, got {num_kv_heads}")
    group = num_heads // num_kv_heads
    if num_kv_heads >= tp_size:
        layout, first = [], 0
        for n in split_sizes(num_kv_heads, tp_size):
            kv = tuple(range(first, first + n))
            layout.append(RankHeads(tuple(range(first * group, (first + n) * group)), kv, group))
            first += n
        return layout
    if num_heads < tp_size:
        raise ValueError(f"{what}: num_heads: expected at least one query head per rank ({tp_size} ranks), got "
                         f"{num_heads}; use a smaller TP group for this attention")
    layout, first = [], 0
    for n in split_sizes(num_heads, tp_size):
        q = tuple(range(first, first + n))
        first += n
        # Runs of consecutive query heads reading the same KV head; n_rep must divide every run.
        runs: List[List[int]] = []
        for h in q:
            if runs and runs[-1][0] == h // group:
                runs[-1][1] += 1
            else:
                runs.append([h // group, 1])
        n_rep = math.gcd(*[length for _, length in runs])
        kv = tuple(k for k, length in runs for _ in range(length // n_rep))
        layout.append(RankHeads(q, kv, n_rep))
    return layout


def describe_heads(layout: Sequence[RankHeads]) -> str:
    """One line saying how the heads were split, for warnings and reprs."""
    q = [len(r.q) for r in layout]
    kv = [len(r.kv) for r in layout]
    return f"query heads per rank {q}, KV heads per rank {kv}"


def is_uneven(layout: Sequence[RankHeads]) -> bool:
    return len({len(r.q) for r in layout}) > 1


def kv_replicated(layout: Sequence[RankHeads]) -> bool:
    held = [k for r in layout for k in r.kv]
    return len(held) != len(set(held))


# -- row ranges and the layouts they make -------------------------------------------------------


def head_ranges(heads: Sequence[int], rows_per_head: int, offset: int = 0) -> Ranges:
    """The row ranges of `heads` in a weight whose head h is rows [offset + h*rows_per_head, ...),
    adjacent ranges merged."""
    out: List[List[int]] = []
    for h in heads:
        start = offset + h * rows_per_head
        if out and out[-1][1] == start:
            out[-1][1] += rows_per_head
        else:
            out.append([start, start + rows_per_head])
    return tuple((a, b) for a, b in out)


def _merge(ranges: Sequence[Tuple[int, int]]) -> List[Tuple[int, int]]:
    out: List[List[int]] = []
    for a, b in ranges:
        if b == a:
            continue
        if out and out[-1][1] == a:
            out[-1][1] = b
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _as_split(ranges_per_rank: Sequence[Ranges], full: int, stride: int) -> Optional[List[int]]:
    """Per-rank sizes when the ranges are `stride` stacked blocks each cut in rank order into
    contiguous pieces, a rank's pieces equal in size (what unshard(..., stride) inverts)."""
    if full % stride != 0:
        return None
    block = full // stride
    sizes = []
    pieces = []  # pieces[r][j]: rank r's range inside block j
    for ranges in ranges_per_rank:
        merged = _merge(ranges)
        per_block: List[Optional[Tuple[int, int]]] = [None] * stride
        for a, b in merged:
            j = a // block
            if j >= stride or (b - 1) // block != j or per_block[j] is not None:
                return None
            per_block[j] = (a, b)
        lengths = {(p[1] - p[0]) if p else 0 for p in per_block}
        if len(lengths) != 1:
            return None
        sizes.append(lengths.pop())
        pieces.append(per_block)
    for j in range(stride):
        at = j * block
        for r, per_block in enumerate(pieces):
            if sizes[r] == 0:
                continue
            if per_block[j][0] != at:
                return None
            at = per_block[j][1]
        if at != (j + 1) * block:
            return None
    return sizes


def describe_layout(ranges_per_rank: Sequence[Ranges], full: int) -> dict:
    """{"kind": "split", "sizes", "stride"} when the ranges are a tensor_split-like layout (see the
    module docstring), else {"kind": "ranges", "ranges"}."""
    for stride in (1, 2, 3):
        sizes = _as_split(ranges_per_rank, full, stride)
        if sizes is not None:
            return {"kind": "split", "sizes": tuple(sizes), "stride": stride}
    held = sorted({i for ranges in ranges_per_rank for a, b in ranges for i in (a, b)})
    covered = set()
    for ranges in ranges_per_rank:
        for a, b in ranges:
            covered.update(range(a, b))
    if covered != set(range(full)):
        raise ValueError(f"describe_layout: ranges_per_rank: expected the ranks together to hold every one of {full} "
                         f"rows, got ranges {list(ranges_per_rank)} (edges {held[:8]}...)")
    return {"kind": "ranges", "ranges": tuple(tuple(tuple(r) for r in _merge(x)) for x in ranges_per_rank)}


def take_ranges(full: torch.Tensor, dim: int, ranges: Ranges) -> torch.Tensor:
    """The rows `ranges` of `full` along `dim`, concatenated (a fresh contiguous tensor)."""
    if not ranges:
        shape = list(full.shape)
        shape[dim] = 0
        return full.new_empty(shape)
    return torch.cat([full.narrow(dim, a, b - a) for a, b in ranges], dim=dim).contiguous()


def mark_layout(param: torch.Tensor, dim: int, layout: dict, rank_sizes: Sequence[int]) -> None:
    """Partition attributes of `param` for `layout` (describe_layout); `rank_sizes`: every rank's
    size along `dim`."""
    if layout["kind"] == "split":
        mark_tensor_parallel(param, dim, layout["sizes"], layout["stride"])
        param.partition_ranges = None
    else:
        mark_tensor_parallel(param, dim, tuple(rank_sizes))
        param.partition_ranges = layout["ranges"]


def _sync_replicated_rows(param: nn.Parameter, dim: int, ranges_per_rank: Sequence[Ranges], full: int,
                          group: Group) -> None:
    """Rows held by several ranks (or twice by one) get the sum of all their copies' gradients, so
    the copies of a replicated KV head stay equal. One all-reduce of the full-size gradient per
    backward: these are the few KV heads of a model with fewer KV heads than ranks."""
    mine = ranges_per_rank[group.rank]
    index = torch.cat([torch.arange(a, b) for a, b in mine]) if mine else torch.empty(0, dtype=torch.long)

    def hook(grad: torch.Tensor) -> torch.Tensor:
        shape = list(grad.shape)
        shape[dim] = full
        total = grad.new_zeros(shape)
        idx = index.to(grad.device)
        total.index_add_(dim, idx, grad)
        group.all_reduce(total)
        return total.index_select(dim, idx)

    register_grad_hook(param, hook)


def register_grad_hook(param: torch.Tensor, hook) -> None:
    """param.register_hook(hook), also on a frozen parameter (torch refuses hooks on tensors that
    do not require grad): the hook is what keeps the copies or partial gradients right once the
    parameter is unfrozen, so it must be there from the start."""
    frozen = not param.requires_grad
    if frozen:
        param.requires_grad_(True)
    try:
        param.register_hook(hook)
    finally:
        if frozen:
            param.requires_grad_(False)


# -- column / row layers with head-granular shards ----------------------------------------------


def _keep_frozen(layer: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    # A frozen full weight (requires_grad False) gives a frozen shard, as from_linear does.
    layer.weight.requires_grad_(weight.requires_grad)
    if bias is not None:
        layer.bias.requires_grad_(bias.requires_grad)


def head_parallel_column(weight: torch.Tensor, bias: Optional[torch.Tensor], ranges_per_rank: Sequence[Ranges],
                         group: Group, device=None) -> ColumnParallelLinear:
    """A ColumnParallelLinear holding rows `ranges_per_rank[rank]` of the full `weight` [out, in]
    (and `bias`): whole heads, any split, KV copies included."""
    out_f, in_f = weight.shape
    rank = group.rank
    layout = describe_layout(ranges_per_rank, out_f)
    rank_sizes = [sum(b - a for a, b in x) for x in ranges_per_rank]
    layer = ColumnParallelLinear(in_f, out_f, bias=bias is not None, group=group, device="meta", dtype=weight.dtype)
    device = device if device is not None else (group.device if group._nccl is not None else weight.device)
    with torch.no_grad():
        w = take_ranges(weight.detach(), 0, ranges_per_rank[rank]).to(device)
        b = take_ranges(bias.detach(), 0, ranges_per_rank[rank]).to(device) if bias is not None else None
    # The layer's own bookkeeping (what it checks inputs and picks the native path by), set for
    # this head-granular split; the layers take tensor_split sizes only.
    layer.stride = layout["stride"] if layout["kind"] == "split" else 1
    layer.partition_sizes = layout["sizes"] if layout["kind"] == "split" else tuple(rank_sizes)
    layer.output_size_per_partition = rank_sizes[rank]
    layer._every_shard_nonempty = min(rank_sizes) > 0
    layer._set_parameters(w, b)
    _keep_frozen(layer, weight, bias)
    for p in (layer.weight, layer.bias):
        if p is not None:
            mark_layout(p, 0, layout, rank_sizes)
    if layout["kind"] == "ranges" and sum(rank_sizes) > out_f:
        for p in (layer.weight, layer.bias):
            if p is not None:
                _sync_replicated_rows(p, 0, ranges_per_rank, out_f, group)
    return layer


def head_parallel_row(weight: torch.Tensor, bias: Optional[torch.Tensor], ranges_per_rank: Sequence[Ranges],
                      group: Group, device=None) -> RowParallelLinear:
    """A RowParallelLinear holding input columns `ranges_per_rank[rank]` of the full `weight`
    [out, in]; the columns must be contiguous pieces in rank order (the query heads)."""
    out_f, in_f = weight.shape
    layout = describe_layout(ranges_per_rank, in_f)
    if layout["kind"] != "split" or layout["stride"] != 1:
        raise ValueError(f"head_parallel_row: ranges_per_rank: expected contiguous pieces in rank order, got "
                         f"{list(ranges_per_rank)}")
    sizes = layout["sizes"]
    layer = RowParallelLinear(in_f, out_f, bias=bias is not None, group=group, device="meta", dtype=weight.dtype)
    device = device if device is not None else (group.device if group._nccl is not None else weight.device)
    with torch.no_grad():
        w = take_ranges(weight.detach(), 1, ranges_per_rank[group.rank]).to(device)
        b = bias.detach().to(device, copy=True) if bias is not None else None
    layer.partition_sizes = tuple(sizes)
    layer.input_size_per_partition = sizes[group.rank]
    layer._every_shard_nonempty = min(sizes) > 0
    layer._set_parameters(w, b)
    _keep_frozen(layer, weight, bias)
    mark_layout(layer.weight, 1, layout, sizes)
    if layer.bias is not None:
        mark_replicated(layer.bias)
    return layer


def qkv_ranges(layout: Sequence[RankHeads], num_heads: int, num_kv_heads: int, head_dim: int, fused: str):
    """Per-rank row ranges of the projections. fused: "separate" -> (q, k, v) ranges; "blocked"
    -> ranges of one [q | k | v] weight; "interleaved" -> ranges of one weight laid out per head as
    [q_h, k_h, v_h] (GPT-NeoX), which needs num_kv_heads == num_heads."""
    if fused == "separate":
        return ([head_ranges(r.q, head_dim) for r in layout], [head_ranges(r.kv, head_dim) for r in layout],
                [head_ranges(r.kv, head_dim) for r in layout])
    if fused == "blocked":
        return [head_ranges(r.q, head_dim) + head_ranges(r.kv, head_dim, num_heads * head_dim)
                + head_ranges(r.kv, head_dim, (num_heads + num_kv_heads) * head_dim) for r in layout]
    if fused == "interleaved":
        if num_kv_heads != num_heads:
            raise ValueError(f"qkv_ranges: num_kv_heads: a per-head interleaved fused QKV needs as many KV heads as "
                             f"query heads ({num_heads}), got {num_kv_heads}")
        return [head_ranges(r.q, 3 * head_dim) for r in layout]
    raise ValueError(f"qkv_ranges: fused: expected 'separate', 'blocked' or 'interleaved', got {fused!r}")


def out_ranges(layout: Sequence[RankHeads], head_dim: int):
    return [head_ranges(r.q, head_dim) for r in layout]


def warn_layout(what: str, layout: Sequence[RankHeads], num_heads: int, num_kv_heads: int) -> None:
    """Says so when the heads split unevenly or KV heads are replicated."""
    notes = []
    if is_uneven(layout):
        notes.append("the heads do not divide evenly, so ranks compute different numbers of heads")
    if kv_replicated(layout):
        notes.append("there are fewer KV heads than ranks, so KV heads are replicated (their gradients are summed "
                     "over the TP group)")
    if notes:
        warnings.warn(f"{what}: {num_heads} query / {num_kv_heads} KV heads over {len(layout)} ranks: "
                      f"{'; '.join(notes)}: {describe_heads(layout)}", stacklevel=3)


# -- rotary embeddings and the attention core ---------------------------------------------------


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin [..., head_dim] of the rotary embedding (Llama / GPT-NeoX "rotate half" form) at
    integer `positions`, computed in float32 and cast to `dtype`."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [batch, heads, seq, head_dim]; cos, sin [batch, seq, head_dim]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attention_mask_for(padding_mask: Optional[torch.Tensor], seq: int, causal: bool, device) -> Optional[torch.Tensor]:
    """The boolean SDPA mask [batch, 1, seq, seq] (True: attend) of a padding mask [batch, seq]
    (nonzero or True: a real token), or None when there is no padding (SDPA's is_causal then
    does the causal part). Every query may attend to itself, so a padding query whose keys are all
    masked (left padding) gets a finite output instead of NaN; real tokens are unaffected."""
    if padding_mask is None:
        return None
    keys = padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    allowed = keys.expand(-1, 1, seq, seq)
    if causal:
        allowed = allowed & torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    return allowed | torch.eye(seq, dtype=torch.bool, device=device)


class ParallelAttention(nn.Module):
    """Self-attention over the TP group: multi-head (num_kv_heads = num_heads), grouped-query
    (a divisor of it) or multi-query (1). Heads are placed by head_layout; Q, K, V are
    ColumnParallelLinear layers holding whole heads (fused_qkv: one layer computing this rank's
    [q | k | v]), the output projection a RowParallelLinear over the local heads.

    Input [batch, seq, hidden_size]; with sequence_parallel, [batch, seq / tp, hidden_size] (the
    rank's slice of the sequence, see tpext.sequence_parallel): the input is all-gathered along
    the sequence and the output reduce-scattered back to the slice instead of all-reduced.
    attention_mask: optional [batch, seq] padding mask (1 / True: real token) over the whole
    sequence; position_ids: optional [batch, seq] positions for the rotary embedding (default
    0..seq-1); rope_theta=None turns rotary embeddings off. Attention runs through
    torch.nn.functional.scaled_dot_product_attention with scale 1/sqrt(head_dim).

    Fresh weights equal those of nn.Linear q, k, v, o built in that order (fused_qkv: qkv, o)
    under the same RNG state; from_linears / from_fused shard existing projections.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, bias: bool = False, out_bias: Optional[bool] = None,
                 fused_qkv: bool = False, rope_theta: Optional[float] = 10000.0, causal: bool = True,
                 sequence_parallel: bool = False, group: Optional[Group] = None, device=None, dtype=None):
        super().__init__()
        what = type(self).__name__
        self.hidden_size = _positive_int(what, "hidden_size", hidden_size)
        self.num_heads = _positive_int(what, "num_heads", num_heads)
        self.num_kv_heads = _positive_int(what, "num_kv_heads", num_heads if num_kv_heads is None else num_kv_heads)
        if head_dim is None:
            if hidden_size % num_heads != 0:
                raise ValueError(f"{what}: head_dim: hidden_size={hidden_size} is not a multiple of num_heads="
                                 f"{num_heads}; pass head_dim")
            head_dim = hidden_size // num_heads
        self.head_dim = _positive_int(what, "head_dim", head_dim)
        if rope_theta is not None and (head_dim % 2 != 0 or not rope_theta > 0):
            raise ValueError(f"{what}: rope_theta: rotary embeddings need an even head_dim and a positive theta, got "
                             f"head_dim={head_dim}, rope_theta={rope_theta}")
        self.rope_theta = rope_theta
        self.causal = bool(causal)
        self.sequence_parallel = bool(sequence_parallel)
        self.fused_qkv = bool(fused_qkv)
        group = resolve_group(group, what)
        self.layout = head_layout(self.num_heads, self.num_kv_heads, group.size)
        warn_layout(what, self.layout, self.num_heads, self.num_kv_heads)
        out_bias = bias if out_bias is None else out_bias
        if device is not None and torch.device(device).type == "meta":
            raise ValueError(f"{what}: device: meta is not supported (the full weights are drawn, then sharded)")
        # Draw the full projections as the single-device model would, then keep this rank's heads.
        dev = device if device is not None else group.device
        q_out, kv_out = self.num_heads * head_dim, self.num_kv_heads * head_dim
        if fused_qkv:
            qkv = nn.Linear(hidden_size, q_out + 2 * kv_out, bias=bias, device=dev, dtype=dtype)
            o = nn.Linear(q_out, hidden_size, bias=out_bias, device=dev, dtype=dtype)
            self._install_fused(qkv, o, group)
        else:
            q, k, v, o = (nn.Linear(hidden_size, q_out, bias=bias, device=dev, dtype=dtype),
                          nn.Linear(hidden_size, kv_out, bias=bias, device=dev, dtype=dtype),
                          nn.Linear(hidden_size, kv_out, bias=bias, device=dev, dtype=dtype),
                          nn.Linear(q_out, hidden_size, bias=out_bias, device=dev, dtype=dtype))
            self._install_separate(q, k, v, o, group)

    # -- construction ----------------------------------------------------------------------------

    def _install_separate(self, q, k, v, o, group) -> None:
        rq, rk, rv = qkv_ranges(self.layout, self.num_heads, self.num_kv_heads, self.head_dim, "separate")
        self.q_proj = head_parallel_column(q.weight, q.bias, rq, group)
        self.k_proj = head_parallel_column(k.weight, k.bias, rk, group)
        self.v_proj = head_parallel_column(v.weight, v.bias, rv, group)
        self.o_proj = head_parallel_row(o.weight, o.bias, out_ranges(self.layout, self.head_dim), group)
        # q, k and v read the same input: _project reduces its gradient once for the three.
        for layer in (self.q_proj, self.k_proj, self.v_proj):
            layer.disable_grad_reduce = group.size > 1

    def _install_fused(self, qkv, o, group) -> None:
        ranges = qkv_ranges(self.layout, self.num_heads, self.num_kv_heads, self.head_dim, "blocked")
        self.qkv_proj = head_parallel_column(qkv.weight, qkv.bias, ranges, group)
        self.o_proj = head_parallel_row(o.weight, o.bias, out_ranges(self.layout, self.head_dim), group)

    @classmethod
    def _empty(cls, hidden_size, num_heads, num_kv_heads, head_dim, fused_qkv, rope_theta, causal,
               sequence_parallel, group) -> "ParallelAttention":
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        what = cls.__name__
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.rope_theta, self.causal = rope_theta, bool(causal)
        self.sequence_parallel, self.fused_qkv = bool(sequence_parallel), fused_qkv
        self.layout = head_layout(num_heads, num_kv_heads, group.size)
        warn_layout(what, self.layout, num_heads, num_kv_heads)
        return self

    @classmethod
    def from_linears(cls, q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear, num_heads: int,
                     num_kv_heads: Optional[int] = None, *, rope_theta: Optional[float] = 10000.0,
                     causal: bool = True, sequence_parallel: bool = False,
                     group: Optional[Group] = None) -> "ParallelAttention":
        """This rank's heads of the full attention with projections q, k, v, o (nn.Linear)."""
        what = f"{cls.__name__}.from_linears"
        for name, lin in (("q", q), ("k", k), ("v", v), ("o", o)):
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"{what}: {name}: expected a torch.nn.Linear, got {type(lin).__name__}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = _head_dim(what, q.out_features, num_heads, "q")
        if k.out_features != num_kv_heads * head_dim or v.out_features != num_kv_heads * head_dim:
            raise ValueError(f"{what}: k, v: expected out_features {num_kv_heads * head_dim} ({num_kv_heads} KV heads "
                             f"of {head_dim}), got {k.out_features} and {v.out_features}")
        if o.in_features != q.out_features:
            raise ValueError(f"{what}: o: expected in_features {q.out_features} (q's out_features), got {o.in_features}")
        group = resolve_group(group, what)
        self = cls._empty(q.in_features, num_heads, num_kv_heads, head_dim, False, rope_theta, causal,
                          sequence_parallel, group)
        self._install_separate(q, k, v, o, group)
        return self

    @classmethod
    def from_fused(cls, qkv: nn.Linear, o: nn.Linear, num_heads: int, num_kv_heads: Optional[int] = None, *,
                   rope_theta: Optional[float] = 10000.0, causal: bool = True, sequence_parallel: bool = False,
                   group: Optional[Group] = None) -> "ParallelAttention":
        """This rank's heads of the full attention whose fused projection `qkv` computes [q | k | v]."""
        what = f"{cls.__name__}.from_fused"
        for name, lin in (("qkv", qkv), ("o", o)):
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"{what}: {name}: expected a torch.nn.Linear, got {type(lin).__name__}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = _head_dim(what, o.in_features, num_heads, "o.in_features")
        if qkv.out_features != (num_heads + 2 * num_kv_heads) * head_dim:
            raise ValueError(f"{what}: qkv: expected out_features {(num_heads + 2 * num_kv_heads) * head_dim} "
                             f"(({num_heads} + 2 * {num_kv_heads}) heads of {head_dim}), got {qkv.out_features}")
        group = resolve_group(group, what)
        self = cls._empty(qkv.in_features, num_heads, num_kv_heads, head_dim, True, rope_theta, causal,
                          sequence_parallel, group)
        self._install_fused(qkv, o, group)
        return self

    # -- forward ---------------------------------------------------------------------------------

    @property
    def group(self) -> Group:
        return self.o_proj.group

    @property
    def local_heads(self) -> RankHeads:
        return self.layout[self.group.rank]

    def _project(self, x: torch.Tensor):
        """This rank's q, k, v [batch, seq, n * head_dim] from the (whole-sequence) input."""
        heads = self.local_heads
        sizes = [len(heads.q) * self.head_dim, len(heads.kv) * self.head_dim, len(heads.kv) * self.head_dim]
        layers = (self.qkv_proj,) if self.fused_qkv else (self.q_proj, self.k_proj, self.v_proj)
        if self.sequence_parallel:
            # The all-gather's backward reduce-scatters dx, which sums the ranks' contributions:
            # the column layers' own backward all-reduce must not run too, so their weights are
            # applied directly.
            outs = [F.linear(x, layer.weight, layer.bias) for layer in layers]
        else:
            if not self.fused_qkv and self.q_proj.disable_grad_reduce:
                # One all-reduce of the input gradient for q, k and v together (their layers skip
                # their own, see _install_separate), as with a fused QKV: 1 in the backward, not 3.
                x = copy_to_tensor_parallel_region(x, self.group)
            outs = [layer(x) for layer in layers]
        if self.fused_qkv:
            return outs[0].split(sizes, dim=-1)
        return outs

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        from .sequence_parallel import (add_sequence_parallel_bias, gather_from_sequence_parallel_region,
                                        reduce_scatter_to_sequence_parallel_region)
        what = type(self).__name__
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
            raise ValueError(f"{what}: hidden_states: expected a [batch, seq, hidden] tensor, got "
                             f"{getattr(hidden_states, 'shape', type(hidden_states).__name__)}")
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"{what}: hidden_states: expected last dimension {self.hidden_size} (hidden_size), got "
                             f"shape {tuple(hidden_states.shape)}")
        x = hidden_states.contiguous()
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, self.group)
        batch, seq, _ = x.shape
        self._check_side_inputs(what, attention_mask, position_ids, batch, seq)
        q, k, v = self._project(x)
        heads = self.local_heads
        q = q.view(batch, seq, len(heads.q), self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, len(heads.kv), self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, len(heads.kv), self.head_dim).transpose(1, 2)
        if self.rope_theta is not None:
            if position_ids is None:
                position_ids = torch.arange(seq, device=x.device).expand(batch, seq)
            cos, sin = rotary_cos_sin(position_ids.to(x.device), self.head_dim, self.rope_theta, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if heads.n_rep > 1:
            k = k.repeat_interleave(heads.n_rep, dim=1)
            v = v.repeat_interleave(heads.n_rep, dim=1)
        mask = attention_mask_for(attention_mask, seq, self.causal, x.device)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None)
        ctx = ctx.transpose(1, 2).reshape(batch, seq, len(heads.q) * self.head_dim).contiguous()
        if not self.sequence_parallel:
            return self.o_proj(ctx)
        out = reduce_scatter_to_sequence_parallel_region(F.linear(ctx, self.o_proj.weight), self.group)
        return add_sequence_parallel_bias(out, self.o_proj.bias, self.group)

    def _check_side_inputs(self, what, attention_mask, position_ids, batch, seq) -> None:
        for name, t in (("attention_mask", attention_mask), ("position_ids", position_ids)):
            if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (batch, seq)):
                raise ValueError(f"{what}: {name}: expected a [batch, seq] = [{batch}, {seq}] tensor over the whole "
                                 f"sequence, got {getattr(t, 'shape', type(t).__name__)}")

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, this rank: {len(self.local_heads.q)} query / {len(self.local_heads.kv)} "
                f"KV heads, rope_theta={self.rope_theta}, causal={self.causal}, "
                f"sequence_parallel={self.sequence_parallel}")


def _head_dim(what: str, features: int, num_heads: int, name: str) -> int:
    if features % num_heads != 0:
        raise ValueError(f"{what}: {name}: expected a multiple of num_heads={num_heads} features, got {features}")
    return features // num_heads
