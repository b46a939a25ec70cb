"""ParallelMLP (gelu and swiglu) on CPU tensors (gloo), TP 1 to 4, against the full MLP.

The full MLPs below are what a single-GPU model holds: fc2(gelu_tanh(fc1(x))) and Llama's
down(silu(gate(x)) * up(x)). Each check shards one (seeded by the check's name only, so every rank
holds the same), runs the parallel MLP, and compares the output and every gradient (the sharded
ones all-gathered) with the full MLP run in float64 by autograd; it also counts the collectives:
exactly one all-reduce forward and one backward, on the TP group.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tpext
from _dist import launch
from _reference import assert_exact, seed_of
from test_layers import (DTYPES, LAUNCHES, LEADING, assert_close_rel, assert_counts, assert_partition,
                         assert_replicated, for_each_tp_size, full_tensor, launch_ids, leaf, reference,
                         tensor_split_sizes)

# (hidden, ffn_hidden): even on TP 1, 2, 4; uneven on 3 and 4; an empty ffn shard on TP 4.
MLP_SIZES = ((8, 12), (7, 10), (5, 3))
# Two GEMMs and an activation between them: the gradients go through about twice the roundings of
# one linear layer, and the bias gradients are sums over rows that cancel, so their max is small
# next to the terms' (seen on the CPU: bf16 errors up to 1.5e-2 of max |expected|, fp16 1.7e-3).
MLP_RTOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}


class FullGeluMLP(nn.Module):
    def __init__(self, hidden, ffn, bias=True, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(hidden, ffn, bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(ffn, hidden, bias, device=device, dtype=dtype)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class FullSwiGLU(nn.Module):
    """Hugging Face Llama's MLP (its names, its order of construction)."""

    def __init__(self, hidden, ffn, bias=False, device=None, dtype=None):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias, device=device, dtype=dtype)
        self.up_proj = nn.Linear(hidden, ffn, bias, device=device, dtype=dtype)
        self.down_proj = nn.Linear(ffn, hidden, bias, device=device, dtype=dtype)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


FULL = {"gelu": FullGeluMLP, "swiglu": FullSwiGLU}


def full_linears(full: nn.Module):
    return [full.fc1, full.fc2] if isinstance(full, FullGeluMLP) else [full.gate_proj, full.up_proj, full.down_proj]


def _mlp64(activation):
    """The full MLP as a function of x and its parameters (weights, then biases, as full_params)."""
    def gelu(x, w1, w2, b1=None, b2=None):
        return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)

    def swiglu(x, wg, wu, wd, bg=None, bu=None, bd=None):
        return F.linear(F.silu(F.linear(x, wg, bg)) * F.linear(x, wu, bu), wd, bd)
    return gelu if activation == "gelu" else swiglu


def full_params(full: nn.Module, bias: bool):
    lins = full_linears(full)
    return [lin.weight for lin in lins] + ([lin.bias for lin in lins] if bias else [])


def make_full(name, activation, hidden, ffn, bias, dtype, device="cpu"):
    torch.manual_seed(seed_of(name, 0))
    return FULL[activation](hidden, ffn, bias, device=device).to(dtype)


def check_mlp(group, device, tag, dtype, activation, bias, hidden, ffn, build="from_mlp", chunks=0):
    name = f"{tag}/mlp/{activation}/{dtype}/bias={bias}/{hidden}->{ffn}"
    what = f"{name}/{build} (tp rank {group.rank} of {group.size})"
    full = make_full(name, activation, hidden, ffn, bias, dtype)
    lins = full_linears(full)
    if build == "from_mlp":
        mlp = tpext.ParallelMLP.from_mlp(full, group=group, chunks=chunks)
    else:
        mlp = tpext.ParallelMLP.from_linears(lins, activation, group, chunks=chunks)
    assert mlp.activation == activation, f"{what}: activation {mlp.activation!r}"
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    assert fc1.weight.device == device and fc1.weight.dtype == dtype, f"{what}: weights on {fc1.weight.device}"
    stride = 2 if activation == "swiglu" else 1
    sizes = tensor_split_sizes(ffn, group.size)
    assert_partition(fc1.weight, 0, sizes, group, f"{what}: fc1 weight", stride)
    assert_partition(fc2.weight, 1, sizes, group, f"{what}: fc2 weight")
    assert_exact(tpext.gather_shards(fc1.weight, group=group).cpu(),
                 torch.cat([lin.weight for lin in lins[:-1]]).detach(), f"{what}: gathered fc1 weight")
    assert_exact(tpext.gather_shards(fc2.weight, group=group).cpu(), lins[-1].weight.detach(), f"{what}: fc2 weight")
    if bias:
        assert_partition(fc1.bias, 0, sizes, group, f"{what}: fc1 bias", stride)
        assert_replicated(fc2.bias, f"{what}: fc2 bias")

    x = leaf(full_tensor(f"{name}/x", LEADING + (hidden,), dtype), device)
    g = full_tensor(f"{name}/g", LEADING + (hidden,), dtype)
    y_ref, dx_ref, p_ref = reference(_mlp64(activation), x, full_params(full, bias), g)
    tpext.reset_stats()
    y = mlp(x)
    nbytes = y.numel() * y.element_size()
    if chunks == 0:
        assert_counts(group, {"all_reduce": 1}, f"{what}: forward", {"all_reduce": nbytes})
    assert_close_rel(y, y_ref, dtype, f"{what}: output", MLP_RTOL[dtype])
    tpext.reset_stats()
    y.backward(g.to(device))
    assert_counts(group, {"all_reduce": 1}, f"{what}: backward", {"all_reduce": x.numel() * x.element_size()})
    assert_close_rel(x.grad, dx_ref, dtype, f"{what}: input grad", MLP_RTOL[dtype])
    n = len(lins)
    assert_close_rel(tpext.gather_shards(fc1.weight.grad, fc1.weight, group), torch.cat(p_ref[:n - 1]), dtype,
                     f"{what}: fc1 weight grad", MLP_RTOL[dtype])
    assert_close_rel(tpext.gather_shards(fc2.weight.grad, fc2.weight, group), p_ref[n - 1], dtype,
                     f"{what}: fc2 weight grad", MLP_RTOL[dtype])
    if bias:
        assert_close_rel(tpext.gather_shards(fc1.bias.grad, fc1.bias, group), torch.cat(p_ref[n:2 * n - 1]), dtype,
                         f"{what}: fc1 bias grad", MLP_RTOL[dtype])
        assert_close_rel(fc2.bias.grad, p_ref[2 * n - 1], dtype, f"{what}: fc2 bias grad (replicated)", MLP_RTOL[dtype])
    return y.detach()


def check_mlp_fresh_init(group, device, tag, dtype):
    """ParallelMLP built under torch.manual_seed(s) gathers, bit for bit, to the full MLP built
    under the same seed (fc1 then fc2; gate, up, down) and leaves the RNG where it does."""
    for activation in ("gelu", "swiglu"):
        for hidden, ffn in MLP_SIZES:
            for bias in (True, False):
                name = f"{tag}/mlp-init/{activation}/{dtype}/bias={bias}/{hidden}->{ffn}"
                what = f"{name} (tp rank {group.rank})"
                torch.manual_seed(seed_of(name, 0))
                mlp = tpext.ParallelMLP(hidden, ffn, activation, bias, group, device, dtype)
                after = torch.rand(4, device=device)
                torch.manual_seed(seed_of(name, 0))
                full = FULL[activation](hidden, ffn, bias, device=device, dtype=dtype)
                assert_exact(after.cpu(), torch.rand(4, device=device).cpu(), f"{what}: RNG state after construction")
                lins = full_linears(full)
                fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
                assert_exact(tpext.gather_shards(fc1.weight, group=group).cpu(),
                             torch.cat([lin.weight for lin in lins[:-1]]).detach().cpu(), f"{what}: fc1 weight")
                assert_exact(tpext.gather_shards(fc2.weight, group=group).cpu(), lins[-1].weight.detach().cpu(),
                             f"{what}: fc2 weight")
                if bias:
                    assert_exact(tpext.gather_shards(fc1.bias, group=group).cpu(),
                                 torch.cat([lin.bias for lin in lins[:-1]]).detach().cpu(), f"{what}: fc1 bias")
                    assert_exact(fc2.bias.detach().cpu(), lins[-1].bias.detach().cpu(), f"{what}: fc2 bias")


def check_mlps(group, device, tag, dtypes=DTYPES, sizes=MLP_SIZES):
    for dtype in dtypes:
        for activation in ("gelu", "swiglu"):
            for hidden, ffn in sizes:
                for bias in (True, False):
                    check_mlp(group, device, tag, dtype, activation, bias, hidden, ffn)
            check_mlp(group, device, tag, dtype, activation, True, 7, 10, build="from_linears")


def _mlp_checks(group, tag):
    device = torch.device("cpu")
    check_mlps(group, device, tag)
    for dtype in (torch.float32, torch.bfloat16):
        check_mlp_fresh_init(group, device, tag, dtype)


def mlp_body(tp_sizes):
    for_each_tp_size(tp_sizes, _mlp_checks)


@pytest.mark.parametrize("world_size, tp_sizes", LAUNCHES, ids=launch_ids(LAUNCHES))
def test_mlp_matches_full_mlp(world_size, tp_sizes):
    launch(mlp_body, world_size, args=(tp_sizes,), timeout_s=240)


# -- one process -------------------------------------------------------------------------------


@pytest.fixture
def single():
    tpext.init(backend="gloo")
    yield tpext.get_tp_group()
    tpext.destroy()


class MetaLlamaFFN(nn.Module):
    """Meta's Llama FeedForward: w2(silu(w1(x)) * w3(x))."""

    def __init__(self, hidden, ffn):
        super().__init__()
        self.w1 = nn.Linear(hidden, ffn, bias=False)
        self.w2 = nn.Linear(ffn, hidden, bias=False)
        self.w3 = nn.Linear(hidden, ffn, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


@pytest.mark.parametrize("make, activation", [
    (lambda: MetaLlamaFFN(6, 10), "swiglu"),
    (lambda: FullSwiGLU(6, 10, bias=True), "swiglu"),
    (lambda: FullGeluMLP(6, 10), "gelu"),
], ids=["meta-llama", "hf-llama", "gelu"])
def test_from_mlp_recognises_the_usual_names(single, make, activation):
    torch.manual_seed(0)
    full = make()
    mlp = tpext.ParallelMLP.from_mlp(full)
    assert mlp.activation == activation
    x = torch.randn(4, 6)
    torch.testing.assert_close(mlp(x), full(x), rtol=1e-5, atol=1e-6)


def test_from_mlp_rejects_a_mismatched_activation(single):
    with pytest.raises(ValueError, match=r"from_mlp: mlp: expected nn.Linear attributes named swiglu: "
                                         r"gate_proj/up_proj/down_proj or w1/w3/w2"):
        tpext.ParallelMLP.from_mlp(FullGeluMLP(4, 8), activation="swiglu")
