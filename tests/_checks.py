"""Checks of a tpext.Group that run on every rank of a launch, on CPU (gloo) or CUDA (NCCL) tensors.

Each check regenerates the inputs of every member of the group from their global ranks (see
_reference.py), so a collective that mixes in a rank of another group, drops one, or reorders
them fails even when all groups hold the same data shape.
"""
from typing import Sequence

import pytest
import torch

import tpext
from _reference import REDUCE_OPS, assert_exact, assert_reduced, chunk_of, inputs_of

CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64)


def _ops_for(dtype: torch.dtype) -> Sequence[str]:
    # An average of integers is rejected (it would truncate); the error checks cover that.
    return REDUCE_OPS if dtype.is_floating_point else tuple(op for op in REDUCE_OPS if op != "avg")


def expected_layout(rank: int, world_size: int, tp_size: int) -> dict:
    """Megatron's layout, written out independently of tpext: TP groups are blocks of tp_size
    consecutive ranks, DP groups take every tp_size-th rank."""
    first = rank - rank % tp_size
    return {
        "tp": (rank % tp_size, list(range(first, first + tp_size))),
        "dp": (rank // tp_size, list(range(rank % tp_size, world_size, tp_size))),
        "world": (rank, list(range(world_size))),
    }


def check_layout(rank: int, world_size: int, tp_size: int, device="cpu") -> None:
    groups = {"tp": tpext.get_tp_group(), "dp": tpext.get_dp_group(), "world": tpext.get_world_group()}
    for name, (group_rank, ranks) in expected_layout(rank, world_size, tp_size).items():
        g = groups[name]
        assert (g.rank, g.size, g.ranks) == (group_rank, len(ranks), ranks), \
            f"{name} group of rank {rank} (world {world_size}, tp {tp_size}): got rank={g.rank} size={g.size} " \
            f"ranks={g.ranks}, expected rank={group_rank} size={len(ranks)} ranks={ranks}"
        # The communicator behind the group must hold those very ranks, in that order.
        members = g.all_gather(torch.tensor([rank], dtype=torch.int64, device=device)).cpu().tolist()
        assert members == ranks, f"{name} group of rank {rank}: gathering the global ranks gave {members}, " \
                                 f"expected {ranks}"


def check_all_reduce(group, device, tag: str, dtypes=CPU_DTYPES, shapes=((3, 5), ())) -> None:
    for dtype in dtypes:
        for op in _ops_for(dtype):
            for shape in shapes:
                t = f"{tag}/all_reduce/{group.name}/{dtype}/{op}/{shape}"
                parts = inputs_of(t, group.ranks, shape, dtype, op)
                x = parts[group.rank].to(device, copy=True)
                out = group.all_reduce(x, op)
                assert out.data_ptr() == x.data_ptr(), f"{t}: all_reduce must work in place and return its input"
                assert_reduced(x, parts, op, f"{t} (group rank {group.rank})")


def check_all_gather(group, device, tag: str, dtypes=CPU_DTYPES, shape=(2, 3, 4), dims=(0, 1, -1)) -> None:
    for dtype in dtypes:
        for dim in dims:
            t = f"{tag}/all_gather/{group.name}/{dtype}/{dim}"
            parts = inputs_of(t, group.ranks, shape, dtype)
            x = parts[group.rank].to(device, copy=True)
            out = group.all_gather(x, dim)
            assert out.device == x.device, f"{t}: output on {out.device}, input on {x.device}"
            assert_exact(out, torch.cat(parts, dim=dim), f"{t} (group rank {group.rank})")
            assert_exact(x, parts[group.rank], f"{t}: the input must be left as it was")


def check_reduce_scatter(group, device, tag: str, dtypes=CPU_DTYPES, dims=(0, 1, -1)) -> None:
    n = group.size
    shape = (2 * n, 3 * n, n)  # divisible by the group size along every dim tested
    for dtype in dtypes:
        for op in _ops_for(dtype):
            for dim in dims:
                t = f"{tag}/reduce_scatter/{group.name}/{dtype}/{op}/{dim}"
                parts = inputs_of(t, group.ranks, shape, dtype, op)
                x = parts[group.rank].to(device, copy=True)
                out = group.reduce_scatter(x, op, dim)
                assert out.device == x.device, f"{t}: output on {out.device}, input on {x.device}"
                assert_reduced(out, parts, op, f"{t} (group rank {group.rank})", chunk=chunk_of(dim, n, group.rank))
                assert_exact(x, parts[group.rank], f"{t}: the input must be left as it was")


def check_broadcast(group, device, tag: str, dtypes=CPU_DTYPES, shape=(4, 3)) -> None:
    for dtype in dtypes:
        for src in range(group.size):
            t = f"{tag}/broadcast/{group.name}/{dtype}/{src}"
            parts = inputs_of(t, group.ranks, shape, dtype)
            x = parts[group.rank].to(device, copy=True)
            out = group.broadcast(x, src)
            assert out.data_ptr() == x.data_ptr(), f"{t}: broadcast must work in place and return its input"
            assert_exact(x, parts[src], f"{t} (group rank {group.rank})")


def check_every_collective(group, device, tag: str, dtypes=CPU_DTYPES) -> None:
    check_all_reduce(group, device, tag, dtypes)
    check_all_gather(group, device, tag, dtypes)
    check_reduce_scatter(group, device, tag, dtypes)
    check_broadcast(group, device, tag, dtypes)


def check_odd_sizes(group, device, tag: str, dtypes=(torch.float32,), sizes=(1, 3, 4097)) -> None:
    """1-d tensors of sizes that fit no vector width: one element, three, one past 4096."""
    n = group.size
    for size in sizes:
        check_all_reduce(group, device, f"{tag}/odd{size}", dtypes, shapes=((size,),))
        check_all_gather(group, device, f"{tag}/odd{size}", dtypes, shape=(size,), dims=(0,))
        for dtype in dtypes:
            t = f"{tag}/odd{size}/reduce_scatter/{group.name}/{dtype}"
            parts = inputs_of(t, group.ranks, (n * size,), dtype)
            out = group.reduce_scatter(parts[group.rank].to(device, copy=True), "sum", 0)
            assert_reduced(out, parts, "sum", f"{t} (group rank {group.rank})", chunk=chunk_of(0, n, group.rank))
        check_broadcast(group, device, f"{tag}/odd{size}", dtypes, shape=(size,))


def check_large(group, device, tag: str, numel: int = 1 << 24) -> None:
    """One large tensor per collective (16M elements: 64 MB in fp32), where NCCL switches to its
    bandwidth algorithms and the chunking of every stage is exercised."""
    n = group.size
    for dtype, op in ((torch.float32, "sum"), (torch.bfloat16, "sum"), (torch.float32, "avg")):
        t = f"{tag}/large/all_reduce/{group.name}/{dtype}/{op}"
        parts = inputs_of(t, group.ranks, (numel,), dtype)
        x = parts[group.rank].to(device, copy=True)
        group.all_reduce(x, op)
        assert_reduced(x, parts, op, f"{t} (group rank {group.rank})")
    t = f"{tag}/large/all_gather/{group.name}"
    parts = inputs_of(t, group.ranks, (numel // n,), torch.float32)
    assert_exact(group.all_gather(parts[group.rank].to(device, copy=True), 0), torch.cat(parts), t)
    t = f"{tag}/large/reduce_scatter/{group.name}"
    parts = inputs_of(t, group.ranks, (numel,), torch.float32)
    out = group.reduce_scatter(parts[group.rank].to(device, copy=True), "sum", 0)
    assert_reduced(out, parts, "sum", t, chunk=chunk_of(0, n, group.rank))
    t = f"{tag}/large/broadcast/{group.name}"
    parts = inputs_of(t, group.ranks, (numel,), torch.float32)
    x = parts[group.rank].to(device, copy=True)
    group.broadcast(x, n - 1)
    assert_exact(x, parts[n - 1], t)


def valid_all_reduce(group, device, tag: str) -> None:
    """A small correct all_reduce: proves the group still works after a rejected call."""
    t = f"{tag}/still-usable/{group.name}"
    parts = inputs_of(t, group.ranks, (7,), torch.float32)
    x = parts[group.rank].to(device, copy=True)
    group.all_reduce(x, "sum")
    assert_reduced(x, parts, "sum", f"{t} (group rank {group.rank})")


def bad_calls(group, device):
    """(description, call, exception type, pattern the message must contain) for every bad argument a
    Group must reject before communicating. Every rank rejects them alike, so no rank is left
    waiting in a collective."""
    f32 = lambda *shape: torch.randn(shape, device=device)  # noqa: E731
    n = group.size
    cases = [
        ("op 'bogus'", lambda: group.all_reduce(f32(4), "bogus"), ValueError, r"\bop\b.*'bogus'"),
        ("reduce_scatter op 'bogus'", lambda: group.reduce_scatter(f32(2 * n), "bogus"), ValueError, r"\bop\b"),
        ("avg of int64", lambda: group.all_reduce(torch.ones(4, dtype=torch.int64, device=device), "avg"),
         ValueError, r"avg"),
        ("all_gather dim 3 of a 3-d tensor", lambda: group.all_gather(f32(2, 3, 4), 3), ValueError, r"\bdim\b"),
        ("all_gather dim -4 of a 3-d tensor", lambda: group.all_gather(f32(2, 3, 4), -4), ValueError, r"\bdim\b"),
        ("all_gather dim '0'", lambda: group.all_gather(f32(2, 3), "0"), TypeError, r"\bdim\b"),
        ("all_gather of a 0-d tensor", lambda: group.all_gather(f32(), 0), ValueError, r"tensor"),
        ("reduce_scatter dim 2 of a 2-d tensor", lambda: group.reduce_scatter(f32(2 * n, n), "sum", 2),
         ValueError, r"\bdim\b"),
        ("all_reduce of a transposed tensor", lambda: group.all_reduce(f32(3, 5).t()), ValueError, r"contiguous"),
        ("all_gather of a strided tensor", lambda: group.all_gather(f32(8)[::2]), ValueError, r"contiguous"),
        ("broadcast of a transposed tensor", lambda: group.broadcast(f32(3, 5).t(), 0), ValueError, r"contiguous"),
        ("all_reduce of complex64", lambda: group.all_reduce(torch.ones(4, dtype=torch.complex64, device=device)),
         ValueError, r"dtype"),
        ("all_gather of bool", lambda: group.all_gather(torch.ones(4, dtype=torch.bool, device=device)),
         ValueError, r"dtype"),
        ("broadcast src == size", lambda: group.broadcast(f32(4), n), ValueError, r"\bsrc\b"),
        ("broadcast src -1", lambda: group.broadcast(f32(4), -1), ValueError, r"\bsrc\b"),
        ("broadcast src '0'", lambda: group.broadcast(f32(4), "0"), ValueError, r"\bsrc\b"),
        ("all_reduce of a list", lambda: group.all_reduce([1.0, 2.0]), TypeError, r"tensor"),
    ]
    if n > 1:
        cases.append(("reduce_scatter of a size not divisible by the group",
                      lambda: group.reduce_scatter(f32(2 * n + 1, 3)), ValueError, r"divisible"))
        cases.append(("reduce_scatter dim 1 not divisible",
                      lambda: group.reduce_scatter(f32(n, n + 1), "sum", 1), ValueError, r"divisible"))
    return cases


def check_errors(group, device, tag: str) -> None:
    """Each bad call raises the documented exception naming the argument, changes no statistics,
    and leaves the group working: the next valid collective is right."""
    before = group.stats()
    for what, call, exc, pattern in bad_calls(group, device):
        with pytest.raises(exc, match=pattern):
            call()
        valid_all_reduce(group, device, f"{tag}/{what}")
    after = group.stats()
    n_valid = len(bad_calls(group, device))
    assert after["all_reduce"]["calls"] - before["all_reduce"]["calls"] == n_valid, \
        f"rejected calls must not be counted: all_reduce calls went {before['all_reduce']} -> {after['all_reduce']} " \
        f"for {n_valid} valid ones"
    for kind in ("all_gather", "reduce_scatter", "broadcast"):
        assert after[kind] == before[kind], f"rejected {kind} calls were counted: {before[kind]} -> {after[kind]}"


def check_stats(group, device, others: Sequence = ()) -> None:
    """stats() counts the calls and input bytes of each kind on this group only."""
    n = group.size
    others_before = [g.stats() for g in others]
    group.reset_stats()
    assert all(v == {"calls": 0, "bytes": 0} for v in group.stats().values()), group.stats()
    group.all_reduce(torch.randn(5, device=device))                                        # 20 bytes
    group.all_reduce(torch.randn(2, 3, dtype=torch.float64, device=device), "max")         # 48 bytes
    group.all_gather(torch.randn(3, dtype=torch.float64, device=device))                   # 24 bytes
    group.reduce_scatter(torch.ones(2 * n, dtype=torch.int64, device=device))              # 16n bytes
    group.broadcast(torch.randn(7, device=device).to(torch.bfloat16), 0)                   # 14 bytes
    expected = {
        "all_reduce": {"calls": 2, "bytes": 20 + 48},
        "all_gather": {"calls": 1, "bytes": 24},
        "reduce_scatter": {"calls": 1, "bytes": 16 * n},
        "broadcast": {"calls": 1, "bytes": 14},
    }
    assert group.stats() == expected, f"{group.name} stats: got {group.stats()}, expected {expected}"
    for g, before in zip(others, others_before):
        assert g.stats() == before, f"calls on {group.name} changed the stats of {g.name}: {before} -> {g.stats()}"
    group.reset_stats()
    assert all(v == {"calls": 0, "bytes": 0} for v in group.stats().values()), group.stats()


def check_destroyed(groups: Sequence, device) -> None:
    """A collective on a group object from before tpext.destroy() raises, naming the way out."""
    for g in groups:
        for call in (lambda: g.all_reduce(torch.ones(2, device=device)),
                     lambda: g.all_gather(torch.ones(2, device=device)),
                     lambda: g.reduce_scatter(torch.ones(2 * g.size, device=device)),
                     lambda: g.broadcast(torch.ones(2, device=device), 0)):
            with pytest.raises(RuntimeError, match=r"destroy.*tpext\.init"):
                call()


def all_groups():
    return [tpext.get_tp_group(), tpext.get_dp_group(), tpext.get_world_group()]
