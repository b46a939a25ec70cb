"""Build-time check of the C++ compiler (used by setup.py, no torch import).

A compiler that links libstdc++ statically into shared objects gives the extension its own copy of
the C++ runtime beside the one torch loads. Streams then use locale facets registered by the other
copy and crash: seen on the GPU box, whose CXX (/opt/gcc/bin/g++) does this, as a segfault in the
first c10::str() of the extension. setup.py asks here for a compiler that links it dynamically.
"""
import os
import shutil
import subprocess
import tempfile
from typing import List, Optional

_PROBE = "#include <sstream>\n#include <string>\nstd::string probe(long x) { std::ostringstream s; s << x; return s.str(); }\n"
# std::basic_ostream<char>::_M_insert<long>: defined in the probe only when libstdc++ is linked in.
_STATIC_MARKER = "_ZNSo9_M_insertIlEERSoT_"


def links_libstdcxx_statically(cxx: str) -> Optional[bool]:
    """True if `cxx` copies libstdc++ into a shared object, False if not, None if it can't tell."""
    with tempfile.TemporaryDirectory() as d:
        src, lib = os.path.join(d, "probe.cpp"), os.path.join(d, "probe.so")
        with open(src, "w") as f:
            f.write(_PROBE)
        try:
            subprocess.run([cxx, "-shared", "-fPIC", "-O1", src, "-o", lib], check=True, capture_output=True,
                           timeout=120)
            syms = subprocess.run(["nm", "-D", "--defined-only", lib], check=True, capture_output=True, text=True,
                                  timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        return _STATIC_MARKER in syms


def pick_cxx(candidates: List[str] = ("g++", "c++")) -> Optional[str]:
    """Keeps $CXX unless it links libstdc++ statically; then the first of `candidates` on PATH that
    links it dynamically. Returns the compiler chosen when $CXX had to be replaced, else None."""
    current = os.environ.get("CXX")
    if not current or links_libstdcxx_statically(current) is not True:
        return None
    for name in candidates:
        path = shutil.which(name)
        if path and os.path.realpath(path) != os.path.realpath(current) and links_libstdcxx_statically(path) is False:
            return path
    raise RuntimeError(f"CXX={current} links libstdc++ statically into shared objects, which crashes beside torch's "
                       f"libstdc++; set CXX to a compiler that links it dynamically (none of {list(candidates)} did)")
