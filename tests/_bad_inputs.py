"""The table of bad inputs to tpext's public API and ops, shared by the CPU (gloo) and GPU (NCCL)
suites of test_reliability*.py.

Every case is (name, call, exception type, regex): the call must raise that exception with a
message matching the regex, which names the argument and what was expected. run_table() drives
the three phases a program can be in:

    before init      (tpext.init with bad arguments, getters and layers without a group)
    initialised      (collectives, layers, mappings, constructors, the torch ops themselves)
    after destroy    (groups, layers and communicator handles from before tpext.destroy())

and checks, for every case, that nothing was enqueued (the collective counters of every group,
which count at enqueue, are unchanged) and that the library still works: the next valid
collective gives the right values, and a ParallelMLP built before gives the output it gave before,
bit for bit. Every rank runs the same cases in the same order, so each one raises everywhere
before anything reaches a peer.
"""
import os
import re
from collections import namedtuple
from typing import Callable, List

import torch
import torch.distributed as dist

import tpext
from _checks import valid_all_reduce

Case = namedtuple("Case", "name call exc pattern")

HIDDEN, FFN = 8, 12


def _other_device(device: torch.device) -> torch.device:
    """A device tpext tensors of `device` must not be on: meta next to the CPU, the CPU next to a GPU."""
    return torch.device("meta") if device.type == "cpu" else torch.device("cpu")


def _other_gpu(device: torch.device):
    """Another visible GPU (launches do not hide GPUs from a rank, as torchrun does not), or None."""
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        return None
    return torch.device("cuda", (device.index + 1) % torch.cuda.device_count())


# -- before tpext.init ---------------------------------------------------------------------------


def pre_init_cases(world_size: int, backend: str) -> List[Case]:
    x = torch.ones(4, HIDDEN)
    cases = [
        Case("get_tp_group before init", lambda: tpext.get_tp_group(), RuntimeError,
             r"get_tp_group: tpext is not initialised; call tpext\.init\(\) first"),
        Case("get_dp_group before init", lambda: tpext.get_dp_group(), RuntimeError,
             r"get_dp_group: tpext is not initialised; call tpext\.init\(\) first"),
        Case("get_world_group before init", lambda: tpext.get_world_group(), RuntimeError,
             r"get_world_group: tpext is not initialised"),
        Case("stats before init", lambda: tpext.stats(), RuntimeError, r"stats: tpext is not initialised"),
        Case("ColumnParallelLinear before init", lambda: tpext.ColumnParallelLinear(HIDDEN, 4), RuntimeError,
             r"ColumnParallelLinear: group: tpext is not initialised; call tpext\.init\(\) first \(or pass group=\)"),
        Case("ParallelMLP before init", lambda: tpext.ParallelMLP(HIDDEN, FFN), RuntimeError,
             r"ParallelMLP: group: tpext is not initialised"),
        Case("reduce_from_tensor_parallel_region before init", lambda: tpext.reduce_from_tensor_parallel_region(x),
             RuntimeError, r"reduce_from_tensor_parallel_region: group: tpext is not initialised"),
        Case("init: tp_size not dividing the world size",
             lambda: tpext.init(tp_size=world_size + 1, backend=backend, timeout=30), ValueError,
             rf"init: tp_size: expected a positive divisor of the world size {world_size}, got {world_size + 1}"),
        Case("init: tp_size 0", lambda: tpext.init(tp_size=0, backend=backend, timeout=30), ValueError,
             rf"init: tp_size: expected a positive divisor of the world size {world_size}, got 0"),
        Case("init: tp_size float", lambda: tpext.init(tp_size=float(world_size), backend=backend), TypeError,
             r"init: tp_size: expected an int, got float"),
        Case("init: timeout 0", lambda: tpext.init(backend=backend, timeout=0), ValueError,
             r"init: timeout: expected a positive, finite duration, got 0\.0 s"),
        Case("init: timeout -1", lambda: tpext.init(backend=backend, timeout=-1), ValueError,
             r"init: timeout: expected a positive, finite duration, got -1\.0 s"),
        Case("init: timeout inf", lambda: tpext.init(backend=backend, timeout=float("inf")), ValueError,
             r"init: timeout: expected a positive, finite duration, got inf s"),
        Case("init: timeout '60'", lambda: tpext.init(backend=backend, timeout="60"), TypeError,
             r"init: timeout: expected seconds \(a number\) or a datetime\.timedelta, got str"),
        Case("init: backend 'mpi'", lambda: tpext.init(backend="mpi"), ValueError,
             r"init: backend: expected one of 'auto', 'nccl', 'gloo', got 'mpi'"),
    ]
    if not torch.cuda.is_available():
        cases.append(Case("init: backend 'nccl' without CUDA", lambda: tpext.init(backend="nccl"), RuntimeError,
                          r"init: backend='nccl' needs CUDA"))
    return cases


# -- initialised ---------------------------------------------------------------------------------


class Fixture:
    """The layers and data the live cases use, built once per table run."""

    def __init__(self, group: tpext.Group, device: torch.device):
        self.group, self.device = group, device
        torch.manual_seed(1234)  # the same full weights on every rank
        self.col = tpext.ColumnParallelLinear(HIDDEN, 6, group=group)
        self.row = tpext.RowParallelLinear(6, HIDDEN, group=group)
        self.row_full = tpext.RowParallelLinear(6, HIDDEN, input_is_parallel=False, group=group)
        self.mlp = tpext.ParallelMLP(HIDDEN, FFN, group=group)
        self.x = torch.randn(4, HIDDEN, device=device)
        with torch.no_grad():
            self.y = self.mlp(self.x)


def live_cases(fx: Fixture) -> List[Case]:
    g, d, n = fx.group, fx.device, fx.group.size
    other = _other_device(d)
    f32 = lambda *shape: torch.randn(shape, device=d)  # noqa: E731
    shard = fx.row.input_size_per_partition
    x = fx.x
    cases = [
        # Group collectives
        Case("all_reduce: unsupported reduce op", lambda: g.all_reduce(f32(4), "bogus"), ValueError,
             r"all_reduce: op: expected one of 'sum', 'prod', 'max', 'min', 'avg', got 'bogus'"),
        Case("reduce_scatter: unsupported reduce op", lambda: g.reduce_scatter(f32(2 * n), "mean"), ValueError,
             r"reduce_scatter: op: expected one of .*, got 'mean'"),
        Case("all_reduce: avg of int64", lambda: g.all_reduce(torch.ones(4, dtype=torch.int64, device=d), "avg"),
             ValueError, r"all_reduce: op: 'avg' needs a floating-point dtype, got torch\.int64"),
        Case("all_reduce: complex64", lambda: g.all_reduce(torch.ones(4, dtype=torch.complex64, device=d)),
             ValueError, r"all_reduce: tensor: expected dtype float32, .*int64, got torch\.complex64"),
        Case("all_gather: bool", lambda: g.all_gather(torch.ones(4, dtype=torch.bool, device=d)), ValueError,
             r"all_gather: tensor: expected dtype .*, got torch\.bool"),
        Case("all_reduce: non-contiguous", lambda: g.all_reduce(f32(3, 5).t()), ValueError,
             r"all_reduce: tensor: expected a contiguous tensor, got strides \(1, 5\) for sizes \(5, 3\)"),
        Case("broadcast: non-contiguous", lambda: g.broadcast(f32(8)[::2], 0), ValueError,
             r"broadcast: tensor: expected a contiguous tensor"),
        Case("all_reduce: a list", lambda: g.all_reduce([1.0, 2.0]), TypeError,
             r"all_reduce: tensor: expected a torch\.Tensor, got list"),
        Case("all_reduce: meta tensor", lambda: g.all_reduce(torch.ones(4, device="meta")), ValueError,
             r"all_reduce: tensor: expected a CPU or CUDA tensor, got one on meta"),
        Case("all_gather: dim out of range", lambda: g.all_gather(f32(2, 3, 4), 3), ValueError,
             r"all_gather: dim: expected a dimension in \[-3, 3\) for a 3-d tensor, got 3"),
        Case("all_gather: dim a str", lambda: g.all_gather(f32(2, 3), "0"), TypeError,
             r"all_gather: dim: expected an int, got str"),
        Case("all_gather: 0-d tensor", lambda: g.all_gather(f32(), 0), ValueError,
             r"all_gather: tensor: expected a tensor with at least one dimension, got a scalar"),
        Case("reduce_scatter: dim out of range", lambda: g.reduce_scatter(f32(2 * n, 3), "sum", -3), ValueError,
             r"reduce_scatter: dim: expected a dimension in \[-2, 2\) for a 2-d tensor, got -3"),
        Case("broadcast: src == group size", lambda: g.broadcast(f32(4), n), ValueError,
             rf"broadcast: src: expected a group rank in \[0, {n}\), got {n}"),
        Case("broadcast: src True", lambda: g.broadcast(f32(4), True), ValueError,
             rf"broadcast: src: expected a group rank in \[0, {n}\), got True"),
        # Layer forwards
        Case("ColumnParallelLinear: float64 input", lambda: fx.col(x.double()), ValueError,
             r"ColumnParallelLinear: input: expected dtype torch\.float32 \(the dtype of weight\), got torch\.float64"),
        Case("ColumnParallelLinear: input on another device", lambda: fx.col(torch.ones(4, HIDDEN, device=other)),
             ValueError, rf"ColumnParallelLinear: input: expected a tensor on {re.escape(str(d))} \(where weight is\), "
                         rf"got one on {other}"),
        Case("ColumnParallelLinear: in_features mismatch", lambda: fx.col(f32(4, HIDDEN + 1)), ValueError,
             rf"ColumnParallelLinear: input: expected last dimension {HIDDEN} \(in_features\), got shape "
             rf"\(4, {HIDDEN + 1}\)"),
        Case("ColumnParallelLinear: non-contiguous input", lambda: fx.col(f32(HIDDEN, 4).t()), ValueError,
             r"ColumnParallelLinear: input: expected a contiguous tensor, got strides .*; call \.contiguous\(\) first"),
        Case("ColumnParallelLinear: 0-d input", lambda: fx.col(f32()), ValueError,
             r"ColumnParallelLinear: input: expected at least one dimension \(the last is the features\), "
             r"got a scalar"),
        Case("ColumnParallelLinear: a list", lambda: fx.col([[1.0] * HIDDEN]), TypeError,
             r"ColumnParallelLinear: input: expected a torch\.Tensor, got list"),
        Case("RowParallelLinear: input not this rank's shard", lambda: fx.row(f32(4, shard + 1)), ValueError,
             rf"RowParallelLinear: input: expected last dimension {shard} \(this rank's shard of in_features=6, "
             rf"input_is_parallel=True\), got shape \(4, {shard + 1}\)"),
        Case("RowParallelLinear(input_is_parallel=False): in_features mismatch", lambda: fx.row_full(f32(4, 5)),
             ValueError,
             r"RowParallelLinear: input: expected last dimension 6 \(in_features, input_is_parallel=False\)"),
        Case("RowParallelLinear: int64 input", lambda: fx.row(torch.ones(4, shard, dtype=torch.int64, device=d)),
             ValueError,
             r"RowParallelLinear: input: expected dtype torch\.float32 \(the dtype of weight\), got torch\.int64"),
        Case("ParallelMLP: hidden mismatch", lambda: fx.mlp(f32(4, HIDDEN - 1)), ValueError,
             rf"ParallelMLP: input: expected last dimension {HIDDEN} \(hidden\), got shape \(4, {HIDDEN - 1}\)"),
        Case("ParallelMLP: bfloat16 input", lambda: fx.mlp(x.to(torch.bfloat16)), ValueError,
             r"ParallelMLP: input: expected dtype torch\.float32 \(the dtype of weight\), got torch\.bfloat16"),
        Case("ParallelMLP: input on another device", lambda: fx.mlp(torch.ones(4, HIDDEN, device=other)), ValueError,
             rf"ParallelMLP: input: expected a tensor on {re.escape(str(d))} \(where weight is\)"),
        Case("ParallelMLP: non-contiguous input", lambda: fx.mlp(f32(HIDDEN, 4).t()), ValueError,
             r"ParallelMLP: input: expected a contiguous tensor"),
        # Constructors
        Case("ColumnParallelLinear: in_features 0", lambda: tpext.ColumnParallelLinear(0, 4, group=g), ValueError,
             r"ColumnParallelLinear: in_features: expected a positive int, got 0"),
        Case("RowParallelLinear: out_features -2", lambda: tpext.RowParallelLinear(4, -2, group=g), ValueError,
             r"RowParallelLinear: out_features: expected a positive int, got -2"),
        Case("ParallelMLP: ffn_hidden 0", lambda: tpext.ParallelMLP(HIDDEN, 0, group=g), ValueError,
             r"ParallelMLP: ffn_hidden: expected a positive int, got 0"),
        Case("ParallelMLP: hidden -8", lambda: tpext.ParallelMLP(-8, FFN, group=g), ValueError,
             r"ParallelMLP: hidden: expected a positive int, got -8"),
        Case("ColumnParallelLinear: in_features float", lambda: tpext.ColumnParallelLinear(8.0, 4, group=g), TypeError,
             r"ColumnParallelLinear: in_features: expected an int, got float"),
        Case("RowParallelLinear: chunks -1", lambda: tpext.RowParallelLinear(8, 4, group=g, chunks=-1), ValueError,
             r"RowParallelLinear: chunks: expected an int >= 0 \(0 = automatic\), got -1"),
        Case("ParallelMLP: activation 'relu'", lambda: tpext.ParallelMLP(HIDDEN, FFN, "relu", group=g), ValueError,
             r"ParallelMLP: activation: expected 'gelu' or 'swiglu', got 'relu'"),
        Case("ColumnParallelLinear: out_features not a multiple of stride",
             lambda: tpext.ColumnParallelLinear(HIDDEN, 6, group=g, stride=4), ValueError,
             r"ColumnParallelLinear: out_features: expected a multiple of stride 4, got 6"),
        Case("ColumnParallelLinear: dtype int32", lambda: tpext.ColumnParallelLinear(HIDDEN, 4, group=g,
                                                                                     dtype=torch.int32),
             ValueError, r"ColumnParallelLinear: dtype: expected a floating-point torch\.dtype, got torch\.int32"),
        Case("ColumnParallelLinear: group a str", lambda: tpext.ColumnParallelLinear(HIDDEN, 4, group="tp"), TypeError,
             r"ColumnParallelLinear: group: expected a tpext\.Group or None \(the TP group\), got str"),
        Case("RowParallelLinear: device 'gpu0'", lambda: tpext.RowParallelLinear(HIDDEN, 4, group=g, device="gpu0"),
             ValueError, r"RowParallelLinear: device: expected a torch\.device or a device string .*, got 'gpu0'"),
        # Mappings and helpers
        Case("gather_from_tensor_parallel_region: wrong number of sizes",
             lambda: tpext.gather_from_tensor_parallel_region(f32(4, 2), g, sizes=[2] * (n + 1)), ValueError,
             rf"gather_from_tensor_parallel_region: sizes: expected {n} sizes \(one per rank of Group\('tp'"),
        Case("scatter_to_tensor_parallel_region: 0-d input",
             lambda: tpext.scatter_to_tensor_parallel_region(f32(), g), ValueError,
             r"scatter_to_tensor_parallel_region: input: expected at least one dimension, got a scalar"),
        Case("copy_to_tensor_parallel_region: group a str",
             lambda: tpext.copy_to_tensor_parallel_region(f32(4), "tp"), TypeError,
             r"copy_to_tensor_parallel_region: group: expected a tpext\.Group or None"),
        Case("stats: group a str", lambda: tpext.stats("tp"), TypeError,
             r"stats: group: expected a tpext\.Group or None \(all groups\), got str"),
        Case("split_sizes: parts 0", lambda: tpext.split_sizes(10, 0), ValueError,
             r"split_sizes: parts: expected an int >= 1, got 0"),
        Case("gather_shards: a plain tensor", lambda: tpext.gather_shards(f32(4)), ValueError,
             r"gather_shards: like: expected a parameter of a tpext layer"),
        Case("init while initialised", lambda: tpext.init(backend="gloo"), RuntimeError,
             r"init: tpext is already initialised; call tpext\.destroy\(\) first"),
    ]
    if n > 1:
        cases.append(Case("reduce_scatter: size not divisible by the group", lambda: g.reduce_scatter(f32(2 * n + 1)),
                          ValueError, rf"reduce_scatter: input: expected size {2 * n + 1} along dim 0 to be divisible "
                                      rf"by the group size {n}"))
    if d.type == "cpu":
        cases.append(Case("ColumnParallelLinear: device 'cuda' on a gloo group",
                          lambda: tpext.ColumnParallelLinear(HIDDEN, 4, group=g, device="cuda"), ValueError,
                          r"ColumnParallelLinear: device: expected cpu \(or meta\): .* has no NCCL communicator"))
    else:
        cases += _native_cases(fx)
    return cases


def _native_cases(fx: Fixture) -> List[Case]:
    """The torch ops themselves (CUDA only): the adapter's own checks, before the core enqueues."""
    g, d, n = fx.group, fx.device, fx.group.size
    h = g._nccl
    f32 = lambda *shape: torch.randn(shape, device=d)  # noqa: E731
    w = fx.row.weight.detach()  # [HIDDEN, shard]
    cases = [
        Case("op all_reduce_: a handle no communicator has",
             lambda: torch.ops.tpext.all_reduce_(f32(4), 987654321, "sum"), ValueError,
             r"comm: no live communicator has handle 987654321"),
        Case("op all_gather: group_size not the communicator's",
             lambda: torch.ops.tpext.all_gather(f32(4), h, 0, n + 1), ValueError,
             rf"all_gather: group_size: expected {n}"),
        Case("op all_reduce: CPU tensor", lambda: torch.ops.tpext.all_reduce(torch.ones(4), h, "sum"), ValueError,
             r"all_reduce: expected CUDA tensors; CPU tensors go through the gloo path of tpext\.Group"),
        Case("op linear: activation 'relu'",
             lambda: torch.ops.tpext.linear(f32(4, w.shape[1]), w, None, "relu"), ValueError,
             r"linear: activation: expected 'none' or 'gelu', got 'relu'"),
        Case("op row_parallel_linear: input width not weight's",
             lambda: torch.ops.tpext.row_parallel_linear(f32(4, w.shape[1] + 1), w, None, h, 0), ValueError,
             rf"row_parallel_linear: input: expected last dimension {w.shape[1]} \(weight\.shape\[1\]"),
        Case("op row_parallel_linear: float16 weight, float32 input",
             lambda: torch.ops.tpext.row_parallel_linear(f32(4, w.shape[1]), w.detach().half(), None, h, 0),
             ValueError, r"row_parallel_linear: weight: expected dtype Float \(the dtype of input\), got Half"),
    ]
    other = _other_gpu(d)
    if other is not None:
        cases += [
            Case(f"all_reduce: a tensor on another GPU", lambda: g.all_reduce(torch.ones(4, device=other)), ValueError,
                 rf"all_reduce: tensor: expected a tensor on {d} \(the GPU of group 'tp'.*\), got one on {other}"),
            Case(f"ColumnParallelLinear: input on another GPU", lambda: fx.col(torch.ones(4, HIDDEN, device=other)),
                 ValueError, rf"ColumnParallelLinear: input: expected a tensor on {d} \(where weight is\), got one on "
                             rf"{other}"),
            Case(f"ColumnParallelLinear: device another GPU",
                 lambda: tpext.ColumnParallelLinear(HIDDEN, 4, group=g, device=other), ValueError,
                 rf"ColumnParallelLinear: device: expected {d} \(the GPU of Group\('tp'"),
        ]
    return cases


# -- after tpext.destroy -------------------------------------------------------------------------


def destroyed_cases(old: dict, device: torch.device) -> List[Case]:
    """`old`: groups, layers and handles from before tpext.destroy()."""
    tp, dp, world, fx = old["tp"], old["dp"], old["world"], old["fixture"]
    x = torch.ones(4, HIDDEN, device=device)
    cases = [
        Case("tp group after destroy: all_reduce", lambda: tp.all_reduce(torch.ones(4, device=device)), RuntimeError,
             r"all_reduce: group 'tp' was destroyed by tpext\.destroy\(\); call tpext\.init\(\) again"),
        Case("dp group after destroy: all_gather", lambda: dp.all_gather(torch.ones(4, device=device)), RuntimeError,
             r"all_gather: group 'dp' was destroyed by tpext\.destroy\(\)"),
        Case("world group after destroy: broadcast", lambda: world.broadcast(torch.ones(4, device=device), 0),
             RuntimeError, r"broadcast: group 'world' was destroyed by tpext\.destroy\(\)"),
        Case("ColumnParallelLinear after destroy: forward", lambda: fx.col(x), RuntimeError,
             r"ColumnParallelLinear: group: 'tp' was destroyed by tpext\.destroy\(\); call tpext\.init\(\) again and "
             r"rebuild the layer"),
        Case("ParallelMLP after destroy: forward", lambda: fx.mlp(x), RuntimeError,
             r"ParallelMLP: group: 'tp' was destroyed by tpext\.destroy\(\)"),
        Case("a layer on a destroyed group", lambda: tpext.RowParallelLinear(6, HIDDEN, group=tp), RuntimeError,
             r"RowParallelLinear: group: 'tp' was destroyed by tpext\.destroy\(\)"),
        Case("reduce_from_tensor_parallel_region on a destroyed group",
             lambda: tpext.reduce_from_tensor_parallel_region(x, tp), RuntimeError,
             r"reduce_from_tensor_parallel_region: group: 'tp' was destroyed"),
    ]
    if device.type == "cuda":
        h = old["tp_handle"]
        cases.append(Case("op all_reduce_ on a destroyed communicator's handle",
                          lambda: torch.ops.tpext.all_reduce_(torch.ones(4, device=device), h, "sum"), ValueError,
                          rf"comm: no live communicator has handle {h} \(destroyed by tpext\.destroy\(\)"))
    return cases


# -- the driver ----------------------------------------------------------------------------------


def _raises(case: Case) -> None:
    try:
        case.call()
    except case.exc as e:
        assert re.search(case.pattern, str(e)), \
            f"{case.name}: the message does not match {case.pattern!r}:\n  {type(e).__name__}: {e}"
        return
    except Exception as e:
        raise AssertionError(f"{case.name}: expected {case.exc.__name__} matching {case.pattern!r}, got "
                             f"{type(e).__name__}: {e}") from e
    raise AssertionError(f"{case.name}: expected {case.exc.__name__} matching {case.pattern!r}; nothing was raised")


def _usable(fx: Fixture, tag: str) -> None:
    """The group still reduces right and the MLP still gives what it gave before the case."""
    valid_all_reduce(fx.group, fx.device, tag)
    with torch.no_grad():
        y = fx.mlp(fx.x)
    assert torch.equal(y, fx.y), f"{tag}: ParallelMLP output changed after a rejected call " \
                                 f"(max diff {(y - fx.y).abs().max().item()})"


def run_table(backend: str, tp_size: int, device_of: Callable[[tpext.Group], torch.device], tag: str) -> dict:
    """Runs every case of the three phases on this rank; returns {phase: [case names]}."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ran = {"before init": [], "initialised": [], "after destroy": []}

    # Before init: nothing may be left half-created.
    for case in pre_init_cases(world, backend):
        _raises(case)
        assert not tpext.is_initialized() and not dist.is_initialized(), f"{case.name}: left state behind"
        ran["before init"].append(case.name)

    tp = tpext.init(tp_size=tp_size, backend=backend, timeout=60)
    device = device_of(tp)
    fx = Fixture(tp, device)
    failures = []  # every failing case is reported, not only the first
    for case in live_cases(fx):
        before = {g: g.stats() for g in (tp, tpext.get_dp_group(), tpext.get_world_group())}
        try:
            _raises(case)
            for g, stats in before.items():
                assert g.stats() == stats, f"{case.name}: a collective was counted on {g} (enqueued) before the " \
                                           f"error: {stats} -> {g.stats()}"
        except AssertionError as e:
            failures.append(str(e))
        _usable(fx, f"{tag}/{case.name}")
        ran["initialised"].append(case.name)
    assert not failures, f"{len(failures)} bad inputs were not rejected as expected:\n" + "\n".join(failures)
    if device.type == "cuda":
        torch.cuda.synchronize()

    old = {"tp": tp, "dp": tpext.get_dp_group(), "world": tpext.get_world_group(), "fixture": fx,
           "tp_handle": tp._nccl}
    tpext.destroy()
    for case in destroyed_cases(old, device):
        _raises(case)
        ran["after destroy"].append(case.name)

    # And after init again: the fresh groups work, the old ones stay dead.
    tp = tpext.init(tp_size=tp_size, backend=backend, timeout=60)
    fresh = Fixture(tp, device_of(tp))
    _usable(fresh, f"{tag}/after re-init")
    for case in destroyed_cases(old, device)[:4]:
        _raises(case)
    if device.type == "cuda":
        torch.cuda.synchronize()
    tpext.destroy()
    if device.type == "cuda":
        assert tpext._C.live_handles() == [], f"communicators left after destroy: {tpext._C.live_handles()}"
    return ran
