"""Checkpoints that reload at any TP size, full_state_dict and gather_params, on converted Hugging
Face models (test_convert.py's tiny Llama and GPT-2: GQA heads whose KV copies make a "ranges"
layout on TP 3 and 4, a fused [q|k|v] Conv1D, tied embeddings, vocabularies no TP size divides), on
CPU tensors (gloo).

A TP 2 checkpoint is written once per session (the `tp2_checkpoint` fixture, a world of 2) from
models trained one AdamW step, so its values are neither the fresh models' nor anything a rank
could rebuild by itself. Loaded at TP 1, 3 and 4 (and 2 again), every parameter gathers back bit
for bit to the full state dict written next to it, and the logits equal the unconverted model's.
Saved again from a world of 4 at TP 2 (two TP groups), only the first TP group writes, and the
files hold the same tensors bit for bit.

full_state_dict loads into the unconverted model (and survives save_pretrained / from_pretrained).
gather_params shows full parameters and gradients on every rank, takes modifications back, and on
exit leaves shards, gradients and optimizer state so that the next AdamW step is bit for bit the
step taken without the block.
"""
import os

import pytest
import torch

import tpext
from _dist import launch
from test_convert import assert_rel, build, convert, for_each_tp_size_on, token_ids

CKPT_FAMILIES = ("llama", "gpt2")


# -- helpers ---------------------------------------------------------------------------------------


def train_one_step(model, ids, lr=1e-2):
    """One AdamW step on the model's own loss; returns the optimizer (its state is what a resumed run
    needs)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, eps=1e-3)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    return opt


def assert_state_equal(got: dict, expected: dict, what: str) -> None:
    """Same keys, and every tensor bit for bit."""
    assert sorted(got) == sorted(expected), \
        f"{what}: keys differ: extra {sorted(set(got) - set(expected))[:5]}, " \
        f"missing {sorted(set(expected) - set(got))[:5]}"
    for k, t in expected.items():
        g = got[k]
        assert g.shape == t.shape and g.dtype == t.dtype, \
            f"{what}: {k}: {tuple(g.shape)} {g.dtype}, expected {tuple(t.shape)} {t.dtype}"
        diff = (g.cpu().double() - t.cpu().double()).abs().max().item()
        assert torch.equal(g.cpu(), t.cpu()), f"{what}: {k} differs from the saved value (max |diff| {diff:.3g})"


def saved_model(family, group, device, tag):
    """The converted model of `family`, trained one step (the values the checkpoint holds)."""
    model = convert(build(family, device), group)
    train_one_step(model, token_ids(f"ckpt/{family}/train", model.config.vocab_size).to(device))
    return model


# -- the checks (any device) -----------------------------------------------------------------------


def check_save(group, device, tag, path):
    """Writes the checkpoint of each family under path/family; returns the full state dicts it holds
    (on every rank)."""
    states = {}
    for family in CKPT_FAMILIES:
        model = saved_model(family, group, device, tag)
        tpext.save_checkpoint(model, os.path.join(path, family))
        rank0 = tpext.full_state_dict(model, group)
        assert (len(rank0) > 0) == (group.rank == 0), \
            f"{tag}/{family}: full_state_dict gave {len(rank0)} tensors on group rank {group.rank}; " \
            f"rank 0 only by default"
        states[family] = tpext.full_state_dict(model, group, rank0_only=False)
    return states


def check_load(group, device, tag, path, states):
    """Loads the checkpoint into freshly converted models at this TP size: every gathered tensor
    equals the saved one bit for bit, and the logits equal the unconverted model's holding them."""
    for family in CKPT_FAMILIES:
        what = f"{tag}/{family}: TP {group.size} load of the TP 2 checkpoint (tp rank {group.rank})"
        model = convert(build(family, device), group)
        fresh = tpext.full_state_dict(model, group, rank0_only=False)
        expected = states[family]
        changed = [k for k in expected if not torch.equal(fresh[k], expected[k])]
        assert changed, f"{what}: the fresh model already holds the checkpoint's values; the check would prove nothing"
        tpext.load_checkpoint(model, os.path.join(path, family))
        assert_state_equal(tpext.full_state_dict(model, group, rank0_only=False), expected, what)
        ref = build(family, device)
        ref.load_state_dict(expected)
        ids = token_ids(f"{tag}/{family}/ids", ref.config.vocab_size).to(device)
        with torch.no_grad():
            assert_rel(model(input_ids=ids).logits, ref(input_ids=ids).logits, 1e-4, f"{what}: logits")


def check_full_state_dict_round_trip(group, device, tag, tmp):
    """full_state_dict (rank 0) loads into the plain model; save_pretrained / from_pretrained keep it;
    the reloaded plain model gives the converted model's logits."""
    family = "gpt2"  # Conv1D weights must come back in their [in, out] storage, tied weights under both names
    what = f"{tag}/{family}/full_state_dict (tp rank {group.rank} of {group.size})"
    model = saved_model(family, group, device, tag)
    ids = token_ids(f"{tag}/fsd/ids", model.config.vocab_size).to(device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    sd = tpext.full_state_dict(model, group)
    if group.rank != 0:
        assert sd == {}, f"{what}: ranks other than 0 get an empty dict, got {len(sd)} tensors"
        return
    plain = build(family, device)
    assert sorted(sd) == sorted(plain.state_dict()), f"{what}: keys differ from the plain model's state_dict"
    for k, t in plain.state_dict().items():
        assert sd[k].shape == t.shape, f"{what}: {k} has shape {tuple(sd[k].shape)}, the plain model {tuple(t.shape)}"
        assert sd[k].device.type == "cpu", f"{what}: {k} on {sd[k].device}, expected the CPU"
    plain.load_state_dict(sd)
    assert plain.lm_head.weight is plain.transformer.wte.weight, f"{what}: loading untied the plain model"
    out = os.path.join(tmp, f"pretrained-{group.ranks[0]}")
    plain.save_pretrained(out)
    again = type(plain).from_pretrained(out).to(device).eval()
    assert_state_equal(again.state_dict(), sd, f"{what}: after save_pretrained / from_pretrained")
    with torch.no_grad():
        assert_rel(again(input_ids=ids).logits, logits, 1e-4, f"{what}: logits of the reloaded plain model")


def check_gather_params(group, device, tag):
    """gather_params on Llama after a step (so AdamW has state) and a backward (so there are
    gradients): inside, full parameters and gradients on every rank, equal to the unconverted twin's;
    on exit, the same shards, gradients and optimizer state, so the next step is bit for bit the one
    of a twin that never entered the block; a change made inside is kept."""
    family = "llama"
    what = f"{tag}/{family}/gather_params (tp rank {group.rank} of {group.size})"
    vocab = build(family).config.vocab_size
    ids = token_ids(f"{tag}/gp/ids", vocab).to(device)
    ref = build(family, device)
    twins = [convert(build(family, device), group) for _ in range(2)]
    opts = [train_one_step(m, ids) for m in [ref] + twins]
    for m in [ref] + twins:
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
    model, twin = twins
    shards = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    states = {n: {k: v.clone() for k, v in opts[1].state[p].items()} for n, p in model.named_parameters()}
    full_ref = dict(ref.named_parameters())
    with tpext.gather_params(model) as inside:
        assert inside is model, f"{what}: the block must yield the model"
        for n, p in model.named_parameters():
            r = full_ref[n]
            assert p.shape == r.shape, f"{what}: {n} inside the block has shape {tuple(p.shape)}, full {tuple(r.shape)}"
            assert p.grad is not None and p.grad.shape == r.shape, \
                f"{what}: {n}.grad inside the block: {None if p.grad is None else tuple(p.grad.shape)}"
            assert_rel(p, r, 1e-5, f"{what}: {n} inside the block vs the unconverted model")
            assert_rel(p.grad, r.grad, 1e-4, f"{what}: {n}.grad inside the block vs the unconverted model",
                       atol=1e-5 * max(q.grad.abs().max().item() for q in ref.parameters()))
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), shards[n]), f"{what}: {n} is not its shard after the block"
        assert torch.equal(p.grad, grads[n]), f"{what}: {n}.grad is not its shard's gradient after the block"
        for k, v in states[n].items():
            assert torch.equal(opts[1].state[p][k], v), f"{what}: optimizer state {k} of {n} changed"
    opts[1].step()
    opts[2].step()
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(p.detach(), q.detach()), f"{what}: {n} after an AdamW step differs from the twin's that " \
                                                    f"never entered gather_params"

    # A change made inside the block is what each rank keeps; grads=False leaves gradients alone.
    emb = model.get_input_embeddings()
    before = emb.weight.detach().clone()
    with tpext.gather_params(model, grads=False):
        assert emb.weight.grad.shape == before.shape, f"{what}: grads=False gathered the gradient"
        with torch.no_grad():
            emb.weight.mul_(2)
    assert torch.equal(emb.weight.detach(), 2 * before), f"{what}: the change made inside the block was lost"
    assert torch.equal(emb.weight.grad, grads["model.embed_tokens.weight"]), \
        f"{what}: grads=False changed the gradient"

    # A parameter with a gradient on some ranks only (here: on rank 0) still gathers, without a hang.
    for p in model.parameters():
        p.grad = None
    if group.rank == 0:
        emb.weight.grad = torch.ones_like(emb.weight)
    with tpext.gather_params(model):
        g = emb.weight.grad
        assert g is not None and g.shape[0] == vocab, f"{what}: a gradient held by rank 0 only was not gathered"
        assert float(g.sum()) == emb.weight.partition_sizes[0] * emb.weight.shape[1], \
            f"{what}: the gathered gradient must be rank 0's ones and zeros elsewhere"
    assert (emb.weight.grad is not None) == (group.rank == 0), \
        f"{what}: a rank that had no gradient must get None back, one that had one its shard"


def check_resave_from_dp_world(group, device, tag, path, saved):
    """At TP 2 in a world with several TP groups only the first writes; the files hold the very
    tensors of the checkpoint they were loaded from."""
    for family in CKPT_FAMILIES:
        what = f"{tag}/{family}: resave (tp rank {group.rank})"
        model = convert(build(family, device), group)
        tpext.load_checkpoint(model, os.path.join(saved, family))
        out = os.path.join(path, family)
        tpext.save_checkpoint(model, out)
        files = sorted(os.listdir(out))
        assert files == ["shard-00000-of-00002.pt", "shard-00001-of-00002.pt", "tpext-checkpoint.json"], \
            f"{what}: files {files}"
        for name in files[:2]:
            a = torch.load(os.path.join(out, name), weights_only=True)
            b = torch.load(os.path.join(saved, family, name), weights_only=True)
            assert (a["tp_size"], a["rank"]) == (b["tp_size"], b["rank"]), f"{what}: {name} header"
            assert a["layouts"] == b["layouts"], f"{what}: {name} layouts differ"
            assert_state_equal(a["tensors"], b["tensors"], f"{what}: {name}")


# -- CPU launches ------------------------------------------------------------------------------------


def save_and_reload_body(path, backend="gloo"):
    """A world of 2: the TP 2 checkpoint written, then read back at TP 1 (two TP groups) in the same
    processes. Returns the full state dicts it holds. test_models_gpu.py runs it through NCCL."""
    saved = {}

    def checks(group, device, tag):
        if group.size == 2:
            saved.update(check_save(group, device, tag, path))
        else:
            check_load(group, device, tag, path, saved)
    for_each_tp_size_on(backend, (2, 1), checks)
    return saved


@pytest.fixture(scope="module")
def tp2_checkpoint(tmp_path_factory):
    """(directory, the full state dicts it holds): a TP 2 checkpoint of each family, already proven
    to load back at TP 1."""
    path = str(tmp_path_factory.mktemp("tp2-checkpoint"))
    states = launch(save_and_reload_body, 2, args=(path,), timeout_s=180)[0]
    return path, states


def world4_body(saved, states, tmp):
    def checks(group, device, tag):
        if group.size == 2:
            check_resave_from_dp_world(group, device, tag, os.path.join(tmp, "resaved"), saved)
        check_load(group, device, tag, saved, states)
        if group.size == 4:
            check_gather_params(group, device, tag)
            check_full_state_dict_round_trip(group, device, tag, tmp)
    for_each_tp_size_on("gloo", (2, 4), checks)  # TP 1: in the tp2_checkpoint fixture


def world3_body(saved, states, tmp):
    def checks(group, device, tag):
        check_load(group, device, tag, saved, states)
        check_gather_params(group, device, tag)
    for_each_tp_size_on("gloo", (3,), checks)


def test_checkpoint_tp2_loads_at_tp2_4_and_gather_params(tp2_checkpoint, tmp_path):
    saved, states = tp2_checkpoint
    launch(world4_body, 4, args=(saved, states, str(tmp_path)), timeout_s=240)


def test_checkpoint_tp2_loads_at_tp3_and_gather_params(tp2_checkpoint, tmp_path):
    saved, states = tp2_checkpoint
    launch(world3_body, 3, args=(saved, states, str(tmp_path)), timeout_s=240)


# -- one process -----------------------------------------------------------------------------------


@pytest.fixture
def single():
    tpext.init(backend="gloo")
    yield tpext.get_tp_group()
    tpext.destroy()


def test_load_errors_name_the_problem(single, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"load_checkpoint: path: expected a tpext checkpoint directory"):
        tpext.load_checkpoint(build("llama"), str(tmp_path / "nothing"))
    llama = convert(build("llama"), single)
    tpext.save_checkpoint(llama, str(tmp_path / "llama"))
    with pytest.raises(KeyError, match=r"the checkpoint does not match the model: missing \['transformer\."):
        tpext.load_checkpoint(convert(build("gpt2"), single), str(tmp_path / "llama"))
    smaller = convert(build("llama", vocab_size=97), single)
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight: the checkpoint's full shape \[101, 48\] "
                                         r"differs from the model's \[97, 48\]"):
        tpext.load_checkpoint(smaller, str(tmp_path / "llama"))
    os.remove(tmp_path / "llama" / "shard-00000-of-00001.pt")
    with pytest.raises(FileNotFoundError, match=r"saved at TP size 1, but .*shard-00000-of-00001.pt is missing"):
        tpext.load_checkpoint(llama, str(tmp_path / "llama"))
    with pytest.raises(TypeError, match=r"save_checkpoint: path: expected a directory path"):
        tpext.save_checkpoint(llama, 3)
