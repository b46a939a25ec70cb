"""Full parameters from shards and shards from full parameters: gather_params, full_state_dict,
and checkpoints that reload at any TP size.

    with tpext.gather_params(model):          # every rank sees full parameters (and gradients)
        export(model.state_dict())
    tpext.save_checkpoint(model, "ckpt/")     # each rank writes its shard and its layout
    tpext.load_checkpoint(model, "ckpt/")     # any TP size: the model converted at the new size
    sd = tpext.full_state_dict(model)         # rank 0: what the unconverted model loads

A tensor's layout comes from its partition attributes (partition.py, attention.py):
    replicated   no tensor_model_parallel, or False: every rank holds all of it
    split        partition_dim, partition_sizes, partition_stride (tensor_split-like pieces)
    ranges       partition_ranges: every rank's (start, stop) row ranges along partition_dim
                 (head-granular shards with replicated KV heads, fused GQA projections)
Every function here is collective over the TP group (default: the group of the model's tpext
layers): all ranks call it, with the same model structure.

Checkpoint directory: `tpext-checkpoint.json` (written by rank 0: TP size, every tensor's full
shape, dtype and layout) and `shard-RRRRR-of-TTTTT.pt` per TP rank (torch.save of {"tensors":
this rank's tensors, "layouts": their layouts, "tp_size", "rank"}). With several TP groups (data
parallelism) only the first writes; the DP replicas hold the same values.
"""
import contextlib
import json
import os
from typing import Dict, List, Optional

import torch
from torch import nn

from . import bootstrap
from .groups import Group
from .mappings import resolve_group
from .partition import all_gather_uneven

FORMAT = "tpext-checkpoint-1"
INDEX_FILE = "tpext-checkpoint.json"


# -- layouts ---------------------------------------------------------------------------------------


def layout_of(t: torch.Tensor) -> dict:
    """The layout of a parameter or buffer (see the module docstring), JSON-serialisable."""
    if not getattr(t, "tensor_model_parallel", False):
        return {"kind": "replicated"}
    dim = int(t.partition_dim)
    ranges = getattr(t, "partition_ranges", None)
    if ranges is not None:
        return {"kind": "ranges", "dim": dim, "ranges": [[list(r) for r in x] for x in ranges]}
    return {"kind": "split", "dim": dim, "sizes": [int(s) for s in t.partition_sizes],
            "stride": int(getattr(t, "partition_stride", 1))}


def _rank_sizes(layout: dict) -> List[int]:
    if layout["kind"] == "ranges":
        return [sum(b - a for a, b in x) for x in layout["ranges"]]
    return [s * layout["stride"] for s in layout["sizes"]]


def _full_size(layout: dict) -> int:
    if layout["kind"] == "ranges":
        return max((b for x in layout["ranges"] for _, b in x), default=0)
    return sum(layout["sizes"]) * layout["stride"]


def assemble(shards: List[torch.Tensor], layout: dict) -> torch.Tensor:
    """The full tensor from every rank's shard (group-rank order)."""
    if layout["kind"] == "replicated":
        return shards[0]
    dim = layout["dim"]
    if layout["kind"] == "split":
        stride = layout["stride"]
        if stride == 1:
            return torch.cat(shards, dim=dim)
        # Each shard is `stride` equal pieces, piece j belonging to block j of the full tensor.
        pieces = [s.chunk(stride, dim=dim) if s.shape[dim] > 0 else (s,) * stride for s in shards]
        return torch.cat([torch.cat([p[j] for p in pieces], dim=dim) for j in range(stride)], dim=dim)
    shape = list(shards[0].shape)
    shape[dim] = _full_size(layout)
    full = shards[0].new_empty(shape)
    for shard, ranges in zip(shards, layout["ranges"]):
        at = 0
        for a, b in ranges:  # copies of a replicated row are equal: any may land last
            full.narrow(dim, a, b - a).copy_(shard.narrow(dim, at, b - a))
            at += b - a
    return full


def take(full: torch.Tensor, layout: dict, rank: int) -> torch.Tensor:
    """Rank `rank`'s shard of `full` (a fresh contiguous tensor)."""
    if layout["kind"] == "replicated":
        return full.clone()
    dim = layout["dim"]
    if layout["kind"] == "ranges":
        ranges = layout["ranges"][rank]
        if not ranges:
            return full.narrow(dim, 0, 0).contiguous()
        return torch.cat([full.narrow(dim, a, b - a) for a, b in ranges], dim=dim).contiguous()
    sizes, stride = layout["sizes"], layout["stride"]
    blocks = full.chunk(stride, dim=dim) if stride > 1 else (full,)
    start = sum(sizes[:rank])
    return torch.cat([b.narrow(dim, start, sizes[rank]) for b in blocks], dim=dim).contiguous()


def gather_full(t: torch.Tensor, layout: dict, group: Group) -> torch.Tensor:
    """The full tensor of which `t` is this rank's shard (collective over `group`)."""
    if layout["kind"] == "replicated":
        return t
    sizes = _rank_sizes(layout)
    if len(sizes) != group.size:
        raise ValueError(f"gather_full: group: the tensor is split over {len(sizes)} ranks, got {group}")
    dim = layout["dim"]
    gathered = all_gather_uneven(t.contiguous(), group, sizes, dim)
    return assemble(list(gathered.split(sizes, dim=dim)), layout)


# -- which group, which tensors --------------------------------------------------------------------


def model_group(model: nn.Module, group: Optional[Group], what: str) -> Group:
    """`group`, else the group of the model's first tpext layer, else the TP group."""
    if group is not None:
        return resolve_group(group, what)
    for m in model.modules():
        g = getattr(m, "group", None)
        if isinstance(g, Group):
            return resolve_group(g, what)
    return resolve_group(None, what)


def _unique_params(model: nn.Module):
    return [p for p in model.parameters() if getattr(p, "tensor_model_parallel", False)]


def _transposed_keys(model: nn.Module) -> set:
    """Weights of modules converted from a Conv1D ([in, out] storage, GPT-2): transposed back in
    full_state_dict so the unconverted model loads them."""
    return {f"{name}.weight" if name else "weight" for name, m in model.named_modules()
            if getattr(m, "tpext_from_conv1d", False)}


def _check_model(model, what: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}: model: expected a torch.nn.Module, got {type(model).__name__}")


# -- gather_params ---------------------------------------------------------------------------------


@contextlib.contextmanager
def gather_params(model: nn.Module, group: Optional[Group] = None, *, grads: bool = True):
    """Inside the block every tensor-parallel parameter of `model` holds its full value (and, with
    grads=True, its full gradient), on every rank; on exit each is cut back to this rank's shard
    of its (possibly modified) full value. The Parameter objects stay the same, so optimizer
    state keyed by them survives, and gradients come back as they were (None where they were None;
    with grads=False they are not touched at all). Replicated KV heads' gradients, already summed
    over the group, come back once. The tpext layers compute with shards: run the model outside the
    block (inside, export or inspect)."""
    what = "gather_params"
    _check_model(model, what)
    group = model_group(model, group, what)
    params = _unique_params(model)
    layouts = [layout_of(p) for p in params]
    # Whether a gradient is gathered must not depend on this rank alone (the gather is collective):
    # one all-reduce tells every rank which parameters have a gradient anywhere; a rank without one
    # contributes zeros (and gets None back on exit).
    had_grad = [p.grad is not None for p in params]
    gather_grad = [False] * len(params)
    if grads and params:
        flags = torch.tensor(had_grad, dtype=torch.int32, device=group.device)
        group.all_reduce(flags, "max")
        gather_grad = [bool(f) for f in flags.tolist()]
    gathered = []
    try:
        for i, (p, layout) in enumerate(zip(params, layouts)):
            full_grad = None
            with torch.no_grad():
                full = gather_full(p.data, layout, group)
                if gather_grad[i]:
                    g = p.grad if had_grad[i] else torch.zeros_like(p.data)
                    full_grad = gather_full(g, layout, group)
            gathered.append(i)
            p.data = full
            if full_grad is not None:
                p.grad = full_grad
        yield model
    finally:
        for i in gathered:
            p, layout = params[i], layouts[i]
            with torch.no_grad():
                shard = take(p.data, layout, group.rank)
                grad = take(p.grad, layout, group.rank) if gather_grad[i] and p.grad is not None else None
            if not gather_grad[i]:
                p.data = shard  # its gradient (if any) was never gathered: it is still the shard's
                continue
            p.grad = None  # the full gradient does not fit the shard about to be set
            p.data = shard
            if had_grad[i] and grad is not None:
                p.grad = grad


# -- full state dict -------------------------------------------------------------------------------


def full_state_dict(model: nn.Module, group: Optional[Group] = None, *, rank0_only: bool = True) -> Dict[str, torch.Tensor]:
    """The state dict of the unconverted model: every tensor full, on the CPU, Conv1D weights in
    their [in, out] storage. Collective; rank 0 (group rank) gets it, the others an empty dict
    unless rank0_only=False. Tied parameters appear under each of their names, as in the
    unconverted model's state_dict()."""
    what = "full_state_dict"
    _check_model(model, what)
    group = model_group(model, group, what)
    keep = group.rank == 0 or not rank0_only
    transposed = _transposed_keys(model)
    done: Dict[int, Optional[torch.Tensor]] = {}  # tied tensors are gathered once
    out = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) not in done:
            with torch.no_grad():
                full = gather_full(t.detach(), layout_of(t), group)
            done[id(t)] = full.to("cpu", copy=True) if keep else None  # the others keep nothing
        if keep:
            full = done[id(t)]
            out[key] = full.t().contiguous() if key in transposed else full
    return out


# -- checkpoints -----------------------------------------------------------------------------------


def _shard_file(path: str, rank: int, size: int) -> str:
    return os.path.join(path, f"shard-{rank:05d}-of-{size:05d}.pt")


def _barrier(group: Group) -> None:
    """Every rank (of the world when tpext is initialised) has reached this point."""
    g = bootstrap.get_world_group() if bootstrap.is_initialized() else group
    g.all_reduce(torch.zeros(1, device=g.device))


def save_checkpoint(model: nn.Module, path: str, group: Optional[Group] = None) -> None:
    """Writes this rank's shards of `model`'s state dict and their layouts under the directory
    `path` (created if missing); load_checkpoint reads them back at any TP size. Collective."""
    what = "save_checkpoint"
    _check_model(model, what)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what}: path: expected a directory path, got {type(path).__name__}")
    path = os.fspath(path)
    group = model_group(model, group, what)
    writer = not bootstrap.is_initialized() or bootstrap.get_dp_group().rank == 0
    state = model.state_dict(keep_vars=True)
    tensors, layouts, index = {}, {}, {}
    copies: Dict[int, torch.Tensor] = {}
    for key, t in state.items():
        layout = layout_of(t)
        if id(t) not in copies:  # tied tensors: one copy, torch.save stores it once
            copies[id(t)] = t.detach().to("cpu", copy=True).contiguous() if writer else None
        tensors[key], layouts[key] = copies[id(t)], layout
        shape = list(t.shape)
        if layout["kind"] != "replicated":
            shape[layout["dim"]] = _full_size(layout)
        index[key] = {"shape": shape, "dtype": str(t.dtype).replace("torch.", ""), "layout": layout}
    if writer:
        os.makedirs(path, exist_ok=True)
        torch.save({"format": FORMAT, "tp_size": group.size, "rank": group.rank, "tensors": tensors,
                    "layouts": layouts}, _shard_file(path, group.rank, group.size))
        if group.rank == 0:
            with open(os.path.join(path, INDEX_FILE), "w") as f:
                json.dump({"format": FORMAT, "tp_size": group.size, "tensors": index}, f, indent=1)
    _barrier(group)


def _read_index(path: str, what: str) -> dict:
    name = os.path.join(path, INDEX_FILE)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"{what}: path: expected a tpext checkpoint directory holding {INDEX_FILE}, "
                                f"got {path!r}")
    with open(name) as f:
        index = json.load(f)
    if index.get("format") != FORMAT:
        raise ValueError(f"{what}: path: expected format {FORMAT!r} in {name}, got {index.get('format')!r}")
    return index


def load_checkpoint(model: nn.Module, path: str, group: Optional[Group] = None, *, strict: bool = True) -> None:
    """Loads a save_checkpoint directory into `model`, converted at any TP size (the saved one or
    not): each tensor is rebuilt whole from the saved shards, then this rank's shard of it (by the
    model's own layout) is copied in, exactly. strict: the keys must match both ways."""
    what = "load_checkpoint"
    _check_model(model, what)
    path = os.fspath(path)
    group = model_group(model, group, what)
    index = _read_index(path, what)
    saved_tp = int(index["tp_size"])
    files = []
    for r in range(saved_tp):
        name = _shard_file(path, r, saved_tp)
        if not os.path.isfile(name):
            raise FileNotFoundError(f"{what}: path: the checkpoint was saved at TP size {saved_tp}, but {name} is "
                                    f"missing")
        files.append(torch.load(name, map_location="cpu", mmap=True, weights_only=True))
    state = model.state_dict(keep_vars=True)
    missing = [k for k in state if k not in index["tensors"]]
    unexpected = [k for k in index["tensors"] if k not in state]
    if strict and (missing or unexpected):
        raise KeyError(f"{what}: path: the checkpoint does not match the model: missing {missing[:10]}"
                       f"{'...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
                       f"{'...' if len(unexpected) > 10 else ''}")
    done = set()
    for key, t in state.items():
        if key not in index["tensors"] or id(t) in done:
            continue
        done.add(id(t))
        entry = index["tensors"][key]
        layout = layout_of(t)
        model_full = list(t.shape)
        if layout["kind"] != "replicated":
            model_full[layout["dim"]] = _full_size(layout)
        if list(entry["shape"]) != model_full:
            # Checked before cutting: a larger saved tensor would otherwise give a shard of the
            # model's shape and load silently truncated.
            raise ValueError(f"{what}: {key}: the checkpoint's full shape {list(entry['shape'])} differs from the "
                             f"model's {model_full}; was the model built from the same config?")
        full = assemble([f["tensors"][key] for f in files], entry["layout"])
        mine = take(full, layout, group.rank)
        if tuple(mine.shape) != tuple(t.shape):
            raise ValueError(f"{what}: {key}: the checkpoint's full shape {entry['shape']} gives this rank a shard of "
                             f"{tuple(mine.shape)}, but the model holds {tuple(t.shape)}; was the model built from the "
                             f"same config?")
        with torch.no_grad():
            t.copy_(mine)
