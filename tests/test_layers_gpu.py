"""The TP layers on CUDA tensors, TP 1 and 2 (one process per GPU): the native ops path.

The parity checks are test_layers.py's and test_mlp.py's, run on the GPU through NCCL: outputs
and every gradient against the full nn.Linear / MLP in float64, the collective counts, the split
recorded on the parameters. On top of them: the row-parallel forward gives the same result
whatever its chunking, and ParallelMLP survives CUDA graph capture and torch.compile(fullgraph=True)
with the results of eager mode and the same collectives.

Every test skips, saying why, where fewer GPUs are visible. float32 runs with TF32 off (the
reference is float64; TF32 would round the inputs to 10 mantissa bits).
"""
import os

import pytest
import torch

import tpext
from _dist import launch
from _gpus import GPU_WORLDS, gpu_case, gpu_worlds
from _reference import seed_of
from test_layers import (SIZES, assert_close_rel, assert_counts, check_fresh_init, check_layers,
                         check_mappings, check_row, full_linear, full_tensor)
from test_mlp import MLP_SIZES, check_mlp_fresh_init, check_mlps

GPU_TIMEOUT_S = 300.0
COMPILE_TIMEOUT_S = 480.0  # inductor compiles forward and backward graphs for two activations
# Real GEMM shapes next to the tiny ones: uneven on TP 2 (201 = 101 + 100), rows not a multiple of 8.
GPU_SIZES = SIZES + ((1, 1), (136, 201))
GPU_MLP_SIZES = MLP_SIZES + ((136, 201),)


def _init(tp_size=None, **init_kwargs):
    world, local_rank = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    tp = tpext.init(tp_size=tp_size or world, backend="nccl", timeout=120, **init_kwargs)
    device = torch.device("cuda", local_rank)
    assert tp.device == device and tp._nccl is not None, \
        f"tpext.init gave {tp} on {tp.device}, expected NCCL on {device}"
    torch.set_float32_matmul_precision("highest")  # no TF32 in the native GEMMs (allowTF32CuBLAS) nor torch's
    return tp, device, f"gpu/w{world}/tp{tp.size}"


# -- parity, counts, errors ----------------------------------------------------------------------


def check_errors_on_gpu(group, device):
    """Bad inputs on the native path raise naming the argument before anything is enqueued."""
    col = tpext.ColumnParallelLinear(8, 6, group=group)
    row = tpext.RowParallelLinear(6, 8, group=group)
    assert col.weight.device == device, f"a fresh layer must live on the group's GPU, got {col.weight.device}"
    shard = row.input_size_per_partition
    cases = [
        (col, torch.randn(2, 8, device=device, dtype=torch.float64), r"input: expected dtype torch.float32"),
        (col, torch.randn(2, 8, device=device, dtype=torch.bfloat16), r"input: expected dtype torch.float32"),
        (col, torch.randint(0, 4, (2, 8), device=device), r"input: expected dtype torch.float32"),
        (col, torch.randn(2, 8), rf"input: expected a tensor on {device} \(where weight is\), got one on cpu"),
        (col, torch.randn(2, 9, device=device), r"input: expected last dimension 8 \(in_features\)"),
        (row, torch.randn(2, shard + 1, device=device), rf"input: expected last dimension {shard} \(this rank's shard"),
        (col, torch.randn(8, 2, device=device).t(), r"input: expected a contiguous tensor"),
        (row, torch.randn(shard, 2, device=device).t(), r"input: expected a contiguous tensor"),
    ]
    for layer, x, pattern in cases:
        tpext.reset_stats()
        with pytest.raises(ValueError, match=pattern):
            layer(x)
        assert all(v["calls"] == 0 for v in tpext.stats().values()), f"{pattern}: a collective ran before the error"
    other = torch.device("cuda", (device.index + 1) % torch.cuda.device_count())
    if other != device:
        with pytest.raises(ValueError, match=rf"device: expected {device} \(the GPU of"):
            tpext.ColumnParallelLinear(8, 6, group=group, device=other)


def check_row_chunks(group, device, tag, dtype):
    """chunks=1..4 cut the row-parallel forward into that many all-reduces, by rows (300 rows:
    pieces of 8-row multiples, all non-empty) and by columns (384: blocks of 8-column multiples,
    through the scratch buffer), and give the output of chunks=1, within a rounding: the GEMM of
    fewer rows or columns may take another cuBLASLt algorithm."""
    in_f, out_f, rows = 256, 384, 300
    name = f"{tag}/chunks/{dtype}"
    lin = full_linear(name, in_f, out_f, True, dtype)
    x_full = full_tensor(f"{name}/x", (rows, in_f), dtype)
    x = x_full.tensor_split(group.size, dim=-1)[group.rank].contiguous().to(device)
    ref = torch.nn.functional.linear(x_full.double(), lin.weight.double(), lin.bias.double())
    outs = {}
    # The last two shrink the last row piece (tpext.set_row_tail_weight) to a quarter and a half of
    # the others: uneven pieces, same sum.
    cuts = ([(c, "auto", 0.0) for c in (1, 2, 3, 4, 0)] + [(c, "columns", 0.0) for c in (2, 3, 4)] +
            [(3, "rows", 0.0), (2, "rows", 0.25), (4, "auto", 0.5)])
    for chunks, chunk_by, tail in cuts:
        layer = tpext.RowParallelLinear.from_linear(lin, group, chunks=chunks, chunk_by=chunk_by)
        tpext.reset_stats()
        tpext.set_row_tail_weight(tail)
        try:
            with torch.no_grad():
                outs[chunks, chunk_by, tail] = y = layer(x)
        finally:
            tpext.set_row_tail_weight(0.0)
        what = f"{name}/chunks={chunks} chunk_by={chunk_by} tail={tail}"
        if chunks:
            assert_counts(group, {"all_reduce": chunks}, f"{what}: forward",
                          {"all_reduce": rows * out_f * x.element_size()})
        assert_close_rel(y, ref, dtype, f"{what}: output")
    # Each rank's partial product may round differently (one ulp) under another algorithm, and the
    # partials are summed in the dtype: a few ulps of the largest output.
    eps = torch.finfo(dtype).eps
    base = outs[1, "auto", 0.0]
    for (chunks, chunk_by, tail), y in outs.items():
        torch.testing.assert_close(y, base, rtol=2 * eps, atol=8 * eps * base.abs().max().item(),
                                   msg=lambda m: f"{name}: chunks={chunks} chunk_by={chunk_by} tail={tail} vs "
                                                 f"chunks=1: {m}")
    # And the layer's own check (gradients, counts) with a pipelined forward.
    check_row(group, device, f"{tag}/chunks", dtype, True, True, in_f, out_f, chunks=2)


def check_gelu_without_pre(group, device, tag, dtype):
    """Inference (no_grad, or nothing requiring grad): the GELU column layer's GEMM skips writing
    the pre-activation (bias+GELU epilogue without its aux output, also for a width the aux path
    cannot take: 201 columns a rank) and computes what the training forward computes; the op
    returns the pre-activation empty."""
    for out_f in (384, 201 * group.size):
        name = f"{tag}/gelu-no-pre/{out_f}/{dtype}"
        lin = full_linear(name, 96, out_f, True, dtype)
        layer = tpext.ColumnParallelLinear.from_linear(lin, group, gather_output=True, activation="gelu")
        x = full_tensor(f"{name}/x", (37, 96), dtype).to(device)
        ref = torch.nn.functional.gelu(torch.nn.functional.linear(x.double().cpu(), lin.weight.double(),
                                                                  lin.bias.double()), approximate="tanh")
        with torch.no_grad():
            y_inference = layer(x)
        y_training = layer(x.clone().requires_grad_())
        assert y_training.grad_fn is not None, f"{name}: the training forward recorded no graph"
        # Two GEMM kernels (the GELU epilogue with and without aux, or for 201 columns the fused
        # epilogue against a bias GEMM then torch's GELU): each within the dtype's bound of float64.
        assert_close_rel(y_inference, ref, dtype, f"{name}: no_grad output")
        assert_close_rel(y_training, ref, dtype, f"{name}: training output")
    w = layer.weight.detach()
    out, pre = torch.ops.tpext.linear(x, w, layer.bias.detach(), "gelu", False)
    assert pre.numel() == 0, f"{tag}: linear(keep_pre=False) returned a pre-activation of {tuple(pre.shape)}"
    out_kept, pre_kept = torch.ops.tpext.linear(x, w, layer.bias.detach(), "gelu")
    assert pre_kept.shape == out_kept.shape, f"{tag}: linear() kept no pre-activation"


def check_bias_grad_beside_the_epilogue(device, tag):
    """linear_backward's bias gradient where the wgrad GEMM's epilogue does not give it: float16
    with one input feature (cuBLASLt's BGRADB wrote one element of 64 there on 2 H200s, 5673920;
    a TP=2 MLP with 3 hidden features has that fc2 shard) and no input feature (no GEMM runs);
    every dtype, for k = 0, 1, 2, against the float64 column sums of the same grad_out. And the
    forward of the same shapes (k = 0: only the bias, where the rows used to be counted as 0)."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for k in (0, 1, 2):
            name = f"{tag}/bias-grad/{dtype}/k={k}"
            g = full_tensor(f"{name}/g", (4096, 64), dtype)
            x = full_tensor(f"{name}/x", (4096, k), dtype)
            w = full_tensor(f"{name}/w", (64, k), dtype)
            g_dev, x_dev, w_dev = g.to(device), x.to(device), w.to(device)
            dx, dw, db = torch.ops.tpext.linear_backward(g_dev, x_dev, w_dev, True, True, True)
            g64, x64, w64 = g.double(), x.double(), w.double()
            assert_close_rel(db.cpu(), g64.sum(0), dtype, f"{name}: db", terms=g64.abs().sum(0))
            assert_close_rel(dw.cpu(), g64.t() @ x64, dtype, f"{name}: dw", terms=g64.abs().t() @ x64.abs())
            assert tuple(dx.shape) == (4096, k), f"{name}: dx shape {tuple(dx.shape)}"
            b = full_tensor(f"{name}/b", (64,), dtype)
            y, _ = torch.ops.tpext.linear(x_dev, w_dev, b.to(device), "none", False)
            assert_close_rel(y.cpu(), x64 @ w64.t() + b.double(), dtype, f"{name}: linear forward",
                             terms=x64.abs() @ w64.abs().t() + b.double().abs())


def parity_body(tp_size=None):
    tp, device, tag = _init(tp_size)
    check_errors_on_gpu(tp, device)
    check_layers(tp, device, tag, sizes=GPU_SIZES)
    check_mlps(tp, device, tag, sizes=GPU_MLP_SIZES)
    for dtype in (torch.float32, torch.bfloat16):
        check_mappings(tp, device, tag, dtype)
        check_fresh_init(tp, device, tag, dtype)
        check_mlp_fresh_init(tp, device, tag, dtype)
        check_row_chunks(tp, device, tag, dtype)
        check_gelu_without_pre(tp, device, tag, dtype)
    check_row_chunks(tp, device, tag, torch.float16)
    check_bias_grad_beside_the_epilogue(device, tag)
    # Autotuned GEMMs (tpext.set_gemm_autotune): whichever algorithm the timing keeps, the MLPs
    # still match the full model within the dtype's bound, forward and every gradient.
    tpext.set_gemm_autotune(8)
    try:
        check_mlps(tp, device, f"{tag}/autotune", sizes=GPU_MLP_SIZES)
        check_row_bias_grad_is_replicated(tp, device, f"{tag}/autotune")
        # Timed under sustained load (1 ms here: the mechanism, not the choice), bias-gradient
        # GEMMs tuned too.
        tpext.set_gemm_autotune_sustain_ms(1)
        check_mlps(tp, device, f"{tag}/autotune-sustained", sizes=GPU_MLP_SIZES)
        check_row_bias_grad_is_replicated(tp, device, f"{tag}/autotune-sustained")
    finally:
        tpext.set_gemm_autotune(0)
        tpext.set_gemm_autotune_sustain_ms(0)
    tpext.destroy()


def check_row_bias_grad_is_replicated(group, device, tag):
    """The row-parallel bias is replicated, so its gradient must be bitwise the same on every rank,
    also when autotuning lets each rank pick its own weight-gradient algorithm; and right."""
    for dtype in (torch.float32, torch.bfloat16):
        row = tpext.RowParallelLinear(512, 384, bias=True, group=group, device=device, dtype=dtype)
        gen = torch.Generator(device=device).manual_seed(seed_of(f"{tag}/{dtype}/x", group.rank))  # a shard per rank
        x = torch.randn(2, 130, row.input_size_per_partition, device=device, dtype=dtype, generator=gen)
        gen.manual_seed(seed_of(f"{tag}/{dtype}/dy", 0))  # the output gradient: replicated
        dy = torch.randn(2, 130, 384, device=device, dtype=dtype, generator=gen)
        row(x.requires_grad_()).backward(dy)
        every = group.all_gather(row.bias.grad.reshape(1, -1), dim=0)
        for r in range(group.size):
            assert torch.equal(every[r], every[0]), \
                f"{tag} {dtype}: rank {r}'s replicated bias gradient differs from rank 0's"
        assert_close_rel(row.bias.grad, dy.double().sum((0, 1)).cpu(), dtype,
                         f"{tag} {dtype}: row-parallel bias gradient", terms=dy.double().abs().sum((0, 1)).cpu())


# TP over every GPU; on eight, also two TP groups of four (DP 2), each computing the full model.
@pytest.mark.parametrize("gpus, tp_size", [gpu_case(n, n, id=f"{n}gpu") for n in (1, 2, 4, 8)] +
                         [gpu_case(8, 4, id="8gpu-tp4")])
def test_layers_and_mlp_match_the_full_model_on_gpu(gpus, tp_size):
    launch(parity_body, gpus, args=(tp_size,), timeout_s=GPU_TIMEOUT_S)


def capped_overlap_body():
    """tpext.init(nccl_overlap_ctas=2) with set_overlap_sms(2): the collectives beside a GEMM (row
    pieces before the last, the column-parallel dx beside wgrad) go through a second NCCL
    communicator capped at 2 CTAs, interleaved on one stream with the uncapped one's. Pipelined
    row-parallel forwards and the MLPs' every gradient still match the full model."""
    tp, device, tag = _init(nccl_overlap_ctas=2)
    tag += "/overlap-ctas2"
    for g in (tp, tpext.get_world_group()):
        got = tpext._C.comm_overlap_max_ctas(g._nccl)
        assert got == (2 if g.size > 1 else -1), f"{g.name}: capped twin {got}, expected 2 on {g.size} ranks"
    tpext.set_overlap_sms(2)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            check_row_chunks(tp, device, tag, dtype)
        check_mlps(tp, device, tag, sizes=GPU_MLP_SIZES)
    finally:
        tpext.set_overlap_sms(0)
    tpext.destroy()
    assert tpext._C.live_handles() == [], f"communicators left after destroy: {tpext._C.live_handles()}"


@pytest.mark.parametrize("gpus", gpu_worlds(2, 4, 8))
def test_layers_with_a_capped_communicator_for_overlapped_collectives(gpus):
    launch(capped_overlap_body, gpus, timeout_s=GPU_TIMEOUT_S)


def window_body():
    """tpext.init(nccl_window_mib=1): every communicator of more than one rank gets a 1 MiB
    symmetric NCCL window; a row-parallel forward whose output fits is computed into it, all-reduced
    there by NCCL's symmetric kernels and copied out, one that does not fit takes the plain path.
    Pipelined and single-piece forwards, the MLPs' every gradient, and a CUDA graph of the MLP
    forward replayed on fresh inputs all match the full model."""
    tp, device, tag = _init(nccl_window_mib=1)
    tag += "/window"
    for g in (tp, tpext.get_world_group()):
        got = tpext._C.comm_window_bytes(g._nccl)
        assert got == ((1 << 20) if g.size > 1 else 0), f"{g.name}: window of {got} bytes on {g.size} ranks"
    for dtype in (torch.float32, torch.bfloat16):  # 300 x 384 outputs: 460 KB, 230 KB, in the window
        check_row_chunks(tp, device, tag, dtype)
    check_mlps(tp, device, tag, sizes=GPU_MLP_SIZES)
    # 1024 x 512 fp32 outputs (2 MiB) do not fit: the plain path, same answer.
    lin = full_linear(f"{tag}/big", 384, 512, True, torch.float32)
    x_full = full_tensor(f"{tag}/big/x", (1024, 384), torch.float32)
    layer = tpext.RowParallelLinear.from_linear(lin, tp)
    with torch.no_grad():
        y = layer(x_full.tensor_split(tp.size, dim=-1)[tp.rank].contiguous().to(device))
    ref = torch.nn.functional.linear(x_full.double(), lin.weight.double(), lin.bias.double())
    assert_close_rel(y, ref, torch.float32, f"{tag}/big: output past the window")
    mlp, xs, _ = _mlp_and_data(tp, device, tag, "gelu")
    check_forward_replays(mlp, xs, device, f"{tag} (rank {tp.rank})")
    tpext.destroy()
    assert tpext._C.live_handles() == [], f"communicators left after destroy: {tpext._C.live_handles()}"


@pytest.mark.parametrize("gpus", gpu_worlds(2, 4, 8))
def test_layers_with_a_symmetric_nccl_window(gpus):
    launch(window_body, gpus, timeout_s=GPU_TIMEOUT_S)


# -- CUDA graphs ---------------------------------------------------------------------------------


def _mlp_and_data(tp, device, tag, activation, dtype=torch.float32, hidden=256, ffn=688, rows=96):
    torch.manual_seed(seed_of(f"{tag}/{activation}", 0))
    mlp = tpext.ParallelMLP(hidden, ffn, activation, bias=True, group=tp, device=device, dtype=dtype)
    xs = [full_tensor(f"{tag}/{activation}/x{i}", (rows, hidden), dtype).to(device) for i in range(3)]
    gs = [full_tensor(f"{tag}/{activation}/g{i}", (rows, hidden), dtype).to(device) for i in range(3)]
    return mlp, xs, gs


def _assert_same(got, expected, what):
    # Replays run the kernels eager mode runs: identical, or within a rounding where NCCL or
    # cuBLASLt pick another algorithm under capture.
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 * scale, msg=lambda m: f"{what}: {m}")


def check_forward_replays(mlp, xs, device, what):
    """A CUDA graph of mlp's no-grad forward, captured on xs[0] and replayed on each of xs, gives
    what eager mode gives. Warmed up on a side stream first: NCCL connects and cuBLASLt plans its
    GEMMs on first use, neither of which may happen during capture."""
    static_x = xs[0].clone()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            mlp(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_y = mlp(static_x)
    for i, x in enumerate(xs):
        static_x.copy_(x)
        graph.replay()
        with torch.no_grad():
            eager = mlp(x)
        _assert_same(static_y, eager, f"{what}: forward replay {i}")


def graphs_body():
    tp, device, tag = _init()
    tag += "/graph"
    # The last case captures fc2's column blocks: GEMMs into a scratch buffer, and on the comm
    # stream their all-reduces and the copies into the output.
    for activation, cut in (("gelu", None), ("swiglu", None), ("gelu", "columns")):
        what = f"{tag}/{activation}{'/' + cut if cut else ''} (rank {tp.rank})"
        mlp, xs, gs = _mlp_and_data(tp, device, tag, activation)
        if cut:
            mlp.linear_fc2.chunks, mlp.linear_fc2.chunk_by = 3, cut
        params = list(mlp.parameters())

        check_forward_replays(mlp, xs, device, what)

        # Forward + backward: gradients set to None before capture, so the captured backward
        # allocates them from the graph's pool and every replay overwrites them.
        static_x = xs[0].clone().requires_grad_()
        static_g = gs[0].clone()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                mlp(static_x).backward(static_g)
        torch.cuda.current_stream().wait_stream(side)
        mlp.zero_grad(set_to_none=True)
        static_x.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = mlp(static_x)
            static_y.backward(static_g)
        static_grads = [static_x.grad] + [p.grad for p in params]
        for i, (x, g) in enumerate(zip(xs, gs)):
            with torch.no_grad():
                static_x.copy_(x)
                static_g.copy_(g)
            graph.replay()
            replayed = [static_y.detach().clone()] + [t.clone() for t in static_grads]
            mlp.zero_grad(set_to_none=True)  # eager allocates its own grads; the graph keeps its
            xe = x.clone().requires_grad_()
            ye = mlp(xe)
            ye.backward(g)
            eager = [ye.detach(), xe.grad] + [p.grad for p in params]
            for j, (r, e) in enumerate(zip(replayed, eager)):
                _assert_same(r, e, f"{what}: forward+backward replay {i}, tensor {j} (output, input grad, params)")
        torch.cuda.synchronize()

    # The last graph captured collectives of tp and is still alive. NCCL's destroy would wait for
    # it forever (it did: both ranks hung in tpext.destroy() on 2 H200s), so destroy() refuses,
    # says why, and leaves every group working; once the graph is gone, destroy() goes through.
    with pytest.raises(RuntimeError, match=r"captured in CUDA graphs that still exist"):
        tpext.destroy()
    assert tpext.is_initialized(), "a refused destroy() must leave tpext initialised"
    x = full_tensor(f"{tag}/after-refused-destroy", (5,), torch.float32).to(device)
    expected = x.double() * tp.size  # every rank drew the same tensor
    tp.all_reduce(x)
    torch.testing.assert_close(x.double(), expected, rtol=1e-6, atol=0)
    del graph
    tpext.destroy()
    assert not tpext.is_initialized()


@pytest.mark.parametrize("gpus", GPU_WORLDS)
def test_mlp_cuda_graph_replays_match_eager(gpus):
    launch(graphs_body, gpus, timeout_s=GPU_TIMEOUT_S)


# -- torch.compile -------------------------------------------------------------------------------


def compile_body():
    from torch.utils._triton import has_triton

    tp, device, tag = _init()
    tag += "/compile"
    # Inductor needs Triton; without it aot_eager still runs dynamo, the autograd.Function
    # tracing and the fake implementations of the tpext ops, the parts this test is about.
    backend = "inductor" if has_triton() else "aot_eager"
    for activation in ("gelu", "swiglu"):
        what = f"{tag}/{activation}/{backend} (rank {tp.rank})"
        mlp, xs, gs = _mlp_and_data(tp, device, tag, activation)
        params = list(mlp.parameters())
        compiled = torch.compile(mlp, fullgraph=True, backend=backend)  # a graph break raises

        with torch.no_grad():
            for i, x in enumerate(xs[:2]):
                tpext.reset_stats()
                y = compiled(x)
                assert_counts(tp, {"all_reduce": 1}, f"{what}: compiled forward {i}",
                              {"all_reduce": y.numel() * y.element_size()})
                _assert_close(y, mlp(x), f"{what}: compiled forward {i}")

        for i, (x, g) in enumerate(zip(xs[:2], gs[:2])):
            mlp.zero_grad(set_to_none=True)
            xc = x.clone().requires_grad_()
            tpext.reset_stats()
            yc = compiled(xc)
            assert_counts(tp, {"all_reduce": 1}, f"{what}: compiled forward with grad {i}")
            tpext.reset_stats()
            yc.backward(g)
            assert_counts(tp, {"all_reduce": 1}, f"{what}: compiled backward {i}",
                          {"all_reduce": x.numel() * x.element_size()})
            got = [yc.detach(), xc.grad] + [p.grad for p in params]
            mlp.zero_grad(set_to_none=True)
            xe = x.clone().requires_grad_()
            ye = mlp(xe)
            ye.backward(g)
            expected = [ye.detach(), xe.grad] + [p.grad for p in params]
            for j, (a, e) in enumerate(zip(got, expected)):
                _assert_close(a, e, f"{what}: forward+backward {i}, tensor {j} (output, input grad, params)")
    tpext.destroy()


def _assert_close(got, expected, what):
    # Inductor fuses the elementwise ops (GELU backward, SiLU * up) into its own kernels: fp32
    # results within a few roundings of eager's.
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("gpus", GPU_WORLDS)
def test_mlp_torch_compile_fullgraph_matches_eager(gpus):
    launch(compile_body, gpus, timeout_s=COMPILE_TIMEOUT_S)
