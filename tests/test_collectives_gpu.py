"""The collectives on CUDA tensors through tpext's NCCL communicators, on 1 and 2 GPUs.

Every test launches one process per GPU (LOCAL_RANK picks the GPU, as under torchrun) and skips,
saying why, where fewer GPUs are visible. The references are the same as on the CPU: every rank
regenerates every member's seeded input on the CPU and reduces it in float64.
"""
import os

import pytest
import torch

import tpext
from _checks import (CPU_DTYPES, all_groups, check_destroyed, check_errors, check_every_collective,
                     check_large, check_layout, check_odd_sizes, check_stats, valid_all_reduce)
from _dist import launch
from _gpus import GPU_WORLDS, gpu_case
from _reference import assert_exact, assert_reduced, chunk_of, inputs_of, reduce_reference

GPU_TIMEOUT_S = 300.0  # CUDA + NCCL start-up and the 16M-element references take a while
HALF_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _rank_env():
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


def _init(tp_size, backend="nccl"):
    rank, world, local_rank = _rank_env()
    tp = tpext.init(tp_size=tp_size, backend=backend, timeout=120)
    device = torch.device("cuda", local_rank)
    assert tp.device == device, f"tpext.init put rank {rank} on {tp.device}, LOCAL_RANK says {device}"
    assert torch.cuda.current_device() == local_rank, "tpext.init must make LOCAL_RANK's GPU the current device"
    return tp, device


# -- init on GPUs ------------------------------------------------------------------------------


@pytest.mark.gpu(1)
def test_init_rejects_a_local_rank_without_a_gpu(monkeypatch):
    # One process per GPU: a LOCAL_RANK past the visible GPUs is a launch mistake, named as such.
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))
    with pytest.raises(ValueError, match=r"LOCAL_RANK"):
        tpext.init(backend="nccl")
    assert not tpext.is_initialized()


# -- every collective, every group, every dtype ------------------------------------------------


def native_bad_calls(group, device):
    """Bad arguments fed to the torch ops directly: the checks of the native adapter itself."""
    h = group._nccl  # the torch ops take the raw communicator handle behind the group
    n = group.size
    x = lambda *shape: torch.randn(shape, device=device)  # noqa: E731
    cases = [
        ("op 'bogus'", lambda: torch.ops.tpext.all_reduce(x(4), h, "bogus"), ValueError, r"\bop\b"),
        ("in-place op 'bogus'", lambda: torch.ops.tpext.all_reduce_(x(4), h, "bogus"), ValueError, r"\bop\b"),
        ("avg of int64", lambda: torch.ops.tpext.all_reduce_(torch.ones(4, dtype=torch.int64, device=device), h,
                                                               "avg"), ValueError, r"avg"),
        ("all_gather dim 2 of a 2-d tensor", lambda: torch.ops.tpext.all_gather(x(2, 3), h, 2, n), ValueError, r"\bdim\b"),
        ("reduce_scatter dim -3 of a 2-d tensor", lambda: torch.ops.tpext.reduce_scatter(x(2 * n, 3), h, "sum", -3, n),
         ValueError, r"\bdim\b"),
        ("broadcast root == size", lambda: torch.ops.tpext.broadcast_(x(4), h, n), ValueError, r"\broot\b"),
        ("broadcast root -1", lambda: torch.ops.tpext.broadcast_(x(4), h, -1), ValueError, r"\broot\b"),
        ("transposed input", lambda: torch.ops.tpext.all_reduce(x(3, 5).t(), h, "sum"), ValueError, r"contiguous"),
        ("complex64 input", lambda: torch.ops.tpext.all_gather(torch.ones(4, dtype=torch.complex64, device=device),
                                                               h, 0, n), ValueError, r"dtype"),
        ("all_gather group_size not the communicator's", lambda: torch.ops.tpext.all_gather(x(4), h, 0, n + 1),
         ValueError, r"\bgroup_size\b"),
        ("bool input", lambda: torch.ops.tpext.broadcast_(torch.ones(4, dtype=torch.bool, device=device), h, 0),
         ValueError, r"dtype"),
        ("CPU input", lambda: torch.ops.tpext.all_reduce(torch.randn(4), h, "sum"), ValueError, r"CUDA"),
        ("a handle no communicator has", lambda: torch.ops.tpext.all_reduce(x(4), 987654321, "sum"), ValueError,
         r"\bcomm\b"),
    ]
    if n > 1:
        cases.append(("reduce_scatter not divisible", lambda: torch.ops.tpext.reduce_scatter(x(2 * n + 1), h, "sum", 0, n),
                      ValueError, r"divisible"))
    if torch.cuda.device_count() >= 2:
        # Every rank sees every GPU (torchrun does not hide them): one not its own is "the wrong one".
        # The case names must not depend on the rank: check_native_errors seeds the next valid call's
        # inputs from them, and every rank must draw the same.
        other = torch.device("cuda", (device.index + 1) % torch.cuda.device_count())
        cases += [
            ("input on another GPU", lambda: torch.ops.tpext.all_reduce(torch.randn(4, device=other), h, "sum"),
             ValueError, rf"cuda:{device.index}"),
            ("group.all_reduce of a tensor on another GPU", lambda: group.all_reduce(torch.randn(4, device=other)),
             ValueError, rf"cuda:{device.index}"),
            ("group.all_gather of a tensor on another GPU", lambda: group.all_gather(torch.randn(4, device=other)),
             ValueError, rf"cuda:{device.index}"),
            ("group.reduce_scatter of a tensor on another GPU",
             lambda: group.reduce_scatter(torch.randn(2 * n, device=other)), ValueError, rf"cuda:{device.index}"),
            ("group.broadcast of a tensor on another GPU", lambda: group.broadcast(torch.randn(4, device=other), 0),
             ValueError, rf"cuda:{device.index}"),
        ]
    return cases


def check_native_errors(group, device, tag):
    before = group.stats()
    cases = native_bad_calls(group, device)
    for what, call, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            call()
        valid_all_reduce(group, device, f"{tag}/native/{what}")
    after = group.stats()
    assert after["all_reduce"]["calls"] - before["all_reduce"]["calls"] == len(cases), \
        f"rejected calls were counted: all_reduce {before['all_reduce']} -> {after['all_reduce']}"
    for kind in ("all_gather", "reduce_scatter", "broadcast"):
        assert after[kind] == before[kind], f"rejected {kind} calls were counted: {before[kind]} -> {after[kind]}"


def check_mixed_cpu_and_cuda(group, device, tag):
    """CPU tensors take gloo and CUDA tensors NCCL on the same group, interleaved; stats() adds both."""
    group.reset_stats()
    for i in range(3):
        for dev in ("cpu", device):
            # The tag names the device type, not cuda:<rank>: every rank must draw the same inputs.
            t = f"{tag}/mixed/{group.name}/{i}/{torch.device(dev).type}"
            parts = inputs_of(t, group.ranks, (5,), torch.float32)
            x = parts[group.rank].to(dev, copy=True)
            group.all_reduce(x)
            assert x.device == torch.device(dev)
            assert_reduced(x, parts, "sum", t)
            gathered = group.all_gather(parts[group.rank].to(dev, copy=True))
            assert_exact(gathered, torch.cat(parts), f"{t}/all_gather")
    stats = group.stats()
    assert stats["all_reduce"] == {"calls": 6, "bytes": 6 * 20}, stats
    assert stats["all_gather"] == {"calls": 6, "bytes": 6 * 20}, stats


def nccl_collectives_body(tp_size, backend):
    rank, world, _ = _rank_env()
    tp, device = _init(tp_size, backend)
    check_layout(rank, world, tp_size, device)
    groups = all_groups()
    assert all(g._nccl is not None for g in groups), f"backend={backend!r} on a GPU must give NCCL communicators"
    tag = f"gpu/w{world}/tp{tp_size}/{backend}"
    for g in groups:
        check_every_collective(g, device, tag, CPU_DTYPES)
        check_odd_sizes(g, device, tag, HALF_DTYPES)
    check_large(tpext.get_world_group(), device, tag)
    for g in groups:
        check_stats(g, device, others=[o for o in groups if o is not g])
        check_errors(g, device, tag)
        check_native_errors(g, device, tag)
        check_mixed_cpu_and_cuda(g, device, tag)
    torch.cuda.synchronize()
    tpext.destroy()
    check_destroyed(groups, device)
    assert tpext._C.live_handles() == [], f"communicators left after destroy: {tpext._C.live_handles()}"


# TP over every GPU, and TP groups of half of them with DP across (TP 1 x DP 2 on two GPUs, TP 2 x
# DP 2 on four, TP 4 x DP 2 on eight).
COLLECTIVE_CASES = [
    gpu_case(1, 1, "nccl", id="1gpu-tp1-nccl"),
    gpu_case(1, 1, "auto", id="1gpu-tp1-auto"),
    gpu_case(2, 2, "nccl", id="2gpu-tp2-nccl"),
    gpu_case(2, 1, "auto", id="2gpu-tp1-auto"),
    gpu_case(4, 4, "nccl", id="4gpu-tp4-nccl"),
    gpu_case(4, 2, "auto", id="4gpu-tp2-auto"),
    gpu_case(8, 8, "nccl", id="8gpu-tp8-nccl"),
    gpu_case(8, 4, "auto", id="8gpu-tp4-auto"),
]


@pytest.mark.parametrize("gpus, tp_size, backend", COLLECTIVE_CASES)
def test_nccl_collectives(gpus, tp_size, backend):
    launch(nccl_collectives_body, gpus, args=(tp_size, backend), timeout_s=GPU_TIMEOUT_S)


def max_ctas_body(max_ctas):
    """tpext.init(nccl_max_ctas=...) reaches ncclConfig.maxCTAs of the world communicator and the
    TP/DP ones split from it: NCCL accepts it and every collective still gives the right answer
    (large messages included, which the cap slows most)."""
    _, world, _ = _rank_env()
    tp = tpext.init(tp_size=world, backend="nccl", timeout=120, nccl_max_ctas=max_ctas)
    device = tp.device
    tag = f"gpu/w{world}/max_ctas{max_ctas}"
    for g in all_groups():
        check_every_collective(g, device, tag, (torch.float32,))
    check_large(tpext.get_world_group(), device, tag)
    torch.cuda.synchronize()
    tpext.destroy()


@pytest.mark.parametrize("gpus", GPU_WORLDS)
def test_collectives_with_capped_nccl_ctas(gpus):
    launch(max_ctas_body, gpus, args=(2,), timeout_s=GPU_TIMEOUT_S)


# -- ordering on the caller's stream -----------------------------------------------------------


def stream_order_body():
    """Inputs written by the last op of a long GPU chain on a side stream, collectives enqueued
    right after on that stream, results read on it right after: nothing synchronises the host in
    between, so only the fences of the ops order them. A collective that started early would
    read the NaN the inputs held before; one whose output is read early gives stale values."""
    rank, world, _ = _rank_env()
    tp, device = _init(world)
    h, n = tp._nccl, tp.size
    numel = 1 << 24
    tag = f"gpu/stream/w{world}"
    names = ("all_reduce_", "all_reduce", "all_gather", "reduce_scatter", "broadcast_")
    parts = {k: inputs_of(f"{tag}/{k}", tp.ranks, (numel,), torch.float32) for k in names}
    bases = {k: parts[k][tp.rank].to(device) for k in names}
    inputs = {k: torch.full((numel,), float("nan"), device=device) for k in names}
    m = torch.randn(4096, 4096, device=device)
    eye = torch.eye(4096, device=device)
    torch.cuda.synchronize()

    side = torch.cuda.Stream(device)
    with torch.cuda.stream(side):
        y = m
        for _ in range(40):  # tens of milliseconds of fp32 GEMMs: far longer than enqueueing below
            y = y @ eye
        for k in names:
            torch.add(bases[k], y.reshape(-1) * 0, out=inputs[k])  # the last op writes the input
        read = {}
        tp.all_reduce(inputs["all_reduce_"])
        read["all_reduce_"] = inputs["all_reduce_"] * 1
        read["all_reduce"] = torch.ops.tpext.all_reduce(inputs["all_reduce"], h, "sum") * 1
        read["all_gather"] = tp.all_gather(inputs["all_gather"], 0) * 1
        read["reduce_scatter"] = tp.reduce_scatter(inputs["reduce_scatter"], "sum", 0) * 1
        tp.broadcast(inputs["broadcast_"], n - 1)
        read["broadcast_"] = inputs["broadcast_"] * 1
    side.synchronize()

    assert_reduced(read["all_reduce_"], parts["all_reduce_"], "sum", f"{tag}: in-place all_reduce")
    assert_reduced(read["all_reduce"], parts["all_reduce"], "sum", f"{tag}: functional all_reduce")
    assert_exact(read["all_gather"], torch.cat(parts["all_gather"]), f"{tag}: all_gather")
    assert_reduced(read["reduce_scatter"], parts["reduce_scatter"], "sum", f"{tag}: reduce_scatter",
                   chunk=chunk_of(0, n, tp.rank))
    assert_exact(read["broadcast_"], parts["broadcast_"][n - 1], f"{tag}: broadcast")
    tpext.destroy()


@pytest.mark.parametrize("gpus", GPU_WORLDS)
def test_collectives_are_ordered_on_the_current_stream(gpus):
    launch(stream_order_body, gpus, timeout_s=GPU_TIMEOUT_S)


# -- lifetime ----------------------------------------------------------------------------------


def reinit_body(tp_sizes):
    rank, world, _ = _rank_env()
    dead = []
    for round_, tp_size in enumerate(tp_sizes):
        tp, device = _init(tp_size)
        check_layout(rank, world, tp_size, device)
        for g in all_groups():
            valid_all_reduce(g, device, f"gpu/reinit/{round_}")
        check_destroyed(dead, device)
        stale = tp._nccl
        dead += all_groups()
        tpext.destroy()
        assert tpext._C.live_handles() == [], f"communicators left after destroy: {tpext._C.live_handles()}"
        check_destroyed(dead, device)
        # The raw op on the handle of a destroyed communicator names the handle, never crashes.
        with pytest.raises(ValueError, match=r"\bcomm\b"):
            torch.ops.tpext.all_reduce(torch.ones(4, device=device), stale, "sum")


@pytest.mark.parametrize("gpus, tp_sizes", [gpu_case(1, (1, 1), id="1gpu"), gpu_case(2, (2, 1, 2), id="2gpu"),
                                            gpu_case(4, (4, 2, 1, 4), id="4gpu"), gpu_case(8, (8, 4, 2, 8), id="8gpu")])
def test_destroy_then_init_again(gpus, tp_sizes):
    launch(reinit_body, gpus, args=(tp_sizes,), timeout_s=GPU_TIMEOUT_S)


# -- torch.compile -----------------------------------------------------------------------------


def compile_body():
    """fullgraph=True of functions calling the in-place group.all_reduce, the functional op and
    the gathering collectives gives what eager gives (and what the reference says)."""
    from torch.utils._triton import has_triton

    rank, world, _ = _rank_env()
    tp, device = _init(world)
    h, n = tp._nccl, tp.size
    # Inductor generates Triton kernels; where Triton is missing aot_eager still runs dynamo and
    # functionalization, the part that has to understand the tpext ops.
    backend = "inductor" if has_triton() else "aot_eager"

    def inplace(x):
        y = x * 2
        tp.all_reduce(y)
        return y + 1

    def inplace_on_argument(x):
        tp.all_reduce(x, "max")
        return x

    def functional(x):
        return torch.ops.tpext.all_reduce(x * 2, h, "sum") + 1

    def gather_scatter(x):
        g = tp.all_gather(x, 0)
        return tp.reduce_scatter(g * 3, "sum", 0)

    tag = f"gpu/compile/w{world}"
    parts = inputs_of(tag, tp.ranks, (4, 1000), torch.float32)
    fresh = lambda: parts[tp.rank].to(device, copy=True)  # noqa: E731

    # The functional ops first: they need no functionalization of a mutation.
    eager = gather_scatter(fresh())
    compiled = torch.compile(gather_scatter, fullgraph=True, backend=backend)(fresh())
    # Gathering, then reduce-scattering 3x the gathered tensor, gives 3n times this rank's chunk of
    # the concatenation: 3n times the input of this group rank.
    expected = parts[tp.rank].double() * 3 * n
    for what, got in (("eager", eager), (f"compiled ({backend})", compiled)):
        torch.testing.assert_close(got.cpu().double(), expected, rtol=1e-6, atol=1e-6,
                                   msg=lambda m: f"{tag}/gather_scatter {what}: {m}")

    # 2 * sum + 1 in float64; fp32 values of size ~1 summed over <= 2 ranks are off by ~1e-7.
    expected = reduce_reference(parts, "sum") * 2 + 1
    for name, fn in (("functional", functional), ("inplace", inplace)):
        eager = fn(fresh())
        compiled = torch.compile(fn, fullgraph=True, backend=backend)(fresh())
        for what, got in (("eager", eager), (f"compiled ({backend})", compiled)):
            torch.testing.assert_close(got.cpu().double(), expected, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{tag}/{name} {what}: {m}")
        torch.testing.assert_close(compiled, eager, msg=lambda m: f"{tag}/{name}: compiled vs eager: {m}")

    x_eager, x_compiled = fresh(), fresh()
    inplace_on_argument(x_eager)
    torch.compile(inplace_on_argument, fullgraph=True, backend=backend)(x_compiled)
    assert_reduced(x_eager, parts, "max", f"{tag}/inplace_on_argument eager")
    assert_reduced(x_compiled, parts, "max", f"{tag}/inplace_on_argument compiled: the argument must be updated")
    tpext.destroy()


@pytest.mark.parametrize("gpus", GPU_WORLDS)
def test_torch_compile_fullgraph_matches_eager(gpus):
    launch(compile_body, gpus, timeout_s=GPU_TIMEOUT_S)
