"""The collectives of tpext.Group on CPU tensors (gloo), against references every rank computes
from the seeded inputs of every other rank.

One launch per (world size, tp_size) pair runs every check on the TP, DP and world groups: CI
has two cores, and starting Python + torch dominates the cost of a launch.
"""
import os

import pytest
import torch

import tpext
from _checks import (all_groups, check_destroyed, check_errors, check_every_collective, check_layout, check_odd_sizes,
                     check_stats)
from _dist import launch

LAYOUTS = [(1, 1), (2, 1), (2, 2), (3, 1), (3, 3), (4, 1), (4, 2), (4, 4)]


def groups_and_collectives_body(tp_size):
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # Rejected on every rank alike before anything is created; the valid init right after works.
    with pytest.raises(ValueError, match=r"tp_size"):
        tpext.init(tp_size=world + 1, backend="gloo", timeout=60)
    tpext.init(tp_size=tp_size, backend="gloo", timeout=60)
    check_layout(rank, world, tp_size)
    groups = all_groups()
    tag = f"w{world}/tp{tp_size}"
    for g in groups:
        check_every_collective(g, "cpu", tag)
        check_odd_sizes(g, "cpu", tag)
    for g in groups:
        check_stats(g, "cpu", others=[o for o in groups if o is not g])
        check_errors(g, "cpu", tag)
    tpext.destroy()
    check_destroyed(groups, "cpu")


@pytest.mark.parametrize("world_size, tp_size", LAYOUTS, ids=[f"world{w}-tp{t}" for w, t in LAYOUTS])
def test_groups_and_collectives(world_size, tp_size):
    launch(groups_and_collectives_body, world_size, args=(tp_size,))


# -- single process ----------------------------------------------------------------------------


def test_collectives_single_process():
    tpext.init(backend="gloo")
    groups = all_groups()
    for g in groups:
        check_every_collective(g, "cpu", "single")
        check_stats(g, "cpu", others=[o for o in groups if o is not g])
        check_errors(g, "cpu", "single")
    tpext.destroy()
    check_destroyed(groups, "cpu")


@pytest.mark.parametrize("call", [
    lambda x: torch.ops.tpext.all_reduce(x, 1, "sum"),
    lambda x: torch.ops.tpext.all_reduce_(x, 1, "sum"),
    lambda x: torch.ops.tpext.all_gather(x, 1, 0, 1),
    lambda x: torch.ops.tpext.reduce_scatter(x, 1, "sum", 0, 1),
    lambda x: torch.ops.tpext.broadcast_(x, 1, 0),
], ids=["all_reduce", "all_reduce_", "all_gather", "reduce_scatter", "broadcast_"])
def test_torch_ops_reject_cpu_tensors(call):
    # The ops are the NCCL path; CPU tensors belong to the gloo path of tpext.Group.
    with pytest.raises(ValueError, match=r"CUDA"):
        call(torch.randn(4))


# -- torch.compile, without a GPU ----------------------------------------------------------------
# Meta tensors run the ops' fake implementations only, so dynamo and functionalization see the
# tpext ops exactly as they would on CUDA tensors, without NCCL. (The comm handle is never looked
# up by these fakes; all_gather / reduce_scatter need a live one and are covered on GPUs.)


def _compiled_on_meta(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")(torch.randn(4, 3, device="meta"))


def test_torch_compile_traces_the_functional_all_reduce():
    out = _compiled_on_meta(lambda x: torch.ops.tpext.all_reduce(x * 2, 1, "sum") + 1)
    assert (out.shape, out.device.type) == ((4, 3), "meta")


@pytest.mark.parametrize("op", ["all_reduce_", "broadcast_"])
def test_torch_compile_traces_the_in_place_ops(op):
    # The in-place ops mutate their argument; functionalization must be able to rewrite them.
    call = {"all_reduce_": lambda y: torch.ops.tpext.all_reduce_(y, 1, "sum"),
            "broadcast_": lambda y: torch.ops.tpext.broadcast_(y, 1, 0)}[op]

    def fn(x):
        y = x * 2
        call(y)
        return y + 1

    out = _compiled_on_meta(fn)
    assert (out.shape, out.device.type) == ((4, 3), "meta")
