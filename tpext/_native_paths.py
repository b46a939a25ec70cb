"""Where the NCCL and cuBLASLt that torch loads live, so the extension and the C++ tests link the
very same libraries (two different libnccl.so.2 in one process do not mix).

Order: an explicit *_HOME variable, then the nvidia-* wheels torch depends on, then CUDA_HOME and
the system. Importable without torch and without tpext._C (setup.py and CMake run it).
"""
import glob
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import List, Optional


@dataclass
class NativeLib:
    include_dir: str
    lib_dir: str
    lib_name: str  # the file to link with -l:NAME (the soname when no unversioned .so exists)
    extra_lib: Optional[str] = None


def _nvidia_roots() -> List[str]:
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    return list(spec.submodule_search_locations)


def _pick_lib(lib_dir: str, stem: str) -> Optional[str]:
    """The name to link: libX.so if present, else the soname libX.so.N."""
    if os.path.exists(os.path.join(lib_dir, f"{stem}.so")):
        return f"{stem}.so"
    versioned = sorted(
        (os.path.basename(p) for p in glob.glob(os.path.join(lib_dir, f"{stem}.so.*"))),
        key=lambda n: (n.count("."), n),
    )
    return versioned[0] if versioned else None


def _search(candidates, header: str, stem: str, what: str, extra_stem: Optional[str] = None) -> NativeLib:
    tried = []
    for inc, lib in candidates:
        tried.append(inc)
        if not os.path.exists(os.path.join(inc, header)):
            continue
        name = _pick_lib(lib, stem)
        if name is None:
            tried.append(f"{lib} (no {stem}.so*)")
            continue
        extra = _pick_lib(lib, extra_stem) if extra_stem else None
        return NativeLib(inc, lib, name, extra)
    raise RuntimeError(
        f"tpext: could not find {what} ({header} and {stem}.so*); looked in: " + ", ".join(tried)
    )


def find_nccl() -> NativeLib:
    cands = []
    if os.environ.get("NCCL_HOME"):
        h = os.environ["NCCL_HOME"]
        cands += [(os.path.join(h, "include"), os.path.join(h, "lib")), (os.path.join(h, "include"), os.path.join(h, "lib64"))]
    for root in _nvidia_roots():
        cands.append((os.path.join(root, "nccl", "include"), os.path.join(root, "nccl", "lib")))
    cands += [("/usr/include", "/usr/lib/x86_64-linux-gnu"), ("/usr/local/include", "/usr/local/lib")]
    return _search(cands, "nccl.h", "libnccl", "NCCL")


def find_cublaslt() -> NativeLib:
    cands = []
    if os.environ.get("CUBLAS_HOME"):
        h = os.environ["CUBLAS_HOME"]
        cands += [(os.path.join(h, "include"), os.path.join(h, "lib")), (os.path.join(h, "include"), os.path.join(h, "lib64"))]
    for root in _nvidia_roots():
        for sub in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            if sub.startswith("cu") or sub == "cublas":
                cands.append((os.path.join(root, sub, "include"), os.path.join(root, sub, "lib")))
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    cands += [(os.path.join(cuda_home, "include"), os.path.join(cuda_home, "lib64"))]
    return _search(cands, "cublasLt.h", "libcublasLt", "cuBLASLt", extra_stem="libcublas")


if __name__ == "__main__":
    # `python tpext/_native_paths.py cmake` prints CMake cache definitions.
    n, c = find_nccl(), find_cublaslt()
    if len(sys.argv) > 1 and sys.argv[1] == "cmake":
        print(
            f"-DNCCL_INCLUDE_DIR={n.include_dir};-DNCCL_LIBRARY={os.path.join(n.lib_dir, n.lib_name)};"
            f"-DCUBLASLT_INCLUDE_DIR={c.include_dir};-DCUBLASLT_LIBRARY={os.path.join(c.lib_dir, c.lib_name)}"
        )
    else:
        print(n)
        print(c)
