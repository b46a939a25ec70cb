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
from . import debug
from .debug import CollectiveMismatch
from .groups import Group
from .bootstrap import destroy, get_dp_group, get_tp_group, get_world_group, init, is_initialized
from .partition import gather_shards, is_tensor_parallel, split_sizes
from .mappings import (copy_to_tensor_parallel_region, gather_from_tensor_parallel_region,
                       reduce_from_tensor_parallel_region, scatter_to_tensor_parallel_region)
from .layers import ColumnParallelLinear, RowParallelLinear
from .mlp import ParallelMLP
from .stats import reset_stats, stats
from .tuning import (gemm_autotune, gemm_autotune_sustain_ms, overlap_sms, row_tail_weight, set_gemm_autotune,
                     set_gemm_autotune_sustain_ms, set_overlap_sms, set_row_tail_weight)
from .attention import ParallelAttention, head_layout
from .embedding import ParallelLMHead, VocabParallelEmbedding
from .cross_entropy import vocab_parallel_cross_entropy
from .sequence_parallel import (ParallelTransformerLayer, gather_from_sequence_parallel_region,
                                reduce_scatter_to_sequence_parallel_region, scatter_to_sequence_parallel_region)
from .convert import parallelize
from .checkpoint import full_state_dict, gather_params, load_checkpoint, save_checkpoint

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
    "CollectiveMismatch",
    "nccl_version",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "ParallelMLP",
    "copy_to_tensor_parallel_region",
    "reduce_from_tensor_parallel_region",
    "scatter_to_tensor_parallel_region",
    "gather_from_tensor_parallel_region",
    "split_sizes",
    "gather_shards",
    "is_tensor_parallel",
    "stats",
    "reset_stats",
    "set_overlap_sms",
    "overlap_sms",
    "set_row_tail_weight",
    "row_tail_weight",
    "set_gemm_autotune",
    "gemm_autotune",
    "set_gemm_autotune_sustain_ms",
    "gemm_autotune_sustain_ms",
    "ParallelAttention",
    "head_layout",
    "VocabParallelEmbedding",
    "ParallelLMHead",
    "vocab_parallel_cross_entropy",
    "ParallelTransformerLayer",
    "scatter_to_sequence_parallel_region",
    "gather_from_sequence_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "parallelize",
    "gather_params",
    "full_state_dict",
    "save_checkpoint",
    "load_checkpoint",
]


def nccl_version() -> tuple:
    """(major, minor, patch) of the libnccl loaded at run time."""
    code = _C.nccl_version()
    return (code // 10000, (code % 10000) // 100, code % 100)
