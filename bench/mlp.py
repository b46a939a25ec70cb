"""Tensor-parallel blocks side by side: tpext against its peers, in the same run on the same GPUs.

    torchrun --nproc-per-node 2 bench/mlp.py --quick                  # ~1 min: the lead's first look
    torchrun --nproc-per-node 2 bench/mlp.py                          # everything, < 8 min on 2 x H200
    torchrun --nproc-per-node 2 bench/mlp.py --workloads mlp-8192 -M 256,4096 --modes fwd \\
        --graph eager,graph --systems tpext,seed,floor,ar-tpext --out bench/results/x.json
    torchrun --nproc-per-node 2 bench/mlp.py --smoke                  # CPU, gloo, tiny sizes: the plumbing

Workloads (bf16): the TP MLP H=8192 FF=28672 and H=4096 FF=14336 (GELU tanh, bias); a TP attention
block (QKV column-parallel by heads, causal SDPA on the local heads, output row-parallel; H=8192,
64 heads of 128, batch 1 x sequence M) and a transformer layer (RMSNorm, attention, residual,
RMSNorm, MLP, residual). Systems: bench/peers.py. Per (workload, M, mode, eager|graph, system):
the slowest rank's median of per-call CUDA-event times after a warm-up (tpext/timing.py), ranks
in lockstep, inputs rotated among several buffers where they are small. Derived per row: ratio to
the best peer, to the floor, exposed communication = (time - floor) / (collectives alone), and
TP time / single-GPU time. The issue's goals are evaluated into the JSON ("goals").
Method and the FLOP / byte counts: bench/NOTES.md.
"""
import argparse
import gc
import itertools
import math
import os
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (bench/common.py)
import peers  # noqa: E402
import plot  # noqa: E402

import tpext  # noqa: E402
from tpext import demo, timing  # noqa: E402

MiB = 1024 * 1024
DEFAULTS = {
    "workloads": "mlp-8192,mlp-4096,attn,layer",
    "m": "128,256,1024,4096,16384",
    "modes": "fwd,fwdbwd",
    "graph": "eager,graph",
    "systems": ",".join(peers.ALL_SYSTEMS),
}
QUICK = {
    "workloads": "mlp-8192",
    "m": "256,4096",
    "modes": "fwd,fwdbwd",
    "graph": "eager",
    "systems": "tpext,single,seed,floor,ar-tpext,ar-torch",
}
SMOKE = {"m": "16", "graph": "eager"}
# Settings that change what the peers do, recorded with the results.
BENCH_ENV = ("CUDA_DEVICE_MAX_CONNECTIONS", "NCCL_MAX_CTAS", "NCCL_MIN_CTAS", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS",
             "NCCL_NVLS_ENABLE", "PYTHONPATH")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
REL_ERR_BOUND = 2e-2  # bf16 block output vs a float32 reference on the same weights

# Iteration counts come from an a-priori time estimate (FLOPs and bytes at these rates), never
# from measured times, so every rank derives the same counts and the loops stay in lockstep.
RATES = {  # flop/s, HBM B/s, all-reduce B/s (algbw), per-launch latency s
    "cuda": (6e14, 4e12, 1.5e11, 25e-6),
    "cpu": (2e10, 1e10, 1e9, 300e-6),
}
# Small inputs rotate through enough buffers to exceed the 50 MiB L2 of an H100/H200 (the
# weights, 100+ MiB per rank for every workload here, do not fit it anyway).
L2_FOOTPRINT = 64 * MiB
MAX_INPUT_SETS = 8
MAX_GRAPH_SETS = 16


# -- command line ------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", help=f"comma list of {', '.join(peers.WORKLOADS)} (default all; --quick: mlp-8192)")
    # torchrun reads '--m' as an abbreviation of its own options, so under torchrun say -M or --tokens.
    p.add_argument("-M", "--tokens", "--m", dest="m",
                   help="comma list of token counts M (default 128,256,1024,4096,16384)")
    p.add_argument("--modes", help="comma list of fwd, fwdbwd (default both)")
    p.add_argument("--graph", help="comma list of eager, graph (default both; graph = each call one CUDA graph replay)")
    p.add_argument("--systems",
                   help=f"comma list of {', '.join(peers.ALL_SYSTEMS)} ('collectives' = ar-tpext,ar-torch)")
    p.add_argument("--quick", action="store_true",
                   help="mlp-8192 at M=256,4096, fwd and fwdbwd, eager, tpext/single/seed/floor/collectives")
    p.add_argument("--smoke", action="store_true",
                   help="CPU and gloo, tiny sizes (H=64 FF=128, M=16): proves the plumbing, table and JSON")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--overlap-sms", type=int, default=0,
                   help="tpext.set_overlap_sms for the run: SMs the GEMMs beside a collective leave to it "
                        "(0: cuBLASLt's choice); pair with --nccl-overlap-ctas N")
    p.add_argument("--nccl-max-ctas", type=int, default=None,
                   help="tpext.init(nccl_max_ctas=N): cap the CTAs of tpext's NCCL collectives only "
                        "(NCCL_MAX_CTAS in the environment would cap the peers' too), those that run alone too")
    p.add_argument("--nccl-overlap-ctas", type=int, default=None,
                   help="tpext.init(nccl_overlap_ctas=N): cap only the collectives tpext runs beside its GEMMs "
                        "(a second communicator); pair with --overlap-sms N")
    p.add_argument("--nccl-window-mib", type=int, default=None,
                   help="tpext.init(nccl_window_mib=N): a symmetric NCCL window of N MiB per rank, which "
                        "row-parallel outputs that fit go through (NCCL's symmetric kernels)")
    p.add_argument("--chunk-by", choices=("auto", "rows", "columns"), default="auto",
                   help="how tpext's row-parallel layers cut their output into pipelined pieces "
                        "(RowParallelLinear chunk_by; default auto: rows, the count from the size)")
    p.add_argument("--chunks", type=int, default=0,
                   help="how many pieces tpext's row-parallel layers cut their output into "
                        "(RowParallelLinear chunks; default 0: from the size)")
    p.add_argument("--row-tail-weight", type=float, default=0.0,
                   help="tpext.set_row_tail_weight for the run: rows of the row-parallel forward's last piece "
                        "relative to each earlier one, in (0, 1] (default 0: tpext's default)")
    p.add_argument("--gemm-autotune", type=int, default=0,
                   help="tpext.set_gemm_autotune for the run: cuBLASLt candidates timed per GEMM problem of "
                        "tpext's ops (tpext, floor-ops, single-ops); default 0: the heuristic's first choice")
    p.add_argument("--gemm-autotune-sustain-ms", type=int, default=0,
                   help="tpext.set_gemm_autotune_sustain_ms for the run: time each candidate under that many ms "
                        "of sustained load (default 0: the short timing)")
    p.add_argument("--out", help="JSON path (default bench/results/mlp-<device>-x<n>-<stamp>.json)")
    p.add_argument("--point-s", type=float, default=None,
                   help="estimated seconds of timed calls per measurement (default 0.15 on GPU)")
    p.add_argument("--min-iters", type=int, default=None, help="timed calls per measurement, at least (default 10)")
    p.add_argument("--max-iters", type=int, default=None, help="timed calls per measurement, at most (default 300)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = p.parse_args(argv)
    base = dict(DEFAULTS)
    if args.quick:
        base.update(QUICK)
    if args.smoke:
        base.update(SMOKE)
    for key in DEFAULTS:
        if getattr(args, key) is None:
            setattr(args, key, base[key])
    args.workloads = _choices(args.workloads, "--workloads", peers.WORKLOADS)
    args.modes = _choices(args.modes, "--modes", ("fwd", "fwdbwd"))
    args.graph = [g == "graph" for g in _choices(args.graph, "--graph", ("eager", "graph"))]
    args.systems = _choices(args.systems.replace("collectives", ",".join(peers.COLLECTIVES)), "--systems",
                            peers.ALL_SYSTEMS)
    try:
        args.m = sorted({int(x) for x in args.m.split(",") if x.strip()})
    except ValueError:
        p.error(f"-M/--tokens: expected a comma list of positive integers, got {args.m!r}")
    if not args.m or args.m[0] < 1:
        p.error(f"-M/--tokens: expected a comma list of positive integers, got {args.m!r}")
    cpu = args.smoke
    args.point_s = args.point_s if args.point_s is not None else (0.02 if cpu else 0.15)
    args.min_iters = args.min_iters if args.min_iters is not None else (3 if cpu else 10)
    args.max_iters = args.max_iters if args.max_iters is not None else (10 if cpu else 300)
    if args.overlap_sms < 0:
        p.error(f"--overlap-sms: expected >= 0, got {args.overlap_sms}")
    if not 0.0 <= args.row_tail_weight <= 1.0:
        p.error(f"--row-tail-weight: expected a share in (0, 1] (0: the default), got {args.row_tail_weight}")
    if not (args.point_s > 0 and 1 <= args.min_iters <= args.max_iters):
        p.error("expected --point-s > 0 and 1 <= --min-iters <= --max-iters")
    return args


def _choices(text: str, flag: str, allowed) -> List[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise SystemExit(f"{flag}: expected a comma list of {', '.join(allowed)}; got {text!r}")
    return list(dict.fromkeys(items))  # order kept, duplicates dropped


# -- set-up ------------------------------------------------------------------------------------


def init(smoke: bool, nccl_max_ctas=None, nccl_overlap_ctas=None, nccl_window_mib=None):
    """The default process group is gloo for CPU tensors and NCCL for CUDA ones
    ('cpu:gloo,cuda:nccl'): the metadata, barriers and statistics go through gloo, and
    megatron-core's groups (created with the default backend) get NCCL. tpext brings its own
    communicators; the torch peers share one NCCL group of all ranks."""
    if "WORLD_SIZE" not in os.environ:  # plain `python bench/mlp.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29517"))
    use_cuda = torch.cuda.is_available() and not smoke
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("cpu:gloo,cuda:nccl" if use_cuda else "gloo")
    tp = tpext.init(backend="nccl" if use_cuda else "gloo", nccl_max_ctas=nccl_max_ctas,
                    nccl_overlap_ctas=nccl_overlap_ctas, nccl_window_mib=nccl_window_mib)
    torch_group = dist.new_group(backend="nccl" if use_cuda else "gloo")
    cpu_group = dist.new_group(backend="gloo")
    device = tp.device if use_cuda else torch.device("cpu")
    return tp, torch_group, cpu_group, device


def all_ok(flag: bool, cpu_group) -> bool:
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=cpu_group)
    return bool(t.item())


def agree(error: Optional[str], cpu_group, world: int) -> Optional[str]:
    """None when no rank had an error, else the first rank's message (every rank the same)."""
    every = [None] * world
    dist.all_gather_object(every, error, group=cpu_group)
    for r, e in enumerate(every):
        if e is not None:
            return f"rank {r}: {e}"
    return None


# -- iteration plan ----------------------------------------------------------------------------


def estimate_s(w: peers.Workload, m: int, mode: str, system: str, n: int, device_type: str, esize: int) -> float:
    """A-priori seconds per call (roofline at RATES, plus launch latency)."""
    flop_s, hbm, ar_bw, lat = RATES[device_type]
    if system in peers.COLLECTIVES:
        return w.allreduces(mode) * (lat + m * w.hidden * esize / ar_bw)
    tp = 1 if system in peers.SINGLES else n
    return max(peers.flops(w, m, mode) / tp / flop_s, peers.min_bytes(w, m, mode, esize, tp) / hbm) + 6 * lat


def iteration_plan(est: float, args):
    iters = int(max(args.min_iters, min(args.max_iters, args.point_s // est if est > 0 else args.max_iters)))
    return iters, max(3, iters // 10)


def input_sets(w: peers.Workload, m: int, esize: int, device_type: str) -> int:
    if device_type != "cuda":
        return 2
    return max(1, min(MAX_INPUT_SETS, math.ceil(L2_FOOTPRINT / (m * w.hidden * esize))))


# -- one measurement ---------------------------------------------------------------------------


class Inputs:
    """Per (workload, M): `sets` replicated inputs x (leaf, requires grad) and output gradients g,
    the same on every rank (seeded, then broadcast from rank 0)."""

    def __init__(self, w, m, sets, device, dtype, group, seed=4321):
        gen = torch.Generator(device=device).manual_seed(seed + m)
        self.x, self.g = [], []
        for _ in range(sets):
            x = torch.randn(*w.shape(m), generator=gen, device=device, dtype=torch.float32).to(dtype)
            g = torch.randn(*w.shape(m), generator=gen, device=device, dtype=torch.float32).to(dtype)
            dist.broadcast(x, src=0, group=group)
            dist.broadcast(g, src=0, group=group)
            self.x.append(x.requires_grad_(True))
            self.g.append(g)

    def __len__(self):
        return len(self.x)


def block_step(system: peers.System, mode: str):
    module, params = system.module, system.params
    if mode == "fwd":
        def step(i, inputs):
            with torch.no_grad():
                return settle(module(inputs.x[i]))
    else:
        def step(i, inputs):
            x = inputs.x[i]
            return settle(torch.autograd.grad(settle(module(x)), [x] + params, inputs.g[i]))
    return step


def settle(result):
    """Orders every collective behind `result` on the current stream. Functional collectives
    (DTensor's) return an AsyncCollectiveTensor that waits only when first used; a result nobody
    uses would leave its all-reduce out of the timed interval (and warn at exit)."""
    try:
        from torch.distributed._functional_collectives import AsyncCollectiveTensor
        from torch.distributed.tensor import DTensor
    except ImportError:
        return result
    for t in (result if isinstance(result, (tuple, list)) else (result,)):
        if isinstance(t, DTensor):
            t = t._local_tensor
        if isinstance(t, AsyncCollectiveTensor):
            t.wait()
    return result


def collective_sets(system, w, m, mode, calls, ctx, graphed):
    """Buffers for the collectives alone: `ars` all-reduces of M x H per call. In-place sums
    multiply the values by n per call, so buffers rotate as demo.buffer_count says to stay finite
    (and exceed L2 when small); in graph mode each set of `ars` buffers is one captured graph."""
    ars, nbytes = w.allreduces(mode), m * w.hidden * torch.empty((), dtype=ctx.dtype).element_size()
    nbuf = demo.buffer_count(nbytes, ctx.dtype, ctx.size, calls * ars, rotate_for_l2=ctx.device.type == "cuda")
    nsets = math.ceil(nbuf / ars)
    if graphed:
        nsets = min(nsets, MAX_GRAPH_SETS)  # past this, values may overflow; NCCL's time does not depend on them
    gen = torch.Generator(device=ctx.device).manual_seed(77 + ctx.rank)
    sets = [[torch.randn(m * w.hidden, generator=gen, device=ctx.device).to(ctx.dtype) for _ in range(ars)]
            for _ in range(nsets)]

    def step(i, _inputs):
        for b in sets[i]:
            system.collective(b)
    return step, nsets


def capture(step, nsets, inputs, device):
    """One CUDA graph per input set, each captured after two calls on a side stream (cuBLAS
    workspaces, autograd state and communicators made outside the capture). Every rank captures
    the same sequence."""
    graphs, keep = [], []
    side = torch.cuda.Stream(device)
    for i in range(nsets):
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step(i, inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        # thread_local: helper threads (torch's NCCL watchdog, tpext's communicator timeouts) may
        # query events while this thread captures; launches into the captured stream from any
        # thread (autograd's device thread included) are captured all the same.
        with torch.cuda.graph(g, capture_error_mode="thread_local"):
            keep.append(step(i, inputs))  # outputs stay alive: their memory belongs to the graph
        graphs.append(g)
    torch.cuda.synchronize(device)
    return graphs, keep


def measure(system, w, m, mode, graphed, inputs, ctx, cpu_group, args):
    """Times one system; returns (row, error). Collective over the ranks (same calls on each)."""
    esize = torch.empty((), dtype=ctx.dtype).element_size()
    iters, warmup = iteration_plan(estimate_s(w, m, mode, system.name, ctx.size, ctx.device.type, esize), args)
    graph_calls = 3 if graphed else 0
    if system.collective is not None:
        step, nsets = collective_sets(system, w, m, mode, warmup + iters + graph_calls, ctx, graphed)
    else:
        step, nsets = block_step(system, mode), len(inputs)
    error, stats, keep = None, None, None
    try:
        if graphed:
            graphs, keep = capture(step, nsets, inputs, ctx.device)
            cycle = itertools.cycle(graphs)
            fn = lambda: next(cycle).replay()  # noqa: E731
        else:
            cycle = itertools.cycle(range(nsets))
            fn = lambda: step(next(cycle), inputs)  # noqa: E731
    except Exception as e:  # a capture that fails fails before anything ran; ranks agree below
        error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    error = agree(error, cpu_group, ctx.size)
    if error is None:
        stats = timing.time_op(fn, iters, warmup, ctx.device, barrier=lambda: dist.barrier(group=cpu_group))
    del keep
    if error is not None:
        return None, error
    row = {"workload": w.name, "M": m, "mode": mode, "graph": graphed, "system": system.name,
           "iters": iters, "warmup": warmup, "input_sets": nsets}
    row.update(across_ranks(stats, cpu_group, ctx.size))
    fl = peers.flops(w, m, mode)
    row["tflops"] = fl / (row["median_ms"] * 1e-3) / 1e12 if system.collective is None else None
    if system.collective is not None:
        row["allreduces"] = w.allreduces(mode)
        row["bytes_each"] = m * w.hidden * esize
    if system.note:
        row["note"] = system.note
    return row, None


def across_ranks(stats, cpu_group, world) -> Dict[str, object]:
    keys = ("median_us", "mean_us", "min_us", "max_us")
    mine = torch.tensor([stats[k] for k in keys], dtype=torch.float64)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=cpu_group)
    per_rank = [dict(zip(keys, (v / 1e3 for v in t.tolist()))) for t in every]
    return {
        "median_ms": max(r["median_us"] for r in per_rank),  # the slowest rank's median
        "mean_ms": max(r["mean_us"] for r in per_rank),
        "min_ms": min(r["min_us"] for r in per_rank),
        "per_rank_median_ms": [r["median_us"] for r in per_rank],
    }


# -- correctness -------------------------------------------------------------------------------


def check(w, systems, full, ctx, cpu_group, m):
    """Every built system's output (and input gradient) against single-GPU float32 math on the
    same weights and inputs: rel. error = ||y - ref|| / ||ref||. Also the first call of every
    system: one that raises on any rank is dropped for this workload, on every rank."""
    ref_sys = peers.build_single(w, full, ctx, dtype=torch.float32)
    inputs = Inputs(w, m, 1, ctx.device, ctx.dtype, ctx.torch_group, seed=999)
    x, g = inputs.x[0], inputs.g[0]
    x32 = x.detach().float().requires_grad_(True)
    y_ref = ref_sys.module(x32)
    (dx_ref,) = torch.autograd.grad(y_ref, [x32], g.float())
    y_ref = y_ref.detach()
    del ref_sys
    results, dropped = {}, {}
    for name, s in list(systems.items()):
        if s.collective is not None:
            continue
        partial = name in peers.FLOORS  # partial sums by design: called, not compared
        err, res = None, {}
        try:
            before = ctx.tp.stats()["all_reduce"]["calls"] if name == "tpext" else 0
            with torch.no_grad():
                y = settle(s.module(x))
            res["out_rel_err"] = None if partial else peers.rel_error(y, y_ref)
            if name == "tpext":
                res["tpext_all_reduce_calls_fwd"] = ctx.tp.stats()["all_reduce"]["calls"] - before
            if s.backward:
                before = ctx.tp.stats()["all_reduce"]["calls"] if name == "tpext" else 0
                dx = settle(torch.autograd.grad(settle(s.module(x)), [x] + s.params, g))[0]
                res["dx_rel_err"] = None if partial else peers.rel_error(dx, dx_ref)
                if name == "tpext":
                    res["tpext_all_reduce_calls_fwdbwd"] = ctx.tp.stats()["all_reduce"]["calls"] - before
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
        except Exception as e:
            err = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        err = agree(err, cpu_group, ctx.size)
        if err is not None:
            dropped[name] = f"first call failed: {err}"
            del systems[name]
            continue
        errs = [v for k, v in res.items() if k.endswith("rel_err") and v is not None]
        res["ok"] = bool(max(errs) < REL_ERR_BOUND) if errs else None
        results[name] = res
    # The slowest rank decides nothing here: errors are per rank; keep rank 0's, and whether all passed.
    for r in results.values():
        r["ok_all_ranks"] = None if r["ok"] is None else all_ok(r["ok"], cpu_group)
    return {"workload": w.name, "M": m, "bound": REL_ERR_BOUND, "reference": "float32 single-GPU, same weights",
            "systems": results}, dropped


def format_check(c) -> str:
    parts = []
    for name, r in c["systems"].items():
        if r["ok"] is None:
            parts.append(f"{name} ran (partial sums, not compared)")
            continue
        dx = r.get("dx_rel_err")
        errs = f"{r['out_rel_err']:.2e} / " + ("-" if dx is None else f"{dx:.2e}")
        parts.append(f"{name} {errs} {'ok' if r['ok_all_ranks'] else 'FAILED'}")
    t = c["systems"].get("tpext", {})
    calls = (f"; tpext all-reduce calls: fwd {t['tpext_all_reduce_calls_fwd']}, fwd+bwd "
             f"{t.get('tpext_all_reduce_calls_fwdbwd', '-')}" if "tpext_all_reduce_calls_fwd" in t else "")
    return (f"check {c['workload']} M={c['M']}: rel. error of out / dx vs {c['reference']} (bound {c['bound']:g}): "
            + ", ".join(parts) + calls)


# -- derived numbers and goals -----------------------------------------------------------------


def derive(rows: List[dict], tp_size: int) -> None:
    """Adds to each row of a TP system its ratios against the others of the same (workload, M,
    mode, graph): best peer, floor, single GPU, the exposed communication, and the scaling
    efficiency against the ideal 1/tp_size of the single-GPU time (1 = ideal)."""
    groups: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["workload"], r["M"], r["mode"], r["graph"]), {})[r["system"]] = r
    for by in groups.values():
        def best(names):
            got = [(by[n]["median_ms"], n) for n in names if n in by]
            return min(got) if got else (None, None)
        peer_ms, peer = best(peers.PEERS)
        floor_ms, floor = best(peers.FLOORS)
        single_ms, single = best(peers.SINGLES)
        coll_ms, coll = best(peers.COLLECTIVES)
        for name in peers.TP_SYSTEMS:
            r = by.get(name)
            if r is None:
                continue
            t = r["median_ms"]
            r["best_peer"] = peer if peer != name else _second_best(by, name)
            r["ratio_best_peer"] = common.ratio(t, by[r["best_peer"]]["median_ms"]) if r["best_peer"] else None
            r["floor"], r["ratio_floor"] = floor, common.ratio(t, floor_ms)
            r["single"], r["ratio_single"] = single, common.ratio(t, single_ms)
            r["scaling_efficiency"] = (1.0 / (tp_size * r["ratio_single"])
                                       if r["ratio_single"] else None)
            r["collectives"] = coll
            r["exposed_comm"] = (common.ratio(t - floor_ms, coll_ms)
                                 if floor_ms is not None and coll_ms is not None else None)


def _second_best(by, name):
    """A peer's own 'best peer' is the fastest of the others."""
    got = [(by[n]["median_ms"], n) for n in peers.PEERS if n in by and n != name]
    return min(got)[1] if got else None


def find(rows, **key) -> Optional[dict]:
    for r in rows:
        if all(r.get(k) == v for k, v in key.items()):
            return r
    return None


def goals(rows, meta, args, workloads) -> Dict[str, object]:
    """The issue's goals, for nvidia-h200-x2, TP=2, mlp-8192 bf16. Each: the measured value, the
    threshold, ok (null where a number is missing, with what is missing). `conditions_match` says
    whether this run is the one the goals are stated for."""
    w = workloads.get("mlp-8192")
    dev = meta["devices"][0]
    cond = {"device": "H200" in str(dev.get("name", "")), "tp": meta["world_size"] == 2, "dtype": args.dtype == "bf16",
            "sizes": w is not None and (w.hidden, w.ffn) == (8192, 28672)}

    def t(system, m, mode, graph):
        r = find(rows, workload="mlp-8192", system=system, M=m, mode=mode, graph=graph)
        return None if r is None else r["median_ms"]

    def best_of(names, m, mode, graph):
        got = [(t(n, m, mode, graph), n) for n in names if t(n, m, mode, graph) is not None]
        return min(got) if got else (None, None)

    out = []

    def goal(gid, text, num, den, threshold, detail):
        value = common.ratio(num, den)
        missing = [k for k, v in detail.items() if v is None]
        out.append({"id": gid, "goal": text, "value": value, "threshold": threshold,
                    "ok": None if value is None else bool(value <= threshold), "inputs_ms": detail,
                    "missing": missing or None})

    peer_ms, peer = best_of(peers.PEERS, 256, "fwd", False)
    goal("fwd256_eager_vs_peer", "M=256 fwd eager: tpext <= 0.85 x best peer", t("tpext", 256, "fwd", False), peer_ms,
         0.85, {"tpext": t("tpext", 256, "fwd", False), f"best_peer({peer})": peer_ms})
    floor_ms, floor = best_of(peers.FLOORS, 256, "fwd", True)
    ar_ms, ar = best_of(peers.COLLECTIVES, 256, "fwd", True)
    goal("fwd256_graph_vs_floor_plus_ar", "M=256 fwd graphed: tpext <= 1.05 x (graphed floor + one all-reduce)",
         t("tpext", 256, "fwd", True), None if floor_ms is None or ar_ms is None else floor_ms + ar_ms, 1.05,
         {"tpext": t("tpext", 256, "fwd", True), f"floor({floor})": floor_ms, f"allreduce({ar})": ar_ms})
    for m in (4096, 16384):
        tp_ms = t("tpext", m, "fwdbwd", False)
        floor_ms, floor = best_of(peers.FLOORS, m, "fwdbwd", False)
        peer_ms, peer = best_of(peers.PEERS, m, "fwdbwd", False)
        goal(f"fwdbwd{m}_vs_floor", f"M={m} fwd+bwd eager: tpext <= 1.03 x floor", tp_ms, floor_ms, 1.03,
             {"tpext": tp_ms, f"floor({floor})": floor_ms})
        goal(f"fwdbwd{m}_vs_peer", f"M={m} fwd+bwd eager: tpext <= 0.95 x best peer", tp_ms, peer_ms, 0.95,
             {"tpext": tp_ms, f"best_peer({peer})": peer_ms})
    single_ms, single = best_of(peers.SINGLES, 16384, "fwdbwd", False)
    goal("fwdbwd16384_vs_single", "M=16384 fwd+bwd eager: TP time / single-GPU time <= 0.52",
         t("tpext", 16384, "fwdbwd", False), single_ms, 0.52,
         {"tpext": t("tpext", 16384, "fwdbwd", False), f"single({single})": single_ms})
    evaluated = [g["ok"] for g in out if g["ok"] is not None]
    return {"stated_for": "nvidia-h200-x2, TP=2, mlp-8192 (H=8192 FF=28672) bf16",
            "conditions_match": all(cond.values()), "conditions": cond, "goals": out,
            "all_met": (all(evaluated) if len(evaluated) == len(out) else None)}


# -- output ------------------------------------------------------------------------------------


def _ms(x) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.2f}" if x < 100 else f"{x:.1f}"


def _r(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def format_tables(rows, workloads, skipped, notes, args) -> str:
    out = []
    for wname in args.workloads:
        w = workloads[wname]
        for mode in args.modes:
            for graphed in args.graph:
                sel = [r for r in rows if r["workload"] == wname and r["mode"] == mode and r["graph"] == graphed]
                if not sel:
                    continue
                names = [s for s in peers.ALL_SYSTEMS if any(r["system"] == s for r in sel)]
                head = f"{'M':>6} | " + " ".join(f"{n:>10}" for n in names) + \
                       f" | {'tp/peer':>7} {'tp/floor':>8} {'exposed':>7} {'tp/single':>9} {'eff':>5}"
                out.append(f"\n{wname} ({w.describe()}, {args.dtype}) {mode} "
                           f"{'CUDA graph' if graphed else 'eager'}: median ms per call, slowest rank")
                out.append(head)
                for m in sorted({r["M"] for r in sel}):
                    by = {r["system"]: r for r in sel if r["M"] == m}
                    cells = " ".join(f"{_ms(by[n]['median_ms']) if n in by else '-':>10}" for n in names)
                    tp = by.get("tpext", {})
                    out.append(f"{m:>6} | {cells} | {_r(tp.get('ratio_best_peer')):>7} {_r(tp.get('ratio_floor')):>8} "
                               f"{_r(tp.get('exposed_comm')):>7} {_r(tp.get('ratio_single')):>9} "
                               f"{_r(tp.get('scaling_efficiency')):>5}")
    out.append("\ntp/peer: tpext / fastest of seed, dtensor, megatron, symm-mem; tp/floor: tpext / fastest of floor, "
               "floor-ops (same shards, no collectives); exposed: (tpext - floor) / (fastest of ar-tpext, ar-torch: "
               "the block's all-reduces alone); tp/single: tpext / fastest single-GPU run with full weights; "
               "eff: (1/TP size) / tp/single, 1 = ideal scaling")
    for key, note in notes.items():
        out.append(f"note {key}: {note}")
    for key, why in skipped.items():
        out.append(f"skipped {key}: {why}")
    return "\n".join(out)


def format_goals(g) -> str:
    lines = [f"goals ({g['stated_for']}; this run matches: {g['conditions_match']}):"]
    for x in g["goals"]:
        verdict = "n/a (missing " + ", ".join(x["missing"] or ["value"]) + ")" if x["ok"] is None else \
            ("met" if x["ok"] else "NOT met")
        val = "-" if x["value"] is None else f"{x['value']:.3f}"
        lines.append(f"  {x['goal']}: {val} (<= {x['threshold']}) {verdict}")
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    tp, torch_group, cpu_group, device = init(args.smoke, args.nccl_max_ctas, args.nccl_overlap_ctas,
                                              args.nccl_window_mib)
    tpext.set_overlap_sms(args.overlap_sms)  # recorded in the JSON with the other args
    tpext.set_row_tail_weight(args.row_tail_weight)
    tpext.set_gemm_autotune(args.gemm_autotune)  # the setters check the ranges
    tpext.set_gemm_autotune_sustain_ms(args.gemm_autotune_sustain_ms)
    ctx = peers.Context(device=device, dtype=DTYPES[args.dtype], rank=tp.rank, size=tp.size, tp=tp,
                        torch_group=torch_group, chunk_by=args.chunk_by, chunks=args.chunks)
    try:
        return run(args, ctx, cpu_group, t_start)
    finally:
        if not isinstance(ctx.megatron, (type(None), peers.Skip)):
            try:
                from megatron.core import parallel_state
                parallel_state.destroy_model_parallel()
            except Exception:
                pass
        tpext.destroy()
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args, ctx, cpu_group, t_start) -> int:
    lead = ctx.rank == 0
    meta = common.metadata("mlp", ctx.device)
    say = (lambda s: print(s, flush=True)) if lead else (lambda s: None)
    say(demo.describe_setup(tpext.get_world_group(), ctx.device))
    table = peers.SMOKE_WORKLOADS if args.smoke else peers.WORKLOADS
    workloads = {name: table[name] for name in args.workloads}
    say(describe_plan(workloads, args, ctx))

    rows, checks, skipped, notes = [], [], {}, {}
    ar_cache: Dict[tuple, dict] = {}  # the collectives alone, shared by workloads of the same H
    correct = True
    for w in workloads.values():
        t_w = time.time()
        full = peers.full_weights(w, ctx.device, ctx.dtype, ctx.torch_group)
        systems = build_systems(w, full, ctx, cpu_group, args.systems, skipped, notes)
        c, dropped = check(w, systems, full, ctx, cpu_group, min(args.m))
        checks.append(c)
        skipped.update({f"{w.name}/{k}": v for k, v in dropped.items()})
        say(format_check(c))
        if "tpext" in c["systems"] and not c["systems"]["tpext"]["ok_all_ranks"]:
            correct = False
        del full
        measure_workload(w, systems, ctx, cpu_group, args, rows, skipped, ar_cache, say)
        say(f"{w.name}: done in {time.time() - t_w:.0f} s (total {time.time() - t_start:.0f} s)")
        del systems
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()

    derive(rows, ctx.size)
    g = goals(rows, meta, args, workloads)
    elapsed = time.time() - t_start
    if lead:
        print(format_tables(rows, workloads, skipped, notes, args), flush=True)
        print(format_goals(g), flush=True)
        record = {"metadata": meta, "bench_env": {k: os.environ.get(k) for k in BENCH_ENV}, "args": vars(args),
                  "smoke": args.smoke, "method": METHOD, "workloads": describe_workloads(workloads, args, ctx),
                  "correctness": checks, "skipped": skipped, "notes": notes, "rows": rows, "goals": g,
                  "elapsed_s": elapsed}
        path = common.write_json(args.out or common.default_out("mlp", meta), record)
        print(f"wrote {path} ({elapsed:.0f} s)", flush=True)
        if not args.no_plots:
            plot.make_plots(path)
        if not correct:
            print(f"tpext's output is outside the bound {REL_ERR_BOUND} (see the checks above)", file=sys.stderr)
    return 0 if correct else 1


def describe_plan(workloads, args, ctx) -> str:
    esize = torch.empty((), dtype=ctx.dtype).element_size()
    total, count = 0.0, 0
    for w, m, mode, graphed, s in itertools.product(workloads.values(), args.m, args.modes, args.graph, args.systems):
        est = estimate_s(w, m, mode, s, ctx.size, ctx.device.type, esize)
        iters, warmup = iteration_plan(est, args)
        total += (iters + warmup + (3 if graphed else 0)) * est + 0.02
        count += 1
    return (f"plan: {len(workloads)} workloads x M {args.m} x {args.modes} x "
            f"{['graph' if g else 'eager' for g in args.graph]} x {len(args.systems)} systems = {count} measurements, "
            f"~{total:.0f} s of timed work by an a-priori estimate (plus set-up)")


def build_systems(w, full, ctx, cpu_group, names, skipped, notes) -> Dict[str, peers.System]:
    """Every requested system that builds on every rank; the others go to `skipped` with the reason."""
    systems = {}
    for name in names:
        err = None
        try:
            systems[name] = peers.BUILDERS[name](w, full, ctx)
        except peers.Skip as e:
            err = str(e)
        except Exception as e:
            err = f"build failed: {type(e).__name__}: {e}".splitlines()[0][:300]
        err = agree(err, cpu_group, ctx.size)
        if err is not None:
            systems.pop(name, None)
            skipped[f"{w.name}/{name}"] = err
        elif systems[name].note:
            notes[f"{w.name}/{name}"] = systems[name].note
    return systems


def measure_workload(w, systems, ctx, cpu_group, args, rows, skipped, ar_cache, say) -> None:
    """Every (M, mode, eager|graph, system) of one workload, systems interleaved within each
    configuration so that drift (clocks, temperature) spreads over all of them."""
    esize = torch.empty((), dtype=ctx.dtype).element_size()
    unsupported = set()  # (system, graphed) that failed once: not retried for this workload
    for m in args.m:
        t_m = time.time()
        inputs = Inputs(w, m, input_sets(w, m, esize, ctx.device.type), ctx.device, ctx.dtype, ctx.torch_group)
        for mode, graphed in itertools.product(args.modes, args.graph):
            for name, s in systems.items():
                if mode == "fwdbwd" and not s.backward:
                    skipped.setdefault(f"{w.name}/{name}/fwdbwd", s.note or "no backward")
                    continue
                if graphed and ctx.device.type != "cuda":
                    skipped.setdefault(f"{w.name}/*/graph", "CUDA graphs need CUDA")
                    continue
                if (name, graphed) in unsupported:
                    continue
                ck = (w.hidden, m, w.allreduces(mode), graphed, name)
                if s.collective is not None and ck in ar_cache:
                    src = ar_cache[ck]
                    rows.append(dict(src, workload=w.name, mode=mode, reused_from=f"{src['workload']}/{src['mode']}"))
                    continue
                row, err = measure(s, w, m, mode, graphed, inputs, ctx, cpu_group, args)
                if err is not None:
                    unsupported.add((name, graphed))
                    key = f"{w.name}/{name}/{mode}/{'graph' if graphed else 'eager'}"
                    skipped[key] = f"{err} (not retried for this workload)"
                    say(f"  {key}: {err}")
                    continue
                if s.collective is not None:
                    ar_cache[ck] = row
                rows.append(row)
                if ctx.device.type == "cuda":
                    torch.cuda.empty_cache()
        del inputs
        say(f"  {w.name} M={m}: {time.time() - t_m:.1f} s")


METHOD = {
    "timing": "CUDA events around every call on the current stream, calls back to back after a warm-up, one "
              "synchronize at the end (tpext/timing.py; CPU: perf_counter); per rank the median; median_ms = the "
              "slowest rank's median; iteration counts from an a-priori estimate (FLOPs and bytes), the same on "
              "every rank",
    "fwd": "forward under torch.no_grad()",
    "fwdbwd": "forward + torch.autograd.grad(out, [x] + params, g) with a fixed random g: no grad accumulation, "
              "no zero_grad, no optimizer",
    "graph": "one CUDA graph per input set (captured after two calls on a side stream), timed replays",
    "inputs": f"x and g rotate among sets of buffers until they exceed {L2_FOOTPRINT // MiB} MiB (at most "
              f"{MAX_INPUT_SETS}); identical on every rank",
    "floor": "this rank's shards, same block code, every collective removed (row bias on rank 0)",
    "collectives": "the block's all-reduces of M x H alone, in place, sum (ar-tpext: tpext's communicator; "
                   "ar-torch: torch.distributed on a NCCL group)",
    "exposed_comm": "(time - fastest floor) / (fastest collectives-alone time)",
    "single": "every rank runs the full block with full weights, no communication",
    "correctness": f"each system's output and input gradient vs float32 single-GPU math on the same weights and "
                   f"inputs, rel. error ||y - ref|| / ||ref|| < {REL_ERR_BOUND}",
}


def describe_workloads(workloads, args, ctx) -> Dict[str, object]:
    esize = torch.empty((), dtype=ctx.dtype).element_size()
    out = {}
    for name, w in workloads.items():
        per_m = {}
        for m in args.m:
            per_m[m] = {"flops_fwd": peers.flops(w, m, "fwd"), "flops_fwdbwd": peers.flops(w, m, "fwdbwd"),
                        "min_bytes_fwd_single": peers.min_bytes(w, m, "fwd", esize),
                        "min_bytes_fwd_per_rank": peers.min_bytes(w, m, "fwd", esize, ctx.size),
                        "min_bytes_fwdbwd_per_rank": peers.min_bytes(w, m, "fwdbwd", esize, ctx.size),
                        "allreduce_bytes_fwd": peers.allreduce_bytes(w, m, "fwd", esize),
                        "allreduce_bytes_fwdbwd": peers.allreduce_bytes(w, m, "fwdbwd", esize)}
        out[name] = {"kind": w.kind, "hidden": w.hidden, "ffn": w.ffn, "heads": w.heads, "head_dim": w.head_dim,
                     "bias": w.bias, "describe": w.describe(), "weights": peers.weight_elems(w), "per_M": per_m}
    return out


if __name__ == "__main__":
    sys.exit(main())
