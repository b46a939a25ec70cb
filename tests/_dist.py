"""Runs a test body in N processes, each with the environment torchrun would give it.

    from _dist import launch
    launch(body, world_size=4, args=(2,))      # body(2) runs on ranks 0..3; returns their results

`body` must be a module-level function of a test module (the children import that module by file
path and look the function up by name). Each rank is a fresh `python` process started with RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR=127.0.0.1 and a MASTER_PORT free
at launch time, plus OMP_NUM_THREADS=1 as torchrun sets it, so tpext.init() sees exactly what it
sees under torchrun.

A rank that raises writes its traceback to a file; the launch then fails naming every rank that
failed, with its traceback. The first failure also shortens the deadline of the others (a peer
waiting in a collective for the dead rank would otherwise block until the gloo timeout), and the
whole launch has a hard wall-clock limit so a hang fails the test instead of blocking CI.

A test of a dying rank names it in `killed`: that rank must end by SIGKILL (it may kill itself,
os.kill(os.getpid(), signal.SIGKILL)); its death shortens nobody's deadline (the survivors are the
ones under test: they must fail on their own, within their timeout) and its result is None.

Two environment variables serve batched runs on a lent GPU box, where the whole session has a
wall-clock limit and pytest's own report comes only at the end: TPEXT_TEST_LAUNCH_TIMEOUT_S caps
every launch's limit (a hang then costs that, not minutes), and TPEXT_TEST_FAILURE_LOG names a file
each failed launch appends its report to at once, so it survives a session cut short.

This file is also the children's entry point: `python _dist.py CHILD_SPEC`.
"""
import faulthandler
import importlib.util
import os
import pickle
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, List, Optional, Sequence

DEFAULT_TIMEOUT_S = 120.0
# After one rank failed, how long the others get to finish (or fail with their own message).
GRACE_AFTER_FAILURE_S = 15.0
_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)


class LaunchError(AssertionError):
    """A launched rank failed, crashed or timed out. An AssertionError so pytest reports a failure."""


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default lower bound


def free_port() -> int:
    """A TCP port nobody listens on right now, for rank 0's TCPStore to bind moments later. Taken
    below the kernel's ephemeral range: a port the kernel hands out (bind to 0) can be handed again,
    in that gap, to any outgoing connection on the machine (NCCL's and gloo's bootstrap sockets of
    concurrent tests), which on 2 H200s with tests running side by side made the store fail with
    EADDRINUSE twice in one run. Below the range only another listener picking the same random
    port could collide."""
    low = _ephemeral_low()
    rng = random.Random()  # seeded from the OS: the tests' torch/random seeds must not pick ports
    for _ in range(200):
        port = rng.randrange(10000, max(low, 10001))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # crowded machine: the kernel's pick
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: str, limit: int = 4000) -> str:
    try:
        with open(path, "r", errors="replace") as f:
            text = f.read()
    except OSError:
        return ""
    return text if len(text) <= limit else "...\n" + text[-limit:]


def launch(body: Callable, world_size: int, args: Sequence[Any] = (), kwargs: Optional[dict] = None,
           timeout_s: float = DEFAULT_TIMEOUT_S, extra_env: Optional[dict] = None,
           killed: Sequence[int] = ()) -> List[Any]:
    """Runs body(*args, **kwargs) on `world_size` ranks and returns the per-rank return values
    (they must pickle). Raises LaunchError naming the failed ranks with their tracebacks.
    `killed`: ranks that must die by SIGKILL (their result is None); any other end of theirs fails."""
    killed = sorted(set(killed))
    cap = os.environ.get("TPEXT_TEST_LAUNCH_TIMEOUT_S")
    if cap:
        timeout_s = min(timeout_s, float(cap))
    if any(not 0 <= r < world_size for r in killed):
        raise ValueError(f"launch: killed: expected ranks in [0, {world_size}), got {killed}")
    module = sys.modules[body.__module__]
    if body.__qualname__ != body.__name__ or getattr(module, body.__name__, None) is not body:
        raise TypeError(f"launch: body: expected a module-level function, got {body.__qualname__}")
    with tempfile.TemporaryDirectory(prefix="tpext-launch-") as tmp:
        spec_path = os.path.join(tmp, "spec.pkl")
        with open(spec_path, "wb") as f:
            pickle.dump({"file": os.path.abspath(module.__file__), "name": body.__name__,
                         "args": tuple(args), "kwargs": dict(kwargs or {}), "dir": tmp,
                         # The parent's import path ('' is its cwd), as multiprocessing's spawn passes
                         # it: the children import the very tpext and helpers this process imported.
                         "sys_path": [p or os.getcwd() for p in sys.path]}, f)
        port = free_port()
        procs = []
        try:
            for rank in range(world_size):
                env = dict(os.environ)
                env.update({
                    "RANK": str(rank), "WORLD_SIZE": str(world_size),
                    "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size),
                    "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1",
                    "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(world_size),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                    "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                })
                env.update(extra_env or {})
                log = open(os.path.join(tmp, f"rank{rank}.log"), "wb")
                # A session of its own per rank, so a timeout kills the rank and anything it started.
                p = subprocess.Popen([sys.executable, os.path.abspath(__file__), spec_path], env=env,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=_REPO)
                log.close()
                procs.append(p)
            timed_out = _wait(procs, timeout_s, killed)
        finally:
            for p in procs:
                if p.poll() is None:
                    _kill(p)
        return _collect(procs, tmp, timed_out, timeout_s, killed)


def _wait(procs, timeout_s: float, killed: Sequence[int] = ()) -> List[int]:
    """Waits for every rank; returns the ranks killed for running past the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return []
        if any(c not in (None, 0) and not (r in killed and c == -signal.SIGKILL) for r, c in enumerate(codes)):
            deadline = min(deadline, time.monotonic() + GRACE_AFTER_FAILURE_S)
        if time.monotonic() >= deadline:
            late = [r for r, p in enumerate(procs) if p.poll() is None]
            # Ask for their Python stacks first (faulthandler, registered in _child), so the
            # report shows where each one hung.
            for r in late:
                _signal(procs[r], signal.SIGUSR1)
            time.sleep(1.0)
            for r in late:
                _kill(procs[r])
            return late
        time.sleep(0.05)


def _signal(p: subprocess.Popen, sig: int) -> None:
    try:
        os.kill(p.pid, sig)
    except ProcessLookupError:
        pass


def _kill(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)  # the rank's own session, started above
    except ProcessLookupError:
        pass
    p.wait()


def _collect(procs, tmp: str, timed_out: List[int], timeout_s: float, killed: Sequence[int] = ()) -> List[Any]:
    failures = []
    results = []
    for rank, p in enumerate(procs):
        err_path = os.path.join(tmp, f"rank{rank}.err")
        out_path = os.path.join(tmp, f"rank{rank}.out")
        log = _tail(os.path.join(tmp, f"rank{rank}.log"))
        if rank in killed and rank not in timed_out:
            if p.returncode == -signal.SIGKILL:
                results.append(None)
            else:
                raised = ""
                if os.path.exists(err_path):
                    with open(err_path) as f:
                        raised = f", after raising:\n{f.read()}"
                failures.append(f"rank {rank}: expected to die by SIGKILL, ended with code {p.returncode}{raised}"
                                f"{_log_block(log)}")
        elif rank in timed_out:
            failures.append(f"rank {rank}: still running after the launch deadline, killed "
                            f"(hang?){_log_block(log)}")
        elif os.path.exists(err_path):
            with open(err_path) as f:
                failures.append(f"rank {rank} raised:\n{f.read()}")
        elif p.returncode != 0:
            failures.append(f"rank {rank}: exited with code {p.returncode} without a Python traceback "
                            f"(crash or killed){_log_block(log)}")
        elif not os.path.exists(out_path):
            failures.append(f"rank {rank}: exited 0 without writing its result{_log_block(log)}")
        else:
            with open(out_path, "rb") as f:
                results.append(pickle.load(f))
    if failures:
        head = f"{len(failures)} of {len(procs)} ranks failed"
        if timed_out:
            head += f" (launch limit {timeout_s:.0f} s, or {GRACE_AFTER_FAILURE_S:.0f} s after the first failure)"
        report = head + "\n\n" + "\n\n".join(failures)
        _append_failure_log(report)
        raise LaunchError(report)
    return results


def _append_failure_log(report: str) -> None:
    path = os.environ.get("TPEXT_TEST_FAILURE_LOG")
    if not path:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "(not under pytest)")
    with open(path, "a") as f:
        f.write(f"===== {test}\n{report}\n\n")


def _log_block(log: str) -> str:
    return f"\n--- output of the rank ---\n{log}" if log.strip() else " (no output)"


def _child(spec_path: str) -> None:
    faulthandler.enable()  # a crash (SIGSEGV, SIGABRT) leaves its Python stack in the rank's log
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    with open(spec_path, "rb") as f:
        spec = pickle.load(f)
    rank = int(os.environ["RANK"])
    # The test modules import their helpers (_dist, _reference) as top-level modules, as pytest's
    # rootdir-relative import does.
    sys.path[:] = [os.path.dirname(spec["file"])] + [p for p in spec["sys_path"] if p != os.path.dirname(spec["file"])]
    try:
        name = os.path.splitext(os.path.basename(spec["file"]))[0]
        mod_spec = importlib.util.spec_from_file_location(name, spec["file"])
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module
        mod_spec.loader.exec_module(module)
        result = getattr(module, spec["name"])(*spec["args"], **spec["kwargs"])
        with open(os.path.join(spec["dir"], f"rank{rank}.out"), "wb") as f:
            pickle.dump(result, f)
    except BaseException:
        text = traceback.format_exc()
        sys.stderr.write(f"[rank {rank}] {text}")
        with open(os.path.join(spec["dir"], f"rank{rank}.err"), "w") as f:
            f.write(text)
        sys.stderr.flush()
        os._exit(1)  # skip interpreter teardown: a peer may be stuck, and atexit hooks could block
    sys.stdout.flush()
    sys.stderr.flush()


if __name__ == "__main__":
    _child(sys.argv[1])
