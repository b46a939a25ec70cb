"""Kernel timeline of tpext's ParallelMLP (mlp-8192: H=8192, FF=28672, GELU, bias, bf16) under
torch.profiler: which kernels ran when, on which stream, with which grid, and how much of the NCCL
kernels' time ran under a GEMM. The profile behind bench/NOTES.md's overlap diagnosis (nsys does
not run on the lent GPU boxes).

    torchrun --nproc-per-node 2 bench/kernel_timeline.py [--overlap-sms 16] [-M 4096] [--chunk-by rows]
        [--trace-dir DIR]

--overlap-sms N also caps tpext's overlapped NCCL collectives at N CTAs (tpext.init(nccl_overlap_ctas=N)).
Per M and mode (fwd, fwd+bwd): 5 warm-up steps, then 3 profiled steps separated by idle gaps; the
last one is reported: a summary line per rank, and rank 0's kernels one per line (start and
duration in us from the step's first kernel). --trace-dir keeps rank 0's Chrome traces (gzip).
"""
import argparse
import gzip
import os
import shutil
import sys
from typing import Optional

import torch

import tpext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profiling import kernel_records, overlap_us  # noqa: E402  (bench/profiling.py)

GAP_CYCLES = 2_000_000  # torch.cuda._sleep between profiled steps: ~1 ms of idle GPU


def kind(name: str) -> str:
    n = name.lower()
    if "nccl" in n:
        return "NCCL"
    if any(k in n for k in ("nvjet", "gemm", "sm90_xmma", "cutlass")):
        return "GEMM"
    return "other"


def profiled_steps(step, tp, steps: int = 3, trace_path: Optional[str] = None):
    """Kernel records of `steps` calls of step(), split per call at the idle gaps between them;
    the Chrome trace is kept at trace_path if given."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
            torch.cuda._sleep(GAP_CYCLES)
            tp.all_reduce(torch.ones(1, device=tp.device))  # keeps the ranks in step
            torch.cuda._sleep(GAP_CYCLES)
        torch.cuda.synchronize()
    parts, cur = [], []
    records = kernel_records(prof, trace_path)
    for e in records:
        if "sleep" in e["name"].lower() or "spin" in e["name"].lower():
            if cur:
                parts.append(cur)
            cur = []
        else:
            cur.append(e)
    if cur:
        parts.append(cur)
    return [p for p in parts if any(kind(e["name"]) == "GEMM" for e in p)]


def describe(step_records, rank: int, label: str, listing: bool) -> str:
    t0 = step_records[0]["ts"]
    gemms = [e for e in step_records if kind(e["name"]) == "GEMM"]
    nccls = [e for e in step_records if kind(e["name"]) == "NCCL"]
    span = max(e["ts"] + e["dur"] for e in step_records) - t0
    nccl_us = sum(e["dur"] for e in nccls)
    under = sum(overlap_us(n, g) for n in nccls for g in gemms)
    lines = [f"== rank {rank} {label}: span {span:.0f} us, GEMMs {sum(e['dur'] for e in gemms):.0f} us, "
             f"NCCL {nccl_us:.0f} us, of it under a GEMM {under:.0f} us ({under / nccl_us if nccl_us else 0:.2f})"]
    if listing:
        for e in step_records:
            a = e.get("args", {})
            lines.append(f"  {e['ts'] - t0:8.1f} +{e['dur']:7.1f}  stream {a.get('stream')}  grid {a.get('grid')} "
                         f"block {a.get('block')}  {kind(e['name']):5s} {e['name'][:60]}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--overlap-sms", type=int, default=0,
                   help="tpext.set_overlap_sms for the run, and the CTA cap of the collectives beside a GEMM "
                        "(nccl_overlap_ctas)")
    p.add_argument("-M", "--tokens", default="4096", help="comma list of token counts")
    p.add_argument("--modes", default="fwd,fwdbwd")
    p.add_argument("--chunk-by", choices=("auto", "rows", "columns"), default="auto",
                   help="how fc2 (row-parallel) cuts its GEMM into pieces beside their all-reduces")
    p.add_argument("--trace-dir", help="keep rank 0's Chrome traces here (gzip)")
    args = p.parse_args()
    tp = tpext.init(backend="nccl", nccl_overlap_ctas=args.overlap_sms or None)
    tpext.set_overlap_sms(args.overlap_sms)
    torch.manual_seed(1234)
    mlp = tpext.ParallelMLP(8192, 28672, activation="gelu", bias=True, group=tp, device=tp.device,
                            dtype=torch.bfloat16, chunk_by=args.chunk_by)
    with torch.no_grad():
        for param in mlp.parameters():
            param.normal_(0, 0.01)  # random, never zeros
    for m in (int(v) for v in args.tokens.split(",")):
        x = torch.randn(m, 8192, device=tp.device, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(m, 8192, device=tp.device, dtype=torch.bfloat16)
        for mode in args.modes.split(","):
            def step():
                y = mlp(x)
                if mode == "fwdbwd":
                    y.backward(grad)
            for _ in range(5):
                step()
            torch.cuda.synchronize()
            keep = args.trace_dir and tp.rank == 0
            name = f"trace-sms{args.overlap_sms}-{args.chunk_by}-M{m}-{mode}.json"
            trace = os.path.join(args.trace_dir, name) if keep else None
            if keep:
                os.makedirs(args.trace_dir, exist_ok=True)
            steps = profiled_steps(step, tp, trace_path=trace)
            label = (f"overlap_sms={args.overlap_sms} (overlapped NCCL CTAs capped alike) chunk_by={args.chunk_by} "
                     f"M={m} {mode}")
            print(describe(steps[-1], tp.rank, label, listing=tp.rank == 0), flush=True)
            if trace:
                with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as out:
                    shutil.copyfileobj(src, out)
                os.unlink(trace)
    tpext.destroy()


if __name__ == "__main__":
    main()
