"""tpext: tensor parallelism for PyTorch as a compiled extension around raw NCCL.

    import tpext
    tpext.init(tp_size=2)                 # under torchrun
    tp = tpext.get_tp_group()
    tp.all_reduce(tensor)                 # ordered on the current CUDA stream
"""
import torch  # noqa: F401  (loads libtorch, libnccl and cuBLAS before tpext._C needs them)

from . import _C  # noqa: F401
from . import _fake_ops  # noqa: F401
from .errors import CommDestroyed, CommTimeout, CudaError, NcclError, TpextError
from .groups import Group
from .bootstrap import destroy, get_dp_group, get_tp_group, get_world_group, init, is_initialized

__version__ = "0.1.0"

__all__ = [
    "init",
    "destroy",
    "is_initialized",
    "get_tp_group",
    "get_dp_group",
    "get_world_group",
    "Group",
    "TpextError",
    "NcclError",
    "CudaError",
    "CommTimeout",
    "CommDestroyed",
    "nccl_version",
]


def nccl_version() -> tuple:
    """(major, minor, patch) of the libnccl loaded at run time."""
    code = _C.nccl_version()
    return (code // 10000, (code % 10000) // 100, code % 100)
