"""Builds tpext._C: the torch-free core (csrc/core) and the torch adapter (csrc/torch) in one
extension, linked against the same libnccl.so.2 and cuBLASLt that torch itself loads.

    pip install --no-build-isolation .        (or -e . for development)

Environment: CUDA_HOME (nvcc), TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), NCCL_HOME and
CUBLAS_HOME to override where the headers and libraries are looked for.
"""
import glob
import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tpext"))
from _native_paths import find_cublaslt, find_nccl  # noqa: E402  (shared with CMake via tpext)
from _toolchain import pick_cxx  # noqa: E402

from torch.utils.cpp_extension import BuildExtension, CUDAExtension  # noqa: E402

os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
_cxx = pick_cxx()
if _cxx:
    print(f"[tpext] CXX={os.environ['CXX']} links libstdc++ statically (a second C++ runtime beside torch's "
          f"crashes); building with {_cxx}")
    os.environ["CXX"] = _cxx
    if os.environ.get("CC") and os.path.basename(_cxx).endswith("++"):
        os.environ.pop("CC")
os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 2))

here = os.path.dirname(os.path.abspath(__file__))
sources = sorted(
    glob.glob(os.path.join("csrc", "core", "*.cpp"))
    + glob.glob(os.path.join("csrc", "core", "*.cu"))
    + glob.glob(os.path.join("csrc", "torch", "*.cpp"))
)

nccl = find_nccl()
cublaslt = find_cublaslt()
include_dirs = [os.path.join(here, "csrc"), nccl.include_dir, cublaslt.include_dir]
link_args = []
for lib in (nccl, cublaslt):
    link_args += [f"-L{lib.lib_dir}", f"-l:{lib.lib_name}", f"-Wl,-rpath,{lib.lib_dir}"]
# cuBLASLt's GEMMs live in libcublasLt; libcublas is only for its error strings and version.
link_args += [f"-l:{cublaslt.extra_lib}"] if cublaslt.extra_lib else []

nvcc_flags = ["-O3", "--expt-relaxed-constexpr"]
if any(a.strip().startswith("9.0") for a in os.environ["TORCH_CUDA_ARCH_LIST"].split(";")):
    # Hopper-only instructions (wgmma, TMA) need the arch-specific target.
    nvcc_flags += ["-gencode=arch=compute_90a,code=sm_90a"]

setup(
    name="tpext",
    version="0.1.0",
    description="Tensor parallelism for PyTorch as a compiled extension around raw NCCL",
    packages=["tpext"],
    ext_modules=[
        CUDAExtension(
            name="tpext._C",
            sources=sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": ["-O2", "-Wall", "-Wno-unused-parameter"], "nvcc": nvcc_flags},
            extra_link_args=link_args,
        )
    ],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
)
