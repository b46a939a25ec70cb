"""The demo behind `python -m tpext` / `torchrun --nproc-per-node N -m tpext`: tpext's story in three
sections, each with its own checks (a check outside its tolerance prints FAIL and the demo exits 1).

1. all-reduce (this file): tpext's against torch.distributed's, a table of time, algbw, busbw.
2. TP linear layers (demo_layers.py): parity against the full nn.Linear, the collectives of a
   ParallelMLP counted with tpext.stats(), and forward + backward time against the floor (the same
   GEMMs without collectives) and the collectives alone: exposed communication.
3. training (demo_training.py): a small Llama trained for a few steps with TP beside the same model
   on one device: per-step losses, the collectives of a step against 4 x b*s*h per layer, and the
   share of the step spent communicating.

Section 1 in detail: it checks tpext's all-reduce against torch.distributed's on the same random
inputs, then prints on rank 0 a table of both side by side over message sizes: median time, algorithm
bandwidth and bus bandwidth (nccl-tests' definitions), and the time ratio tpext / torch. On GPUs tpext runs its
own NCCL communicator and torch a NCCL process group of its own (dist.new_group(backend="nccl"));
on CPU both go through gloo (tpext's CPU path is torch's gloo underneath, so there the table shows
the cost of tpext's Python layer and nothing more).

bench/allreduce.py reuses the pieces below with more iterations, both dtypes and a JSON record.
"""
import argparse
import itertools
import math
import socket
import time
import warnings
from collections import Counter
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

import tpext

from . import timing

KiB = 1024
MiB = 1024 * KiB
# 8 B, then powers of 4 from 16 B to 1 GiB: 64 KiB (a latency-bound TP activation) and 256 MiB
# (bandwidth-bound) are both on the grid.
GPU_SIZES = [8] + [16 * 4 ** k for k in range(14)]
CPU_SIZES = [s for s in GPU_SIZES if s <= 4 * MiB]  # gloo on two cores: keeps the demo well under a minute
# The demo's default on the CPU (--sweep short): every other point of the grid, enough to show
# latency giving way to bandwidth while leaving time for the other sections.
CPU_SHORT_SIZES = [16, 256, 4 * KiB, 64 * KiB, 1 * MiB, 4 * MiB]
# Buffers of at most this size are rotated so their footprint exceeds the L2 cache of an H100/H200
# (50 MiB): every call then reads its input from HBM, for tpext and torch alike.
L2_ROTATE_MAX_BYTES = 16 * MiB
L2_FOOTPRINT_BYTES = 64 * MiB
MAX_BUFFERS = 256

# fp16 is left out: its range (2^16) leaves buffer_count a handful of in-place sums per buffer.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# -- set-up ------------------------------------------------------------------------------------


def torch_peer_group(device: torch.device) -> dist.ProcessGroup:
    """A torch.distributed group over all ranks with the backend tpext uses for `device`: NCCL on
    GPUs (its own communicator, created lazily by torch at its first collective), gloo on CPU.
    Every rank must call this, in the same order relative to other group creations."""
    return dist.new_group(backend="nccl" if device.type == "cuda" else "gloo")


def describe_setup(world: tpext.Group, device: torch.device) -> str:
    """One line: world size, backend, devices of every rank, NCCL and torch versions. Collective."""
    host = socket.gethostname()
    if device.type == "cuda":
        mine = (host, torch.cuda.get_device_name(device))
    else:
        mine = (host, "cpu")
    every = [None] * world.size
    dist.all_gather_object(every, mine)
    devices = ", ".join(f"{k} x {name} on {h}" for (h, name), k in Counter(every).items())
    backend = "nccl (tpext's communicator; torch: a NCCL process group)" if device.type == "cuda" else "gloo"
    return (f"tpext {tpext.__version__} | world {world.size}, backend {backend} | devices: {devices} | "
            f"NCCL: tpext {_version(tpext.nccl_version())}, torch {_version(torch_nccl_version())} | "
            f"torch {torch.__version__}, CUDA {torch.version.cuda}")


def torch_nccl_version() -> Optional[tuple]:
    try:
        return tuple(torch.cuda.nccl.version())
    except Exception:  # a torch built without NCCL
        return None


def _version(v: Optional[tuple]) -> str:
    return ".".join(map(str, v)) if v else "n/a"


def all_ranks_true(flag: bool) -> bool:
    """True on every rank iff `flag` is true on every rank (through the default gloo group)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


# -- correctness -------------------------------------------------------------------------------


def check_allreduce(world: tpext.Group, peer: dist.ProcessGroup, device: torch.device,
                    dtype: torch.dtype, count: int, seed: int = 1234) -> Dict[str, object]:
    """Sum-all-reduces the same seeded random input (rank r's is drawn from seed + r) with tpext and
    with torch, and compares both with the float64 sum that every rank computes from all ranks'
    inputs. Bound per element: n * eps(dtype) * sum_r |x_r| (n - 1 roundings of partial sums, each
    at most half an ulp of a value no larger than that sum, plus the final rounding)."""
    n, rank = world.size, world.rank
    inputs = [torch.randn(count, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + r)).to(dtype)
              for r in range(n)]
    reference = torch.stack([x.double() for x in inputs]).sum(0)
    bound = n * torch.finfo(dtype).eps * torch.stack([x.double().abs() for x in inputs]).sum(0)
    bound += torch.finfo(dtype).tiny

    mine = inputs[rank].to(device)
    ours, theirs = mine.clone(), mine.clone()
    world.all_reduce(ours, "sum")
    dist.all_reduce(theirs, op=dist.ReduceOp.SUM, group=peer)
    ours, theirs = ours.double().cpu(), theirs.double().cpu()
    ours_err = (ours - reference).abs()
    theirs_err = (theirs - reference).abs()
    return {
        "dtype": dtype_name(dtype),
        "count": count,
        "tpext_max_abs_err": float(ours_err.max()),
        "torch_max_abs_err": float(theirs_err.max()),
        "max_bound": float(bound.max()),
        "tpext_vs_torch_max_abs_diff": float((ours - theirs).abs().max()),
        "tpext_ok": bool((ours_err <= bound).all()),
        "torch_ok": bool((theirs_err <= bound).all()),
    }


def format_check(c: Dict[str, object], world_size: int) -> str:
    verdict = "ok" if c["tpext_ok"] else "FAILED"
    note = "" if c["torch_ok"] else " (torch itself is outside the bound too)"
    ranks = f"{world_size} rank{'s' * (world_size != 1)}"
    return (f"check: all-reduce sum of {c['count']} {c['dtype']} random values (never zeros) on {ranks}; "
            f"max |error| vs float64 reference: tpext {c['tpext_max_abs_err']:.3g}, torch {c['torch_max_abs_err']:.3g} "
            f"(bound n*eps*sum|x| <= {c['max_bound']:.3g}); max |tpext - torch| {c['tpext_vs_torch_max_abs_diff']:.3g}"
            f" -> {verdict}{note}")


# -- measurement -------------------------------------------------------------------------------


def buffer_count(nbytes: int, dtype: torch.dtype, world_size: int, calls: int, rotate_for_l2: bool) -> int:
    """How many input buffers a timing run of `calls` in-place sum all-reduces cycles through.

    The timed op is a sum, the op tensor parallelism runs. Reducing one buffer in place over and
    over multiplies its values by n per call (after the first call every rank holds the same sum),
    so a buffer may take at most M calls with n^M well inside the dtype's range (starting values
    are randn, below 2^3; 8 bits more are kept in reserve); more calls rotate through more buffers.
    The alternatives were worse: re-filling adds a kernel between calls; 'avg' (ncclAvg) is another
    NCCL reduction (pre-multiplied sum, not available to torch on gloo) than the one TP uses.
    rotate_for_l2: also rotate small messages until their footprint exceeds the L2 cache."""
    n = 1
    if world_size > 1:
        headroom_bits = math.log2(torch.finfo(dtype).max) - 3 - 8
        max_calls = max(1, int(headroom_bits / math.log2(world_size)))
        n = math.ceil(calls / max_calls)
    if rotate_for_l2 and nbytes <= L2_ROTATE_MAX_BYTES:
        n = max(n, min(MAX_BUFFERS, math.ceil(L2_FOOTPRINT_BYTES / nbytes)))
    return n


def measure_allreduce(world: tpext.Group, peer: dist.ProcessGroup, device: torch.device, nbytes: int,
                      dtype: torch.dtype, iters: int, warmup: int, rotate_for_l2: bool = False,
                      seed: int = 99, keep_samples: bool = False) -> Dict[str, object]:
    """Times tpext's and torch's in-place sum all-reduce of `nbytes` (same buffers, same counts) and
    returns one row: per implementation the per-rank statistics, the headline median (the slowest
    rank's median: a collective ends when its slowest rank does), algbw and busbw; and the ratio
    of tpext's time to torch's. Collective: every rank must call it with the same arguments."""
    esize = torch.empty((), dtype=dtype).element_size()
    if nbytes % esize != 0:
        raise ValueError(f"measure_allreduce: nbytes: expected a multiple of the {dtype} element size {esize}, "
                         f"got {nbytes}")
    count = nbytes // esize
    n_buf = buffer_count(nbytes, dtype, world.size, warmup + iters, rotate_for_l2)

    def run(call):
        # Fresh buffers with the same values for each implementation (untimed), so each run
        # starts where buffer_count's bound assumes.
        gen = torch.Generator(device=device).manual_seed(seed + world.rank)
        buffers = [torch.randn(count, generator=gen, device=device).to(dtype) for _ in range(n_buf)]
        cycle = itertools.cycle(buffers)
        stats = timing.time_op(lambda: call(next(cycle)), iters, warmup, device, barrier=dist.barrier)
        if not all_ranks_true(all(bool(torch.isfinite(b).all()) for b in buffers)):
            raise RuntimeError(f"measure_allreduce: values overflowed at {nbytes} B {dtype} over {n_buf} "
                               "buffers; buffer_count's growth bound is wrong")
        return stats

    row = {"bytes": nbytes, "dtype": dtype_name(dtype), "count": count, "op": "sum",
           "iters": iters, "warmup": warmup, "buffers": n_buf}
    row["tpext"] = run(lambda b: world.all_reduce(b, "sum"))
    row["torch"] = run(lambda b: dist.all_reduce(b, op=dist.ReduceOp.SUM, group=peer))
    for name in ("tpext", "torch"):
        row[name] = _across_ranks(row[name], nbytes, world.size, keep_samples)
    row["time_ratio"] = row["tpext"]["median_us"] / row["torch"]["median_us"]
    return row


def _across_ranks(stats: Dict[str, object], nbytes: int, world_size: int, keep_samples: bool) -> Dict[str, object]:
    keys = ("median_us", "mean_us", "min_us", "max_us")
    mine = torch.tensor([stats[k] for k in keys], dtype=torch.float64)
    every = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(every, mine)
    per_rank = [dict(zip(keys, map(float, t.tolist()))) for t in every]
    median = max(r["median_us"] for r in per_rank)
    out = {
        "median_us": median,
        "mean_us": max(r["mean_us"] for r in per_rank),
        "algbw_GBps": timing.algbw_gbps(nbytes, median),
        "busbw_GBps": timing.allreduce_busbw_gbps(nbytes, median, world_size),
        "per_rank": per_rank,
    }
    if keep_samples:
        out["rank0_samples_us"] = stats["samples_us"]  # this rank's, rank 0's in what rank 0 writes
    return out


# -- output ------------------------------------------------------------------------------------


def format_size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1024 ** 3), ("MiB", MiB), ("KiB", KiB)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"


def _bw(x: float) -> str:
    return f"{x:.1f}" if x >= 100 else f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def format_table(rows: Sequence[Dict[str, object]], world_size: int, title: str) -> str:
    lines = [title,
             f"{'size':>9} {'iters':>6} | {'tpext us':>9} {'mean':>8} {'algbw':>7} {'busbw':>7} | "
             f"{'torch us':>9} {'mean':>8} {'algbw':>7} {'busbw':>7} | {'tpext/torch':>11}"]
    for r in rows:
        a, b = r["tpext"], r["torch"]
        cells = []
        for s in (a, b):
            busbw = _bw(s["busbw_GBps"]) if world_size > 1 else "-"
            cells.append(f"{s['median_us']:9.1f} {s['mean_us']:8.1f} {_bw(s['algbw_GBps']):>7} {busbw:>7}")
        size = format_size(r["bytes"])
        lines.append(f"{size:>9} {r['iters']:>6} | {cells[0]} | {cells[1]} | {r['time_ratio']:11.2f}")
    lines.append("us: the slowest rank's median per call (mean: the largest per-rank mean); algbw = bytes / time, "
                 "busbw = algbw * 2(n-1)/n (GB/s, nccl-tests); tpext/torch: ratio of the medians, < 1 = tpext faster")
    return "\n".join(lines)


def iteration_plan(nbytes: int, device: torch.device, scale: int = 1):
    """(iters, warmup) for a message size; the same on every rank (see timing.iters_for_bytes).
    GPU: ~20 timed calls at 256 MiB up to 200 for small messages; CPU (gloo): fewer."""
    if device.type == "cuda":
        iters = timing.iters_for_bytes(nbytes, 5 * 1024 * MiB * scale, 20 * scale, 200 * scale)
    else:
        iters = timing.iters_for_bytes(nbytes, 64 * MiB * scale, 10 * scale, 100 * scale)
    return iters, max(3, iters // 10)


# -- main --------------------------------------------------------------------------------------

SECTIONS = ("allreduce", "layers", "training")


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m tpext", description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run, in order (default: all: {','.join(SECTIONS)})")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the timed all-reduces")
    p.add_argument("--sweep", choices=("short", "full"), default=None,
                   help=f"all-reduce sizes: full = {format_size(GPU_SIZES[0])} to {format_size(GPU_SIZES[-1])} by "
                        f"powers of 4 on GPU, to {format_size(CPU_SIZES[-1])} on CPU; short = "
                        f"{', '.join(map(format_size, CPU_SHORT_SIZES))} (default: full on GPU, short on CPU)")
    p.add_argument("--max-bytes", type=int, default=None,
                   help="the full grid of all-reduce sizes up to this many bytes (overrides --sweep)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 10 on GPU, 8 on CPU)")
    args = p.parse_args(argv)
    args.sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = [x for x in args.sections if x not in SECTIONS]
    if unknown or not args.sections:
        p.error(f"--sections: expected names among {', '.join(SECTIONS)}, got {args.sections}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse_args(argv)
    tpext.init(backend="auto")
    try:
        world = tpext.get_world_group()
        device = world.device if world.device is not None else torch.device("cpu")
        peer = torch_peer_group(device)
        try:
            with warnings.catch_warnings():
                # torch warns once when the autograd engine's GPU thread makes its first cuBLAS call
                # before that thread has a current CUDA context; it then takes the primary context,
                # which is the right one. Nothing to act on, so kept out of the demo's story.
                warnings.filterwarnings("ignore", message="Attempting to run cuBLAS, but there was no current CUDA "
                                                          "context")
                ok = _run(args, world, peer, device)
        finally:
            dist.destroy_process_group(peer)
    finally:
        tpext.destroy()
    return 0 if ok else 1


def describe_header(world: tpext.Group, tp: tpext.Group, device: torch.device) -> str:
    """The demo's first line: devices, backend, TP size, versions (collective, see describe_setup)."""
    from .demo_training import transformers_version
    transformers = transformers_version() or "not installed"
    return f"tpext demo | TP size {tp.size} | {describe_setup(world, device)}, transformers {transformers}"


def _run(args, world, peer, device) -> bool:
    lead = world.rank == 0
    tp = tpext.get_tp_group()
    started = time.perf_counter()

    def say(line: str) -> None:
        if lead:
            print(line, flush=True)

    say(describe_header(world, tp, device))
    titles = {
        "allreduce": "all-reduce: tpext vs torch.distributed",
        "layers": "TP linear layers: parity with the full nn.Linear, collectives, time",
        "training": "training a small Llama with TP, step for step against a single device",
    }
    failures: List[str] = []
    for i, name in enumerate(args.sections, start=1):
        t0 = time.perf_counter()
        say(f"\n== [{i}/{len(args.sections)}] {titles[name]} ==")
        if name == "allreduce":
            failures += run_allreduce_section(world, peer, device, DTYPES[args.dtype], allreduce_sizes(args, device),
                                              say)
        elif name == "layers":
            from . import demo_layers
            failures += demo_layers.run(tp, device, say)
        else:
            from . import demo_training
            failures += demo_training.run(tp, device, say, steps=args.steps)
        say(f"   ({name}: {time.perf_counter() - t0:.1f} s)")
    elapsed = time.perf_counter() - started
    if failures:
        say(f"\n== result: FAIL ({len(failures)} check(s): {'; '.join(failures)}) after {elapsed:.1f} s ==")
    else:
        say(f"\n== result: PASS (every check within tolerance) in {elapsed:.1f} s ==")
    return not failures


def allreduce_sizes(args, device: torch.device) -> List[int]:
    if args.max_bytes is not None:
        return [s for s in GPU_SIZES if s <= args.max_bytes]
    if (args.sweep or ("full" if device.type == "cuda" else "short")) == "short":
        return CPU_SHORT_SIZES
    return GPU_SIZES if device.type == "cuda" else CPU_SIZES


def run_allreduce_section(world, peer, device, dtype, sizes, say) -> List[str]:
    """Correctness checks in float32 and bfloat16, then the timing table. Returns failed checks."""
    count = 1_000_003 if device.type == "cuda" else 100_003  # odd: no size happens to suit a kernel
    failures = []
    for check_dtype in (torch.float32, torch.bfloat16):
        c = check_allreduce(world, peer, device, check_dtype, count)
        if not all_ranks_true(c["tpext_ok"]):
            failures.append(f"all-reduce {dtype_name(check_dtype)} outside the error bound")
        say(format_check(c, world.size))

    esize = torch.empty((), dtype=dtype).element_size()
    rows = []
    for nbytes in (s for s in sizes if s % esize == 0):
        iters, warmup = iteration_plan(nbytes, device)
        rows.append(measure_allreduce(world, peer, device, nbytes, dtype, iters, warmup))
    where = f"{world.size} x {device.type.upper()}"
    say(format_table(rows, world.size, f"all-reduce (sum, in place) {dtype_name(dtype)} on {where}: "
                                       f"tpext.get_world_group().all_reduce vs torch.distributed.all_reduce"))
    return failures
