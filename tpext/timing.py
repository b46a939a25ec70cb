"""Timing helpers shared by the demo (python -m tpext) and bench/.

    stats = time_op(lambda: group.all_reduce(x), iters=200, warmup=20, device=x.device)
    stats["median_us"], stats["mean_us"], stats["min_us"], stats["samples_us"]

On CUDA every call is bracketed by two CUDA events recorded on the current stream, right before and
right after it; the calls run back to back (no synchronisation between them) and the host waits
once, after the last one, before reading the events. So a sample is the time the op occupied the
stream: for a bandwidth-bound collective that is its GPU time; for a latency-bound one whose host
launch takes longer than its GPU work, the stream idles while the next call is being enqueued and
that launch time is included, as a user issuing the op would see it. On CPU a sample is the wall
time of the call (time.perf_counter), which for gloo is the whole collective.

Collectives must be called the same number of times on every rank, so iteration counts are derived
from the message size only (iters_for_bytes), never from measured times, which differ per rank.
"""
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch


def time_op(fn: Callable[[], object], iters: int, warmup: int, device: torch.device,
            barrier: Optional[Callable[[], None]] = None) -> Dict[str, object]:
    """Runs fn() `warmup` times untimed, then `iters` times timed; returns median_us, mean_us,
    min_us, max_us and samples_us (every sample, in call order).

    barrier: called once before the warm-up (after the device is idle), e.g. dist.barrier, so ranks
    enter the loop together; the warm-up calls then absorb what skew is left, and the timed calls
    follow them without a gap."""
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise ValueError(f"time_op: iters: expected a positive int, got {iters!r}")
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ValueError(f"time_op: warmup: expected a non-negative int, got {warmup!r}")
    device = torch.device(device)
    if device.type == "cuda":
        samples = _time_cuda(fn, iters, warmup, device, barrier)
    elif device.type == "cpu":
        samples = _time_cpu(fn, iters, warmup, barrier)
    else:
        raise ValueError(f"time_op: device: expected a CPU or CUDA device, got {device}")
    return summarize(samples)


def summarize(samples_us: List[float]) -> Dict[str, object]:
    return {
        "median_us": statistics.median(samples_us),
        "mean_us": statistics.fmean(samples_us),
        "min_us": min(samples_us),
        "max_us": max(samples_us),
        "samples_us": list(samples_us),
    }


def _time_cuda(fn, iters, warmup, device, barrier) -> List[float]:
    with torch.cuda.device(device):
        torch.cuda.synchronize(device)
        if barrier is not None:
            barrier()
        for _ in range(warmup):
            fn()
        stream = torch.cuda.current_stream(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for start, end in zip(starts, ends):
            start.record(stream)
            fn()
            end.record(stream)
        torch.cuda.synchronize(device)
        # elapsed_time is in milliseconds, resolution about half a microsecond.
        return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]


def _time_cpu(fn, iters, warmup, barrier) -> List[float]:
    if barrier is not None:
        barrier()
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    return samples


def iters_for_bytes(nbytes: int, budget_bytes: int, min_iters: int, max_iters: int) -> int:
    """Timed iterations for a message of `nbytes`: about budget_bytes / nbytes, clamped to
    [min_iters, max_iters]. A function of the size only, so every rank gets the same count."""
    if nbytes < 1:
        raise ValueError(f"iters_for_bytes: nbytes: expected a positive size, got {nbytes}")
    if not 1 <= min_iters <= max_iters:
        raise ValueError(f"iters_for_bytes: expected 1 <= min_iters <= max_iters, got {min_iters}, {max_iters}")
    return max(min_iters, min(max_iters, budget_bytes // nbytes))


def algbw_gbps(nbytes: int, time_us: float) -> float:
    """Algorithm bandwidth as nccl-tests defines it: message bytes / time, in GB/s (1e9 B/s)."""
    return nbytes / (time_us * 1e-6) / 1e9 if time_us > 0 else float("nan")


def allreduce_busbw_gbps(nbytes: int, time_us: float, world_size: int) -> float:
    """Bus bandwidth of an all-reduce as nccl-tests defines it: algbw * 2(n-1)/n, the per-link
    traffic of a ring, comparable with the hardware's link bandwidth. 0 for a single rank."""
    return algbw_gbps(nbytes, time_us) * 2 * (world_size - 1) / world_size
