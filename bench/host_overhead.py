"""Host time per call at launch-bound sizes: tpext's MLP and layers against torch's, one GPU.

    python bench/host_overhead.py [--out bench/results/host-overhead-x.json]    # ~30 s

At a few tokens and a small hidden size every kernel is shorter than the host work that launches
it, so the time per call is the host's: Python, the autograd Functions, the dispatcher, the
argument checks, the launches. That is the latency floor of small-batch inference. Timed: N calls
back to back, host clock, tpext's and torch's rounds taking turns; per case the median of rounds,
in us per call, beside the same computation in plain torch in the same run (tpext's TP group is one rank: its all-reduce is a
copy, fenced on the comm stream as at any size). Cases: the MLP (fc1 column-parallel with GELU,
fc2 row-parallel) forward under no_grad and forward + backward; each layer alone under no_grad;
and the bare ops, so what the modules add is visible.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import metadata, write_json  # noqa: E402  (bench/common.py)

import tpext  # noqa: E402

ROUNDS = 9


def per_call_us(fns, calls: int):
    """Host time per call of each function in `fns`: rounds of `calls` back-to-back calls, the
    functions taking turns round by round (so a slow spell of the shared host lands on all of
    them), the GPU drained before each round. Per function the median and the fastest round."""
    for fn in fns:
        for _ in range(50):
            fn()
    rounds = [[] for _ in fns]
    for _ in range(ROUNDS):
        for fn, times in zip(fns, rounds):
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - t) / calls * 1e6)
    torch.cuda.synchronize()
    return [(statistics.median(t), min(t)) for t in rounds]


def result_row(m: int, case: str, tp, ref) -> dict:
    return {"M": m, "case": case, "tpext_us": round(tp[0], 2), "torch_us": round(ref[0], 2),
            "ratio": round(tp[0] / ref[0], 3), "tpext_fastest_us": round(tp[1], 2), "torch_fastest_us": round(ref[1], 2)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("-M", "--tokens", default="1,16")
    p.add_argument("--calls", type=int, default=1000, help="calls per round (fwd+bwd: a quarter)")
    p.add_argument("--out", default=None, help="JSON file for every case (default: none)")
    args = p.parse_args()
    group = tpext.init()
    dev = torch.device("cuda", torch.cuda.current_device())
    dt = torch.bfloat16
    h, ff = args.hidden, args.ffn
    torch.manual_seed(0)
    mlp = tpext.ParallelMLP(h, ff, device=dev, dtype=dt)
    ref = nn.Sequential(nn.Linear(h, ff), nn.GELU(approximate="tanh"), nn.Linear(ff, h)).to(dev, dt)
    col, row = mlp.linear_fc1, mlp.linear_fc2
    print(f"{torch.cuda.get_device_name(dev)}; torch {torch.__version__}; MLP {h} -> {ff} -> {h} bf16; "
          f"host us per call (median of {ROUNDS} rounds)")
    rows = []
    for m in (int(v) for v in args.tokens.split(",")):
        x = torch.randn(m, h, device=dev, dtype=dt)
        hid = torch.randn(m, ff, device=dev, dtype=dt)
        xg = x.clone().requires_grad_()
        g = torch.randn(m, h, device=dev, dtype=dt)
        # (tpext case, torch case): the same computation both ways.
        pairs = {
            "mlp fwd": (lambda: mlp(x), lambda: ref(x)),
            "column layer fwd": (lambda: col(x), lambda: F.gelu(F.linear(x, col.weight, col.bias), approximate="tanh")),
            "row layer fwd": (lambda: row(hid), lambda: F.linear(hid, row.weight, row.bias)),
            "linear op (gelu)": (lambda: torch.ops.tpext.linear(x, col.weight, col.bias, "gelu", False),
                                 lambda: F.gelu(F.linear(x, col.weight, col.bias), approximate="tanh")),
            "row_parallel_linear op": (
                lambda: torch.ops.tpext.row_parallel_linear(hid, row.weight, row.bias, group._nccl, 0, "auto"),
                lambda: F.linear(hid, row.weight, row.bias)),
        }
        for name, (tp_fn, torch_fn) in pairs.items():
            with torch.no_grad():
                rows.append(result_row(m, name, *per_call_us([tp_fn, torch_fn], args.calls)))
        tp_params, ref_params = [xg] + list(mlp.parameters()), [xg] + list(ref.parameters())
        rows.append(result_row(m, "mlp fwd+bwd", *per_call_us([lambda: torch.autograd.grad(mlp(xg), tp_params, g),
                                                               lambda: torch.autograd.grad(ref(xg), ref_params, g)],
                                                              args.calls // 4)))
    print(f"{'M':>4} {'case':<24} {'tpext':>8} {'torch':>8} {'ratio':>6}  (fastest rounds: tpext, torch)")
    for r in rows:
        print(f"{r['M']:>4} {r['case']:<24} {r['tpext_us']:>8.1f} {r['torch_us']:>8.1f} {r['ratio']:>6.3f}  "
              f"({r['tpext_fastest_us']:.1f}, {r['torch_fastest_us']:.1f})")
    if args.out:
        meta = metadata("host_overhead", dev)
        meta.update(shapes={"hidden": h, "ffn": ff, "dtype": "bfloat16"}, calls=args.calls, rounds=ROUNDS)
        write_json(args.out, {"meta": meta, "rows": rows})
        print(f"wrote {args.out}")
    tpext.destroy()


if __name__ == "__main__":
    main()
