"""ColumnParallelLinear, RowParallelLinear and the region mappings on CPU tensors (gloo), TP 1 to 4.

Each check builds the full nn.Linear every rank agrees on (seeded by the check's name only), shards
it with from_linear, runs the TP layer, and compares the output and every gradient (the sharded
ones all-gathered) with the same full layer run in float64 by autograd. Sizes cover even splits,
uneven ones (7 inputs, 10 outputs on TP 3 and 4) and an empty shard (3 features on TP 4).

The checks take the device and group, so test_layers_gpu.py runs the very same ones through NCCL
and the native ops. One launch per TP size runs all of them: CI has two cores, and starting the
processes costs more than the checks.
"""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import tpext
from _dist import launch
from _reference import assert_exact, assert_reduced, make_input, seed_of

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Max-norm relative error allowed against the float64 reference: a few roundings of the dtype
# (eps: fp32 1.2e-7, fp16 9.8e-4, bf16 7.8e-3) over sums of at most a few dozen terms, with room.
RTOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float64: 1e-12}
# (in_features, out_features): even on TP 1, 2, 4; uneven on 3 and 4; an empty shard on TP 4.
SIZES = ((8, 12), (7, 10), (3, 3))
LEADING = (2, 3)  # N-d inputs: the layers flatten the leading dims
# (world size, TP sizes run one after the other in that launch): starting processes dominates the
# cost on CI's two cores, so one launch re-initialises tpext for several TP sizes. World 4 with TP 2
# runs two TP groups side by side; with TP 1, four.
LAUNCHES = [(4, (1, 2, 4)), (3, (3,))]


def launch_ids(launches):
    return [f"world{w}-tp" + ",".join(map(str, t)) for w, t in launches]


# -- helpers shared with test_mlp.py and test_layers_gpu.py --------------------------------------


def tensor_split_sizes(total: int, parts: int):
    """The split the layers must use, written independently of tpext."""
    return [len(c) for c in torch.arange(total).tensor_split(parts)]


def full_tensor(tag: str, shape, dtype) -> torch.Tensor:
    """The same fresh random tensor (never zeros) on every rank: seeded by `tag` only."""
    return make_input(tag, 0, shape, dtype)


def full_linear(tag: str, in_f: int, out_f: int, bias: bool, dtype) -> nn.Linear:
    torch.manual_seed(seed_of(tag, 0))
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


def leaf(t: torch.Tensor, device) -> torch.Tensor:
    """A fresh copy on `device` that collects its own gradient (never an alias of `t`)."""
    return t.to(device, copy=True).requires_grad_()


def my_slice(t: torch.Tensor, group, dim: int = -1) -> torch.Tensor:
    return t.tensor_split(group.size, dim=dim)[group.rank].contiguous()


def reference(fn, x: torch.Tensor, params, grad: torch.Tensor):
    """fn(x, *params) and its gradients, in float64 on the CPU from the very same values."""
    x64 = x.detach().cpu().double().requires_grad_()
    p64 = [p.detach().cpu().double().requires_grad_() if p is not None else None for p in params]
    y = fn(x64, *p64)
    y.backward(grad.detach().cpu().double())
    return y.detach(), x64.grad, [p.grad if p is not None else None for p in p64]


def magnitudes(fn, x: torch.Tensor, params, grad: torch.Tensor):
    """reference() of the absolute values: for a linear layer, per element of the output and of each
    gradient, the sum of the absolute values of the products it adds up (|x| |W|^T + |b|, |g| |W|,
    |g|^T |x|, sum |g|). Rounding error in a sum scales with that, not with the sum itself, which
    cancellation can make arbitrarily small (seen on 2 GPUs: a weight-gradient element of 2.3e-4 made
    of six products up to 1.7 in size, whose float32 sum is off by 1.4e-8 in any order)."""
    return reference(fn, x.detach().abs(), [p.detach().abs() if p is not None else None for p in params],
                     grad.detach().abs())


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, dtype, what: str, rtol=None,
                     terms: torch.Tensor = None) -> None:
    """|actual - expected| <= rtol * max|expected| everywhere (expected in float64; rtol defaults
    to RTOL[dtype]); where `terms` (magnitudes()) is given, an element may also be off by rtol times
    its own sum of absolute terms, when that is larger."""
    rtol = RTOL[dtype] if rtol is None else rtol
    assert actual is not None, f"{what}: no gradient"
    assert tuple(actual.shape) == tuple(expected.shape), \
        f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    if expected.numel() == 0:
        return
    err = (actual.detach().cpu().double() - expected).abs()
    scale = expected.abs().max().item()
    bound = torch.full_like(err, rtol * scale)
    if terms is not None:
        bound = torch.maximum(bound, rtol * terms.double())
    bad = (err > bound).flatten().nonzero()
    assert bad.numel() == 0, (f"{what}: |error| {err.flatten()[bad[0]].item():.3g} at flat index {int(bad[0])} "
                              f"> {rtol:g} * max(max |expected| = {scale:.3g}, that element's sum of |terms|); "
                              f"max |error| {err.max().item():.3g}")


def assert_partition(param, dim, sizes, group, what: str, stride: int = 1) -> None:
    assert tpext.is_tensor_parallel(param) and param.tensor_model_parallel is True, \
        f"{what}: not marked tensor-parallel"
    assert param.partition_dim == dim, f"{what}: partition_dim {param.partition_dim}, expected {dim}"
    assert tuple(param.partition_sizes) == tuple(sizes), \
        f"{what}: partition_sizes {param.partition_sizes}, expected {sizes}"
    assert param.partition_stride == stride, f"{what}: partition_stride {param.partition_stride}, expected {stride}"
    assert param.shape[dim] == stride * sizes[group.rank], \
        f"{what}: local shape {tuple(param.shape)}, expected {stride * sizes[group.rank]} along dim {dim}"


def assert_replicated(param, what: str) -> None:
    assert not tpext.is_tensor_parallel(param) and param.tensor_model_parallel is False, \
        f"{what}: a replicated parameter must not be marked tensor-parallel"
    assert param.partition_dim is None, f"{what}: partition_dim {param.partition_dim}, expected None"


def assert_counts(group, expected: dict, what: str, nbytes: dict = None) -> None:
    """Exactly `expected` calls per collective kind on `group` since the last reset, the same in
    tpext.stats() (only this group worked), and `nbytes` where given."""
    for source, got in (("group", tpext.stats(group)), ("tpext.stats()", tpext.stats())):
        calls = {k: v["calls"] for k, v in got.items() if v["calls"]}
        assert calls == expected, f"{what}: {source} counted {calls}, expected {expected}"
        for kind, b in (nbytes or {}).items():
            assert got[kind]["bytes"] == b, f"{what}: {source} {kind} bytes {got[kind]['bytes']}, expected {b}"


def _linear(x, w, b=None, act=None):
    y = F.linear(x, w, b)
    return F.gelu(y, approximate="tanh") if act == "gelu" else y


# -- the checks (any device) -------------------------------------------------------------------


def check_no_grad_forward(layer, x, group, counts: dict, expected, terms, dtype, what: str) -> None:
    """The layer under torch.no_grad() (the inference path, which skips the autograd Functions):
    no graph recorded, the same collectives and the same output as the training forward."""
    tpext.reset_stats()
    with torch.no_grad():
        y = layer(x)
    assert y.grad_fn is None and not y.requires_grad, f"{what}: the no_grad forward recorded a graph"
    assert_counts(group, counts, f"{what}: no_grad forward")
    assert_close_rel(y, expected, dtype, f"{what}: no_grad output", terms=terms)


def this_rank(sliced: bool, group):
    """What of a full reference tensor this rank holds: its slice of the last dim, or all of it."""
    return (lambda t: my_slice(t, group)) if sliced else (lambda t: t)


def check_column(group, device, tag, dtype, bias, gather_output, in_f, out_f, activation=None):
    name = f"{tag}/column/{dtype}/bias={bias}/gather={gather_output}/act={activation}/{in_f}->{out_f}"
    what = f"{name} (tp rank {group.rank} of {group.size})"
    lin = full_linear(name, in_f, out_f, bias, dtype)
    layer = tpext.ColumnParallelLinear.from_linear(lin, group, gather_output=gather_output, activation=activation)
    assert layer.weight.device == device and layer.weight.dtype == dtype, f"{what}: weight on {layer.weight.device}"
    sizes = tensor_split_sizes(out_f, group.size)
    assert_partition(layer.weight, 0, sizes, group, f"{what}: weight")
    assert_exact(tpext.gather_shards(layer.weight, group=group).cpu(), lin.weight.detach(), f"{what}: gathered weight")
    if bias:
        assert_partition(layer.bias, 0, sizes, group, f"{what}: bias")
        assert_exact(tpext.gather_shards(layer.bias, group=group).cpu(), lin.bias.detach(), f"{what}: gathered bias")

    x = leaf(full_tensor(f"{name}/x", LEADING + (in_f,), dtype), device)
    g_full = full_tensor(f"{name}/g", LEADING + (out_f,), dtype)
    fn = lambda x, w, b: _linear(x, w, b, activation)  # noqa: E731
    y_ref, dx_ref, (dw_ref, db_ref) = reference(fn, x, [lin.weight, lin.bias], g_full)
    y_terms, dx_terms, (dw_terms, db_terms) = magnitudes(fn, x, [lin.weight, lin.bias], g_full)
    mine = this_rank(not gather_output, group)
    tpext.reset_stats()
    y = layer(x)
    assert_counts(group, {"all_gather": 1} if gather_output else {}, f"{what}: forward")
    assert_close_rel(y, mine(y_ref), dtype, f"{what}: output", terms=mine(y_terms))
    check_no_grad_forward(layer, x, group, {"all_gather": 1} if gather_output else {}, mine(y_ref), mine(y_terms),
                          dtype, what)
    tpext.reset_stats()
    y.backward(mine(g_full).to(device))
    assert_counts(group, {"all_reduce": 1}, f"{what}: backward", {"all_reduce": x.numel() * x.element_size()})
    assert_close_rel(x.grad, dx_ref, dtype, f"{what}: input grad", terms=dx_terms)
    assert_close_rel(tpext.gather_shards(layer.weight.grad, layer.weight, group), dw_ref, dtype, f"{what}: weight grad",
                     terms=dw_terms)
    if bias:
        assert_close_rel(tpext.gather_shards(layer.bias.grad, layer.bias, group), db_ref, dtype, f"{what}: bias grad",
                         terms=db_terms)


def check_row(group, device, tag, dtype, bias, input_is_parallel, in_f, out_f, chunks=0):
    name = f"{tag}/row/{dtype}/bias={bias}/parallel_in={input_is_parallel}/{in_f}->{out_f}"
    what = f"{name}/chunks={chunks} (tp rank {group.rank} of {group.size})"
    lin = full_linear(name, in_f, out_f, bias, dtype)
    layer = tpext.RowParallelLinear.from_linear(lin, group, input_is_parallel=input_is_parallel, chunks=chunks)
    assert layer.weight.device == device and layer.weight.dtype == dtype, f"{what}: weight on {layer.weight.device}"
    assert_partition(layer.weight, 1, tensor_split_sizes(in_f, group.size), group, f"{what}: weight")
    assert_exact(tpext.gather_shards(layer.weight, group=group).cpu(), lin.weight.detach(), f"{what}: gathered weight")
    if bias:
        assert_replicated(layer.bias, f"{what}: bias")
        assert_exact(layer.bias.detach().cpu(), lin.bias.detach(), f"{what}: bias")

    x_full = full_tensor(f"{name}/x", LEADING + (in_f,), dtype)
    x = leaf(my_slice(x_full, group) if input_is_parallel else x_full, device)
    g = full_tensor(f"{name}/g", LEADING + (out_f,), dtype)
    y_ref, dx_ref, (dw_ref, db_ref) = reference(_linear, x_full, [lin.weight, lin.bias], g)
    y_terms, dx_terms, (dw_terms, db_terms) = magnitudes(_linear, x_full, [lin.weight, lin.bias], g)
    tpext.reset_stats()
    y = layer(x)
    # chunks > 0 cuts the native all-reduce into (at most) that many pieces; the bytes stay the same.
    if chunks == 0:
        assert_counts(group, {"all_reduce": 1}, f"{what}: forward", {"all_reduce": y.numel() * y.element_size()})
    else:
        assert tpext.stats(group)["all_reduce"]["bytes"] == y.numel() * y.element_size(), f"{what}: forward bytes"
    assert_close_rel(y, y_ref, dtype, f"{what}: output", terms=y_terms)
    if chunks == 0:
        # A full input is sliced, not communicated: one all-reduce either way.
        check_no_grad_forward(layer, x, group, {"all_reduce": 1}, y_ref, y_terms, dtype, what)
    tpext.reset_stats()
    y.backward(g.to(device))
    assert_counts(group, {} if input_is_parallel else {"all_gather": 1}, f"{what}: backward")
    mine = this_rank(input_is_parallel, group)
    assert_close_rel(x.grad, mine(dx_ref), dtype, f"{what}: input grad", terms=mine(dx_terms))
    assert_close_rel(tpext.gather_shards(layer.weight.grad, layer.weight, group), dw_ref, dtype, f"{what}: weight grad",
                     terms=dw_terms)
    if bias:
        assert_close_rel(layer.bias.grad, db_ref, dtype, f"{what}: bias grad (replicated)", terms=db_terms)
    return y.detach()


def check_layers(group, device, tag, dtypes=DTYPES, sizes=SIZES):
    for dtype in dtypes:
        for in_f, out_f in sizes:
            for bias in (True, False):
                for flag in (False, True):
                    check_column(group, device, tag, dtype, bias, flag, in_f, out_f)
                    check_row(group, device, tag, dtype, bias, flag, in_f, out_f)
        for gather_output in (False, True):
            check_column(group, device, tag, dtype, True, gather_output, 7, 10, activation="gelu")


def check_mappings(group, device, tag, dtype, width=7):
    """The four region crossings against what each rank can compute from every member's seeded
    inputs: sums through assert_reduced's bound, data movements bit for bit."""
    t = f"{tag}/mappings/{dtype}/w{width}"
    what = f"{t} (tp rank {group.rank} of {group.size})"
    shape = LEADING + (width,)
    sizes = tensor_split_sizes(width, group.size)
    xs = [make_input(f"{t}/x", r, shape, dtype) for r in group.ranks]
    gs = [make_input(f"{t}/g", r, shape, dtype) for r in group.ranks]
    me = group.rank

    x = leaf(xs[me], device)
    y = tpext.copy_to_tensor_parallel_region(x, group)
    assert_exact(y.detach().cpu(), xs[me], f"{what}: copy_to forward")
    y.backward(gs[me].to(device))
    assert_reduced(x.grad, gs, "sum", f"{what}: copy_to backward")

    x = leaf(xs[me], device)
    y = tpext.reduce_from_tensor_parallel_region(x, group)
    assert_reduced(y, xs, "sum", f"{what}: reduce_from forward")
    assert_exact(x.detach().cpu(), xs[me], f"{what}: reduce_from must leave its input alone")
    y.backward(gs[me].to(device))
    assert_exact(x.grad.cpu(), gs[me], f"{what}: reduce_from backward")

    x = leaf(xs[0], device)  # the full tensor every rank holds
    y = tpext.scatter_to_tensor_parallel_region(x, group)
    assert_exact(y.detach().cpu(), my_slice(xs[0], group), f"{what}: scatter_to forward")
    y.backward(my_slice(gs[me], group).to(device))  # each rank's gradient for its own slice
    expected = torch.cat([gs[r].tensor_split(group.size, dim=-1)[r] for r in range(group.size)], dim=-1)
    assert_exact(x.grad.cpu(), expected, f"{what}: scatter_to backward")

    x = leaf(xs[me][..., :sizes[me]].contiguous(), device)
    y = tpext.gather_from_tensor_parallel_region(x, group, sizes=sizes)
    expected = torch.cat([xs[r][..., :sizes[r]] for r in range(group.size)], dim=-1)
    assert_exact(y.detach().cpu(), expected, f"{what}: gather_from forward")
    y.backward(gs[0].to(device))
    assert_exact(x.grad.cpu(), my_slice(gs[0], group), f"{what}: gather_from backward")


def check_fresh_init(group, device, tag, dtype):
    """Built under torch.manual_seed(s), a TP layer gathers to the nn.Linear built under the same
    seed, bit for bit, and leaves the RNG where nn.Linear leaves it."""
    for in_f, out_f in SIZES:
        for bias in (True, False):
            for cls, dim in ((tpext.ColumnParallelLinear, 0), (tpext.RowParallelLinear, 1)):
                name = f"{tag}/init/{cls.__name__}/{dtype}/bias={bias}/{in_f}->{out_f}"
                what = f"{name} (tp rank {group.rank})"
                s = seed_of(name, 0)  # the same on every rank
                torch.manual_seed(s)
                layer = cls(in_f, out_f, bias, group=group, device=device, dtype=dtype)
                after = torch.rand(4, device=device)
                torch.manual_seed(s)
                ref = nn.Linear(in_f, out_f, bias, device=device, dtype=dtype)
                assert_exact(after.cpu(), torch.rand(4, device=device).cpu(), f"{what}: RNG state after construction")
                assert layer.weight.device == device, f"{what}: weight on {layer.weight.device}, expected {device}"
                assert_exact(tpext.gather_shards(layer.weight, group=group).cpu(), ref.weight.detach().cpu(),
                             f"{what}: weight")
                if bias:
                    assert_exact(tpext.gather_shards(layer.bias, group=group).cpu(), ref.bias.detach().cpu(),
                                 f"{what}: bias")


# -- CPU, several processes --------------------------------------------------------------------


def for_each_tp_size(tp_sizes, check) -> None:
    """check(group, tag) under tpext.init(tp_size=t) for each t in turn. The default process group
    is ours, so tpext.destroy() leaves it up between the TP sizes: re-creating it from env:// while
    a slower rank still holds the old one races (see the report to the lead)."""
    world = int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=60))
    try:
        for tp_size in tp_sizes:
            tpext.init(tp_size=tp_size, backend="gloo", timeout=60)
            check(tpext.get_tp_group(), f"cpu/w{world}/tp{tp_size}")
            tpext.destroy()
    finally:
        dist.destroy_process_group()


def _layers_checks(group, tag):
    device = torch.device("cpu")
    check_layers(group, device, tag)
    for dtype in (torch.float32, torch.bfloat16):
        check_mappings(group, device, tag, dtype)
        check_fresh_init(group, device, tag, dtype)
    check_mappings(group, device, tag, torch.float32, width=8)


def layers_body(tp_sizes):
    for_each_tp_size(tp_sizes, _layers_checks)


@pytest.mark.parametrize("world_size, tp_sizes", LAUNCHES, ids=launch_ids(LAUNCHES))
def test_layers_match_nn_linear(world_size, tp_sizes):
    launch(layers_body, world_size, args=(tp_sizes,), timeout_s=240)


# -- one process: layouts, errors ------------------------------------------------------------------


@pytest.mark.parametrize("total", range(0, 13))
def test_split_sizes_is_tensor_split(total):
    for parts in range(1, 6):
        assert tpext.split_sizes(total, parts) == tensor_split_sizes(total, parts), f"split_sizes({total}, {parts})"


def test_shard_unshard_round_trip():
    from tpext.partition import shard, unshard
    full = torch.arange(2 * 10 * 3).reshape(20, 3)  # two stacked blocks of 10 rows
    for parts in (1, 3, 4):
        for stride in (1, 2):
            pieces = [shard(full, 0, r, parts, stride) for r in range(parts)]
            blocks = full.chunk(stride)
            for r, p in enumerate(pieces):
                expected = torch.cat([b.tensor_split(parts)[r] for b in blocks])
                assert torch.equal(p, expected), f"shard rank {r} of {parts}, stride {stride}"
            assert torch.equal(unshard(pieces, 0, stride), full), f"unshard of {parts} parts, stride {stride}"


@pytest.fixture
def single():
    tpext.init(backend="gloo")
    yield tpext.get_tp_group()
    tpext.destroy()


def test_bad_inputs_raise_before_any_work(single):
    col = tpext.ColumnParallelLinear(4, 6)
    row = tpext.RowParallelLinear(6, 4)
    row_full = tpext.RowParallelLinear(6, 4, input_is_parallel=False)
    mlp = tpext.ParallelMLP(4, 6)
    cases = [
        (col, torch.randn(2, 4, dtype=torch.float64), r"ColumnParallelLinear: input: expected dtype torch.float32 "
                                                      r"\(the dtype of weight\), got torch.float64"),
        (col, torch.randint(0, 5, (2, 4)), r"input: expected dtype torch.float32 .* got torch.int64"),
        (row, torch.randn(2, 6, dtype=torch.bfloat16), r"RowParallelLinear: input: expected dtype torch.float32"),
        (col, torch.randn(2, 4, device="meta"),
         r"input: expected a tensor on cpu \(where weight is\), got one on meta"),
        (col, torch.randn(2, 5), r"input: expected last dimension 4 \(in_features\), got shape \(2, 5\)"),
        (row, torch.randn(2, 4), r"input: expected last dimension 6 \(this rank's shard of in_features=6"),
        (row_full, torch.randn(2, 5), r"input: expected last dimension 6 \(in_features, input_is_parallel=False\)"),
        (col, torch.randn(4, 2).t(), r"input: expected a contiguous tensor"),
        (row_full, torch.randn(6, 2).t(), r"input: expected a contiguous tensor"),
        (col, torch.tensor(1.0), r"input: expected at least one dimension"),
        (mlp, torch.randn(3, 5), r"input: expected last dimension 4"),
        (mlp, torch.randn(3, 4, dtype=torch.float16), r"input: expected dtype torch.float32"),
    ]
    for layer, x, pattern in cases:
        tpext.reset_stats()
        x = x.requires_grad_() if x.dtype.is_floating_point and x.device.type == "cpu" else x
        with pytest.raises(ValueError, match=pattern):
            layer(x)
        assert all(v["calls"] == 0 for v in tpext.stats().values()), f"{pattern}: a collective ran before the error"
    with pytest.raises(TypeError, match=r"input: expected a torch.Tensor, got list"):
        col([1.0, 2.0, 3.0, 4.0])
    assert all(p.grad is None for m in (col, row, row_full, mlp) for p in m.parameters())


@pytest.mark.parametrize("make, exc, pattern", [
    (lambda: tpext.ColumnParallelLinear(0, 4), ValueError,
     r"ColumnParallelLinear: in_features: expected a positive int, got 0"),
    (lambda: tpext.ColumnParallelLinear(4, -2), ValueError, r"out_features: expected a positive int, got -2"),
    (lambda: tpext.RowParallelLinear(-1, 4), ValueError, r"RowParallelLinear: in_features: expected a positive int"),
    (lambda: tpext.RowParallelLinear(4, 0), ValueError, r"out_features"),
    (lambda: tpext.ColumnParallelLinear(4.0, 4), TypeError, r"in_features: expected an int, got float"),
    (lambda: tpext.ColumnParallelLinear(4, 4, activation="relu"), ValueError, r"activation: expected None or 'gelu'"),
    (lambda: tpext.RowParallelLinear(4, 4, chunks=-1), ValueError, r"chunks: expected an int >= 0"),
    (lambda: tpext.RowParallelLinear(4, 4, chunk_by="diagonal"), ValueError,
     r"chunk_by: expected one of 'auto', 'rows', 'columns', got 'diagonal'"),
    (lambda: tpext.ParallelMLP(4, 8, chunk_by=2), ValueError, r"chunk_by: expected one of"),
    (lambda: tpext.ColumnParallelLinear(4, 4, dtype=torch.int64), ValueError, r"dtype: expected a floating-point"),
    (lambda: tpext.ColumnParallelLinear(4, 4, device="cuda"), ValueError,
     r"device: expected cpu .* no NCCL communicator"),
    (lambda: tpext.ColumnParallelLinear(4, 4, group="tp"), TypeError, r"group: expected a tpext.Group"),
    (lambda: tpext.ColumnParallelLinear.from_linear(nn.Conv1d(2, 2, 1)), TypeError,
     r"linear: expected a torch.nn.Linear"),
    (lambda: tpext.ParallelMLP(0, 4), ValueError, r"ParallelMLP: hidden: expected a positive int"),
    (lambda: tpext.ParallelMLP(4, 0), ValueError, r"ffn_hidden: expected a positive int"),
    (lambda: tpext.ParallelMLP(4, 8, activation="relu"), ValueError, r"activation: expected 'gelu' or 'swiglu'"),
    (lambda: tpext.ParallelMLP.from_linears([nn.Linear(4, 8)]), ValueError,
     r"linears: expected 2 nn.Linear \(fc1, fc2\)"),
    (lambda: tpext.ParallelMLP.from_linears([nn.Linear(4, 8), nn.Linear(4, 8)]), ValueError,
     r"fc2: expected in_features=8, out_features=4"),
    (lambda: tpext.ParallelMLP.from_linears([nn.Linear(4, 8), nn.Linear(8, 4, bias=False)]), ValueError,
     r"fc2: expected a bias"),
    (lambda: tpext.ParallelMLP.from_linears([nn.Linear(4, 8), nn.Linear(8, 4).double()]), ValueError,
     r"fc2: expected dtype torch.float32"),
    (lambda: tpext.ParallelMLP.from_linears([nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 4)], "swish"),
     ValueError, r"activation: expected 'gelu' or 'swiglu'"),
    (lambda: tpext.ParallelMLP.from_linears([nn.Linear(4, 8), nn.Linear(4, 6), nn.Linear(8, 4)], "swiglu"),
     ValueError, r"up: expected in_features=4, out_features=8"),
    (lambda: tpext.ParallelMLP.from_mlp(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))), ValueError,
     r"mlp: expected nn.Linear attributes named gelu: fc1/fc2"),
    (lambda: tpext.gather_from_tensor_parallel_region(torch.randn(2, 3), sizes=[2]), ValueError,
     r"gather_from_tensor_parallel_region: input: expected last dimension 2"),
])
def test_bad_arguments(single, make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make()


@pytest.mark.parametrize("call", [
    lambda: tpext.ColumnParallelLinear(4, 4),
    lambda: tpext.RowParallelLinear(4, 4),
    lambda: tpext.ParallelMLP(4, 8),
    lambda: tpext.ColumnParallelLinear.from_linear(nn.Linear(4, 4)),
    lambda: tpext.copy_to_tensor_parallel_region(torch.randn(2)),
    lambda: tpext.reduce_from_tensor_parallel_region(torch.randn(2)),
    lambda: tpext.scatter_to_tensor_parallel_region(torch.randn(2)),
    lambda: tpext.gather_from_tensor_parallel_region(torch.randn(2)),
    lambda: tpext.stats(),
    lambda: tpext.reset_stats(),
], ids=["column", "row", "mlp", "from_linear", "copy_to", "reduce_from", "scatter_to", "gather_from", "stats",
        "reset_stats"])
def test_uninitialised_names_tpext_init(call):
    with pytest.raises(RuntimeError, match=r"tpext is not initialised; call tpext\.init\(\) first"):
        call()


def test_destroyed_group_is_named():
    tpext.init(backend="gloo")
    col = tpext.ColumnParallelLinear(4, 4)
    tpext.destroy()
    with pytest.raises(RuntimeError,
                       match=r"group: 'tp' was destroyed by tpext.destroy\(\); call tpext.init\(\) again"):
        col(torch.randn(2, 4))


def test_float64_and_frozen_weights(single):
    """float64 layers run the torch path; frozen weights get no gradient and the input still does."""
    lin = full_linear("single/f64", 5, 6, True, torch.float64).requires_grad_(False)
    col = tpext.ColumnParallelLinear.from_linear(lin)
    assert col.weight.dtype == torch.float64
    assert not any(p.requires_grad for p in col.parameters()), "from_linear must keep a frozen layer frozen"
    x = full_tensor("single/f64/x", (3, 5), torch.float64).requires_grad_()
    g = full_tensor("single/f64/g", (3, 6), torch.float64)
    y = col(x)
    y.backward(g)
    torch.testing.assert_close(y.detach(), lin(x).detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, g @ lin.weight.detach(), rtol=1e-12, atol=1e-12)
    assert col.weight.grad is None and col.bias.grad is None


def test_from_linear_copies_the_weights(single):
    lin = nn.Linear(4, 6)
    col = tpext.ColumnParallelLinear.from_linear(lin)
    row = tpext.RowParallelLinear.from_linear(lin)
    before = [t.detach().clone() for t in (col.weight, col.bias, row.weight, row.bias)]
    with torch.no_grad():
        lin.weight.add_(1.0)
        lin.bias.add_(1.0)
    after = [col.weight, col.bias, row.weight, row.bias]
    assert all(torch.equal(a, b) for a, b in zip(after, before)), "from_linear must copy, not alias, the full weights"


# The process-wide tuning knobs (tpext/tuning.py): each off (0) by default; bad values name the
# argument and change nothing. Per knob: setter, getter, why the default is 0, out-of-range values
# with the ValueError they raise, wrongly typed values with the TypeError, a good value.
TUNING_KNOBS = {
    "overlap_sms": (tpext.set_overlap_sms, tpext.overlap_sms, "the default leaves the GEMMs' SM count to cuBLASLt",
                    (-1,), r"\bsms\b.*>= 0", (1.5, "16", True), r"\bsms\b", 16),
    # 0 takes the core's default tail weight.
    "row_tail_weight": (tpext.set_row_tail_weight, tpext.row_tail_weight, "0 leaves the last piece to the default",
                        (-0.5, 1.5, float("nan")), r"\bweight\b.*\(0, 1\]", ("0.5", True, None), r"\bweight\b",
                        0.5),
    # Off by default: results stay bitwise reproducible across runs.
    "gemm_autotune": (tpext.set_gemm_autotune, tpext.gemm_autotune, "autotuning must be opt-in",
                      (-1, 17), r"\bcandidates\b.*0 \(off\) to 16", (2.0, "8", True), r"\bcandidates\b", 8),
    # 0 is the short timing: tuning under sustained load costs seconds per GEMM shape.
    "gemm_autotune_sustain_ms": (tpext.set_gemm_autotune_sustain_ms, tpext.gemm_autotune_sustain_ms,
                                 "the sustained timing must be asked for", (-1, 10001),
                                 r"\bms\b.*0 \(the short timing\) to 10000", (50.0, "50", False, None), r"\bms\b",
                                 50),
}


@pytest.mark.parametrize("knob", sorted(TUNING_KNOBS))
def test_tuning_knob_is_validated_and_kept(knob):
    set_knob, get_knob, why_off, out_of_range, range_error, wrong_types, type_error, good = TUNING_KNOBS[knob]
    assert get_knob() == 0, why_off
    try:
        for bad in out_of_range:
            with pytest.raises(ValueError, match=range_error):
                set_knob(bad)
        for bad in wrong_types:
            with pytest.raises(TypeError, match=type_error):
                set_knob(bad)
        assert get_knob() == 0
        set_knob(good)
        assert get_knob() == good
    finally:
        set_knob(0)
