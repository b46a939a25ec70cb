"""What every benchmark records next to its numbers, and where its JSON goes.

    meta = metadata("allreduce", device)        # collective: call on every rank
    write_json(path, {"metadata": meta, ...})   # rank 0

The commit is `git rev-parse HEAD` of this checkout, with '-dirty' when tracked files differ from
it or untracked (not ignored) files exist; a copy without .git (as shipped to a GPU box) records
TPEXT_COMMIT from the environment when set, else "unknown".
"""
import datetime
import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
from typing import Dict, Optional

import torch
import torch.distributed as dist

import tpext

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")


def git_commit(repo: str = REPO) -> str:
    override = os.environ.get("TPEXT_COMMIT")
    if override:
        return override
    try:
        head = _git(repo, "rev-parse", "HEAD").strip()
        # --no-optional-locks: a plain `git status` may rewrite the index, and others commit here.
        dirty = _git(repo, "--no-optional-locks", "status", "--porcelain").strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def _git(repo: str, *args: str) -> str:
    return subprocess.run(["git", "-C", repo, *args], check=True, capture_output=True, text=True,
                          timeout=30).stdout


def _device_record(device: torch.device) -> Dict[str, object]:
    rec = {"host": socket.gethostname(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        rec.update(name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_GiB=round(props.total_memory / 2 ** 30, 1), sm_count=props.multi_processor_count)
    else:
        rec.update(name=platform.processor() or platform.machine(), cpu_count=os.cpu_count())
    return rec


def metadata(benchmark: str, device: torch.device) -> Dict[str, object]:
    """Run metadata; gathers every rank's device through the default process group, so every rank
    must call it."""
    mine = _device_record(device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    devices = [mine]
    if world > 1:
        devices = [None] * world
        dist.all_gather_object(devices, mine)
    for rank, d in enumerate(devices):
        d["rank"] = rank
    try:
        torch_nccl = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:  # torch built without NCCL
        torch_nccl = None
    return {
        "benchmark": benchmark,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": sorted({d["host"] for d in devices}),
        "world_size": world,
        "gpu_count": torch.cuda.device_count(),  # visible on rank 0's host
        "devices": devices,
        "commit": git_commit(),
        "versions": {
            "tpext": tpext.__version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "nccl_tpext": ".".join(map(str, tpext.nccl_version())),
            "nccl_torch": torch_nccl,
        },
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("NCCL_", "TORCH_NCCL_"))},
        "argv": sys.argv,
    }


def device_slug(meta: Dict[str, object]) -> str:
    """e.g. 'nvidia-h200-x2' or 'cpu-x2': the device name of rank 0 and the world size."""
    first = meta["devices"][0]
    name = first["name"] if str(first["device"]).startswith("cuda") else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"
    return f"{slug}-x{meta['world_size']}"


def default_out(benchmark: str, meta: Dict[str, object]) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(RESULTS, f"{benchmark}-{device_slug(meta)}-{stamp}.json")


def _finite(obj):
    """NaN and infinities become null: json.dump would write NaN, which is not JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str, obj: Dict[str, object]) -> str:
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_finite(obj), f, indent=1, allow_nan=False)
        f.write("\n")
    return path


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or not b:
        return None
    r = a / b
    return r if math.isfinite(r) else None
