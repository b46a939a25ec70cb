"""Reliability on GPUs (NCCL, the native ops): the bad-input table on 1 and 2 GPUs, a rank killed
mid-run, diverging ranks (TPEXT_DEBUG=1 names them; without it the watchdog's timeout ends the
wait), 10,000-step runs with flat memory and bitwise-reproducible outputs, init/destroy cycles, and
TP + DP communicators interleaved as in training. The bodies are test_reliability.py's where the
two share them. Every test skips, saying why, where fewer GPUs are visible.

The times a survivor of a dead rank took to fail are printed (pytest -s shows them).
"""
import os
import time

import pytest
import torch

import tpext
from _dist import launch
from _gpus import GPU_WORLDS
from test_reliability import (_fds, _rank, _report_table, bad_inputs_body, check_cycles, check_dead_rank, cycles_body,
                              dead_rank_body, diverging_body, two_comms_body)

GPU_TIMEOUT_S = 180.0


def _gpus_up_to(n):
    return min(n, torch.cuda.device_count()) if torch.cuda.is_available() else 0


# -- the table of bad inputs ---------------------------------------------------------------------


@pytest.mark.parametrize("gpus", GPU_WORLDS)
def test_bad_inputs_nccl(gpus):
    results = launch(bad_inputs_body, gpus, args=("nccl", gpus), timeout_s=GPU_TIMEOUT_S)
    assert all(r == results[0] for r in results), "the ranks ran different case lists"
    _report_table(results[0], f"nccl, {gpus} GPU(s), tp {gpus}")


# -- a rank that dies mid-run --------------------------------------------------------------------


@pytest.mark.gpu(2)
def test_dead_rank_nccl(tmp_path):
    timeout_s = 5.0
    t0 = time.monotonic()
    results = launch(dead_rank_body, 2, args=(str(tmp_path / "killed_at"), timeout_s, "nccl"), killed=[1],
                     timeout_s=GPU_TIMEOUT_S)
    # The watchdog polls every 20 ms; the survivor's collective may have been enqueued just before
    # the kill, so its deadline ends at most `timeout` after the kill, plus the poll and the abort.
    check_dead_rank(results, timeout_s, "nccl, 2 GPUs, tp 2", slack_s=2.0)
    print(f"[dead rank, nccl] the whole launch took {time.monotonic() - t0:.1f} s")


# -- diverging ranks -----------------------------------------------------------------------------


@pytest.mark.gpu(2)
def test_diverging_ranks_nccl():
    """TPEXT_DEBUG=1: the native row-parallel forward and column-parallel backward and every Group
    collective raise CollectiveMismatch on both ranks. Then, with the check off, a rank that never
    arrives: the watchdog aborts the communicator after the timeout and the next call raises."""
    timeout_s = 3.0
    results = launch(diverging_body, 2, args=(timeout_s, "nccl"), extra_env={"TPEXT_DEBUG": "1"},
                     timeout_s=GPU_TIMEOUT_S)
    waited = results[0]["waited"]
    print(f"\n[diverging, nccl] {len(results[0]['scenarios'])} mismatch scenarios + 2 layer ones raised on both ranks; "
          f"a rank that never arrived: rank 0 raised CommTimeout after {waited:.2f} s (timeout {timeout_s} s)")
    assert timeout_s - 0.1 <= waited <= timeout_s + 3.0, waited


# -- long runs -----------------------------------------------------------------------------------


def long_run_body(steps, hidden=64, ffn=256, rows=32, lr=1e-5):
    """`steps` ParallelMLP forward + backward + SGD steps, twice from the same seed: the memory the
    caching allocator holds and the open file descriptors are the same at step 100 and at the end,
    and the two runs give bitwise the same outputs (sampled every 1000 steps) and weights."""
    rank, world = _rank()
    tp = tpext.init(backend="nccl", timeout=60)
    device = tp.device
    torch.set_float32_matmul_precision("highest")

    def run(seed):
        torch.manual_seed(seed)
        mlp = tpext.ParallelMLP(hidden, ffn, group=tp)
        params = list(mlp.parameters())
        x = torch.randn(rows, hidden, device=device, requires_grad=True)
        g = torch.randn(rows, hidden, device=device)
        for p in params:
            p.grad = torch.zeros_like(p)
        samples, marks = [], {}
        t0 = time.monotonic()
        for step in range(1, steps + 1):
            y = mlp(x)
            y.backward(g)
            with torch.no_grad():
                torch._foreach_add_(params, [p.grad for p in params], alpha=-lr)
                for p in params:
                    p.grad.zero_()
            x.grad = None
            if step % 1000 == 0:
                samples.append(y.detach().cpu())
            if step in (100, steps):
                torch.cuda.synchronize()
                marks[step] = {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved(),
                               "fds": _fds()}
        torch.cuda.synchronize()
        return samples, [p.detach().cpu() for p in params], marks, time.monotonic() - t0

    first, second = run(7), run(7)
    for i, (a, b) in enumerate(zip(first[0], second[0])):
        assert torch.equal(a, b), f"rank {rank}: output at step {1000 * (i + 1)} differs between two runs of seed 7 " \
                                  f"(max diff {(a - b).abs().max().item()})"
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b), f"rank {rank}: final weights differ between two runs of seed 7"
    assert not torch.equal(first[0][0], first[0][-1]), "the weights never changed: the run trained nothing"
    for label, (_, _, marks, _) in (("first", first), ("second", second)):
        assert marks[steps] == marks[100], f"rank {rank}, {label} run: memory or fds changed between step 100 and " \
                                           f"step {steps}: {marks[100]} -> {marks[steps]}"
    tpext.destroy()
    return {"seconds": [first[3], second[3]], "marks": first[2]}


@pytest.mark.gpu(1)
def test_long_run_flat_memory_and_reproducible():
    gpus, steps = _gpus_up_to(2), 10_000
    results = launch(long_run_body, gpus, args=(steps,), timeout_s=GPU_TIMEOUT_S)
    for rank, r in enumerate(results):
        print(f"\n[long run, {gpus} GPU(s)] rank {rank}: {steps} steps in {r['seconds'][0]:.1f} s and "
              f"{r['seconds'][1]:.1f} s; at step 100 and {steps}: {r['marks']}")


# -- init / destroy cycles -----------------------------------------------------------------------

# An NCCL cycle (world communicator, TP and DP splits, their blocking twins, gloo groups) takes about
# 1.6-2 s on 2 H200s: 100 cycles took 159 s there alone, 197 s beside the other GPU tests, so the
# suite runs 25 unless TPEXT_TEST_NCCL_CYCLES asks for more; scripts/gpu_session.sh asks for the
# issue's 100 and runs them beside the rest.
GPU_CYCLES = int(os.environ.get("TPEXT_TEST_NCCL_CYCLES", "25"))
# Host memory is measured with glibc's malloc arenas capped. NCCL starts new threads for every
# communicator it creates (async init, proxy), glibc gives new threads arenas of their own (up to 8
# per core), and each arena keeps tens of MB of freed pages that malloc_trim cannot hand back while
# a live block sits above them. Seen on one H100 (NCCL 2.28.9, 20 cycles after 5 warm-up cycles):
# RSS +140.6 MB with the default arenas, +0.0 MB (1005.6 -> 1005.6) with MALLOC_ARENA_MAX=2. The
# growth is the allocator's retention across new arenas, not memory anything still holds; the
# capped run is the one a leak would show in. README's "Long-running processes" says the same.
CYCLE_ENV = {"MALLOC_ARENA_MAX": "2"}


@pytest.mark.gpu(1)
def test_init_destroy_cycles_nccl():
    gpus = _gpus_up_to(2)
    results = launch(cycles_body, gpus, args=(GPU_CYCLES, "nccl"), kwargs={"warmup": 5},
                     timeout_s=GPU_TIMEOUT_S + 3.0 * GPU_CYCLES, extra_env=CYCLE_ENV)
    check_cycles(results, GPU_CYCLES, f"nccl, {gpus} GPU(s), MALLOC_ARENA_MAX=2", rss_slack_mb=16.0)


# -- two communicators, interleaved as in training --------------------------------------------


def two_layouts_body(tp_sizes):
    return [two_comms_body(tp, "nccl") for tp in tp_sizes]


@pytest.mark.gpu(2)
def test_tp_and_dp_interleaved_nccl():
    """World 2 as TP 1 x DP 2 (the DP all-reduce crosses GPUs, the TP communicators are single-rank)
    and as TP 2 x DP 1, one after the other in the same processes."""
    results = launch(two_layouts_body, 2, args=((1, 2),), timeout_s=GPU_TIMEOUT_S)
    print(f"\n[two communicators, nccl world 2, tp 1 then 2] all-reduce calls per rank {results}")
