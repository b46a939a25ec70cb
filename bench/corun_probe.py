"""One-GPU probe for bench/NOTES.md (attempt 1): does a kernel on a high-priority stream gain
anything by running beside a persistent cuBLAS GEMM (one CTA per SM), and does it once the GEMM is
told to leave SMs free (cuBLASLt's SM count target)?

    python bench/corun_probe.py [--out results.json]    # one CUDA GPU, triton; ~20 s

The GEMM is one row piece of the M=4096 row-parallel forward of mlp-8192 at TP=2 (1024 x 14336 by
14336 x 8192, bf16). The side kernel, a stand-in for NCCL's, copies 16 MiB with a fixed number of
CTAs and becomes runnable just as the GEMM starts (an event recorded before it), as chunk i's
all-reduce does beside chunk i+1's GEMM. Cases: the GEMM on every SM beside 16 or 32 side CTAs
(what tpext does by default), and the GEMM sized for SMs - c beside c side CTAs, c = 8, 16, 32 (what
tpext.set_overlap_sms(c) with tpext.init(nccl_max_ctas=c) does). The SM count target is set through
torch's experimental carveout, which puts the same cuBLASLt attribute (CUBLASLT_MATMUL_DESC_SM_COUNT_
TARGET) on torch's cuBLASLt GEMMs that tpext puts on its own; torch is told to prefer cuBLASLt for
every case, so all cases run the same library. From torch.profiler's kernel records, medians over
repeats: the GEMM (its grid) and side kernel alone; then together: where the side kernel starts
(share of the GEMM), how much of it runs under the GEMM, and the pair's span against the two run
one after the other with the GEMM on every SM (below 1.00: running them side by side pays).
"""
import argparse
import os
import statistics
import sys
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import metadata, write_json  # noqa: E402  (bench/common.py)
from profiling import kernel_records, overlap_us  # noqa: E402  (bench/profiling.py)


@triton.jit
def _copy_kernel(src, dst, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    for start in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


def profiled(fn):
    """Kernel records of fn's GPU work (bench/profiling.py)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return kernel_records(prof)


def probe_case(x, w, side, ctas: int, carveout: Optional[int], main_stream, side_stream, repeats: int):
    """Medians for one (side CTAs, carveout) case; the carveout is set only for this case."""
    torch._C._set_sm_carveout_experimental(carveout)
    try:
        for _ in range(3):
            F.linear(x, w)
            side(ctas)
        torch.cuda.synchronize()
        alone = profiled(lambda: [f() for _ in range(repeats) for f in (lambda: F.linear(x, w), lambda: side(ctas))])
        gemm_alone = [k for k in alone if "_copy_kernel" not in k["name"]]
        side_alone = statistics.median(k["dur"] for k in alone if "_copy_kernel" in k["name"])

        def together():
            for _ in range(repeats):
                torch.cuda._sleep(100_000)  # a gap, so each pair starts from an idle GPU
                ready = torch.cuda.Event()
                ready.record(main_stream)
                F.linear(x, w)
                side_stream.wait_event(ready)
                with torch.cuda.stream(side_stream):
                    side(ctas)
                main_stream.wait_stream(side_stream)

        recs = [k for k in profiled(together) if "sleep" not in k["name"] and "spin" not in k["name"]]
    finally:
        torch._C._set_sm_carveout_experimental(None)
    gemms = [k for k in recs if "_copy_kernel" not in k["name"]]
    sides = [k for k in recs if "_copy_kernel" in k["name"]]
    start, under, span, beside = [], [], [], []
    for g, s in zip(gemms, sides):
        start.append((s["ts"] - g["ts"]) / g["dur"])
        under.append(overlap_us(s, g) / s["dur"])
        span.append(max(g["ts"] + g["dur"], s["ts"] + s["dur"]) - min(g["ts"], s["ts"]))
        beside.append(g["dur"])
    return {
        "side_ctas": ctas,
        "carveout_sms": carveout or 0,
        "gemm_kernel": gemm_alone[0]["name"],
        "gemm_grid": gemm_alone[0]["args"].get("grid"),
        "gemm_alone_us": round(statistics.median(k["dur"] for k in gemm_alone), 1),
        "gemm_beside_us": round(statistics.median(beside), 1),
        "side_alone_us": round(side_alone, 1),
        "side_start_share_of_gemm": round(statistics.median(start), 2),
        "side_share_under_gemm": round(statistics.median(under), 2),
        "pair_span_us": round(statistics.median(span), 1),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=10, help="pairs per case (default 10)")
    p.add_argument("--out", default=None, help="JSON file for every case (default: none)")
    args = p.parse_args()
    dev = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    x = torch.randn(1024, 14336, device=dev, dtype=torch.bfloat16)
    w = torch.randn(8192, 14336, device=dev, dtype=torch.bfloat16)
    src = torch.randn(8 * 1024 * 1024, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    side_stream = torch.cuda.Stream(priority=-1)  # the priority tpext's comm stream has
    main_stream = torch.cuda.current_stream()
    props = torch.cuda.get_device_properties(dev)
    torch.backends.cuda.preferred_blas_library("cublaslt")  # the carveout reaches torch's cuBLASLt path only
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}")

    def side(ctas):
        _copy_kernel[(ctas,)](src, dst, src.numel(), BLOCK=4096)

    cases = []
    for ctas, carveout in ((16, None), (32, None), (8, 8), (16, 16), (32, 32)):
        c = probe_case(x, w, side, ctas, carveout, main_stream, side_stream, args.repeats)
        cases.append(c)
    full = cases[0]["gemm_alone_us"]  # the GEMM on every SM
    for c in cases:
        series = full + c["side_alone_us"]
        c["span_over_full_series"] = round(c["pair_span_us"] / series, 3)
        print(f"side {c['side_ctas']:>2} CTAs, GEMM left {c['carveout_sms']:>2} SMs: {c['gemm_kernel'][:40]} grid "
              f"{c['gemm_grid']} alone {c['gemm_alone_us']:.1f} us (every SM {full:.1f}), beside "
              f"{c['gemm_beside_us']:.1f}; side alone {c['side_alone_us']:.1f} us, starts at "
              f"{c['side_start_share_of_gemm']:.2f} of the GEMM, {c['side_share_under_gemm']:.2f} of it under it; "
              f"pair {c['pair_span_us']:.1f} us = {c['span_over_full_series']:.3f} x GEMM on every SM then side")
    if args.out:
        meta = metadata("corun_probe", dev)
        meta.update(gemm="1024x14336 by 14336x8192^T bf16 (F.linear, cuBLASLt preferred)",
                    side_kernel="triton copy of 16 MiB, high-priority stream", repeats=args.repeats)
        write_json(args.out, {"meta": meta, "cases": cases})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
