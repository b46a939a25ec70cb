"""tpext's cuBLASLt GEMM ops against torch's on one GPU, for the per-rank shapes of the TP MLP: where
bench/mlp.py's floor-ops (tpext's GEMMs) and floor (torch's) differ, which GEMM it is.

    python bench/gemm_compare.py [--tp 2] [-M 128,256,1024,4096] [--hidden 8192 --ffn 28672]
                                 [--autotune 8] [--out results.json]

Per M: fc1 (x[M,H] by W1[FF/tp,H]^T, bias, GELU tanh) as tpext.linear with its bias+GELU epilogue
(writing the pre-activation for backward, and without it: "no pre", the inference path) against
F.linear then F.gelu, and against F.linear alone; fc2 (h[M,FF/tp] by W2[H,FF/tp]^T) as tpext.linear against F.linear, without bias
(the row-parallel layer adds its bias on rank 0 only). bf16, random data, inputs rotated across
buffers; medians of CUDA-event times (tpext/timing.py) in alternating rounds. "tuned": the same
tpext op with tpext.set_gemm_autotune(N) (cuBLASLt's best N algorithms timed once per problem, the
fastest kept), in the same rounds.
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

import tpext  # noqa: F401  (registers torch.ops.tpext)
from tpext import timing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import metadata, write_json  # noqa: E402  (bench/common.py)

ROUNDS = 5
L2_BYTES = 64 * 1024 * 1024


def rotating(make, count):
    bufs = [make() for _ in range(count)]
    state = {"i": 0}

    def next_buf():
        state["i"] = (state["i"] + 1) % count
        return bufs[state["i"]]
    return next_buf


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("-M", "--tokens", default="128,256,1024,4096")
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--ffn", type=int, default=28672)
    p.add_argument("--autotune", type=int, default=8, help="candidates for the 'tuned' columns")
    p.add_argument("--out", default=None, help="JSON file for every median (default: none)")
    args = p.parse_args()
    dev = torch.device("cuda", torch.cuda.current_device())
    dt = torch.bfloat16
    torch.manual_seed(0)
    h, ff = args.hidden, args.ffn // args.tp
    w1 = torch.randn(ff, h, device=dev, dtype=dt) * h ** -0.5
    b1 = torch.randn(ff, device=dev, dtype=dt) * 0.1
    w2 = torch.randn(h, ff, device=dev, dtype=dt) * ff ** -0.5
    print(f"{torch.cuda.get_device_name(dev)}; torch {torch.__version__}; fc1 [M,{h}]x[{ff},{h}]^T, "
          f"fc2 [M,{ff}]x[{h},{ff}]^T, bf16; medians in us")
    print(f"{'M':>6} | {'fc1 tpext':>10} {'tuned':>8} {'no pre':>8} {'torch+gelu':>10} {'torch':>8} {'ratio':>6} "
          f"{'tuned':>6} | {'fc2 tpext':>10} {'tuned':>8} {'torch':>8} {'ratio':>6} {'tuned':>6}")
    rows = []

    def tuned(op):
        def run():
            tpext.set_gemm_autotune(args.autotune)
            try:
                return op()
            finally:
                tpext.set_gemm_autotune(0)
        return run
    for m in (int(v) for v in args.tokens.split(",")):
        sets = max(1, min(8, math.ceil(L2_BYTES / (m * ff * 2))))
        xs = rotating(lambda: torch.randn(m, h, device=dev, dtype=dt), sets)
        hs = rotating(lambda: torch.randn(m, ff, device=dev, dtype=dt), sets)
        cases = {
            "fc1 tpext": lambda: torch.ops.tpext.linear(xs(), w1, b1, "gelu"),
            "fc1 tpext tuned": tuned(lambda: torch.ops.tpext.linear(xs(), w1, b1, "gelu")),
            "fc1 tpext no pre": lambda: torch.ops.tpext.linear(xs(), w1, b1, "gelu", False),
            "fc1 torch+gelu": lambda: F.gelu(F.linear(xs(), w1, b1), approximate="tanh"),
            "fc1 torch": lambda: F.linear(xs(), w1, b1),
            "fc2 tpext": lambda: torch.ops.tpext.linear(hs(), w2, None, "none"),
            "fc2 tpext tuned": tuned(lambda: torch.ops.tpext.linear(hs(), w2, None, "none")),
            "fc2 torch": lambda: F.linear(hs(), w2),
        }
        samples = {k: [] for k in cases}
        for _ in range(ROUNDS):
            for name, fn in cases.items():
                samples[name] += timing.time_op(fn, iters=40, warmup=5, device=dev)["samples_us"]
        med = {k: sorted(v)[len(v) // 2] for k, v in samples.items()}
        print(f"{m:>6} | {med['fc1 tpext']:>10.1f} {med['fc1 tpext tuned']:>8.1f} {med['fc1 tpext no pre']:>8.1f} "
              f"{med['fc1 torch+gelu']:>10.1f} {med['fc1 torch']:>8.1f} "
              f"{med['fc1 tpext'] / med['fc1 torch+gelu']:>6.3f} {med['fc1 tpext tuned'] / med['fc1 torch+gelu']:>6.3f} | "
              f"{med['fc2 tpext']:>10.1f} {med['fc2 tpext tuned']:>8.1f} {med['fc2 torch']:>8.1f} "
              f"{med['fc2 tpext'] / med['fc2 torch']:>6.3f} {med['fc2 tpext tuned'] / med['fc2 torch']:>6.3f}")
        rows.append({"M": m, "median_us": med})
    if args.out:
        meta = metadata("gemm_compare", dev)
        meta.update(shapes={"hidden": h, "ffn_per_rank": ff, "dtype": "bfloat16"}, autotune=args.autotune)
        write_json(args.out, {"meta": meta, "rows": rows})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
