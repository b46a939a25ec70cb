"""The bench's own machinery on CPU: bench/mlp.py --smoke end to end on 2 gloo processes (every
workload and system that runs without CUDA, the correctness check, the JSON that GPU runs commit),
and bench/sweep_score.py's score, which picks the carve-out in scripts/gpu_session.sh."""
import json
import math
import os
import subprocess
import sys

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The smoke run takes ~15 s on two cores; the limit turns a hang into a failure.
TIMEOUT_S = 300
WORKLOADS = ("mlp-8192", "mlp-4096", "attn", "layer")
CPU_SYSTEMS = ("tpext", "seed", "single", "floor")  # timed on CPU; the CUDA-only ones must be skipped with a reason
CUDA_ONLY = ("single-ops", "floor-ops", "symm-mem")


def _env():
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path (gloo), whatever this machine has
    env["PYTHONPATH"] = _REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(cmd, timeout_s=TIMEOUT_S):
    try:
        return subprocess.run(cmd, cwd=_REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"{' '.join(cmd)} ran past {timeout_s} s; its output so far:\n{out}")


def test_mlp_bench_smoke_on_two_cpu_processes(tmp_path):
    out_json = tmp_path / "smoke.json"
    result = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "bench/mlp.py", "--smoke", "--chunks", "2", "--no-plots", "--out", str(out_json)])
    log = result.stdout
    assert result.returncode == 0, f"bench/mlp.py --smoke exited with {result.returncode}:\n{log}"
    d = json.loads(out_json.read_text())

    meta = d["metadata"]
    assert meta["world_size"] == 2 and meta["gpu_count"] == 0, meta
    assert meta["commit"], "the JSON must record the commit it measured"
    for key in ("torch", "tpext", "python"):
        assert meta["versions"].get(key), f"versions lacks {key}: {meta['versions']}"
    assert d["args"]["chunks"] == 2 and d["args"]["smoke"] is True, d["args"]

    # Every workload's every CPU system measured in both modes, with real (positive, finite) times.
    got = {(r["workload"], r["mode"], r["system"]): r for r in d["rows"]}
    for wl in WORKLOADS:
        for mode in ("fwd", "fwdbwd"):
            for system in CPU_SYSTEMS:
                row = got.get((wl, mode, system))
                assert row is not None, f"no {system} row for {wl} {mode}; rows: {sorted(got)}"
                assert math.isfinite(row["median_ms"]) and row["median_ms"] > 0, row
                assert len(row["per_rank_median_ms"]) == 2, row
        for system in CUDA_ONLY:
            reason = d["skipped"].get(f"{wl}/{system}", "")
            assert "needs CUDA" in reason, f"{wl}/{system} should be skipped for want of CUDA, got {reason!r}"

    # The correctness check ran for every workload and tpext agreed with the float32 reference on
    # both ranks, output and input gradient.
    checked = {c["workload"]: c for c in d["correctness"]}
    assert set(checked) == set(WORKLOADS), sorted(checked)
    for wl, c in checked.items():
        tp = c["systems"]["tpext"]
        assert tp["ok_all_ranks"] is True, f"{wl}: {tp}"
        assert 0 < tp["out_rel_err"] < c["bound"] and 0 < tp["dx_rel_err"] < c["bound"], f"{wl}: {tp}"
    assert "wrote " in log, log


def _rows(times):
    """bench/mlp.py rows from {(system, M): eager fwd+bwd median ms}, plus a forward row that must be ignored."""
    rows = [{"system": s, "M": m, "mode": "fwdbwd", "graph": False, "median_ms": t} for (s, m), t in times.items()]
    rows.append({"system": "tpext", "M": 4096, "mode": "fwd", "graph": False, "median_ms": 1000.0})
    rows.append({"system": "tpext", "M": 4096, "mode": "fwdbwd", "graph": True, "median_ms": 1000.0})
    return rows


def _score(tmp_path, *row_sets):
    paths = []
    for i, rows in enumerate(row_sets):
        p = tmp_path / f"r{i}.json"
        p.write_text(json.dumps({"rows": rows}))
        paths.append(str(p))
    return _run([sys.executable, "bench/sweep_score.py", *paths], timeout_s=60)


def test_sweep_score_is_the_mean_ratio_to_the_floor_of_the_same_run(tmp_path):
    a = _rows({("tpext", 4096): 9.0, ("floor-ops", 4096): 8.0, ("tpext", 16384): 36.0, ("floor-ops", 16384): 32.0})
    r = _score(tmp_path, a)
    assert r.returncode == 0, r.stdout
    assert float(r.stdout) == pytest.approx((9 / 8 + 36 / 32) / 2, abs=1e-4)
    # A run whose clocks were lower all through (everything 10 % slower) scores the same.
    slow = _rows({("tpext", 4096): 9.9, ("floor-ops", 4096): 8.8, ("tpext", 16384): 39.6, ("floor-ops", 16384): 35.2})
    assert float(_score(tmp_path, slow).stdout) == pytest.approx(float(r.stdout), abs=1e-4)


def test_sweep_score_takes_the_median_over_rounds(tmp_path):
    def run(ratio):
        return _rows({("tpext", 4096): 8.0 * ratio, ("floor-ops", 4096): 8.0,
                      ("tpext", 16384): 32.0 * ratio, ("floor-ops", 16384): 32.0})
    r = _score(tmp_path, run(1.10), run(1.02), run(1.04))
    assert r.returncode == 0, r.stdout
    assert float(r.stdout) == pytest.approx(1.04, abs=1e-4)


def test_sweep_score_refuses_a_run_with_a_missing_row(tmp_path):
    whole = _rows({("tpext", 4096): 9.0, ("floor-ops", 4096): 8.0, ("tpext", 16384): 36.0, ("floor-ops", 16384): 32.0})
    cut = _rows({("tpext", 4096): 9.0, ("floor-ops", 4096): 8.0, ("tpext", 16384): 36.0})
    r = _score(tmp_path, whole, cut)
    assert r.returncode == 1 and r.stdout.strip() == "", r.stdout


def test_sweep_score_ratio_table_compares_two_systems_row_by_row(tmp_path):
    rows = _rows({("single-ops", 4096): 9.0, ("single", 4096): 10.0, ("single-ops", 16384): 30.0})
    p = tmp_path / "ab.json"
    p.write_text(json.dumps({"rows": rows}))
    r = _run([sys.executable, "bench/sweep_score.py", "--ratio", "single-ops", "single", str(p)], timeout_s=60)
    assert r.returncode == 0, r.stdout
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, f"only the row where both systems ran: {r.stdout}"
    assert "M=4096" in lines[0] and "single-ops/single 0.9000" in lines[0], lines[0]
