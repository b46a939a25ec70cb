"""tpext.init / tpext.destroy: process bootstrap under torchrun, and the TP / DP groups.

Ranks are laid out as Megatron does: TP groups of `tp_size` consecutive ranks (inside a node, where
NVLink is), DP groups across them (rank r is in TP group r // tp_size and DP group r % tp_size).
The NCCL world communicator is created from a unique id exchanged through the c10d Store; the TP
and DP communicators are split from it (ncclCommSplit, no further exchange). A gloo process group
per group serves CPU tensors.
"""
import datetime
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist

from . import _C
from .groups import Group

_BACKENDS = ("auto", "nccl", "gloo")
MAX_NCCL_CTAS = 64  # NCCL's MAXCHANNELS: a collective runs at most one CTA per channel
MAX_NCCL_WINDOW_MIB = 1 << 16  # 64 GiB per rank: beyond any GPU's memory, so a unit mix-up (bytes) is caught


@dataclass
class _State:
    world: Group
    tp: Group
    dp: Group
    owns_default_pg: bool
    gloo_groups: list
    nccl_handles: list  # destroyed in this order: children before the world communicator


_state: Optional[_State] = None
_generation = 0  # how many times this process called init(); equal on every rank, keys the Store
# The env:// rendezvous store of the first init, ((MASTER_ADDR, MASTER_PORT, rank, world_size),
# store), kept for the process's lifetime and shared by every later generation (each under its own
# prefix). Were it dropped with the process group at destroy(), a rank that finished destroy() first
# and called init() again could connect to rank 0's old TCPStore server just before rank 0's
# destroy() closed it: that rank would fail ("Failed to recv") and rank 0 would wait for it in vain.
_rendezvous = None


def _seconds(timeout: Union[float, int, datetime.timedelta]) -> float:
    if isinstance(timeout, datetime.timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise TypeError(f"init: timeout: expected seconds (a number) or a datetime.timedelta, got {type(timeout).__name__}")
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"init: timeout: expected a positive, finite duration, got {seconds} s")
    return seconds


def _env_int(name: str, default: Optional[int]) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise RuntimeError(f"init: environment variable {name} is not set; launch with torchrun")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"init: environment variable {name}: expected an integer, got {raw!r}") from None


def _check_ctas(name: str, value) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise TypeError(f"init: {name}: expected None or an int, got {type(value).__name__}")
    if value is not None and not 1 <= value <= MAX_NCCL_CTAS:
        raise ValueError(f"init: {name}: expected None (NCCL's choice) or an int in [1, {MAX_NCCL_CTAS}] "
                         f"(NCCL's channel limit), got {value}")


def _check_window(value) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise TypeError(f"init: nccl_window_mib: expected None or an int, got {type(value).__name__}")
    if value is not None and not 0 <= value <= MAX_NCCL_WINDOW_MIB:
        raise ValueError(f"init: nccl_window_mib: expected None or an int in [0, {MAX_NCCL_WINDOW_MIB}] (MiB per "
                         f"rank and communicator), got {value}")


def init(tp_size: Optional[int] = None, timeout: Union[float, datetime.timedelta] = 600.0,
         backend: str = "auto", *, nccl_max_ctas: Optional[int] = None,
         nccl_overlap_ctas: Optional[int] = None, nccl_window_mib: Optional[int] = None) -> Group:
    """Initialises tpext in this process and returns the TP group.

    tp_size: ranks per tensor-parallel group; must divide the world size (default: all ranks).
    timeout: seconds (or a timedelta) after which a communicator waiting for a missing or diverging
        peer is aborted and an exception raised instead of hanging.
    backend: "auto" (NCCL when CUDA is available, else gloo only), "nccl", or "gloo".
    nccl_max_ctas: the most CTAs (SMs) a collective of tpext's NCCL communicators may take
        (ncclConfig.maxCTAs; None: NCCL's choice), e.g. the n of tpext.set_overlap_sms(n), so that
        the GEMMs running beside a collective keep the rest. Unlike NCCL_MAX_CTAS in the
        environment it leaves other NCCL users of the process (torch.distributed) alone. Ignored
        where no NCCL communicator is made (gloo).
    nccl_overlap_ctas: the most CTAs of the collectives tpext runs beside its own GEMMs (a
        row-parallel piece's all-reduce while the next piece multiplies, the column-parallel dx
        all-reduce beside the weight-gradient GEMM); pair it with tpext.set_overlap_sms(n). They
        go through a second NCCL communicator capped at n (at nccl_max_ctas where that is lower),
        so the collectives that run alone (a single piece, the last one, every plain collective)
        keep all the CTAs NCCL wants: capping those only adds exposed time (bench/NOTES.md).
        None: no second communicator.
    nccl_window_mib: a symmetric NCCL window of that many MiB per rank on each communicator of
        more than one rank (NCCL 2.27+: ncclMemAlloc memory registered with
        NCCL_WIN_COLL_SYMMETRIC). A row-parallel forward whose output fits writes it there, and
        its all-reduce runs NCCL's symmetric kernels (on 2 H200s 24 instead of 36 us for 4 MiB,
        bench/NOTES.md attempt 10), plus a copy into the output. None or 0: no window.

    Works under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), alongside a
    torch.distributed process group the caller already initialised, and in a plain single process.
    """
    global _state, _generation
    if _state is not None:
        raise RuntimeError("init: tpext is already initialised; call tpext.destroy() first")
    if backend not in _BACKENDS:
        raise ValueError(f"init: backend: expected one of {', '.join(map(repr, _BACKENDS))}, got {backend!r}")
    timeout_s = _seconds(timeout)
    _check_ctas("nccl_max_ctas", nccl_max_ctas)
    _check_ctas("nccl_overlap_ctas", nccl_overlap_ctas)
    _check_window(nccl_window_mib)

    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", rank)

    if tp_size is None:
        tp_size = world_size
    if not isinstance(tp_size, int) or isinstance(tp_size, bool):
        raise TypeError(f"init: tp_size: expected an int, got {type(tp_size).__name__}")
    if tp_size < 1 or world_size % tp_size != 0:
        raise ValueError(f"init: tp_size: expected a positive divisor of the world size {world_size}, got {tp_size}")

    use_nccl = backend == "nccl" or (backend == "auto" and torch.cuda.is_available())
    device = None
    if use_nccl:
        if not torch.cuda.is_available():
            raise RuntimeError("init: backend='nccl' needs CUDA, but torch.cuda.is_available() is False")
        ndev = torch.cuda.device_count()
        if not 0 <= local_rank < ndev:
            raise ValueError(
                f"init: LOCAL_RANK: expected a GPU index in [0, {ndev}) (this node has {ndev} visible GPUs), "
                f"got {local_rank}; start at most {ndev} processes per node, or pass backend='gloo'")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)

    td = datetime.timedelta(seconds=timeout_s)
    owns_default_pg = False
    if not dist.is_initialized():
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=td)
        else:
            store, rank, world_size = _env_store(rank, world_size, td)
            store = dist.PrefixStore(f"tpext/{_generation}", store)
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=td)
        owns_default_pg = True

    # Every rank must create every group, in the same order (torch.distributed's rule).
    gloo_groups = []
    tp_gloo = dp_gloo = None
    n_tp = world_size // tp_size
    tp_ranks = list(range((rank // tp_size) * tp_size, (rank // tp_size + 1) * tp_size))
    dp_ranks = list(range(rank % tp_size, world_size, tp_size))
    try:
        for i in range(n_tp):
            g = dist.new_group(list(range(i * tp_size, (i + 1) * tp_size)), backend="gloo", timeout=td)
            gloo_groups.append(g)
            if i == rank // tp_size:
                tp_gloo = g
        for j in range(tp_size):
            g = dist.new_group(list(range(j, world_size, tp_size)), backend="gloo", timeout=td)
            gloo_groups.append(g)
            if j == rank % tp_size:
                dp_gloo = g
        world_gloo = dist.new_group(list(range(world_size)), backend="gloo", timeout=td)
        gloo_groups.append(world_gloo)
    except BaseException:
        _destroy_gloo(gloo_groups, owns_default_pg)
        raise

    handles = []
    world_h = tp_h = dp_h = None
    if use_nccl:
        try:
            world_h = _create_world_communicator(rank, world_size, device.index, timeout_s, nccl_max_ctas,
                                                 nccl_overlap_ctas, nccl_window_mib)
            handles.append(world_h)
            tp_h = _C.comm_split(world_h, rank // tp_size, rank % tp_size, "tp", timeout_s)
            handles.insert(0, tp_h)
            dp_h = _C.comm_split(world_h, rank % tp_size, rank // tp_size, "dp", timeout_s)
            handles.insert(0, dp_h)
        except BaseException:
            for h in handles:
                _C.comm_abort(h)
            _destroy_gloo(gloo_groups, owns_default_pg)
            raise
    _generation += 1

    _state = _State(
        world=Group("world", list(range(world_size)), rank, world_gloo, world_h, device, timeout_s),
        tp=Group("tp", tp_ranks, rank % tp_size, tp_gloo, tp_h, device, timeout_s),
        dp=Group("dp", dp_ranks, rank // tp_size, dp_gloo, dp_h, device, timeout_s),
        owns_default_pg=owns_default_pg,
        gloo_groups=gloo_groups,
        nccl_handles=handles,
    )
    return _state.tp


def _env_store(rank: int, world_size: int, td: datetime.timedelta):
    """The env:// rendezvous store (TCPStore: rank 0 serves it), created once per process and
    launch (MASTER_ADDR/MASTER_PORT, rank, world size) and reused by later generations."""
    global _rendezvous
    key = (os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"), rank, world_size)
    if _rendezvous is not None and _rendezvous[0] == key:
        store = _rendezvous[1]
    else:
        store, rank, world_size = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=td))
        _rendezvous = (key, store)
    store.set_timeout(td)
    return store, rank, world_size


def _create_world_communicator(rank: int, world_size: int, device: int, timeout_s: float,
                               max_ctas: Optional[int], overlap_ctas: Optional[int],
                               window_mib: Optional[int]) -> int:
    """The world's NCCL communicator; the TP and DP ones are split from it and inherit both caps
    and the window size."""
    store = dist.distributed_c10d._get_default_store()
    key = f"tpext/{_generation}/nccl_unique_id"
    if rank == 0:
        store.set(key, _C.unique_id())
    uid = store.get(key)  # blocks until rank 0 has published it, up to the store's timeout
    return _C.comm_create(uid, rank, world_size, device, "world", timeout_s,
                          max_ctas=-1 if max_ctas is None else max_ctas,
                          overlap_max_ctas=-1 if overlap_ctas is None else overlap_ctas,
                          window_bytes=(window_mib or 0) << 20)


def _destroy_gloo(groups, owns_default_pg: bool) -> None:
    if owns_default_pg:
        dist.destroy_process_group()  # also destroys every group created from it
        return
    for g in groups:
        dist.destroy_process_group(g)


# How long destroy() waits for graphs the caller just dropped: CUDA reports their destruction
# from an internal thread, shortly after the last replay finished.
GRAPH_RELEASE_WAIT_S = 10.0


def destroy() -> None:
    """Releases every communicator and group tpext created; tpext.init() works again afterwards.

    A default torch.distributed process group the caller created stays as it was. When tpext
    created the default group itself (no process group existed at init), it is destroyed here,
    and with it every group created from it, tpext's or not."""
    global _state
    if _state is None:
        return
    # NCCL's destroy waits for every CUDA graph that captured a collective of the communicator to
    # be destroyed, so a live graph would hang it. Refuse before releasing anything: the groups
    # stay usable and destroy() can be called again once the graphs are gone.
    for h in _state.nccl_handles:
        _C.comm_require_no_live_graphs(h, GRAPH_RELEASE_WAIT_S)
    state, _state = _state, None
    for g in (state.tp, state.dp, state.world):
        g._destroy()
    errors = []
    for h in state.nccl_handles:
        try:
            _C.comm_destroy(h)
        except Exception as e:  # keep releasing the rest, then report
            errors.append(e)
    _destroy_gloo(state.gloo_groups, state.owns_default_pg)
    # NCCL frees ~100 MB of host memory per communicator it destroys; glibc would keep it, so RSS
    # would stay at its peak and creep up over init/destroy cycles (csrc/core/host_memory.h).
    _C.release_freed_host_memory()
    if errors:
        raise errors[0]


def is_initialized() -> bool:
    return _state is not None


def _require(what: str) -> _State:
    if _state is None:
        raise RuntimeError(f"{what}: tpext is not initialised; call tpext.init() first")
    return _state


def get_tp_group() -> Group:
    """This rank's tensor-parallel group."""
    return _require("get_tp_group").tp


def get_dp_group() -> Group:
    """This rank's data-parallel group (the ranks holding the same TP shard)."""
    return _require("get_dp_group").dp


def get_world_group() -> Group:
    return _require("get_world_group").world
