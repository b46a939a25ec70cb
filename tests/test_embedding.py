"""VocabParallelEmbedding, ParallelLMHead and vocab_parallel_cross_entropy on CPU tensors (gloo),
TP 1 to 4.

Every check builds the full module every rank agrees on (seeded by the check's name only), shards
it, and compares with the full module: the embedding bit for bit (a lookup plus a sum with zeros is
exact), the head and the loss against float64 autograd. Vocabulary sizes cover even splits (12 on
TP 1, 2, 3, 4), uneven ones (101: 51 + 50 on TP 2, 34 + 34 + 33 on TP 3, 26 + 25 + 25 + 25 on TP 4)
and an empty shard (3 tokens on TP 4). The statistics prove what moves: one all-reduce of the
embeddings forward, and for the vocab-parallel loss two all-reduces of [tokens] floats forward and
nothing backward, never an all-gather of the logits.

The checks take the device, so test_models_gpu.py could run them through NCCL too.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tpext
from _dist import launch
from _reference import assert_exact, seed_of
from test_layers import (LAUNCHES, assert_close_rel, assert_counts, assert_partition, for_each_tp_size, full_tensor,
                         launch_ids, leaf, reference, tensor_split_sizes)

# (vocab, hidden): even on 1-4, uneven on 2-4, an empty shard on TP 4.
VOCABS = ((12, 8), (101, 6), (3, 5))
BATCH, SEQ = 2, 7
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def token_ids(tag, vocab, shape=(BATCH, SEQ), device="cpu"):
    """Random ids every rank agrees on; the first ones are 0 and vocab - 1 (both ends of the split)."""
    g = torch.Generator().manual_seed(seed_of(tag, 0))
    ids = torch.randint(0, vocab, shape, generator=g)
    flat = ids.view(-1)
    flat[0], flat[-1] = 0, vocab - 1
    return ids.to(device)


def full_embedding(tag, vocab, dim, padding_idx, dtype):
    torch.manual_seed(seed_of(tag, 0))
    emb = nn.Embedding(vocab, dim, padding_idx=padding_idx).to(dtype)
    if padding_idx is not None:  # nn.Embedding zeroes it; give it a value so that a wrong row shows
        with torch.no_grad():
            emb.weight[padding_idx] = full_tensor(f"{tag}/pad", (dim,), dtype)
    return emb


def vocab_slice(t, group, vocab):
    sizes = tensor_split_sizes(vocab, group.size)
    start = sum(sizes[:group.rank])
    return t.narrow(-1, start, sizes[group.rank]).contiguous()


# -- the checks (any device) ---------------------------------------------------------------------


def check_embedding(group, device, tag, dtype, vocab, dim, padding_idx=None):
    name = f"{tag}/embedding/{dtype}/{vocab}x{dim}/pad={padding_idx}"
    what = f"{name} (tp rank {group.rank} of {group.size})"
    full = full_embedding(name, vocab, dim, padding_idx, dtype)
    emb = tpext.VocabParallelEmbedding.from_embedding(full, group)
    sizes = tensor_split_sizes(vocab, group.size)
    assert emb.weight.device == device and emb.weight.dtype == dtype, f"{what}: weight on {emb.weight.device}"
    assert_partition(emb.weight, 0, sizes, group, f"{what}: weight")
    assert (emb.vocab_start, emb.vocab_end) == (sum(sizes[:group.rank]), sum(sizes[:group.rank + 1])), \
        f"{what}: holds ids [{emb.vocab_start}, {emb.vocab_end}), expected the tensor_split slice of {sizes}"
    assert_exact(tpext.gather_shards(emb.weight, group=group).cpu(), full.weight.detach(), f"{what}: gathered weight")

    ids = token_ids(f"{name}/ids", vocab)
    if padding_idx is not None:
        ids[0, 1] = padding_idx
    g = full_tensor(f"{name}/g", (BATCH, SEQ, dim), dtype)
    expected = F.embedding(ids, full.weight.detach(), padding_idx)
    tpext.reset_stats()
    y = emb(ids.to(device))
    assert_counts(group, {"all_reduce": 1}, f"{what}: forward", {"all_reduce": y.numel() * y.element_size()})
    # Each rank contributes its rows and zeros elsewhere: the sum is exact.
    assert_exact(y.detach().cpu(), expected, f"{what}: output")
    tpext.reset_stats()
    y.backward(g.to(device))
    assert_counts(group, {}, f"{what}: backward")
    w64 = full.weight.detach().double().requires_grad_()
    F.embedding(ids, w64, padding_idx).backward(g.double())
    grad = tpext.gather_shards(emb.weight.grad, emb.weight, group)
    assert_close_rel(grad, w64.grad, dtype, f"{what}: weight grad (gathered)", rtol=RTOL[dtype])
    if padding_idx is not None:
        assert not grad[padding_idx].any(), f"{what}: the padding row {padding_idx} got a gradient"

    # Sequence parallelism: the output is reduce-scattered along the sequence instead.
    ids_sp = token_ids(f"{name}/ids_sp", vocab, (BATCH, 2 * group.size))
    sp = tpext.VocabParallelEmbedding.from_embedding(full, group, sequence_parallel=True)
    tpext.reset_stats()
    out = sp(ids_sp.to(device))
    assert_counts(group, {"reduce_scatter": 1}, f"{what}: sequence-parallel forward")
    expected = F.embedding(ids_sp, full.weight.detach(), padding_idx).chunk(group.size, 1)[group.rank]
    assert_exact(out.detach().cpu(), expected, f"{what}: sequence-parallel output (this rank's slice of the sequence)")


def check_embedding_fresh_init(group, device, tag, dtype):
    """Built under torch.manual_seed(s), the embedding gathers to nn.Embedding built under that seed."""
    for vocab, dim in VOCABS:
        for padding_idx in (None, vocab - 1):
            name = f"{tag}/embedding-init/{dtype}/{vocab}x{dim}/pad={padding_idx}"
            s = seed_of(name, 0)
            torch.manual_seed(s)
            emb = tpext.VocabParallelEmbedding(vocab, dim, padding_idx, group=group, device=device, dtype=dtype)
            torch.manual_seed(s)
            ref = nn.Embedding(vocab, dim, padding_idx, device=device, dtype=dtype)
            assert_exact(tpext.gather_shards(emb.weight, group=group).cpu(), ref.weight.detach().cpu(),
                         f"{name} (tp rank {group.rank}): weight")


def check_head(group, device, tag, dtype, vocab, hidden, bias, gather_output):
    """ParallelLMHead.from_linear (untied) against the full linear: logits (all of them, or this
    rank's vocabulary slice), the input gradient and the gathered weight and bias gradients. The
    input is a non-contiguous slice, as generation hands the last positions."""
    name = f"{tag}/head/{dtype}/{vocab}x{hidden}/bias={bias}/gather={gather_output}"
    what = f"{name} (tp rank {group.rank} of {group.size})"
    torch.manual_seed(seed_of(name, 0))
    lin = nn.Linear(hidden, vocab, bias=bias).to(dtype)
    head = tpext.ParallelLMHead.from_linear(lin, group, gather_output=gather_output)
    assert_partition(head.weight, 0, tensor_split_sizes(vocab, group.size), group, f"{what}: weight")
    assert_exact(tpext.gather_shards(head.weight, group=group).cpu(), lin.weight.detach(), f"{what}: gathered weight")
    h_full = full_tensor(f"{name}/h", (BATCH, SEQ + 1, hidden), dtype)
    g = full_tensor(f"{name}/g", (BATCH, SEQ, vocab), dtype)
    y_ref, dh_ref, (dw_ref, db_ref) = reference(lambda h, w, b: F.linear(h[:, 1:], w, b), h_full,
                                                [lin.weight, lin.bias], g)
    h = leaf(h_full, device)
    tpext.reset_stats()
    y = head(h[:, 1:])  # not contiguous
    assert_counts(group, {"all_gather": 1} if gather_output else {}, f"{what}: forward")
    assert_close_rel(y, y_ref if gather_output else vocab_slice(y_ref, group, vocab), dtype, f"{what}: logits")
    y.backward((g if gather_output else vocab_slice(g, group, vocab)).to(device))
    assert_close_rel(h.grad, dh_ref, dtype, f"{what}: input grad")
    assert_close_rel(tpext.gather_shards(head.weight.grad, head.weight, group), dw_ref, dtype, f"{what}: weight grad")
    if bias:
        assert_close_rel(tpext.gather_shards(head.bias.grad, head.bias, group), db_ref, dtype, f"{what}: bias grad")


def check_tied(group, device, tag, dtype, vocab, hidden):
    """Tied input and output embeddings: the head holds the embedding's very Parameter, and the
    gradient of the one weight sums both uses, as in the full model."""
    name = f"{tag}/tied/{dtype}/{vocab}x{hidden}"
    what = f"{name} (tp rank {group.rank} of {group.size})"
    full = full_embedding(name, vocab, hidden, None, dtype)
    lin = nn.Linear(hidden, vocab, bias=False).to(dtype)
    lin.weight = full.weight
    emb = tpext.VocabParallelEmbedding.from_embedding(full, group)
    head = tpext.ParallelLMHead.from_linear(lin, group, tied_to=emb)
    built = tpext.ParallelLMHead(hidden, vocab, group=group, tied_to=emb)
    for h, how in ((head, "from_linear"), (built, "the constructor")):
        assert h.weight is emb.weight, f"{what}: the head built by {how} must hold the embedding's Parameter"
        assert "tied" in h.extra_repr(), f"{what}: the repr of a tied head must say so: {h.extra_repr()}"
    ids = token_ids(f"{name}/ids", vocab)
    g = full_tensor(f"{name}/g", (BATCH, SEQ, vocab), dtype)
    scale = full_tensor(f"{name}/scale", (hidden,), dtype)  # something between the two uses

    def model(w):
        return F.linear(F.embedding(ids, w) * scale.to(w.dtype), w)
    y_ref, _, (dw_ref,) = reference(lambda _x, w: model(w), torch.zeros(1), [full.weight], g)
    y = head(emb(ids.to(device)) * scale.to(device))
    assert_close_rel(y, y_ref, dtype, f"{what}: logits")
    y.backward(g.to(device))
    assert_close_rel(tpext.gather_shards(emb.weight.grad, emb.weight, group), dw_ref, dtype,
                     f"{what}: weight grad (embedding and head together)")
    # A tied head with a bias of its own: the bias is the head's, the weight the embedding's.
    lin_b = nn.Linear(hidden, vocab, bias=True).to(dtype)
    lin_b.weight = full.weight
    with torch.no_grad():
        lin_b.bias.copy_(full_tensor(f"{name}/bias", (vocab,), dtype))
    head_b = tpext.ParallelLMHead.from_linear(lin_b, group, tied_to=emb)
    assert head_b.weight is emb.weight, f"{what}: a tied head with a bias must still hold the embedding's weight"
    assert_exact(tpext.gather_shards(head_b.bias, group=group).cpu(), lin_b.bias.detach(), f"{what}: tied head bias")


def check_cross_entropy(group, device, tag, dtype, vocab, reduction, ignore_index=-100, offset=0.0):
    """vocab_parallel_cross_entropy of this rank's slice against F.cross_entropy of the full logits
    in float64: the loss, the logits gradient (this rank's slice), and the collectives: two
    all-reduces of [tokens] floats forward (max; target logit and sum of exps together), nothing
    backward, so the full logits never exist anywhere."""
    name = f"{tag}/xent/{dtype}/{vocab}/{reduction}/ignore={ignore_index}/offset={offset}"
    what = f"{name} (tp rank {group.rank} of {group.size})"
    logits_full = (3 * full_tensor(f"{name}/logits", (BATCH, SEQ, vocab), torch.float64) + offset).to(dtype)
    target = token_ids(f"{name}/target", vocab)
    target[0, 2] = ignore_index  # an ignored token in the middle
    if ignore_index in range(vocab):  # an id that is ignored: it must not count anywhere
        target[1, 0] = ignore_index
    tokens = target.numel()
    x64 = logits_full.double().requires_grad_()
    loss_ref = F.cross_entropy(x64.view(-1, vocab), target.view(-1), ignore_index=ignore_index,
                               reduction=reduction)
    g = full_tensor(f"{name}/g", (tokens,), torch.float64).view(BATCH, SEQ) if reduction == "none" else None
    loss_ref.backward(g.reshape(-1) if g is not None else None)
    mine = leaf(vocab_slice(logits_full, group, vocab), device)
    tpext.reset_stats()
    loss = tpext.vocab_parallel_cross_entropy(mine, target.to(device), group, ignore_index=ignore_index,
                                              vocab_sizes=tensor_split_sizes(vocab, group.size), reduction=reduction)
    # Forward: the max, then (target logit, sum of exps) of every token: 4 + 8 bytes a token in float32.
    assert_counts(group, {"all_reduce": 2}, f"{what}: forward", {"all_reduce": 12 * tokens})
    assert loss.dtype == torch.float32, f"{what}: loss dtype {loss.dtype}, expected float32"
    expected_loss = loss_ref.detach().view(BATCH, SEQ) if reduction == "none" else loss_ref.detach()
    assert_close_rel(loss, expected_loss, torch.float32, f"{what}: loss", rtol=RTOL[dtype] if offset == 0 else 1e-4)
    tpext.reset_stats()
    loss.backward(g.to(device, torch.float32) if g is not None else None)
    assert_counts(group, {}, f"{what}: backward")
    assert_close_rel(mine.grad, vocab_slice(x64.grad, group, vocab), dtype, f"{what}: logits grad (this rank's slice)",
                     rtol=RTOL[dtype])
    ignored = (target == ignore_index).to(device)
    assert not mine.grad[ignored].any(), f"{what}: ignored tokens got a gradient"


def check_head_and_loss_never_gather(group, device, tag, vocab=101, hidden=16):
    """The training path of a vocab-parallel model: ParallelLMHead(gather_output=False) feeding
    vocab_parallel_cross_entropy gives F.cross_entropy's loss and gradients, and no collective ever
    moves logits-sized data (forward and backward)."""
    name = f"{tag}/head+xent/{vocab}x{hidden}"
    what = f"{name} (tp rank {group.rank} of {group.size})"
    torch.manual_seed(seed_of(name, 0))
    lin = nn.Linear(hidden, vocab, bias=False)
    head = tpext.ParallelLMHead.from_linear(lin, group, gather_output=False)
    h_full = full_tensor(f"{name}/h", (BATCH, SEQ, hidden), torch.float32)
    target = token_ids(f"{name}/t", vocab)

    def fn(h, w):
        return F.cross_entropy(F.linear(h, w).view(-1, vocab), target.view(-1))
    loss_ref, dh_ref, (dw_ref,) = reference(fn, h_full, [lin.weight], torch.tensor(1.0, dtype=torch.float64))
    h = leaf(h_full, device)
    tpext.reset_stats()
    loss = tpext.vocab_parallel_cross_entropy(head(h), target.to(device), group, vocab_sizes=head.partition_sizes)
    loss.backward()
    got = tpext.stats(group)
    logits_bytes = BATCH * SEQ * vocab * 4
    assert got["all_gather"]["calls"] == 0, f"{what}: an all-gather ran ({got['all_gather']}): the logits were gathered"
    for kind, v in got.items():
        assert v["bytes"] < logits_bytes / 2, \
            f"{what}: {kind} moved {v['bytes']} bytes, a logits-sized amount (full logits: {logits_bytes} bytes)"
    # Forward: the two loss all-reduces; backward: the head's input gradient.
    assert got["all_reduce"]["calls"] == 3, f"{what}: expected 3 all-reduces (2 loss, 1 head dgrad), got {got}"
    assert_close_rel(loss, loss_ref, torch.float32, f"{what}: loss")
    assert_close_rel(h.grad, dh_ref, torch.float32, f"{what}: hidden grad")
    assert_close_rel(tpext.gather_shards(head.weight.grad, head.weight, group), dw_ref, torch.float32,
                     f"{what}: head weight grad")


def check_errors(group, device, tag):
    emb = tpext.VocabParallelEmbedding(10, 4, group=group, device=device)
    tpext.reset_stats()
    if device.type == "cpu":  # on CUDA ids are not range-checked (that would synchronise with the host)
        with pytest.raises(IndexError, match=r"input: expected token ids in \[0, 10\)"):
            emb(torch.tensor([[1, 10]], device=device))
        with pytest.raises(IndexError, match=r"input: expected token ids in \[0, 10\)"):
            emb(torch.tensor([[-1, 3]], device=device))
    with pytest.raises(TypeError, match=r"input: expected a tensor of integer token ids"):
        emb(torch.ones(2, 3, device=device))
    with pytest.raises(ValueError, match=r"padding_idx: expected None or an id in \[-10, 10\)"):
        tpext.VocabParallelEmbedding(10, 4, padding_idx=10, group=group, device=device)
    with pytest.raises(TypeError, match=r"embedding: expected a torch.nn.Embedding"):
        tpext.VocabParallelEmbedding.from_embedding(nn.Linear(3, 4), group)
    with pytest.raises(ValueError, match=r"max_norm, scale_grad_by_freq and sparse are not supported"):
        tpext.VocabParallelEmbedding.from_embedding(nn.Embedding(10, 4, max_norm=1.0), group)
    with pytest.raises(ValueError, match=r"tie: embedding: expected 11 x 4 \(vocab x hidden\), got 10 x 4"):
        tpext.ParallelLMHead(4, 11, group=group, tied_to=emb)
    with pytest.raises(TypeError, match=r"tied_to: expected a tpext.VocabParallelEmbedding"):
        tpext.ParallelLMHead(4, 10, group=group, tied_to=nn.Embedding(10, 4))
    n = tensor_split_sizes(10, group.size)[group.rank]
    logits = torch.randn(2, 3, n, device=device)
    target = torch.ones(2, 3, dtype=torch.long, device=device)
    sizes = tensor_split_sizes(10, group.size)
    xent = tpext.vocab_parallel_cross_entropy
    with pytest.raises(ValueError, match=r"target: expected shape \(2, 3\) \(logits without the vocabulary dim\)"):
        xent(logits, target[:, :2], group, vocab_sizes=sizes)
    with pytest.raises(TypeError, match=r"target: expected a tensor of integer token ids"):
        xent(logits, target.float(), group, vocab_sizes=sizes)
    with pytest.raises(TypeError, match=r"logits: expected a floating-point tensor"):
        xent(target, target[..., 0], group, vocab_sizes=sizes)
    with pytest.raises(ValueError, match=r"reduction: expected one of 'mean', 'sum', 'none', got 'avg'"):
        xent(logits, target, group, vocab_sizes=sizes, reduction="avg")
    with pytest.raises(ValueError, match=rf"vocab_sizes: expected {group.size} sizes"):
        xent(logits, target, group, vocab_sizes=sizes + [1])
    if device.type == "cpu":
        with pytest.raises(IndexError, match=r"target: expected ids in \[0, 10\) or ignore_index=-100, got 10"):
            xent(logits, torch.full_like(target, 10), group, vocab_sizes=sizes)
    assert_counts(group, {}, f"{tag}/errors (tp rank {group.rank}): rejected calls must not communicate")


def run_all(group, device, tag, dtypes=(torch.float32, torch.bfloat16)):
    for dtype in dtypes:
        for vocab, dim in VOCABS:
            check_embedding(group, device, tag, dtype, vocab, dim)
            check_head(group, device, tag, dtype, vocab, dim, True, True)
            check_head(group, device, tag, dtype, vocab, dim, False, False)
            check_tied(group, device, tag, dtype, vocab, dim)
            check_cross_entropy(group, device, tag, dtype, vocab, "mean")
        check_embedding(group, device, tag, dtype, 101, 6, padding_idx=100)
        check_embedding(group, device, tag, dtype, 12, 8, padding_idx=5)
        check_embedding_fresh_init(group, device, tag, dtype)
    for vocab, _ in VOCABS:
        check_cross_entropy(group, device, tag, torch.float32, vocab, "sum", ignore_index=1)
        check_cross_entropy(group, device, tag, torch.float32, vocab, "none")
    # Logits far from zero: the max is subtracted before exp (1000 would overflow exp in float32).
    check_cross_entropy(group, device, tag, torch.float32, 101, "mean", offset=1000.0)
    check_head_and_loss_never_gather(group, device, tag)
    check_errors(group, device, tag)


def _cpu_checks(group, tag):
    run_all(group, torch.device("cpu"), tag)


def body(tp_sizes):
    for_each_tp_size(tp_sizes, _cpu_checks)


@pytest.mark.parametrize("world_size,tp_sizes", LAUNCHES, ids=launch_ids(LAUNCHES))
def test_vocab_parallel_embedding_head_and_loss(world_size, tp_sizes):
    launch(body, world_size, args=(tp_sizes,), timeout_s=240)


# -- one process -----------------------------------------------------------------------------------


@pytest.fixture
def single():
    tpext.init(backend="gloo")
    yield tpext.get_tp_group()
    tpext.destroy()


def test_cross_entropy_with_every_token_ignored_is_nan_like_torch(single):
    logits = torch.randn(2, 3, 5, requires_grad=True)
    target = torch.full((2, 3), -100)
    expected = F.cross_entropy(logits.view(-1, 5), target.view(-1))
    loss = tpext.vocab_parallel_cross_entropy(logits, target)
    assert torch.isnan(expected) and torch.isnan(loss), f"got {loss}, F.cross_entropy gives {expected}"
    total = tpext.vocab_parallel_cross_entropy(logits, target, reduction="sum")
    total.backward()
    assert total.item() == 0.0 and not logits.grad.any(), f"sum over ignored tokens: {total}, grad {logits.grad}"


def test_errors_name_the_argument_before_init():
    with pytest.raises(RuntimeError, match=r"VocabParallelEmbedding: group: tpext is not initialised"):
        tpext.VocabParallelEmbedding(10, 4)
    with pytest.raises(RuntimeError, match=r"vocab_parallel_cross_entropy: group: tpext is not initialised"):
        tpext.vocab_parallel_cross_entropy(torch.randn(2, 5), torch.ones(2, dtype=torch.long))


def test_cross_entropy_backward_twice_raises_instead_of_a_wrong_gradient(single):
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss = tpext.vocab_parallel_cross_entropy(logits, torch.ones(2, 3, dtype=torch.long))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"vocab_parallel_cross_entropy: backward ran a second time"):
        loss.backward()
