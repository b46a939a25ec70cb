"""Cross-rank agreement checks of collectives: ranks that call different collectives, or the same
one with different shapes, raise on every rank naming the ranks and what each called, instead of
hanging, crashing or returning a silently wrong result.

Before a checked collective every rank all-gathers a small fixed-size record of the call (which
collective, shape, dtype, device type, reduce op / dim / src / chunks) over the group's gloo
process group and compares them; any difference raises CollectiveMismatch on every rank, before
anything is enqueued (the group stays usable). The exchange is one 128-byte all-gather per
collective on the CPU, with no CUDA synchronisation.

When it runs:
- CPU tensors (the gloo path): always. Gloo itself aborts the process (std::terminate in its
  transport thread) on a size mismatch and silently mixes data of equal size but different
  shape, so this check is what keeps a diverging CPU run from crashing. Its cost is small next
  to the gloo collective it guards.
- CUDA tensors (the NCCL path, the native row-parallel forward and column-parallel backward):
  only with TPEXT_DEBUG=1 in the environment (read at import; tpext.debug.set_enabled() changes
  it at run time); it costs a host round trip per collective. Without it a diverging NCCL call
  is caught late by the communicator's watchdog: a collective that does not complete within
  tpext.init(timeout=) aborts the communicator, and the next tpext call on it raises
  tpext.CommTimeout. The diverging call itself returns (it is only enqueued) and its result is
  wrong: on 2 H200s, an all-reduce of 1000 elements on one rank and 1007 on the other completed
  at once on the first rank (its 1000 elements looked right) and was aborted after the timeout
  on the second, whose next call raised, as did the first rank's call after next. A mismatch
  NCCL completes on every rank (same element count, different shape) goes unnoticed. That is
  what the check is for.

Under torch.compile tracing the check is skipped (it is host-side Python over gloo).
"""
import os
import zlib
from typing import List, Optional, Sequence

import torch

from ._C import TpextError


class CollectiveMismatch(TpextError):
    """The ranks of a group called different collectives, or the same one with different
    arguments (shape, dtype, reduce op, dim, src). Raised on every rank of the group, before
    anything was enqueued."""


def _env_flag(raw: Optional[str]) -> bool:
    return raw is not None and raw.strip().lower() not in ("", "0", "false", "no", "off")


_enabled = _env_flag(os.environ.get("TPEXT_DEBUG"))


def enabled() -> bool:
    """Whether collectives on CUDA tensors are checked too (TPEXT_DEBUG=1)."""
    return _enabled


def set_enabled(flag: bool) -> None:
    """Turns the check of CUDA collectives on or off in this process. Every rank must agree: the
    check is itself a collective."""
    global _enabled
    _enabled = bool(flag)


# -- the record --------------------------------------------------------------------------------

OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "row_parallel_linear",
       "column_parallel_backward")
_REDUCE_OPS = ("sum", "prod", "max", "min", "avg")
CHUNK_BY = ("auto", "rows", "columns")  # row_parallel_linear's chunk_by, in the record's dim slot
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int32,
           torch.int64, torch.bool, torch.complex64, torch.complex128, torch.int16)
_DEVICES = ("cpu", "cuda")
_MAX_DIMS = 8
_NONE = -(1 << 62)  # "not given" in a parameter slot
_MAGIC = 0x7470657874  # 'tpext'
# magic, op, dtype, device type, ndim, dims[8], reduce op, dim, src/chunks
RECORD_LEN = 5 + _MAX_DIMS + 3


def _code(table: Sequence, value) -> int:
    try:
        return table.index(value)
    except ValueError:
        return len(table) + zlib.crc32(str(value).encode()) % 1000  # unknown, the same on every rank


def encode(op: str, shape: Sequence[int], dtype: torch.dtype, device_type: str, reduce_op: Optional[str] = None,
           dim: Optional[int] = None, extra: Optional[int] = None) -> torch.Tensor:
    """The fixed-size int64 record of one call. Shapes of more than 8 dimensions keep the first 7
    and fold the rest into the 8th (their product), which still tells different sizes apart."""
    shape = [int(s) for s in shape]
    dims = shape[:_MAX_DIMS]
    if len(shape) > _MAX_DIMS:
        folded = 1
        for s in shape[_MAX_DIMS - 1:]:
            folded *= s
        dims = shape[:_MAX_DIMS - 1] + [folded]
    dims = dims + [_NONE] * (_MAX_DIMS - len(dims))
    rec = [_MAGIC, _code(OPS, op), _code(_DTYPES, dtype), _code(_DEVICES, device_type), len(shape), *dims,
           _NONE if reduce_op is None else _code(_REDUCE_OPS, reduce_op),
           _NONE if dim is None else int(dim),
           _NONE if extra is None else int(extra)]
    return torch.tensor(rec, dtype=torch.int64)


def describe(rec: Sequence[int], extra_name: str = "src") -> str:
    """A record as text: 'all_reduce(shape=(3, 4), dtype=torch.float32, cpu, op='sum')'."""
    rec = [int(v) for v in rec]
    if rec[0] != _MAGIC:
        return "<not a tpext collective record>"

    def name(table, code):
        return str(table[code]) if 0 <= code < len(table) else f"<unknown #{code}>"

    op = name(OPS, rec[1])
    ndim = rec[4]
    dims = [d for d in rec[5:5 + _MAX_DIMS] if d != _NONE]
    shape = tuple(dims) if ndim <= _MAX_DIMS else tuple(dims[:-1]) + (f"...{dims[-1]} elements",)
    parts = [f"shape={shape}", f"dtype={name(_DTYPES, rec[2])}", name(_DEVICES, rec[3])]
    reduce_op, dim, extra = rec[5 + _MAX_DIMS:]
    if reduce_op != _NONE:
        parts.append(f"op={name(_REDUCE_OPS, reduce_op)!r}")
    if dim != _NONE:
        parts.append(f"chunk_by={name(CHUNK_BY, dim)!r}" if op == "row_parallel_linear" else f"dim={dim}")
    if extra != _NONE:
        parts.append(f"{'chunks' if op == 'row_parallel_linear' else 'src'}={extra}")
    return f"{op}({', '.join(parts)})"


def compare(group_desc: str, ranks: Sequence[int], records: List[Sequence[int]], what: str) -> None:
    """Raises CollectiveMismatch when the records (one per group rank, in group-rank order)
    differ; the message lists every rank's call."""
    rows = [tuple(int(v) for v in r) for r in records]
    if all(r == rows[0] for r in rows):
        return
    groups = {}
    for rank, r in zip(ranks, rows):
        groups.setdefault(r, []).append(rank)
    lines = "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {describe(r)}"
                      for r, rs in groups.items())
    raise CollectiveMismatch(
        f"tpext: {what}: the ranks of {group_desc} called different collectives or passed different "
        f"arguments ({lines}). Every rank of a group must make the same collective calls with the same shapes, "
        f"dtypes and arguments. Nothing was enqueued; the group is still usable.")


def check(group, op: str, shape: Sequence[int], dtype: torch.dtype, device_type: str,
          reduce_op: Optional[str] = None, dim: Optional[int] = None, extra: Optional[int] = None) -> None:
    """Exchanges this call's record over `group` (a tpext.Group) and raises CollectiveMismatch on
    every rank if the ranks disagree. A collective itself: every rank of the group must call it."""
    if group.size == 1 or torch.compiler.is_compiling():
        return
    rec = encode(op, shape, dtype, device_type, reduce_op, dim, extra)
    records = group._exchange_records(rec, op)
    compare(group.describe(), group.ranks, records, op)
