"""Knobs that change how fast the TP layers run, never what they compute beyond rounding.

    tpext.set_overlap_sms(16)    # GEMMs beside a collective leave 16 SMs to it
    tpext.overlap_sms()          # -> 16
    tpext.set_row_tail_weight(0.5)  # the row-parallel forward's last piece half the others
    tpext.set_gemm_autotune(8)   # time cuBLASLt's 8 best algorithms per GEMM problem, keep the fastest
    tpext.set_gemm_autotune_sustain_ms(50)  # ... each under 50 ms of sustained load, as training runs them

Overlap: the row-parallel forward runs the GEMM of piece i+1 (rows or column blocks) while piece i
is all-reduced, and the column-parallel backward runs the weight-gradient GEMM while the input
gradient is all-reduced. cuBLASLt's Hopper GEMMs are persistent (one CTA per SM for the whole
GEMM), so a collective beside one gets no SM of its own: it squeezes in beside the GEMM's CTAs and
crawls (bench/corun_probe.py on one H100: the pair took 1.19-1.44 x the two in series). With
set_overlap_sms(n), only those GEMMs are sized for n fewer SMs (cuBLASLt's SM count target),
leaving room for NCCL's kernel (the same probe: a side kernel of n CTAs then runs wholly under the
GEMM, the pair taking 0.75 x the series at n = 8 and 0.88 x at 16, while the GEMM itself is 9-12 %
slower); pair it with tpext.init(nccl_overlap_ctas=n), which caps at n CTAs only the collectives
that run beside those GEMMs (through a second NCCL communicator), so that NCCL asks for no more
there while the collectives that run alone keep every CTA (capping those, as nccl_max_ctas or
NCCL_MAX_CTAS in the environment do, only lengthens exposed time: 67 against 39 us for a 4 MiB
all-reduce at 8 CTAs on 2 H200s). 0, the default, leaves both to the libraries. Whether
it pays depends on the sizes: bench/mlp.py --overlap-sms measures it (bench/NOTES.md).

The setting is process-wide and read when an op is enqueued: a CUDA graph keeps the value it was
captured with.

GEMM autotuning: cuBLASLt's heuristic ranks its algorithms by a model, and its first choice is not
always the fastest one (bench/gemm_compare.py found tpext's bias+GELU+aux GEMM 3-8 % behind torch's
GEMM + GELU at some sizes). With set_gemm_autotune(n), the first call of each distinct GEMM problem
(shapes, layouts, dtype, epilogue, alignment) outside CUDA-graph capture times the heuristic's best
n algorithms on its own operands and keeps the fastest for every later call (the heuristic's first
choice unless another is at least 3 % faster); under capture the first choice runs and the next
eager call tunes. Before any timing, each algorithm's outputs on those operands must agree with the
first choice's (a lower-ranked cuBLASLt algorithm once wrote one bias-gradient element of many), or
it is never kept. The price: one host wait per new problem, and the choice may differ between
processes and ranks, so results stop being bitwise reproducible across runs (rounding differs
between algorithms). Off (0) by default for that reason; GEMMs that accumulate into their output are
never tuned. The one replicated result a GEMM computes without a collective after it, a
row-parallel layer's bias gradient, is summed by torch while tuning is on, so that it stays
bitwise the same on every rank. Measured on one H100 with the short timing (bench/NOTES.md,
attempt 5): 7-8 % faster training fc1 at 512-1024 tokens, 2-3 % slower at 256 tokens (fc1) and
4096-16384 (fc2), where the short timing disagrees with use.

set_gemm_autotune_sustain_ms(ms) times each candidate the way a training step runs its GEMMs: back
to back for ms milliseconds, until the GPU sits at its power limit and its clocks drop (~1500 MHz
at 700 W on an H200), then as long again timed, in three rounds; another algorithm is kept only
when faster than the first choice in every round and by 1 % at the median. Under that load the
weight-gradient GEMMs of an 8192 x 28672 MLP run 3-6 % faster on a lower-ranked tile than on the
heuristic's first choice (bench/gemm_sustained_probe.cpp, bench/NOTES.md attempt 11). It costs
about 6 x ms per candidate and GEMM problem, once: seconds per shape at 50 ms, so it suits training
with fixed shapes, not inference with ever new ones. 0 (the default) keeps the short timing.
"""
from . import _C


def _int_arg(what: str, name: str, value) -> int:
    """The type check of the setters below; the range is the C++ setter's to check."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what}: {name}: expected an int, got {type(value).__name__}")
    return value


def set_overlap_sms(sms: int) -> None:
    """SMs the GEMMs that run beside a collective leave free for it (0: cuBLASLt's choice). Each
    op checks it against its device's SM count."""
    _C.set_overlap_sms(_int_arg("set_overlap_sms", "sms", sms))  # a negative count raises ValueError there


def overlap_sms() -> int:
    """The current set_overlap_sms value."""
    return int(_C.overlap_sms())


def set_row_tail_weight(weight: float) -> None:
    """Rows of the row-parallel forward's last piece relative to each earlier one, in (0, 1]; 0
    takes the default. The last piece's all-reduce is the one nothing hides, so a smaller last
    piece exposes less, as long as its GEMM still outlasts the previous piece's all-reduce."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TypeError(f"set_row_tail_weight: weight: expected a float, got {type(weight).__name__}")
    _C.set_row_tail_weight(float(weight))  # outside [0, 1] raises ValueError there


def row_tail_weight() -> float:
    """The current set_row_tail_weight value (0: the default)."""
    return float(_C.row_tail_weight())


# set_gemm_autotune's value, kept here too: the autograd Functions read it in their backward, which
# torch.compile traces, and dynamo can read a Python global (guarding on it) but not call into _C.
_autotune_candidates = 0


def set_gemm_autotune(candidates: int) -> None:
    """How many of cuBLASLt's best algorithms to time per GEMM problem (0 or 1: off, up to 16; the
    C++ setter raises ValueError outside that). Plans made under another setting stay cached beside
    the new ones."""
    global _autotune_candidates
    _C.set_gemm_autotune(_int_arg("set_gemm_autotune", "candidates", candidates))
    _autotune_candidates = candidates


def gemm_autotune_on() -> bool:
    """Whether GEMMs are autotuned (set_gemm_autotune(n) with n >= 2), so that ranks may run
    different algorithms for the same problem."""
    return _autotune_candidates > 1


def gemm_autotune() -> int:
    """The current set_gemm_autotune value."""
    return int(_C.gemm_autotune())


def set_gemm_autotune_sustain_ms(ms: int) -> None:
    """How set_gemm_autotune times each candidate: 0 a few short runs (the default), ms > 0 back to
    back for ms milliseconds after as long again of warm-up, three rounds (up to 10000; the C++
    setter raises ValueError outside [0, 10000]). GEMM problems tuned one way stay cached beside
    those tuned the other."""
    _C.set_gemm_autotune_sustain_ms(_int_arg("set_gemm_autotune_sustain_ms", "ms", ms))


def gemm_autotune_sustain_ms() -> int:
    """The current set_gemm_autotune_sustain_ms value."""
    return int(_C.gemm_autotune_sustain_ms())
