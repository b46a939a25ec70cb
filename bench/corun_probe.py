"""One-GPU probe for bench/NOTES.md (attempt 1's diagnosis): does a kernel on a high-priority stream
gain anything by running beside a persistent cuBLAS GEMM (one CTA per SM)?

    python bench/corun_probe.py          # one CUDA GPU, triton; ~10 s

The GEMM is one row piece of the M=4096 row-parallel forward of mlp-8192 at TP=2 (1024 x 14336 by
14336 x 8192, bf16). The side kernel, a stand-in for NCCL's, copies 16 MiB with a fixed number of
CTAs and becomes runnable just as the GEMM starts (an event recorded before it), as chunk i's
all-reduce does beside chunk i+1's GEMM. From torch.profiler's kernel records, medians over
repeats: GEMM and side kernel alone; then together: where the side kernel starts (share of the
GEMM), how much of it runs under the GEMM, and the pair's span against the two run one after the
other (1.00 = no gain from running them side by side).
"""
import os
import statistics
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profiling import kernel_records, overlap_us  # noqa: E402  (bench/profiling.py)

REPEATS = 10


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


def main():
    dev = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    x = torch.randn(1024, 14336, device=dev, dtype=torch.bfloat16)
    w = torch.randn(8192, 14336, device=dev, dtype=torch.bfloat16)
    src = torch.randn(8 * 1024 * 1024, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    side_stream = torch.cuda.Stream(priority=-1)  # the priority tpext's comm stream has
    main_stream = torch.cuda.current_stream()
    props = torch.cuda.get_device_properties(dev)
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}")

    def side(ctas):
        _copy_kernel[(ctas,)](src, dst, src.numel(), BLOCK=4096)

    for ctas in (16, 32):
        for _ in range(3):
            F.linear(x, w)
            side(ctas)
        torch.cuda.synchronize()
        alone = profiled(lambda: [f() for _ in range(REPEATS) for f in (lambda: F.linear(x, w), lambda: side(ctas))])
        gemm_alone = statistics.median(k["dur"] for k in alone if "_copy_kernel" not in k["name"])
        side_alone = statistics.median(k["dur"] for k in alone if "_copy_kernel" in k["name"])

        def together():
            for _ in range(REPEATS):
                torch.cuda._sleep(100_000)  # a gap, so each pair starts from an idle GPU
                ready = torch.cuda.Event()
                ready.record(main_stream)
                F.linear(x, w)
                side_stream.wait_event(ready)
                with torch.cuda.stream(side_stream):
                    side(ctas)
                main_stream.wait_stream(side_stream)

        recs = [k for k in profiled(together) if "sleep" not in k["name"] and "spin" not in k["name"]]
        gemms = [k for k in recs if "_copy_kernel" not in k["name"]]
        sides = [k for k in recs if "_copy_kernel" in k["name"]]
        start, under, span, gemm_beside = [], [], [], []
        for g, s in zip(gemms, sides):
            start.append((s["ts"] - g["ts"]) / g["dur"])
            under.append(overlap_us(s, g) / s["dur"])
            span.append(max(g["ts"] + g["dur"], s["ts"] + s["dur"]) - min(g["ts"], s["ts"]))
            gemm_beside.append(g["dur"])
        print(f"side kernel of {ctas} CTAs: GEMM {gemms[0]['name'][:48]} grid {gemms[0]['args'].get('grid')}"
              f" alone {gemm_alone:.1f} us, beside the side kernel {statistics.median(gemm_beside):.1f} us;"
              f" side kernel alone {side_alone:.1f} us, starts at {statistics.median(start):.2f} of the GEMM,"
              f" {statistics.median(under):.2f} of it under the GEMM; pair span {statistics.median(span):.1f} us"
              f" = {statistics.median(span) / (gemm_alone + side_alone):.2f} x the two in series")


if __name__ == "__main__":
    main()
