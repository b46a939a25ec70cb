"""The demo (python -m tpext) end to end on 2 CPU processes through gloo, as scripts/run_demo.sh
runs it on a machine without GPUs: every section prints, every check passes, the exit code is 0."""
import os
import subprocess
import sys

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The demo takes well under a minute on two cores; the limit leaves room for a loaded machine and
# turns a hang into a failure instead of a stuck suite.
TIMEOUT_S = 240

SECTION_HEADERS = (
    "== [1/3] all-reduce: tpext vs torch.distributed ==",
    "== [2/3] TP linear layers: parity with the full nn.Linear, collectives, time ==",
    "== [3/3] training a small Llama with TP, step for step against a single device ==",
)
# One line of each section's story that only appears when its measurement ran through.
SECTION_MARKERS = (
    "tpext/torch",                                  # the all-reduce table's header
    "exposed communication (tpext - floor) / collectives",
    "losses agree at every step",
    "decoder layer 1",                              # the collectives of a step, per layer
    "4 x A = 4 x b*s*h",
    "of the TP step",                               # the communication share
)


def _run_demo(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path (gloo), whatever this machine has
    env["PYTHONPATH"] = _REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "tpext",
           *args]
    try:
        return subprocess.run(cmd, cwd=_REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"the demo ran past {TIMEOUT_S} s; its output so far:\n{out}")


def test_demo_on_two_cpu_processes():
    result = _run_demo()
    out = result.stdout
    assert result.returncode == 0, f"the demo exited with {result.returncode}:\n{out}"
    first = next((line for line in out.splitlines() if line.startswith("tpext demo |")), None)
    assert first is not None, f"no header line:\n{out}"
    for needed in ("TP size 2", "backend gloo", "torch ", "transformers "):
        assert needed in first, f"the header line lacks {needed!r}: {first}"
    for header in SECTION_HEADERS:
        assert header in out, f"missing section {header!r}:\n{out}"
    for marker in SECTION_MARKERS:
        assert marker in out, f"missing {marker!r}:\n{out}"
    assert "FAIL" not in out, f"a check failed:\n{out}"
    assert "== result: PASS" in out, out


def _training_without_transformers(steps):
    """Rank body: the training section with transformers taken to be missing (the plain-torch Llama)."""
    import torch
    import tpext
    from tpext import demo_training

    demo_training.transformers_version = lambda: None
    tp = tpext.init(backend="gloo")
    try:
        lines = []
        failures = demo_training.run(tp, torch.device("cpu"), lines.append, steps=steps)
        return failures, lines
    finally:
        tpext.destroy()


def test_training_section_without_transformers():
    from _dist import launch

    for failures, lines in launch(_training_without_transformers, world_size=2, args=(3,)):
        out = "\n".join(lines)
        assert failures == [], out
        assert "plain-torch Llama (transformers is not installed)" in out, out
        assert "4 x A = 4 x b*s*h" in out and "FAIL" not in out, out
