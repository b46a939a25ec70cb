"""Seeded inputs every rank can regenerate, and the references the collectives are checked against.

Rank r's input for a check named `tag` comes from a CPU generator seeded by (tag, r) only, so any
rank rebuilds every other rank's input locally and computes the expected result itself, in
float64 (exactly for integers), without trusting any communication.

Tolerances follow from the arithmetic, not from trial: a sum of n values, each step rounded to
the dtype (unit roundoff u = eps / 2), is off by at most about n * u * sum(|x_i|) whatever the
order the reduction takes; we allow n * eps * sum(|x_i|) (twice that), plus one rounding of the
result. max/min, gathers and broadcasts move values without arithmetic and must match exactly.
"""
import zlib
from typing import Iterable, List, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
REDUCE_OPS = ("sum", "prod", "max", "min", "avg")


def seed_of(tag: str, rank: int) -> int:
    # crc32, not hash(): Python salts str hashes per process, and every rank must agree.
    return zlib.crc32(f"{tag}/rank{rank}".encode())


def make_input(tag: str, rank: int, shape: Sequence[int], dtype: torch.dtype, op: str = "sum") -> torch.Tensor:
    """Rank `rank`'s input (on the CPU) for check `tag`: fresh random values, never zeros.

    For 'prod' the magnitudes stay in [0.5, 2) so a product over 4 ranks neither overflows fp16
    nor underflows; integers stay small so every product over 4 ranks fits exactly."""
    g = torch.Generator().manual_seed(seed_of(tag, rank))
    shape = tuple(shape)
    if dtype.is_floating_point:
        if op == "prod":
            mag = torch.rand(shape, generator=g, dtype=torch.float64) * 1.5 + 0.5
            sign = torch.randint(0, 2, shape, generator=g, dtype=torch.int64) * 2 - 1
            return (mag * sign).to(dtype)
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    # Integers: non-zero values in [-9, 9] (a zero would hide a missing factor of a product).
    mag = torch.randint(1, 10, shape, generator=g, dtype=torch.int64)
    sign = torch.randint(0, 2, shape, generator=g, dtype=torch.int64) * 2 - 1
    return (mag * sign).to(dtype)


def inputs_of(tag: str, ranks: Iterable[int], shape: Sequence[int], dtype: torch.dtype,
              op: str = "sum") -> List[torch.Tensor]:
    """The inputs of the global ranks `ranks` (a group's members, in group-rank order) for `tag`."""
    return [make_input(tag, r, shape, dtype, op) for r in ranks]


def reduce_reference(parts: Sequence[torch.Tensor], op: str) -> torch.Tensor:
    """op over `parts` in float64 (int64 for integers): the exact result up to float64 rounding."""
    wide = torch.float64 if parts[0].dtype.is_floating_point else torch.int64
    x = torch.stack([p.to(wide) for p in parts])
    if op == "sum":
        return x.sum(0)
    if op == "prod":
        return x.prod(0)
    if op == "max":
        return x.max(0).values
    if op == "min":
        return x.min(0).values
    if op == "avg":
        return x.sum(0) / len(parts)
    raise AssertionError(f"no reference for op {op!r}")


def reduce_tolerance(parts: Sequence[torch.Tensor], op: str, ref: torch.Tensor) -> torch.Tensor:
    """Per-element bound on |result - ref| for a reduction computed in the dtype of `parts`."""
    dtype = parts[0].dtype
    if not dtype.is_floating_point or op in ("max", "min"):
        return torch.zeros_like(ref, dtype=torch.float64)
    eps = torch.finfo(dtype).eps
    n = len(parts)
    mag = torch.stack([p.double().abs() for p in parts]).sum(0)
    if op == "prod":
        return (n + 1) * eps * ref.abs()
    if op == "avg":
        # Either sum-then-divide or scale-each-then-sum (NCCL's premultiplied average): one more
        # rounding than the sum, on values n times smaller.
        return (n + 1) * eps * mag / n + eps * ref.abs()
    return n * eps * mag + eps * ref.abs()


def assert_reduced(result: torch.Tensor, parts: Sequence[torch.Tensor], op: str, what: str,
                   chunk=None) -> None:
    """Checks `result` against op over `parts`; `chunk(t)` selects the slice this rank keeps
    (reduce_scatter)."""
    ref = reduce_reference(parts, op)
    tol = reduce_tolerance(parts, op, ref)
    if chunk is not None:
        ref, tol = chunk(ref), chunk(tol)
    assert result.dtype == parts[0].dtype, f"{what}: dtype {result.dtype}, expected {parts[0].dtype}"
    assert tuple(result.shape) == tuple(ref.shape), f"{what}: shape {tuple(result.shape)}, expected {tuple(ref.shape)}"
    got = result.detach().cpu()
    if not parts[0].dtype.is_floating_point or op in ("max", "min"):
        expected = ref.to(parts[0].dtype)
        bad = got != expected
        if bad.any():
            i = int(bad.flatten().nonzero()[0])
            raise AssertionError(
                f"{what}: {int(bad.sum())} of {got.numel()} elements differ from the exact {op}; first at flat "
                f"index {i}: got {got.flatten()[i].item()}, expected {expected.flatten()[i].item()}")
        return
    err = (got.double() - ref).abs()
    bad = ~(err <= tol)  # also catches NaN
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {got.numel()} elements outside the {parts[0].dtype} bound for {op}; "
            f"first at flat index {i}: got {got.flatten()[i].item()!r}, expected {ref.flatten()[i].item()!r} "
            f"(|err| {err.flatten()[i].item():.3g} > bound {tol.flatten()[i].item():.3g})")


def assert_exact(result: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bitwise equality for data movement (all_gather, broadcast)."""
    assert result.dtype == expected.dtype, f"{what}: dtype {result.dtype}, expected {expected.dtype}"
    assert tuple(result.shape) == tuple(expected.shape), \
        f"{what}: shape {tuple(result.shape)}, expected {tuple(expected.shape)}"
    got = result.detach().cpu().contiguous()
    same = got.reshape(-1).view(torch.uint8) == expected.contiguous().reshape(-1).view(torch.uint8)
    if not bool(same.all()):
        bad = (got != expected).flatten().nonzero()
        i = int(bad[0]) if len(bad) else -1
        detail = (f"; first at flat index {i}: got {got.flatten()[i].item()}, expected "
                  f"{expected.flatten()[i].item()}") if i >= 0 else " (NaN or signed-zero bits)"
        raise AssertionError(f"{what}: differs from the expected values bit for bit{detail}")


def chunk_of(dim: int, size: int, rank: int):
    """The reduce_scatter slice group rank `rank` keeps along `dim`."""
    return lambda t: t.chunk(size, dim=dim)[rank]
