"""All-reduce: tpext (its own NCCL communicator) against torch.distributed (a NCCL process group of
the same ranks), in the same run on the same GPUs; gloo for both on CPU.

    torchrun --nproc-per-node 2 bench/allreduce.py [--sizes 1024 64K 256M] [--dtypes fp32 bf16]
                                                   [--out bench/results/allreduce-<device>-<date>.json]

Both are timed in place (group.all_reduce and dist.all_reduce), op sum, on the same buffers: per
call CUDA events on the current stream, calls back to back, median per rank, and the slowest
rank's median reported (tpext/timing.py). Messages up to 16 MiB rotate through enough buffers
to exceed the L2 cache; buffers are also rotated so that repeated in-place sums stay finite
(tpext/demo.py: buffer_count). Results: a table per dtype on stdout, every row in the JSON with the
run's metadata (bench/common.py), and "checks" computed on fp32 (the dtype of the bus-bandwidth
table): the 256 MiB bus-bandwidth ratio and the 64 KiB latency ratio, both tpext / torch.
"""
import argparse
import os
import re
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (bench/common.py, next to this file)

import tpext  # noqa: E402
from tpext import demo  # noqa: E402

_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024 ** 2, "MB": 1024 ** 2, "MIB": 1024 ** 2,
          "G": 1024 ** 3, "GB": 1024 ** 3, "GIB": 1024 ** 3}
CHECK_DTYPE = "fp32"


def parse_size(text: str) -> int:
    """'1024', '64K', '64KiB', '256M' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"--sizes: expected a byte count such as 1024, 64K or 256MiB, got {text!r}")
    n = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if n < 1:
        raise argparse.ArgumentTypeError(f"--sizes: expected a positive size, got {text!r}")
    return n


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", type=parse_size, default=None,
                   help="message sizes in bytes (K/M/G suffixes allowed); default 8 B, then 16 B x 4^k up to "
                        "256 MiB on GPU, up to 4 MiB on CPU")
    p.add_argument("--dtypes", nargs="+", choices=sorted(demo.DTYPES), default=["fp32", "bf16"])
    p.add_argument("--out", default=None, help="JSON path (default bench/results/allreduce-<device>-<date>.json)")
    p.add_argument("--iters-scale", type=int, default=4,
                   help="multiplies the demo's iteration counts (default 4: 80 timed calls at 256 MiB, 800 "
                        "for small messages on GPU)")
    p.add_argument("--keep-samples", action="store_true", help="also store rank 0's every sample in the JSON")
    return p.parse_args(argv)


def summary_checks(rows, world_size):
    """The two numbers quoted from this benchmark, on fp32 rows; null where a size was not run
    (and the bus-bandwidth ratio on one rank, where busbw is 0)."""
    by_size = {r["bytes"]: r for r in rows if r["dtype"] == demo.dtype_name(demo.DTYPES[CHECK_DTYPE])}
    big, small = by_size.get(256 * demo.MiB), by_size.get(64 * demo.KiB)
    busbw_ratio = latency_ratio = faster = None
    if big is not None and world_size > 1:
        busbw_ratio = common.ratio(big["tpext"]["busbw_GBps"], big["torch"]["busbw_GBps"])
    if small is not None:
        latency_ratio = common.ratio(small["tpext"]["median_us"], small["torch"]["median_us"])
        if latency_ratio is not None:
            faster = "tpext" if latency_ratio < 1 else "torch" if latency_ratio > 1 else "equal"
    return {"dtype": demo.dtype_name(demo.DTYPES[CHECK_DTYPE]), "busbw_256MiB_ratio": busbw_ratio,
            "latency_64KiB_ratio": latency_ratio, "faster_at_64KiB": faster}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.iters_scale < 1:
        raise ValueError(f"--iters-scale: expected a positive integer, got {args.iters_scale}")
    tpext.init(backend="auto")
    try:
        world = tpext.get_world_group()
        device = world.device if world.device is not None else torch.device("cpu")
        peer = demo.torch_peer_group(device)
        try:
            return run(args, world, peer, device)
        finally:
            dist.destroy_process_group(peer)
    finally:
        tpext.destroy()


def run(args, world, peer, device) -> int:
    lead = world.rank == 0
    meta = common.metadata("allreduce", device)
    setup = demo.describe_setup(world, device)
    if lead:
        print(setup, flush=True)

    correctness, ok = [], True
    count = 1_000_003 if device.type == "cuda" else 100_003
    for dtype in (torch.float32, torch.bfloat16):
        c = demo.check_allreduce(world, peer, device, dtype, count)
        ok = demo.all_ranks_true(c["tpext_ok"]) and ok
        correctness.append(c)
        if lead:
            print(demo.format_check(c, world.size), flush=True)

    sizes = args.sizes or (demo.GPU_SIZES if device.type == "cuda" else demo.CPU_SIZES)
    rows = []
    for name in args.dtypes:
        dtype = demo.DTYPES[name]
        esize = torch.empty((), dtype=dtype).element_size()
        skipped = [s for s in sizes if s % esize]
        if skipped and lead:
            print(f"{name}: skipping sizes that are not a whole number of elements: {skipped}", flush=True)
        table = []
        for nbytes in (s for s in sizes if s % esize == 0):
            iters, warmup = demo.iteration_plan(nbytes, device, scale=args.iters_scale)
            table.append(demo.measure_allreduce(world, peer, device, nbytes, dtype, iters, warmup,
                                                rotate_for_l2=True, keep_samples=args.keep_samples))
        rows.extend(table)
        if lead:
            print(demo.format_table(table, world.size,
                                    f"all-reduce (sum, in place) {name} on {world.size} x {device.type.upper()}"),
                  flush=True)

    checks = summary_checks(rows, world.size)
    if lead:
        fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
        print(f"checks ({CHECK_DTYPE}, tpext / torch): bus bandwidth at 256 MiB {fmt(checks['busbw_256MiB_ratio'])}, "
              f"time at 64 KiB {fmt(checks['latency_64KiB_ratio'])} (faster at 64 KiB: "
              f"{checks['faster_at_64KiB'] or 'n/a'})", flush=True)
        out = args.out or common.default_out("allreduce", meta)
        path = common.write_json(out, {
            "metadata": meta,
            "method": {
                "op": "sum, in place, same buffers for both implementations",
                "timing": "CUDA events around each call on the current stream, calls back to back, one "
                          "synchronize at the end (CPU: perf_counter per call); median per rank; "
                          "median_us = the slowest rank's median",
                "bandwidth": "algbw = bytes / median time; busbw = algbw * 2(n-1)/n (nccl-tests), GB/s = 1e9 B/s",
                "buffers": "rotated when <= 16 MiB to exceed L2, and so repeated sums stay finite",
            },
            "correctness": correctness,
            "rows": rows,
            "checks": checks,
        })
        print(f"wrote {path}", flush=True)
        if not ok:
            print("tpext's all-reduce is outside the error bound (see the checks above)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
