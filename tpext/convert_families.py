"""What tpext.parallelize knows about Hugging Face model families: their plans (which modules are
column-parallel, row-parallel, vocabulary-parallel) and their attention modules (which children
project Q, K, V and the output, how a fused QKV weight is laid out, which attributes hold the head
counts the module reads in forward).

Models outside the table convert through their own tensor-parallel plan (config.base_model_tp_plan
or the model's _tp_plan, as transformers writes them) and the generic attention rule below, which
covers the Llama-like attention of most current families (q_proj / k_proj / v_proj and o_proj,
dense or out_proj, heads of self.head_dim, reshaped with -1 heads in forward).
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from torch import nn

# Plans of the families that carry none (GPT-2, OPT) or whose fused projections need a rule
# (GPT-NeoX), and of the Llama-like ones, so they convert the same on every transformers version.
# Patterns match the trailing components of module names ('*' matches one component).
_LLAMA_LIKE_PLAN = {
    "layers.*.self_attn.q_proj": "column",
    "layers.*.self_attn.k_proj": "column",
    "layers.*.self_attn.v_proj": "column",
    "layers.*.self_attn.o_proj": "row",
    "layers.*.mlp.gate_proj": "column",
    "layers.*.mlp.up_proj": "column",
    "layers.*.mlp.down_proj": "row",
}
FAMILY_PLANS: Dict[str, Dict[str, str]] = {
    "llama": _LLAMA_LIKE_PLAN,
    "mistral": _LLAMA_LIKE_PLAN,
    "qwen2": _LLAMA_LIKE_PLAN,
    "gpt2": {
        "h.*.attn.c_attn": "column",
        "h.*.attn.c_proj": "row",
        "h.*.mlp.c_fc": "column",
        "h.*.mlp.c_proj": "row",
    },
    "gpt_neox": {
        "layers.*.attention.query_key_value": "column",
        "layers.*.attention.dense": "row",
        "layers.*.mlp.dense_h_to_4h": "column",
        "layers.*.mlp.dense_4h_to_h": "row",
    },
    "opt": {
        "layers.*.self_attn.q_proj": "column",
        "layers.*.self_attn.k_proj": "column",
        "layers.*.self_attn.v_proj": "column",
        "layers.*.self_attn.out_proj": "row",
        "layers.*.fc1": "column",
        "layers.*.fc2": "row",
    },
}

# transformers' style names (every version since 4.46) -> (tpext style, options).
_HF_STYLES = {
    "colwise": ("column", {}),
    "colwise_rep": ("column", {"gather_output": True}),
    "colwise_gather_output": ("column", {"gather_output": True}),
    "local_colwise": ("column", {}),
    "packed_colwise": ("column", {"stride": 2}),
    "local_packed_colwise": ("column", {"stride": 2}),
    "rowwise": ("row", {}),
    "rowwise_rep": ("row", {"input_is_parallel": False}),
    "local_rowwise": ("row", {}),
    "rowwise_split_input": ("row", {"input_is_parallel": False}),
    "replicate": ("replicate", {}),
    "replicated_with_grad_allreduce": ("replicate", {}),
    "local": ("replicate", {}),
    "local_params": ("replicate", {}),
    "gather": ("replicate", {}),
    "isolated": ("replicate", {}),
    "sequence_parallel": ("replicate", {}),
    "embedding_rowwise": ("vocab", {}),
    "embedding_colwise": ("vocab", {}),
    "vocab": ("vocab", {}),
    "column": ("column", {}),
    "row": ("row", {}),
}
TPEXT_STYLES = ("column", "row", "replicate", "vocab")


def normalize_style(style, where: str) -> Tuple[str, dict]:
    """(tpext style, options) of a plan value: tpext's own ("column", "row", "replicate",
    "vocab") or transformers' names."""
    if not isinstance(style, str) or style not in _HF_STYLES:
        known = ", ".join(repr(s) for s in TPEXT_STYLES)
        raise ValueError(f"parallelize: {where}: expected a style among {known} (or a transformers tp_plan style: "
                         f"colwise, rowwise, packed_colwise, replicate, embedding_rowwise, ...), got {style!r}")
    return _HF_STYLES[style]


# -- attention modules ------------------------------------------------------------------------------


@dataclass
class AttentionRule:
    """How one attention module is split by heads.

    projections: child names of separate q, k, v projections, or a single fused one;
    fused: "separate", "blocked" ([q | k | v] rows) or "interleaved" (per head [q_h, k_h, v_h]);
    out: the output projection; heads(module, children) -> (num_heads, num_kv_heads, head_dim);
    patch(module, rank_heads, head_dim): sets the per-rank counts the module reads in forward."""
    projections: Tuple[str, ...]
    fused: str
    out: str
    heads: Callable
    patch: Callable


def _out_features(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.out_features
    return m.weight.shape[1]  # Conv1D stores [in, out]


def _in_features(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.in_features
    return m.weight.shape[0]


def _patch_counts(module: nn.Module, heads, head_dim: int) -> None:
    """The attributes transformers' attention modules read the head counts from."""
    for name in ("num_heads", "num_attention_heads", "n_heads", "n_head"):
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, len(heads.q))
    for name in ("num_key_value_heads", "num_kv_heads", "n_kv_heads"):
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, len(heads.kv))
    if isinstance(getattr(module, "num_key_value_groups", None), int):
        module.num_key_value_groups = heads.n_rep


def _generic_heads(module: nn.Module, names: Tuple[str, ...]):
    head_dim = getattr(module, "head_dim", None)
    if not isinstance(head_dim, int):
        raise NotImplementedError(f"parallelize: {type(module).__name__} has no integer head_dim attribute; pass a "
                                  f"plan that replicates it")
    q, k, _ = (getattr(module, n) for n in names)
    return _out_features(q) // head_dim, _out_features(k) // head_dim, head_dim


def _gpt2_patch(module, heads, head_dim) -> None:
    module.num_heads = len(heads.q)
    module.split_size = len(heads.q) * head_dim  # c_attn's output is split into q, k, v of this size


def _neox_heads(module, names):
    head_dim = module.head_size
    n = _out_features(getattr(module, names[0])) // (3 * head_dim)
    return n, n, head_dim


_OUT_NAMES = ("o_proj", "dense", "out_proj")


def attention_rule(module: nn.Module) -> Optional[AttentionRule]:
    """The rule for `module` when it is an attention module tpext knows, else None."""
    cls = type(module).__name__
    if cls in ("GPT2Attention", "DecisionTransformerGPT2Attention"):
        if getattr(module, "is_cross_attention", False):
            raise NotImplementedError(f"parallelize: {cls} as cross-attention (separate q_attn) is not supported; pass "
                                      f"a plan that replicates it")
        return AttentionRule(("c_attn",), "blocked", "c_proj",
                             lambda m, names: (m.num_heads, m.num_heads, m.head_dim), _gpt2_patch)
    if cls == "GPTNeoXAttention":
        return AttentionRule(("query_key_value",), "interleaved", "dense", _neox_heads, lambda m, h, d: None)
    names = ("q_proj", "k_proj", "v_proj")
    if all(isinstance(getattr(module, n, None), nn.Linear) for n in names):
        for out in _OUT_NAMES:
            if isinstance(getattr(module, out, None), nn.Linear):
                return AttentionRule(names, "separate", out, _generic_heads, _patch_counts)
    return None


def looks_like_attention(module: nn.Module) -> bool:
    """Modules whose Linear children must not be split by features without a head rule."""
    return "Attention" in type(module).__name__ or "Attn" in type(module).__name__
