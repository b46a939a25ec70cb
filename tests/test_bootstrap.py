"""tpext.init / tpext.destroy and the groups they lay out.

Single-process tests run in the pytest process (world 1, no MASTER_ADDR: tpext uses an in-memory
store). Multi-process tests launch ranks through _dist.launch on gloo; the layout of every
(world size, tp_size) pair is checked with the collectives in test_collectives.py, one launch each.
"""
import datetime
import os

import pytest
import torch
import torch.distributed as dist

import tpext
from _checks import all_groups, check_destroyed, check_layout, valid_all_reduce
from _dist import launch
from _reference import assert_reduced, inputs_of

# -- single process ----------------------------------------------------------------------------


@pytest.mark.parametrize("getter", [tpext.get_tp_group, tpext.get_dp_group, tpext.get_world_group])
def test_group_getters_before_init_raise_naming_init(getter):
    assert not tpext.is_initialized()
    with pytest.raises(RuntimeError, match=r"tpext\.init"):
        getter()


def test_init_single_process_without_master_addr():
    tp = tpext.init(backend="gloo")
    assert tpext.is_initialized()
    assert tp is tpext.get_tp_group()
    for g in all_groups():
        assert (g.rank, g.size, g.ranks, g.device) == (0, 1, [0], torch.device("cpu")), g
    # tpext created the default process group itself, so destroy() takes it down again.
    assert dist.is_initialized()
    valid_all_reduce(tp, "cpu", "single")
    tpext.destroy()
    assert not tpext.is_initialized()
    assert not dist.is_initialized()


def test_init_auto_backend_serves_cpu_tensors():
    # "auto" picks NCCL only where CUDA is available; CPU tensors take gloo either way.
    tp = tpext.init(backend="auto", timeout=datetime.timedelta(seconds=30))
    # Group.device: where the group's tensors live, the NCCL device or else the CPU.
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert tp.device == expected, f"backend='auto' gave {tp.device}, expected {expected}"
    valid_all_reduce(tp, "cpu", "auto")
    tpext.destroy()


def test_init_twice_raises_and_keeps_the_first():
    tp = tpext.init(tp_size=1, backend="gloo")
    with pytest.raises(RuntimeError, match=r"already initiali[sz]ed.*tpext\.destroy"):
        tpext.init(tp_size=1, backend="gloo")
    assert tpext.get_tp_group() is tp
    valid_all_reduce(tp, "cpu", "twice")
    tpext.destroy()


@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(tp_size=0), ValueError, r"tp_size"),
    (dict(tp_size=-1), ValueError, r"tp_size"),
    (dict(tp_size=2), ValueError, r"tp_size"),  # does not divide the world size 1
    (dict(tp_size=1.0), TypeError, r"tp_size"),
    (dict(tp_size=True), TypeError, r"tp_size"),
    (dict(timeout=0), ValueError, r"timeout"),
    (dict(timeout=-5.0), ValueError, r"timeout"),
    (dict(timeout=datetime.timedelta(0)), ValueError, r"timeout"),
    (dict(timeout="60"), TypeError, r"timeout"),
    (dict(backend="mpi"), ValueError, r"backend"),
    (dict(backend="NCCL"), ValueError, r"backend"),
    (dict(backend=None), ValueError, r"backend"),
    (dict(nccl_max_ctas=0), ValueError, r"nccl_max_ctas: expected None .* in \[1, 64\]"),
    (dict(nccl_max_ctas=65), ValueError, r"nccl_max_ctas"),
    (dict(nccl_max_ctas=8.0), TypeError, r"nccl_max_ctas: expected None or an int, got float"),
    (dict(nccl_max_ctas=True), TypeError, r"nccl_max_ctas"),
    (dict(nccl_overlap_ctas=0), ValueError, r"nccl_overlap_ctas: expected None .* in \[1, 64\]"),
    (dict(nccl_overlap_ctas="8"), TypeError, r"nccl_overlap_ctas: expected None or an int, got str"),
    (dict(nccl_window_mib=-1), ValueError, r"nccl_window_mib: expected None or an int in \[0, 65536\]"),
    (dict(nccl_window_mib=16 << 20), ValueError, r"nccl_window_mib: .*MiB per rank"),
    (dict(nccl_window_mib=1.5), TypeError, r"nccl_window_mib: expected None or an int, got float"),
], ids=lambda v: repr(v) if isinstance(v, dict) else None)
def test_init_rejects_bad_arguments_and_stays_usable(kwargs, exc, pattern):
    args = dict(backend="gloo")
    args.update(kwargs)
    with pytest.raises(exc, match=pattern):
        tpext.init(**args)
    # Nothing half-made is left behind: the next valid init works.
    assert not tpext.is_initialized()
    assert not dist.is_initialized()
    valid_all_reduce(tpext.init(tp_size=1, backend="gloo"), "cpu", f"after-bad-init/{kwargs}")
    tpext.destroy()


@pytest.mark.parametrize("name", ["RANK", "WORLD_SIZE", "LOCAL_RANK"])
def test_init_rejects_a_non_integer_launcher_variable(monkeypatch, name):
    monkeypatch.setenv(name, "one")
    with pytest.raises(ValueError, match=name):
        tpext.init(backend="gloo")
    assert not tpext.is_initialized() and not dist.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is absent")
def test_init_nccl_without_cuda_raises():
    with pytest.raises(RuntimeError, match=r"CUDA"):
        tpext.init(backend="nccl")
    assert not tpext.is_initialized() and not dist.is_initialized()


def test_destroy_is_a_noop_when_not_initialised():
    tpext.destroy()
    tpext.destroy()
    assert not tpext.is_initialized()


def test_destroy_then_init_again_single_process():
    tpext.init(backend="gloo")
    old = all_groups()
    tpext.destroy()
    tpext.destroy()  # a second destroy is harmless
    check_destroyed(old, "cpu")
    with pytest.raises(RuntimeError, match=r"tpext\.init"):
        tpext.get_tp_group()
    tp = tpext.init(backend="gloo", timeout=30)
    valid_all_reduce(tp, "cpu", "reinit")
    check_destroyed(old, "cpu")  # the old objects stay dead; the new ones work
    tpext.destroy()


def test_alongside_a_process_group_of_the_caller_single_process():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    tp = tpext.init(backend="gloo")
    valid_all_reduce(tp, "cpu", "user-pg")
    tpext.destroy()
    assert dist.is_initialized(), "tpext.destroy() must leave the caller's process group alone"
    x = torch.arange(3.0) + 1
    dist.all_reduce(x)
    assert x.tolist() == [1.0, 2.0, 3.0]
    dist.destroy_process_group()


# -- several processes -------------------------------------------------------------------------


def _rank_and_world():
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def reinit_body(tp_sizes):
    """init with each tp_size in turn, each followed by destroy; the groups of every round are
    laid out right and work, and the objects of earlier rounds stay dead."""
    rank, world = _rank_and_world()
    dead = []
    for round_, tp_size in enumerate(tp_sizes):
        tpext.init(tp_size=tp_size, backend="gloo", timeout=60)
        check_layout(rank, world, tp_size)
        for g in all_groups():
            valid_all_reduce(g, "cpu", f"reinit/{round_}")
        check_destroyed(dead, "cpu")
        dead += all_groups()
        tpext.destroy()
        assert not tpext.is_initialized()
        assert not dist.is_initialized(), "tpext created the default process group, so destroy() removes it"
        check_destroyed(dead, "cpu")
        with pytest.raises(RuntimeError, match=r"tpext\.init"):
            tpext.get_dp_group()


@pytest.mark.parametrize("world_size, tp_sizes", [(2, (2, 1, 2)), (4, (2, 4, 1))])
def test_destroy_then_init_again_with_another_tp_size(world_size, tp_sizes):
    launch(reinit_body, world_size, args=(tp_sizes,))


def existing_pg_body(tp_sizes):
    """The caller initialises torch.distributed itself; tpext builds its groups beside it, and
    tpext.destroy() leaves it working."""
    rank, world = _rank_and_world()
    dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=60))
    for round_, tp_size in enumerate(tp_sizes):
        tpext.init(tp_size=tp_size, backend="gloo", timeout=60)
        check_layout(rank, world, tp_size)
        for g in all_groups():
            valid_all_reduce(g, "cpu", f"existing/{round_}")
        tpext.destroy()
        assert dist.is_initialized(), "tpext.destroy() must leave the caller's process group alone"
        assert (dist.get_rank(), dist.get_world_size()) == (rank, world)
        tag = f"existing/default-pg/{round_}"
        parts = inputs_of(tag, range(world), (5,), torch.float64)
        x = parts[rank].clone()
        dist.all_reduce(x)
        assert_reduced(x, parts, "sum", tag)
    dist.destroy_process_group()


@pytest.mark.parametrize("world_size, tp_sizes", [(4, (2, 4)), (3, (3,))])
def test_alongside_a_process_group_of_the_caller(world_size, tp_sizes):
    launch(existing_pg_body, world_size, args=(tp_sizes,))
