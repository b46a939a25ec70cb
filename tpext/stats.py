"""Collective counters over this process's groups, for tests and for reading what a model costs:

    tpext.reset_stats()
    loss = model(x).sum(); loss.backward()
    tpext.stats()["all_reduce"]     # {"calls": 2, "bytes": ...} summed over the TP, DP, world groups
    tpext.stats(tpext.get_tp_group())

Every collective counts once per call on the rank that issues it, with the bytes of its input
(reduce-scatter: the whole input), whichever path ran it (NCCL ops, native linear schedules,
gloo). A row-parallel forward cut into k pieces runs k all-reduces and counts k calls. Counting
happens when the work is enqueued, so a captured CUDA graph counts at capture, not at replay.
"""
from typing import Dict, List, Optional

from . import bootstrap
from .groups import COLLECTIVES, Group


def _groups(group: Optional[Group], what: str) -> List[Group]:
    if group is not None:
        if not isinstance(group, Group):
            raise TypeError(f"{what}: group: expected a tpext.Group or None (all groups), got {type(group).__name__}")
        return [group]
    if not bootstrap.is_initialized():
        raise RuntimeError(f"{what}: tpext is not initialised; call tpext.init() first")
    return [bootstrap.get_tp_group(), bootstrap.get_dp_group(), bootstrap.get_world_group()]


def stats(group: Optional[Group] = None) -> Dict[str, Dict[str, int]]:
    """Per collective kind (all_reduce, all_gather, reduce_scatter, broadcast): calls and bytes,
    of `group`, or summed over the TP, DP and world groups of this process."""
    total = {kind: {"calls": 0, "bytes": 0} for kind in COLLECTIVES}
    for g in _groups(group, "stats"):
        for kind, v in g.stats().items():
            total[kind]["calls"] += v["calls"]
            total[kind]["bytes"] += v["bytes"]
    return total


def reset_stats(group: Optional[Group] = None) -> None:
    """Zeroes the counters of `group`, or of every group of this process."""
    for g in _groups(group, "reset_stats"):
        g.reset_stats()
