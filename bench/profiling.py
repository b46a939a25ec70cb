"""torch.profiler helpers shared by bench/kernel_timeline.py and bench/corun_probe.py."""
import json
import os
import tempfile
from typing import Dict, List, Optional


def kernel_records(prof, trace_path: Optional[str] = None) -> List[Dict]:
    """The CUDA kernel records of a finished torch.profiler.profile, sorted by start ("ts", "dur"
    in us; "args" has "stream", "grid", "block"). The Chrome trace they come from is kept at
    trace_path when one is given."""
    path = trace_path
    if path is None:
        fd, path = tempfile.mkstemp(suffix=".json")
        os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        if trace_path is None:
            os.unlink(path)
    return sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])


def overlap_us(a: Dict, b: Dict) -> float:
    """How long two kernel records ran at the same time."""
    return max(0.0, min(a["ts"] + a["dur"], b["ts"] + b["dur"]) - max(a["ts"], b["ts"]))
