"""Section 2 of the demo (python -m tpext): the tensor-parallel linear layers.

- Parity: ColumnParallelLinear, RowParallelLinear and a SwiGLU ParallelMLP sharded from full
  nn.Linear layers (from_linear / from_linears) compute what the full layers compute. For the
  output and every gradient (sharded weight gradients put back together with tpext.gather_shards)
  the demo prints max |tp - full| / max |full|.
- Collectives: tpext.stats() over the TP group around the MLP's forward, then around its backward:
  one all-reduce of the [tokens, hidden] activation each (Megatron-LM), nothing else.
- Time for one problem size: the MLP's forward + backward; the floor (the same local GEMMs on this
  rank's shards with every collective removed); the collectives alone (the two all-reduces of
  [tokens, hidden]); and exposed communication = (tpext - floor) / collectives, 0 when the
  collectives hide completely under the GEMMs and 1 when they add their whole time.
"""
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import tpext

from . import timing
from .demo import dtype_name
from .linear_functions import use_native

# Max |tp - full| / max |full| allowed per dtype. The TP result sums partial products in another
# order than the full GEMM (and, in half precision, rounds each partial sum to the dtype before the
# all-reduce adds them), so it differs from the full layer by a few roundings of the largest values.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@dataclass(frozen=True)
class LayerPlan:
    """Sizes of the section: parity checks on one problem, timing on another (the product size on
    GPUs, a small one on the CPU, where two processes share the cores)."""
    parity_hidden: int
    parity_ffn: int
    parity_tokens: int
    parity_dtype: torch.dtype
    hidden: int
    ffn: int
    tokens: int
    dtype: torch.dtype
    iters: int
    warmup: int


GPU_PLAN = LayerPlan(parity_hidden=4096, parity_ffn=14336, parity_tokens=512, parity_dtype=torch.bfloat16,
                     hidden=4096, ffn=14336, tokens=2048, dtype=torch.bfloat16, iters=30, warmup=5)
CPU_PLAN = LayerPlan(parity_hidden=256, parity_ffn=688, parity_tokens=128, parity_dtype=torch.float32,
                     hidden=512, ffn=1024, tokens=256, dtype=torch.float32, iters=20, warmup=3)


# Timing rounds: plan.iters calls of each measured function, in this many alternating rounds.
ROUNDS = 5


def plan_for(device: torch.device) -> LayerPlan:
    return GPU_PLAN if device.type == "cuda" else CPU_PLAN


# -- helpers -----------------------------------------------------------------------------------


def max_relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, in float64 (the absolute error when want is all zeros)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        raise ValueError(f"max_relative_error: got shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    diff = float((got - want).abs().max()) if want.numel() else 0.0
    scale = float(want.abs().max()) if want.numel() else 0.0
    return diff / scale if scale > 0 else diff


def worst_over_ranks(value: float) -> float:
    """The largest `value` over all ranks (a collective through the default gloo group): verdicts
    and timings printed by rank 0 then cover every rank, and every rank reaches the same verdict."""
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _seeded(seed: int, shape: Sequence[int], device, dtype) -> torch.Tensor:
    # Drawn on the CPU from its own generator: the same values on every rank whatever the device.
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).to(device, dtype)


def _forward_backward(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor):
    """(output, input gradient) of module(x) with upstream gradient grad_out; parameter gradients
    land in .grad."""
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(grad_out)
    return y.detach(), x.grad


class _SwiGLU(nn.Module):
    """The full MLP of a Llama layer: down(silu(gate(x)) * up(x)), from existing nn.Linear layers."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear):
        super().__init__()
        self.gate, self.up, self.down = gate, up, down

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def _full_swiglu(hidden: int, ffn: int, device, dtype, seed: int) -> _SwiGLU:
    torch.manual_seed(seed)  # the same full weights on every rank
    return _SwiGLU(*(nn.Linear(i, o, bias=False, device=device, dtype=dtype)
                     for i, o in ((hidden, ffn), (hidden, ffn), (ffn, hidden))))


# -- parity ------------------------------------------------------------------------------------


@dataclass
class ParityRow:
    name: str
    errors: Dict[str, float]  # what -> max relative error, worst over ranks
    tolerance: float

    @property
    def ok(self) -> bool:
        return all(e <= self.tolerance for e in self.errors.values())


def column_parity(group: tpext.Group, plan: LayerPlan, device, seed: int = 11) -> ParityRow:
    h, f, m, dtype = plan.parity_hidden, plan.parity_ffn, plan.parity_tokens, plan.parity_dtype
    torch.manual_seed(seed)
    full = nn.Linear(h, f, device=device, dtype=dtype)
    # gather_output: the full output on every rank, so the same upstream gradient drives both.
    tp = tpext.ColumnParallelLinear.from_linear(full, group, gather_output=True)
    x, g = _seeded(seed + 1, (m, h), device, dtype), _seeded(seed + 2, (m, f), device, dtype)
    want_y, want_dx = _forward_backward(full, x, g)
    got_y, got_dx = _forward_backward(tp, x, g)
    errors = {
        "output": max_relative_error(got_y, want_y),
        "grad W": max_relative_error(tpext.gather_shards(tp.weight.grad, tp.weight, group), full.weight.grad),
        "grad b": max_relative_error(tpext.gather_shards(tp.bias.grad, tp.bias, group), full.bias.grad),
        "grad x": max_relative_error(got_dx, want_dx),
    }
    return ParityRow(f"ColumnParallelLinear {h}->{f}", {k: worst_over_ranks(v) for k, v in errors.items()},
                     TOLERANCE[dtype])


def row_parity(group: tpext.Group, plan: LayerPlan, device, seed: int = 21) -> ParityRow:
    h, f, m, dtype = plan.parity_hidden, plan.parity_ffn, plan.parity_tokens, plan.parity_dtype
    torch.manual_seed(seed)
    full = nn.Linear(f, h, device=device, dtype=dtype)
    # input_is_parallel=False: the layer takes the full input and keeps its slice, so its input
    # gradient comes back whole (all-gathered) and compares with the full layer's.
    tp = tpext.RowParallelLinear.from_linear(full, group, input_is_parallel=False)
    x, g = _seeded(seed + 1, (m, f), device, dtype), _seeded(seed + 2, (m, h), device, dtype)
    want_y, want_dx = _forward_backward(full, x, g)
    got_y, got_dx = _forward_backward(tp, x, g)
    errors = {
        "output": max_relative_error(got_y, want_y),
        "grad W": max_relative_error(tpext.gather_shards(tp.weight.grad, tp.weight, group), full.weight.grad),
        "grad b": max_relative_error(tp.bias.grad, full.bias.grad),  # replicated: every rank holds it all
        "grad x": max_relative_error(got_dx, want_dx),
    }
    return ParityRow(f"RowParallelLinear {f}->{h}", {k: worst_over_ranks(v) for k, v in errors.items()},
                     TOLERANCE[dtype])


@dataclass
class CollectiveCount:
    calls: int
    bytes: int
    other_calls: int  # collectives of any other kind (expected: none)


def _all_reduces(group: tpext.Group) -> CollectiveCount:
    s = tpext.stats(group)
    return CollectiveCount(s["all_reduce"]["calls"], s["all_reduce"]["bytes"],
                           sum(v["calls"] for k, v in s.items() if k != "all_reduce"))


def mlp_parity_and_counts(group: tpext.Group, plan: LayerPlan, device, seed: int = 31):
    """ParallelMLP (SwiGLU, Llama's MLP) against the full MLP; and the collectives of its forward
    and of its backward, counted with tpext.stats() on the TP group."""
    h, f, m, dtype = plan.parity_hidden, plan.parity_ffn, plan.parity_tokens, plan.parity_dtype
    full = _full_swiglu(h, f, device, dtype, seed)
    tp = tpext.ParallelMLP.from_linears([full.gate, full.up, full.down], "swiglu", group)
    x, g = _seeded(seed + 1, (m, h), device, dtype), _seeded(seed + 2, (m, h), device, dtype)
    want_y, want_dx = _forward_backward(full, x, g)

    xt = x.detach().clone().requires_grad_(True)  # requires grad: the backward all-reduces dx
    tpext.reset_stats(group)
    y = tp(xt)
    forward = _all_reduces(group)
    tpext.reset_stats(group)
    y.backward(g)
    backward = _all_reduces(group)

    fc1, fc2 = tp.linear_fc1, tp.linear_fc2
    errors = {
        "output": max_relative_error(y.detach(), want_y),
        # fc1 stacks gate and up (stride 2); gathered, it is [gate; up] of the full MLP.
        "grad W1": max_relative_error(tpext.gather_shards(fc1.weight.grad, fc1.weight, group),
                                      torch.cat([full.gate.weight.grad, full.up.weight.grad])),
        "grad W2": max_relative_error(tpext.gather_shards(fc2.weight.grad, fc2.weight, group), full.down.weight.grad),
        "grad x": max_relative_error(xt.grad, want_dx),
    }
    row = ParityRow(f"ParallelMLP swiglu {h}->{f}->{h}", {k: worst_over_ranks(v) for k, v in errors.items()},
                    TOLERANCE[dtype])
    activation_bytes = m * h * torch.empty((), dtype=dtype).element_size()
    return row, forward, backward, activation_bytes


def _count_ok(c: CollectiveCount, activation_bytes: int, exact_calls: bool) -> bool:
    """One all-reduce of the activation and nothing else. The native row-parallel forward may cut
    that all-reduce into pieces pipelined under its GEMM (each counts as a call; the bytes add up to
    one activation), so there only the bytes must match exactly."""
    calls_ok = c.calls == 1 if exact_calls else c.calls >= 1
    return calls_ok and c.bytes == activation_bytes and c.other_calls == 0


# -- time --------------------------------------------------------------------------------------


class _LocalLinearFunction(torch.autograd.Function):
    """x W^T with tpext's own local GEMM ops and no collective: the floor of the native path."""

    @staticmethod
    def forward(ctx, x, weight):
        out, _ = torch.ops.tpext.linear(x, weight, None, "none")
        ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        dx, dw, _ = torch.ops.tpext.linear_backward(grad.contiguous(), x, weight, False, ctx.needs_input_grad[0], True)
        return (dx if ctx.needs_input_grad[0] else None), dw


def _local_swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, native: bool) -> torch.Tensor:
    """What ParallelMLP computes on this rank (its shards, its activation), minus the collectives.
    The same GEMM kernels as the layer: tpext's ops on the native (CUDA) path, F.linear otherwise."""
    linear = _LocalLinearFunction.apply if native else F.linear
    h = linear(x, w1)
    n = h.shape[-1] // 2  # this rank's gate slice, then its up slice (ParallelMLP's stride-2 layout)
    return linear((F.silu(h[..., :n]) * h[..., n:]).contiguous(), w2)


@dataclass
class MlpTimes:
    tpext_us: float
    floor_us: float
    collectives_us: float

    @property
    def exposed(self) -> float:
        return (self.tpext_us - self.floor_us) / self.collectives_us if self.collectives_us > 0 else float("nan")


def time_mlp(group: tpext.Group, plan: LayerPlan, device, seed: int = 41) -> MlpTimes:
    """Medians (the slowest rank's) of: ParallelMLP forward + backward, the floor, and the two
    all-reduces alone. Every rank runs the same fixed numbers of calls."""
    h, f, m, dtype = plan.hidden, plan.ffn, plan.tokens, plan.dtype
    full = _full_swiglu(h, f, device, dtype, seed)
    mlp = tpext.ParallelMLP.from_linears([full.gate, full.up, full.down], "swiglu", group)
    del full
    x = _seeded(seed + 1, (m, h), device, dtype).requires_grad_(True)
    g = _seeded(seed + 2, (m, h), device, dtype)
    w1 = mlp.linear_fc1.weight.detach().clone().requires_grad_(True)
    w2 = mlp.linear_fc2.weight.detach().clone().requires_grad_(True)
    native = use_native(x, True)

    # autograd.grad rather than backward(): gradients are returned, not accumulated into .grad, so
    # every call does the same work; asking for dx makes the column layer's all-reduce run.
    def tp_step():
        torch.autograd.grad(mlp(x), [x, mlp.linear_fc1.weight, mlp.linear_fc2.weight], g)

    def floor_step():
        torch.autograd.grad(_local_swiglu(x, w1, w2, native), [x, w1, w2], g)

    # Zeros: a sum of zeros stays zero however many times it runs (random values would grow n-fold
    # per in-place call), and neither NCCL nor gloo takes longer or shorter on other values.
    buffers = [torch.zeros(m, h, device=device, dtype=dtype) for _ in range(2)]

    def collectives_step():
        for b in buffers:  # the forward's all-reduce of the output, the backward's of dx
            group.all_reduce(b)

    return MlpTimes(*interleaved_medians([tp_step, floor_step, collectives_step], plan, device))


def interleaved_medians(fns: Sequence[Callable[[], None]], plan: LayerPlan, device) -> List[float]:
    """Median time per call of each of `fns` (the slowest rank's), sampled in alternating rounds
    of a few calls each, so that a change of machine load or clock during the measurement weighs on
    all of them alike instead of on whichever ran at the time."""
    per_round = max(1, plan.iters // ROUNDS)
    samples: List[List[float]] = [[] for _ in fns]
    for r in range(ROUNDS):
        for fn, mine in zip(fns, samples):
            # The warm-up calls run in the first round only; the barrier lines the ranks up each time.
            stats = timing.time_op(fn, per_round, plan.warmup if r == 0 else 0, device, barrier=dist.barrier)
            mine.extend(stats["samples_us"])
    return [worst_over_ranks(timing.summarize(mine)["median_us"]) for mine in samples]


# -- the section -------------------------------------------------------------------------------


def _fmt_err(e: float) -> str:
    return "0" if e == 0 else f"{e:.1e}"


def _format_parity(rows: List[ParityRow], plan: LayerPlan) -> List[str]:
    lines = [f"parity against the full layers (same full weights, {dtype_name(plan.parity_dtype)}, "
             f"{plan.parity_tokens} tokens): max |tp - full| / max |full|, worst rank; sharded weight gradients "
             f"gathered with tpext.gather_shards"]
    for r in rows:
        cells = "  ".join(f"{k} {_fmt_err(v):>7}" for k, v in r.errors.items())
        verdict = "ok" if r.ok else "FAIL"
        lines.append(f"  {r.name:<34} {cells}  (tolerance {r.tolerance:.0e}) {verdict}")
    return lines


def _format_count(phase: str, c: CollectiveCount, activation_bytes: int, ok: bool, tokens: int, hidden: int,
                  dtype: torch.dtype) -> str:
    pieces = f" (in {c.calls} pieces pipelined under the GEMM)" if c.calls > 1 else ""
    what = "all-reduce" if c.calls == 1 else "all-reduces"
    other = f", {c.other_calls} other collectives" if c.other_calls else ""
    return (f"  {phase:<8} {c.calls} {what}, {c.bytes} B = {c.bytes / activation_bytes:g} x [{tokens} x {hidden}] "
            f"{dtype_name(dtype)}{pieces}{other} -> {'ok' if ok else 'FAIL'}")


def _format_times(t: MlpTimes, plan: LayerPlan, device, tp_size: int) -> List[str]:
    clock = "CUDA events" if device.type == "cuda" else "time.perf_counter"
    ms = lambda us: f"{us / 1e3:9.3f} ms"  # noqa: E731
    overlap_note = ("0 = the collectives hide completely under the GEMMs, 1 = they add their whole time"
                    if device.type == "cuda" else
                    "0 = hidden under the GEMMs, 1 = fully exposed; on the CPU gloo runs in line with the "
                    "GEMMs, so about 1 is expected")
    return [
        f"time: ParallelMLP swiglu hidden {plan.hidden}, ffn {plan.ffn}, {plan.tokens} tokens, "
        f"{dtype_name(plan.dtype)}, TP {tp_size}, forward + backward (dx and dW); median of {plan.iters} calls "
        f"each, taken in {ROUNDS} alternating rounds after {plan.warmup} warm-up ({clock}), slowest rank",
        f"  tpext ParallelMLP                          {ms(t.tpext_us)}",
        f"  floor: same local GEMMs, no collectives    {ms(t.floor_us)}",
        f"  collectives alone: 2 all-reduces [{plan.tokens} x {plan.hidden}] {ms(t.collectives_us)}",
        f"  exposed communication (tpext - floor) / collectives = {t.exposed:.2f}  ({overlap_note})",
    ]


def run(group: tpext.Group, device: torch.device, say: Callable[[str], None]) -> List[str]:
    """Runs the section on every rank (collective); rank 0 prints through `say`. Returns the
    failed checks (the same on every rank)."""
    plan = plan_for(device)
    failures = []
    rows = [column_parity(group, plan, device), row_parity(group, plan, device)]
    mlp_row, forward, backward, activation_bytes = mlp_parity_and_counts(group, plan, device)
    rows.append(mlp_row)
    for line in _format_parity(rows, plan):
        say(line)
    failures += [f"parity of {r.name}" for r in rows if not r.ok]

    native = device.type == "cuda"
    forward_ok = _count_ok(forward, activation_bytes, exact_calls=not native)
    backward_ok = _count_ok(backward, activation_bytes, exact_calls=True)
    # Every rank counts its own calls; they agree, but the verdict is taken together all the same.
    forward_ok = worst_over_ranks(0.0 if forward_ok else 1.0) == 0.0
    backward_ok = worst_over_ranks(0.0 if backward_ok else 1.0) == 0.0
    say(f"collectives of ParallelMLP (tpext.stats() on the TP group; expected: one all-reduce of the "
        f"[tokens x hidden] activation forward, one backward, nothing else):")
    dims = (plan.parity_tokens, plan.parity_hidden, plan.parity_dtype)
    say(_format_count("forward", forward, activation_bytes, forward_ok, *dims))
    say(_format_count("backward", backward, activation_bytes, backward_ok, *dims))
    if not forward_ok:
        failures.append("ParallelMLP forward collectives")
    if not backward_ok:
        failures.append("ParallelMLP backward collectives")

    times = time_mlp(group, plan, device)
    for line in _format_times(times, plan, device, group.size):
        say(line)
    if not all(math.isfinite(v) for v in (times.tpext_us, times.floor_us, times.collectives_us)):
        failures.append("MLP timing")
    return failures
