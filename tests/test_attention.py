"""ParallelAttention, the head layout, sequence parallelism and ParallelTransformerLayer on CPU
tensors (gloo), TP 1 to 4.

Each attention check builds the full q, k, v, o (or fused qkv, o) nn.Linear every rank agrees on
(seeded by the check's name), shards them with from_linears / from_fused, and compares the output,
the input gradient and every gathered weight gradient with a float64 attention written out here
from the definitions (explicit softmax, KV head h // (H / K) for query head h, rotary pairs
(i, i + d/2)). The configurations cover MHA, GQA and MQA, heads that do not divide the TP size
(5 and 6 heads on 4 ranks), fewer KV heads than ranks (replicated KV), fused QKV, biases,
padding masks with left padding, explicit positions, no rotary and non-causal attention.

The checks take the device, so test_convert_gpu.py could run them through NCCL as well; one
launch per world size runs everything (CI has two cores; starting processes dominates).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tpext
from tpext.attention import describe_layout, head_layout, head_ranges
from _dist import launch
from _reference import make_input, seed_of

RTOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
LAUNCHES = [(4, (1, 2, 4)), (3, (3,))]
# (hidden, heads, kv heads, bias, fused qkv, rope theta, causal, padding mask, explicit positions)
CONFIGS = (
    (32, 4, 4, True, False, 10000.0, True, False, False),   # MHA
    (48, 6, 2, False, False, 10000.0, True, True, False),   # GQA: KV replicated on 3 and 4 ranks
    (32, 4, 1, True, True, 500.0, True, True, True),        # MQA, fused
    (40, 5, 5, False, True, None, False, False, False),     # 5 heads: uneven on 2, 3, 4; no rope, not causal
    (48, 6, 3, True, True, 10000.0, True, True, False),     # GQA fused: a ranges layout
)
BATCH, SEQ = 2, 5


# -- helpers ---------------------------------------------------------------------------------------


def full_tensor(tag, shape, dtype=torch.float32):
    return make_input(tag, 0, shape, dtype)


def full_linear(tag, in_f, out_f, bias, dtype=torch.float32):
    torch.manual_seed(seed_of(tag, 0))
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


def assert_close(actual, expected, rtol, what):
    """|actual - expected| <= rtol * max|expected| everywhere (expected in float64)."""
    assert actual is not None, f"{what}: missing (no gradient?)"
    assert tuple(actual.shape) == tuple(expected.shape), f"{what}: shape {tuple(actual.shape)}, expected " \
                                                         f"{tuple(expected.shape)}"
    err = (actual.detach().cpu().double() - expected.detach().cpu().double()).abs()
    scale = expected.detach().abs().max().item()
    worst = err.max().item() if err.numel() else 0.0
    assert worst <= rtol * scale, f"{what}: max |error| {worst:.3g} > {rtol:g} * max |expected| ({scale:.3g})"


def padding_mask(batch, seq):
    """Row 0 all real tokens, the others left-padded by 2 (a padding query sees no real key)."""
    m = torch.ones(batch, seq, dtype=torch.long)
    m[1:, :2] = 0
    return m


def reference_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, heads, kv_heads, theta, causal, mask, pos):
    """The attention in float64, from the definitions."""
    b, s, _ = x.shape
    d = wq.shape[0] // heads
    q = F.linear(x, wq, bq).view(b, s, heads, d).transpose(1, 2)
    k = F.linear(x, wk, bk).view(b, s, kv_heads, d).transpose(1, 2)
    v = F.linear(x, wv, bv).view(b, s, kv_heads, d).transpose(1, 2)
    if theta is not None:
        pos = torch.arange(s).expand(b, s) if pos is None else pos
        inv = torch.tensor([theta ** (-2.0 * i / d) for i in range(d // 2)], dtype=torch.float64)
        ang = pos.double()[:, None, :, None] * inv  # [b, 1, s, d/2]
        cos, sin = ang.cos(), ang.sin()

        def rot(t):
            t1, t2 = t[..., :d // 2], t[..., d // 2:]
            return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1)
        q, k = rot(q), rot(k)
    group = heads // kv_heads
    k, v = k[:, [h // group for h in range(heads)]], v[:, [h // group for h in range(heads)]]
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    allowed = torch.ones(s, s, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    allowed = allowed.expand(b, 1, s, s)
    if mask is not None:
        allowed = allowed & mask.bool()[:, None, None, :]
    allowed = allowed | torch.eye(s, dtype=torch.bool)  # as tpext: a query always sees itself
    p = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    ctx = (p @ v).transpose(1, 2).reshape(b, s, heads * d)
    return F.linear(ctx, wo, bo)


def run_reference(fn, x, params, g):
    x64 = x.detach().double().requires_grad_()
    p64 = [p.detach().double().requires_grad_() if p is not None else None for p in params]
    y = fn(x64, *p64)
    y.backward(g.double())
    return y.detach(), x64.grad, [p.grad if p is not None else None for p in p64]


# -- checks (any device) -----------------------------------------------------------------------------


def check_attention(group, device, tag, dtype, config):
    hidden, heads, kv, bias, fused, theta, causal, with_mask, with_pos = config
    name = f"{tag}/attention/{dtype}/{config}"
    what = f"{name} (tp rank {group.rank} of {group.size})"
    d = hidden // heads
    q, k, v = (full_linear(f"{name}/{p}", hidden, n * d, bias, dtype) for p, n in (("q", heads), ("k", kv), ("v", kv)))
    o = full_linear(f"{name}/o", heads * d, hidden, bias, dtype)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # uneven heads / replicated KV warn by design
        if fused:
            qkv = nn.Linear(hidden, (heads + 2 * kv) * d, bias=bias).to(dtype)
            with torch.no_grad():
                qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
                if bias:
                    qkv.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
            attn = tpext.ParallelAttention.from_fused(qkv, o, heads, kv, rope_theta=theta, causal=causal, group=group)
        else:
            attn = tpext.ParallelAttention.from_linears(q, k, v, o, heads, kv, rope_theta=theta, causal=causal,
                                                        group=group)
    mine = attn.local_heads
    assert len(mine.q) >= 1 and len(mine.q) == mine.n_rep * len(mine.kv), f"{what}: local heads {mine}"
    counted = torch.tensor([len(mine.q)], dtype=torch.int64, device=device)
    group.all_reduce(counted)
    assert int(counted) == heads, f"{what}: the ranks compute {int(counted)} query heads, expected {heads}"

    x = full_tensor(f"{name}/x", (BATCH, SEQ, hidden), dtype)
    g = full_tensor(f"{name}/g", (BATCH, SEQ, hidden), dtype)
    mask = padding_mask(BATCH, SEQ) if with_mask else None
    pos = (torch.arange(SEQ).expand(BATCH, SEQ) + torch.tensor([[3], [0]])) if with_pos else None
    params = [q.weight, q.bias, k.weight, k.bias, v.weight, v.bias, o.weight, o.bias]
    y_ref, dx_ref, grads_ref = run_reference(
        lambda x, *p: reference_attention(x, *p, heads, kv, theta, causal, mask, pos), x, params, g)

    xd = x.to(device, copy=True).requires_grad_()
    tpext.reset_stats(group)
    y = attn(xd, None if mask is None else mask.to(device), None if pos is None else pos.to(device))
    calls = {kind: v["calls"] for kind, v in tpext.stats(group).items() if v["calls"]}
    assert calls == {"all_reduce": 1}, f"{what}: forward ran {calls}, expected one all-reduce"
    assert_close(y, y_ref, RTOL[dtype], f"{what}: output")
    tpext.reset_stats(group)
    y.backward(g.to(device))
    if 1 < group.size and kv >= group.size:
        # (With more ranks than KV heads, the replicated K/V rows' weight gradients are summed too.)
        calls = {kind: v["calls"] for kind, v in tpext.stats(group).items() if v["calls"]}
        assert calls == {"all_reduce": 1}, \
            f"{what}: backward ran {calls}, expected one all-reduce (q, k and v share the input gradient's)"
    assert_close(xd.grad, dx_ref, RTOL[dtype], f"{what}: input grad")
    with tpext.gather_params(attn):
        if fused:
            got = [(attn.qkv_proj.weight.grad, torch.cat(grads_ref[0:6:2]), "qkv weight")]
            if bias:
                got.append((attn.qkv_proj.bias.grad, torch.cat(grads_ref[1:6:2]), "qkv bias"))
        else:
            got = [(getattr(attn, f"{p}_proj").weight.grad, grads_ref[2 * i], f"{p} weight")
                   for i, p in enumerate("qkv")]
            if bias:
                got += [(getattr(attn, f"{p}_proj").bias.grad, grads_ref[2 * i + 1], f"{p} bias")
                        for i, p in enumerate("qkv")]
        got.append((attn.o_proj.weight.grad, grads_ref[6], "o weight"))
        if bias:
            got.append((attn.o_proj.bias.grad, grads_ref[7], "o bias"))
        for actual, expected, label in got:
            assert_close(actual, expected, RTOL[dtype], f"{what}: {label} grad (gathered)")


def check_fresh_init(group, device, tag):
    """ParallelAttention(...) under a seed holds the weights of nn.Linear q, k, v, o drawn in order."""
    what = f"{tag}/fresh (tp rank {group.rank} of {group.size})"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(11)
        attn = tpext.ParallelAttention(48, 6, 2, bias=True, group=group)
    torch.manual_seed(11)
    full = [nn.Linear(48, 48, bias=True), nn.Linear(48, 16, bias=True), nn.Linear(48, 16, bias=True),
            nn.Linear(48, 48, bias=True)]
    with tpext.gather_params(attn):
        for layer, lin in zip((attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj), full):
            assert torch.equal(layer.weight.detach().cpu(), lin.weight.detach()), f"{what}: weight differs"
            assert torch.equal(layer.bias.detach().cpu(), lin.bias.detach()), f"{what}: bias differs"


def check_layer_sequence_parallel(group, device, tag, norm, activation, seq):
    """ParallelTransformerLayer with sequence parallelism equals it without (outputs, the input
    gradient, every gathered parameter gradient), and both equal a float64 layer built from the
    gathered weights."""
    name = f"{tag}/layer/{norm}/{activation}/seq{seq}"
    what = f"{name} (tp rank {group.rank} of {group.size})"
    import warnings
    layers = {}
    heads = 6 if group.size <= 6 else 12  # over 3 KV heads; past TP 6, 12 for at least one per rank
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for sp in (False, True):
            torch.manual_seed(5)
            layers[sp] = tpext.ParallelTransformerLayer(48, heads, 40, num_kv_heads=3, norm=norm, activation=activation,
                                                        bias=activation == "gelu", sequence_parallel=sp, group=group)
    with torch.no_grad():  # non-trivial norm parameters
        for sp in (False, True):
            for i, n in enumerate((layers[sp].norm1, layers[sp].norm2)):
                for j, p in enumerate(n.parameters()):
                    p.copy_(1 + 0.1 * full_tensor(f"{tag}/norm{i}/{j}", p.shape))
    x = full_tensor(f"{name}/x", (BATCH, seq, 48))
    g = full_tensor(f"{name}/g", (BATCH, seq, 48))
    mask = padding_mask(BATCH, seq)
    outs, dxs, grads = {}, {}, {}
    for sp, layer in layers.items():
        xd = x.to(device, copy=True).requires_grad_()
        tpext.reset_stats(group)
        if sp:
            y = layer(tpext.scatter_to_sequence_parallel_region(xd, group), mask.to(device))
        else:
            y = layer(xd, mask.to(device))
        calls = {kind: v["calls"] for kind, v in tpext.stats(group).items() if v["calls"]}
        expected = {"all_gather": 2, "reduce_scatter": 2} if sp else {"all_reduce": 2}
        assert calls == expected, f"{what}: sequence_parallel={sp} forward ran {calls}, expected {expected}"
        # With sequence parallelism each rank holds its slice of the output and of the loss gradient.
        y.backward((g.chunk(group.size, dim=1)[group.rank] if sp else g).to(device))
        outs[sp] = (group.all_gather(y.detach().contiguous(), 1) if sp else y.detach()).cpu()
        dxs[sp] = xd.grad.cpu()
        with tpext.gather_params(layer):
            grads[sp] = {n: p.grad.detach().cpu().clone() for n, p in layer.named_parameters()}
            if not sp:
                weights = {n: p.detach().cpu().double() for n, p in layer.named_parameters()}
    assert_close(outs[True], outs[False], 1e-5, f"{what}: output with vs without sequence parallelism")
    assert_close(dxs[True], dxs[False], 1e-5, f"{what}: input grad with vs without sequence parallelism")
    for n in grads[False]:
        assert_close(grads[True][n], grads[False][n], 1e-5, f"{what}: {n} grad with vs without sequence parallelism")
    # The float64 layer from the gathered weights (ranges in the full [out, in] layout).
    w = weights
    x64 = x.double().requires_grad_()

    def norm_fn(t, i):
        if norm == "rmsnorm":
            return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5) * w[f"norm{i}.weight"]
        return F.layer_norm(t, (48,), w[f"norm{i}.weight"], w[f"norm{i}.bias"], 1e-5)
    a = "attention."
    h = x64 + reference_attention(norm_fn(x64, 1), *[w.get(f"{a}{p}_proj.{kind}") for p in "qkvo"
                                                      for kind in ("weight", "bias")], heads, 3, 10000.0, True, mask, None)
    fc1, fc2 = w["mlp.linear_fc1.weight"], w["mlp.linear_fc2.weight"]
    if activation == "swiglu":
        gate, up = fc1.chunk(2)
        mlp = F.linear(F.silu(F.linear(norm_fn(h, 2), gate)) * F.linear(norm_fn(h, 2), up), fc2)
    else:
        mlp = F.linear(F.gelu(F.linear(norm_fn(h, 2), fc1, w["mlp.linear_fc1.bias"]), approximate="tanh"), fc2,
                       w["mlp.linear_fc2.bias"])
    y_ref = h + mlp
    assert_close(outs[False], y_ref, 2e-5, f"{what}: output vs the float64 layer")
    y_ref.backward(g.double())
    assert_close(dxs[False], x64.grad, 2e-5, f"{what}: input grad vs the float64 layer")


def check_sequence_regions(group, device, tag):
    what = f"{tag}/regions (tp rank {group.rank} of {group.size})"
    t = group.size
    x = full_tensor(f"{tag}/regions/x", (2, 2 * t, 3))
    xd = x.to(device, copy=True).requires_grad_()
    mine = tpext.scatter_to_sequence_parallel_region(xd, group)
    assert torch.equal(mine.detach().cpu(), x.chunk(t, dim=1)[group.rank]), f"{what}: scatter"
    back = tpext.gather_from_sequence_parallel_region(mine, group)
    assert torch.equal(back.detach().cpu(), x), f"{what}: gather"
    rs = tpext.reduce_scatter_to_sequence_parallel_region(back * (group.rank + 1), group)
    expected = x.chunk(t, dim=1)[group.rank] * (t * (t + 1) / 2)
    assert_close(rs, expected.double(), 1e-6, f"{what}: reduce_scatter")
    rs.sum().backward()
    # The ranks' losses together are sum_r slice_r(T x).sum() = T x.sum() with T = sum_r (r + 1): every rank's
    # x gradient is T everywhere (all-gather of the slices' gradients after the gather's reduce-scatter).
    assert_close(xd.grad, torch.full_like(x, t * (t + 1) / 2).double(), 1e-6, f"{what}: backward")
    if t > 1:
        with pytest.raises(ValueError, match="divisible by the TP size"):
            tpext.scatter_to_sequence_parallel_region(torch.zeros(2, 2 * t + 1, 3, device=device), group)


def check_errors(group, device, tag):
    with pytest.raises(ValueError, match="head_dim"):
        tpext.ParallelAttention(30, 4, group=group)
    with pytest.raises(ValueError, match="num_kv_heads"):
        tpext.ParallelAttention(48, 6, 4, group=group)
    if group.size > 1:
        with pytest.raises(ValueError, match="at least one query head per rank"):
            tpext.ParallelAttention(8 * (group.size - 1), group.size - 1, 1, group=group)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attn = tpext.ParallelAttention(32, 4, 2, group=group)
    x = torch.zeros(2, 5, 32, device=device)
    with pytest.raises(ValueError, match="attention_mask"):
        attn(x, torch.ones(2, 4, device=device))
    with pytest.raises(ValueError, match="hidden_size"):
        attn(torch.zeros(2, 5, 31, device=device))


def run_all(group, device, tag, dtypes=(torch.float32, torch.bfloat16)):
    for dtype in dtypes:
        for config in CONFIGS:
            if dtype == torch.bfloat16 and config not in (CONFIGS[1], CONFIGS[2]):
                continue
            check_attention(group, device, tag, dtype, config)
    check_fresh_init(group, device, tag)
    check_sequence_regions(group, device, tag)
    seq = 2 * group.size
    check_layer_sequence_parallel(group, device, tag, "rmsnorm", "swiglu", seq)
    check_layer_sequence_parallel(group, device, tag, "layernorm", "gelu", seq + group.size)
    check_errors(group, device, tag)


def body(tp_sizes):
    for tp in tp_sizes:
        group = tpext.init(tp_size=tp, backend="gloo")
        try:
            run_all(group, torch.device("cpu"), f"tp{tp}")
        finally:
            tpext.destroy()


@pytest.mark.parametrize("world,tp_sizes", LAUNCHES, ids=[f"world{w}-tp" + ",".join(map(str, t)) for w, t in LAUNCHES])
def test_attention_blocks(world, tp_sizes):
    launch(body, world, args=(tp_sizes,), timeout_s=240)


# -- the head layout, without processes --------------------------------------------------------------


def test_head_layout_covers_every_head_once():
    for heads in range(1, 9):
        for kv in [k for k in range(1, heads + 1) if heads % k == 0]:
            group = heads // kv
            for tp in range(1, 6):
                if kv < tp and heads < tp:
                    with pytest.raises(ValueError, match="at least one query head per rank"):
                        head_layout(heads, kv, tp)
                    continue
                layout = head_layout(heads, kv, tp)
                what = f"heads={heads} kv={kv} tp={tp}: {layout}"
                assert len(layout) == tp, what
                assert [h for r in layout for h in r.q] == list(range(heads)), what
                sizes = sorted(len(r.q) for r in layout)
                assert sizes[-1] - sizes[0] <= max(group, 1) and sizes[0] >= 1, what
                for r in layout:
                    assert len(r.q) == r.n_rep * len(r.kv), what
                    for j, h in enumerate(r.q):
                        assert r.kv[j // r.n_rep] == h // group, f"{what}: query head {h} reads the wrong KV head"
                held = [h for r in layout for h in r.kv]
                if kv >= tp:
                    assert sorted(held) == list(range(kv)), f"{what}: KV heads must not be replicated"
                else:
                    assert set(held) == set(range(kv)), what


def test_head_layout_examples_and_errors():
    # 4 heads on 3 ranks (2 KV heads): whole heads 2, 1, 1; the ranks after the first read KV head 1.
    layout = head_layout(4, 2, 3)
    assert [(r.q, r.kv, r.n_rep) for r in layout] == [((0, 1), (0,), 2), ((2,), (1,), 1), ((3,), (1,), 1)]
    # 6 heads, 3 KV heads on 2 ranks: whole KV groups, 2 and 1, no replication.
    assert [(r.q, r.kv) for r in head_layout(6, 3, 2)] == [((0, 1, 2, 3), (0, 1)), ((4, 5), (2,))]
    # 6 heads, 2 KV heads on 4 ranks: rank 1's heads 2 and 3 read different KV heads.
    assert head_layout(6, 2, 4)[1].kv == (0, 1) and head_layout(6, 2, 4)[1].n_rep == 1
    with pytest.raises(ValueError, match="num_kv_heads"):
        head_layout(6, 4, 2)
    with pytest.raises(ValueError, match="tp_size"):
        head_layout(4, 2, 0)


def test_describe_layout():
    # Contiguous pieces in rank order: a plain split.
    assert describe_layout([((0, 4),), ((4, 6),)], 6) == {"kind": "split", "sizes": (4, 2), "stride": 1}
    # [q | k | v] of equal parts cut the same way on each: stride 3.
    ranges = [head_ranges((0, 1), 2) + head_ranges((0, 1), 2, 6) + head_ranges((0, 1), 2, 12),
              head_ranges((2,), 2) + head_ranges((2,), 2, 6) + head_ranges((2,), 2, 12)]
    assert describe_layout(ranges, 18) == {"kind": "split", "sizes": (4, 2), "stride": 3}
    # A row held twice: ranges.
    got = describe_layout([((0, 2),), ((0, 2),), ((2, 4),)], 4)
    assert got["kind"] == "ranges" and got["ranges"] == (((0, 2),), ((0, 2),), ((2, 4),))
    with pytest.raises(ValueError, match="every one of 4 rows"):
        describe_layout([((0, 2),), ((0, 2),)], 4)
