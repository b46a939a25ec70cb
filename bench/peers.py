"""The blocks bench/mlp.py times, and one small builder per system that runs them.

Three blocks, written once with the linear layers handed in, so every system runs the same code
around its own linear layers (bf16, inputs [tokens, hidden] for the MLP, [1, seq, hidden] for the
others):

    MLPBlock        fc1 (column-parallel) -> GELU (tanh) -> fc2 (row-parallel)
    AttentionBlock  qkv (column-parallel by heads) -> causal SDPA on the local heads -> proj (row)
    LayerBlock      x + attn(norm1(x)), then h + mlp(norm2(h)); RMSNorm, replicated on every rank

The QKV weight is laid out [heads, (q, k, v), head_dim] along its output dimension, so the
contiguous row shard of a column-parallel split holds whole heads with their q, k and v; the local
head count is read from the shard's width, which is what lets DTensor's and megatron-core's
layers (which know nothing of heads) run the same attention code.

Systems (one builder each; a builder raises Skip(reason) where it cannot run):
    tpext       tpext.ParallelMLP (GELU in fc1's epilogue) / ColumnParallelLinear / RowParallelLinear
    single      full weights on every rank, F.linear, no communication
    single-ops  full weights, tpext's local GEMM ops (CUDA), no communication
    seed        F.linear + torch.distributed.all_reduce in Megatron's copy-to / reduce-from
                autograd Functions, on a NCCL group
    dtensor     torch.distributed.tensor.parallel ColwiseParallel / RowwiseParallel
    megatron    megatron.core.tensor_parallel ColumnParallelLinear / RowParallelLinear
    symm-mem    torch symmetric-memory fused_matmul_reduce_scatter for fc2, then an all-gather
                (MLP forward only: the op has no autograd formula)
    floor       this rank's shards with F.linear, every collective removed (row bias on rank 0)
    floor-ops   the same with tpext's local GEMM ops (CUDA)
    ar-tpext    only the all-reduces the block does (M x H each), through tpext's communicator
    ar-torch    the same through torch.distributed on a NCCL group
"""
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import tpext

TP_SYSTEMS = ("tpext", "seed", "dtensor", "megatron", "symm-mem")
PEERS = ("seed", "dtensor", "megatron", "symm-mem")  # 'best peer' = the fastest of these
SINGLES = ("single", "single-ops")
FLOORS = ("floor", "floor-ops")
COLLECTIVES = ("ar-tpext", "ar-torch")
ALL_SYSTEMS = ("tpext",) + PEERS + SINGLES + FLOORS + COLLECTIVES


class Skip(Exception):
    """A system that cannot run here; the message says why."""


# -- workloads ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # "mlp", "attn" or "layer"
    hidden: int
    ffn: int = 0  # MLP inner width (mlp, layer)
    heads: int = 0  # attention heads (attn, layer)
    bias: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads if self.heads else 0

    def shape(self, m: int):
        """Input shape for m tokens: [m, H] for the MLP, batch 1 x sequence m for the others."""
        return (m, self.hidden) if self.kind == "mlp" else (1, m, self.hidden)

    def allreduces(self, mode: str) -> int:
        """All-reduces of M x H the TP block does: one per row-parallel layer forward, one per
        column-parallel layer's input gradient backward."""
        per_pass = 2 if self.kind == "layer" else 1
        return per_pass * (2 if mode == "fwdbwd" else 1)

    def describe(self) -> str:
        parts = [f"H={self.hidden}"]
        if self.ffn:
            parts.append(f"FF={self.ffn} gelu")
        if self.heads:
            parts.append(f"{self.heads} heads x {self.head_dim}, causal")
        parts.append("bias" if self.bias else "no bias")
        return " ".join(parts)


WORKLOADS = {
    "mlp-8192": Workload("mlp-8192", "mlp", 8192, ffn=28672),
    "mlp-4096": Workload("mlp-4096", "mlp", 4096, ffn=14336),
    "attn": Workload("attn", "attn", 8192, heads=64),
    "layer": Workload("layer", "layer", 8192, ffn=28672, heads=64),
}
SMOKE_WORKLOADS = {
    "mlp-8192": Workload("mlp-8192", "mlp", 64, ffn=128),
    "mlp-4096": Workload("mlp-4096", "mlp", 32, ffn=64),
    "attn": Workload("attn", "attn", 64, heads=4),
    "layer": Workload("layer", "layer", 64, ffn=128, heads=4),
}


def flops(w: Workload, m: int, mode: str) -> float:
    """Floating-point operations of the whole block for m tokens (all ranks together): 2 per
    multiply-add of every GEMM; causal attention counts the half of the score matrix it needs.
    The backward does twice the GEMM work of the forward (dgrad + wgrad), and the attention
    core 2.5x (flash-attention's count: recomputed scores, dV, dP, dQ, dK)."""
    gemm = core = 0.0
    if w.kind in ("mlp", "layer"):
        gemm += 2 * m * 2 * w.hidden * w.ffn
    if w.kind in ("attn", "layer"):
        gemm += 2 * m * w.hidden * 4 * w.hidden  # QKV (3H) and proj (H)
        core += 2 * 2 * m * m * w.hidden / 2  # QK^T and PV, causal half
    if mode == "fwd":
        return gemm + core
    return 3 * gemm + 3.5 * core


def weight_elems(w: Workload) -> int:
    n = 0
    if w.kind in ("mlp", "layer"):
        n += 2 * w.hidden * w.ffn + (w.ffn + w.hidden if w.bias else 0)
    if w.kind in ("attn", "layer"):
        n += 4 * w.hidden * w.hidden + (4 * w.hidden if w.bias else 0)
    if w.kind == "layer":
        n += 2 * w.hidden
    return n


def min_bytes(w: Workload, m: int, mode: str, esize: int, tp: int = 1) -> float:
    """Compulsory HBM traffic of one rank holding 1/tp of the weights (see NOTES.md): the weight
    shard once forward (again backward, plus its gradient written), and the block's input and
    output activations of m x H; intermediates that a fused kernel could keep on chip are left
    out, so this is a lower bound."""
    weights = weight_elems(w) * esize / tp
    act = m * w.hidden * esize
    if mode == "fwd":
        return weights + 2 * act
    return 3 * weights + 5 * act  # + read W, write dW; read dy, re-read x, write dx


def allreduce_bytes(w: Workload, m: int, mode: str, esize: int) -> int:
    return w.allreduces(mode) * m * w.hidden * esize


# -- deterministic weights ---------------------------------------------------------------------


def full_weights(w: Workload, device, dtype, group, seed: int = 1234) -> Dict[str, torch.Tensor]:
    """The full (unsharded) weights, identical on every rank: drawn from a seeded generator on
    each rank, then broadcast from rank 0 so a generator that differed between devices could not
    make the systems disagree. Scales keep activations O(1): N(0, 1/fan_in) weights, N(0, 0.1)
    biases, RMSNorm gains 1 + N(0, 0.1) (never trivially ones or zeros)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    H = w.hidden

    def randn(*shape, std):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype)

    out = {}
    if w.kind in ("attn", "layer"):
        out["wqkv"] = randn(3 * H, H, std=H ** -0.5)
        out["wo"] = randn(H, H, std=H ** -0.5)
        if w.bias:
            out["bqkv"] = randn(3 * H, std=0.1)
            out["bo"] = randn(H, std=0.1)
    if w.kind in ("mlp", "layer"):
        out["w1"] = randn(w.ffn, H, std=H ** -0.5)
        out["w2"] = randn(H, w.ffn, std=w.ffn ** -0.5)
        if w.bias:
            out["b1"] = randn(w.ffn, std=0.1)
            out["b2"] = randn(H, std=0.1)
    if w.kind == "layer":
        out["g1"] = 1 + randn(H, std=0.1)
        out["g2"] = 1 + randn(H, std=0.1)
    for name in sorted(out):
        dist.broadcast(out[name], src=0, group=group)
    return out


def column_shard(t: torch.Tensor, rank: int, n: int) -> torch.Tensor:
    """Rows (output features) of this rank: contiguous, equal pieces (the sizes bench/mlp.py uses
    divide evenly, so this is also tensor_split's, DTensor's and megatron's split)."""
    return t.chunk(n, dim=0)[rank].contiguous()


def row_shard(t: torch.Tensor, rank: int, n: int) -> torch.Tensor:
    """Columns (input features) of this rank."""
    return t.chunk(n, dim=-1)[rank].contiguous()


# -- the blocks --------------------------------------------------------------------------------


class MLPBlock(nn.Module):
    def __init__(self, fc1: nn.Module, fc2: nn.Module, gelu_in_fc1: bool = False):
        super().__init__()
        self.fc1, self.fc2, self.gelu_in_fc1 = fc1, fc2, gelu_in_fc1

    def forward(self, x):
        h = self.fc1(x)
        if not self.gelu_in_fc1:
            h = F.gelu(h, approximate="tanh")
        return self.fc2(h)


class AttentionBlock(nn.Module):
    def __init__(self, qkv: nn.Module, proj: nn.Module, head_dim: int):
        super().__init__()
        self.qkv, self.proj, self.head_dim = qkv, proj, head_dim

    def forward(self, x):
        b, s, _ = x.shape
        qkv = self.qkv(x).view(b, s, -1, 3, self.head_dim)  # local heads from the shard's width
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(3))  # [b, heads, s, d]
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(o.transpose(1, 2).reshape(b, s, -1))


class LayerBlock(nn.Module):
    def __init__(self, hidden: int, attn: nn.Module, mlp: nn.Module, g1, g2):
        super().__init__()
        self.norm1 = _rmsnorm(hidden, g1)
        self.norm2 = _rmsnorm(hidden, g2)
        self.attn, self.mlp = attn, mlp

    def forward(self, x):
        h = x + self.attn(self.norm1(x))
        return h + self.mlp(self.norm2(h))


def _rmsnorm(hidden: int, gain: torch.Tensor) -> nn.Module:
    norm = nn.RMSNorm(hidden, eps=1e-5, device=gain.device, dtype=gain.dtype)
    with torch.no_grad():
        norm.weight.copy_(gain)
    return norm


class LocalLinear(nn.Module):
    """F.linear on the given tensors, no communication (single GPU, floor)."""

    def __init__(self, weight, bias):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class _OpsLinearFn(torch.autograd.Function):
    """tpext's local GEMM ops (cuBLASLt, bias and GELU in the epilogue) without any collective:
    the floor of tpext's own kernels, and a single GPU running them."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation, backward_follows):
        # As tpext's layers do: no pre-activation written when no backward follows (inference).
        out, pre = torch.ops.tpext.linear(x, weight, bias, activation, backward_follows)
        ctx.save_for_backward(x, weight, pre if activation == "gelu" and backward_follows else None)
        ctx.activation, ctx.has_bias = activation, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, pre = ctx.saved_tensors
        grad = grad.contiguous()
        if ctx.activation == "gelu":
            grad = torch.ops.aten.gelu_backward(grad, pre, approximate="tanh")
        dx, dw, db = torch.ops.tpext.linear_backward(grad, x, weight, ctx.has_bias, ctx.needs_input_grad[0], True)
        return (dx if ctx.needs_input_grad[0] else None, dw, db if ctx.has_bias else None, None, None)


class OpsLinear(LocalLinear):
    def __init__(self, weight, bias, activation="none"):
        super().__init__(weight, bias)
        self.activation = activation

    def forward(self, x):
        backward_follows = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        return _OpsLinearFn.apply(x.contiguous(), self.weight, self.bias, self.activation, backward_follows)


class _CopyToTP(torch.autograd.Function):
    """Megatron's copy-to-tensor-parallel-region with torch.distributed: identity forward,
    all-reduce of the input gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """Megatron's reduce-from-tensor-parallel-region: all-reduce forward (in place on the fresh
    partial product), identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        dist.all_reduce(x, group=group)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class SeedColumn(LocalLinear):
    def __init__(self, weight, bias, group):
        super().__init__(weight, bias)
        self.group = group

    def forward(self, x):
        return F.linear(_CopyToTP.apply(x, self.group), self.weight, self.bias)


class SeedRow(LocalLinear):
    def __init__(self, weight, bias, group):
        super().__init__(weight, bias)
        self.group = group

    def forward(self, x):
        out = _ReduceFromTP.apply(F.linear(x, self.weight), self.group)
        return out + self.bias if self.bias is not None else out


class _MegatronLinear(nn.Module):
    """megatron-core layers return (output, bias); with skip_bias_add=False the bias is in the
    output already."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)[0]


class _SymmMemRow(nn.Module):
    """fc2 as torch's fused matmul + reduce-scatter over symmetric memory, then an all-gather of
    the rows so the output is replicated like an all-reduce's; the bias after."""

    def __init__(self, weight, bias, group):
        super().__init__()
        self.weight, self.bias, self.group = weight, bias, group
        self.name = group.group_name

    def forward(self, h):
        part = torch.ops.symm_mem.fused_matmul_reduce_scatter(h, self.weight.t(), "sum", 0, self.name)
        out = h.new_empty(h.shape[0], self.weight.shape[0])
        dist.all_gather_into_tensor(out, part, group=self.group)
        return out + self.bias if self.bias is not None else out


# -- systems -----------------------------------------------------------------------------------


@dataclass
class System:
    name: str
    module: Optional[nn.Module] = None  # forward(x) -> output; None for the collectives
    params: List[torch.Tensor] = field(default_factory=list)  # differentiated in fwdbwd
    backward: bool = True  # can run fwdbwd
    note: str = ""
    collective: Optional[Callable[[torch.Tensor], None]] = None  # ar-*: one in-place all-reduce


@dataclass
class Context:
    device: torch.device
    dtype: torch.dtype
    rank: int
    size: int
    tp: "tpext.Group"
    torch_group: dist.ProcessGroup  # NCCL on GPUs, gloo on CPU
    megatron: Optional[object] = None  # megatron_state(); None = not tried yet
    chunk_by: str = "auto"  # tpext's RowParallelLinear pieces (bench/mlp.py --chunk-by)
    chunks: int = 0  # and how many (bench/mlp.py --chunks; 0: from the size)


def _layers(w: Workload, full, make_col, make_row, gelu_fused_mlp=None) -> nn.Module:
    """The workload's block from two linear-layer factories: make_col(weight, bias) for a
    column-parallel layer (full tensors in, the factory shards), make_row likewise.
    gelu_fused_mlp(w1, b1, w2, b2) -> an MLP module, where a system has its own."""
    def mlp():
        if gelu_fused_mlp is not None:
            return gelu_fused_mlp(full["w1"], full.get("b1"), full["w2"], full.get("b2"))
        return MLPBlock(make_col(full["w1"], full.get("b1")), make_row(full["w2"], full.get("b2")))

    def attn():
        return AttentionBlock(make_col(full["wqkv"], full.get("bqkv")), make_row(full["wo"], full.get("bo")),
                              w.head_dim)

    if w.kind == "mlp":
        return mlp()
    if w.kind == "attn":
        return attn()
    return LayerBlock(w.hidden, attn(), mlp(), full["g1"], full["g2"])


def _system(name, module, **kw) -> System:
    return System(name, module, [p for p in module.parameters()], **kw)


def build_single(w, full, ctx, dtype=None) -> System:
    """Full weights, torch ops. dtype=float32 (upcast copies) gives the correctness reference."""
    cast = (lambda t: t if t is None else t.to(dtype)) if dtype is not None else (lambda t: t)
    full = {k: cast(v) for k, v in full.items()}
    return _system("single", _layers(w, full, lambda W, b: LocalLinear(W, b), lambda W, b: LocalLinear(W, b)))


def build_single_ops(w, full, ctx) -> System:
    _need_cuda(ctx, "tpext's GEMM ops take CUDA tensors")
    return _system("single-ops", _layers(
        w, full, lambda W, b: OpsLinear(W, b), lambda W, b: OpsLinear(W, b),
        lambda w1, b1, w2, b2: MLPBlock(OpsLinear(w1, b1, "gelu"), OpsLinear(w2, b2), gelu_in_fc1=True)))


def build_floor(w, full, ctx) -> System:
    r, n = ctx.rank, ctx.size
    return _system("floor", _layers(
        w, full,
        lambda W, b: LocalLinear(column_shard(W, r, n), None if b is None else column_shard(b, r, n)),
        lambda W, b: LocalLinear(row_shard(W, r, n), b if r == 0 else None)))


def build_floor_ops(w, full, ctx) -> System:
    _need_cuda(ctx, "tpext's GEMM ops take CUDA tensors")
    r, n = ctx.rank, ctx.size
    def col(W, b, act="none"):
        return OpsLinear(column_shard(W, r, n), None if b is None else column_shard(b, r, n), act)

    def row(W, b):
        return OpsLinear(row_shard(W, r, n), b if r == 0 else None)

    return _system("floor-ops", _layers(
        w, full, col, row, lambda w1, b1, w2, b2: MLPBlock(col(w1, b1, "gelu"), row(w2, b2), gelu_in_fc1=True)))


def build_seed(w, full, ctx) -> System:
    r, n, g = ctx.rank, ctx.size, ctx.torch_group
    return _system("seed", _layers(
        w, full,
        lambda W, b: SeedColumn(column_shard(W, r, n), None if b is None else column_shard(b, r, n), g),
        lambda W, b: SeedRow(row_shard(W, r, n), b, g)))


def build_tpext(w, full, ctx) -> System:
    """tpext's modules (ParallelMLP with the GELU in fc1's epilogue; Column/RowParallelLinear for
    attention), loaded with this rank's shards of the same weights."""
    missing = [a for a in ("ColumnParallelLinear", "RowParallelLinear", "ParallelMLP") if not hasattr(tpext, a)]
    if missing:
        raise Skip(f"tpext has no {', '.join(missing)}")
    tp, dev, dt = ctx.tp, ctx.device, ctx.dtype

    def col(W, b):
        m = tpext.ColumnParallelLinear(W.shape[1], W.shape[0], bias=b is not None, group=tp, device=dev, dtype=dt)
        _load(m, W, b)
        return m

    def row(W, b):
        m = tpext.RowParallelLinear(W.shape[1], W.shape[0], bias=b is not None, group=tp, device=dev, dtype=dt,
                                    chunk_by=ctx.chunk_by, chunks=ctx.chunks)
        _load(m, W, b)
        return m

    def mlp(w1, b1, w2, b2):
        m = tpext.ParallelMLP(w1.shape[1], w1.shape[0], activation="gelu", bias=b1 is not None, group=tp,
                              device=dev, dtype=dt, chunk_by=ctx.chunk_by, chunks=ctx.chunks)
        cols = [c for c in m.modules() if isinstance(c, tpext.ColumnParallelLinear)]
        rows = [c for c in m.modules() if isinstance(c, tpext.RowParallelLinear)]
        if len(cols) != 1 or len(rows) != 1:
            raise Skip(f"tpext.ParallelMLP: expected one ColumnParallelLinear and one RowParallelLinear inside, "
                       f"found {len(cols)} and {len(rows)}; teach bench/peers.py:build_tpext its layout")
        _load(cols[0], w1, b1)
        _load(rows[0], w2, b2)
        return m

    return _system("tpext", _layers(w, full, col, row, mlp))


def _load(module: nn.Module, full_w: torch.Tensor, full_b: Optional[torch.Tensor]) -> None:
    """Copies this rank's piece of the full weight (and bias) into a tpext layer, using the
    layout its parameters carry (tpext/partition.py), so the bench follows the layer's own split."""
    from tpext.partition import is_tensor_parallel, shard
    group = getattr(module, "group", None) or tpext.get_tp_group()
    for name, full in (("weight", full_w), ("bias", full_b)):
        p = getattr(module, name, None)
        if full is None:
            if p is not None:
                raise Skip(f"{type(module).__name__}.{name}: the layer has one, the workload has none")
            continue
        if p is None:
            raise Skip(f"{type(module).__name__}.{name}: expected a parameter, the layer has none")
        piece = full
        if is_tensor_parallel(p):
            piece = shard(full, p.partition_dim, group.rank, group.size, p.partition_stride)
        if piece.shape != p.shape:
            raise Skip(f"{type(module).__name__}.{name}: shard of shape {tuple(piece.shape)} does not fit the "
                       f"parameter's {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(piece)


def build_dtensor(w, full, ctx) -> System:
    try:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    except ImportError as e:
        raise Skip(f"torch.distributed.tensor.parallel does not import: {e}") from None

    def linear(W, b):
        m = nn.Linear(W.shape[1], W.shape[0], bias=b is not None, device=ctx.device, dtype=ctx.dtype)
        with torch.no_grad():
            m.weight.copy_(W)
            if b is not None:
                m.bias.copy_(b)
        return m

    module = _layers(w, full, linear, linear)
    cols = {"mlp": ["fc1"], "attn": ["qkv"], "layer": ["attn.qkv", "mlp.fc1"]}[w.kind]
    rows = {"mlp": ["fc2"], "attn": ["proj"], "layer": ["attn.proj", "mlp.fc2"]}[w.kind]
    plan = {**{c: ColwiseParallel() for c in cols}, **{r: RowwiseParallel() for r in rows}}
    mesh = DeviceMesh.from_group(ctx.torch_group, ctx.device.type)
    parallelize_module(module, mesh, plan)
    return _system("dtensor", module)


def megatron_state(ctx: Context):
    """Imports megatron-core and initialises its model-parallel state once per process
    (tensor_model_parallel_size = the TP size). Returns the module, or a Skip with the reason."""
    if ctx.megatron is not None:
        return ctx.megatron
    try:
        import megatron.core  # noqa: F401
        from megatron.core import parallel_state
        from megatron.core import tensor_parallel  # noqa: F401
        from megatron.core.model_parallel_config import ModelParallelConfig  # noqa: F401
    except Exception as e:  # ImportError, or whatever its own imports raise
        ctx.megatron = Skip(f"megatron.core does not import: {type(e).__name__}: {e}")
        return ctx.megatron
    try:
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=ctx.size)
        ctx.megatron = megatron.core
    except Exception as e:
        ctx.megatron = Skip(f"megatron.core.parallel_state.initialize_model_parallel failed: {type(e).__name__}: {e}")
    return ctx.megatron


def build_megatron(w, full, ctx) -> System:
    mc = megatron_state(ctx)
    if isinstance(mc, Skip):
        raise mc
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    r, n = ctx.rank, ctx.size
    cfg = ModelParallelConfig(tensor_model_parallel_size=n, params_dtype=ctx.dtype,
                              use_cpu_initialization=ctx.device.type == "cpu", perform_initialization=False,
                              gradient_accumulation_fusion=False, sequence_parallel=False)

    def col(W, b):
        m = ColumnParallelLinear(W.shape[1], W.shape[0], config=cfg, init_method=nn.init.zeros_, bias=b is not None,
                                 gather_output=False, skip_bias_add=False)
        _copy(m, column_shard(W, r, n), None if b is None else column_shard(b, r, n))
        return _MegatronLinear(m)

    def row(W, b):
        m = RowParallelLinear(W.shape[1], W.shape[0], config=cfg, init_method=nn.init.zeros_, bias=b is not None,
                              input_is_parallel=True, skip_bias_add=False)
        _copy(m, row_shard(W, r, n), b)
        return _MegatronLinear(m)

    return _system("megatron", _layers(w, full, col, row), note=f"megatron-core {mc.__version__}")


def _copy(m, weight, bias):
    for name, t in (("weight", weight), ("bias", bias)):
        p = getattr(m, name)
        if t is None:
            continue
        if p.shape != t.shape:
            raise Skip(f"megatron {type(m).__name__}.{name}: expected shape {tuple(t.shape)}, got {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(t.to(p.device))


def build_symm_mem(w, full, ctx) -> System:
    _need_cuda(ctx, "symmetric memory is CUDA only")
    if w.kind != "mlp":
        raise Skip("built for the MLP only (fc2 as fused matmul + reduce-scatter)")
    if not hasattr(torch.ops, "symm_mem") or not hasattr(torch.ops.symm_mem, "fused_matmul_reduce_scatter"):
        raise Skip("torch.ops.symm_mem.fused_matmul_reduce_scatter is not in this torch")
    from torch.distributed import _symmetric_memory as symm
    r, n, g = ctx.rank, ctx.size, ctx.torch_group
    symm.enable_symm_mem_for_group(g.group_name)
    fc1 = LocalLinear(column_shard(full["w1"], r, n), None if "b1" not in full else column_shard(full["b1"], r, n))
    b2 = nn.Parameter(full["b2"]) if "b2" in full else None
    fc2 = _SymmMemRow(nn.Parameter(row_shard(full["w2"], r, n)), b2, g)
    return System("symm-mem", MLPBlock(fc1, fc2), [], backward=False,
                  note="forward only: fused_matmul_reduce_scatter has no backward")


def build_ar_tpext(w, full, ctx) -> System:
    tp = ctx.tp
    return System("ar-tpext", collective=lambda t: tp.all_reduce(t, "sum"))


def build_ar_torch(w, full, ctx) -> System:
    g = ctx.torch_group
    return System("ar-torch", collective=lambda t: dist.all_reduce(t, group=g))


def _need_cuda(ctx, why):
    if ctx.device.type != "cuda":
        raise Skip(f"needs CUDA ({why})")


BUILDERS = {
    "tpext": build_tpext,
    "single": build_single,
    "single-ops": build_single_ops,
    "seed": build_seed,
    "dtensor": build_dtensor,
    "megatron": build_megatron,
    "symm-mem": build_symm_mem,
    "floor": build_floor,
    "floor-ops": build_floor_ops,
    "ar-tpext": build_ar_tpext,
    "ar-torch": build_ar_torch,
}


def rel_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| (Frobenius), in float64."""
    a, ref = a.double(), ref.double()
    den = float(ref.norm())
    return float((a - ref).norm()) / den if den > 0 else math.inf
