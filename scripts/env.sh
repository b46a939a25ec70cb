# Sourced by the other scripts: picks the Python to use, installs what is missing, builds tpext.
#
# - A Python that already has torch (>= 2.11), pytest and ninja is used as it is: that is the
#   offline GPU box, where nothing may be downloaded. TPEXT_PYTHON forces a choice.
# - Otherwise a virtual environment .venv is created with torch==2.14.1 (the CUDA 13.0 build),
#   pybind11, ninja, pytest, numpy and transformers (only for model conversion and its tests).
# Then tpext is built in place (setup.py build_ext --inplace: no pip, no network, no build
# isolation, which the offline box needs) and the checkout put on PYTHONPATH.
set -euo pipefail

TPEXT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
# NVLink multicast stays off on shared multi-GPU hosts (see NOTES-NCCL.md).
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
export NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}
export PYTHONUNBUFFERED=1

_has_stack() {
  "$1" - <<'PY' 2>/dev/null
import torch, pytest  # noqa: F401
import shutil, sys
major, minor = (int(x) for x in torch.__version__.split(".")[:2])
ok = (major, minor) >= (2, 11) and (shutil.which("ninja") or __import__("importlib").util.find_spec("ninja"))
sys.exit(0 if ok else 1)
PY
}

if [ -n "${TPEXT_PYTHON:-}" ]; then
  PY=$TPEXT_PYTHON
elif [ ! -x "$TPEXT_ROOT/.venv/bin/python" ] && command -v python3 >/dev/null && _has_stack python3; then
  PY=$(command -v python3)
else
  if [ ! -x "$TPEXT_ROOT/.venv/bin/python" ]; then
    echo "[tpext] creating $TPEXT_ROOT/.venv"
    python3 -m venv "$TPEXT_ROOT/.venv"
  fi
  PY=$TPEXT_ROOT/.venv/bin/python
  if ! _has_stack "$PY"; then
    echo "[tpext] installing torch==2.14.1, pybind11, ninja, pytest, numpy, transformers into .venv"
    "$PY" -m pip install -q --upgrade pip setuptools wheel
    "$PY" -m pip install -q torch==2.14.1 pybind11 ninja pytest numpy transformers
  fi
fi
export PATH="$(dirname "$PY"):$PATH"
ninja_bin=$("$PY" -c 'import ninja, os; print(os.path.join(ninja.BIN_DIR, "ninja"))' 2>/dev/null || true)
[ -n "$ninja_bin" ] && [ -x "$ninja_bin" ] && export PATH="$(dirname "$ninja_bin"):$PATH"
echo "[tpext] python: $PY ($("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())'))"

export PYTHONPATH="$TPEXT_ROOT${PYTHONPATH:+:$PYTHONPATH}"

tpext_build() {
  echo "[tpext] building tpext._C"
  (cd "$TPEXT_ROOT" && "$PY" setup.py -q build_ext --inplace)
}
