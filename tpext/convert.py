"""tpext.parallelize: converts a Hugging Face transformers model (or any torch model whose modules a
plan names) in place onto the TP layers, so that it computes what it computed before, on every
rank of the TP group.

    model = AutoModelForCausalLM.from_config(config)       # or from_pretrained, same weights on every rank
    tpext.parallelize(model)                                # Llama, Mistral, Qwen2, GPT-2, GPT-NeoX, OPT, any
                                                            # model with a base_model_tp_plan
    out = model.generate(ids, max_new_tokens=20)            # the same tokens on every rank

What changes:
- Linear (and GPT-2's Conv1D) layers the plan calls "column" become ColumnParallelLinear, "row"
  RowParallelLinear: an MLP is split by its hidden features.
- Attention modules keep their own forward (their rotary embeddings, masks, KV cache and
  attention kernels); their Q/K/V projections become column-parallel layers holding whole heads
  (fused ones included: GPT-2's [q|k|v], GPT-NeoX's per-head interleaving) and the output
  projection a row-parallel one. The per-rank head counts the module reads (num_heads,
  num_key_value_groups, GPT-2's split_size, ...) are set to this rank's. Heads that do not divide
  split unevenly; fewer KV heads than ranks are replicated (see tpext.attention); a warning says so.
  A plan that keeps an attention's activations whole (its projections "colwise_gather_output" and
  the output "rowwise_split_input", as Olmo2's and Phi-3's plans do for their norms over all heads
  or their sliced fused projections) is followed instead: the projections are split by features,
  their outputs gathered, and the attention runs with all its heads on every rank.
- The input embedding becomes a VocabParallelEmbedding and the output projection a ParallelLMHead
  gathering the logits (tied to the embedding when the model ties them).
- Everything else (norms, position embeddings, biases of row layers) is replicated. Weights
  inside a head-split attention that act on each head (Qwen3's q_norm / k_norm) see only this
  rank's heads: their gradients are summed over the TP group (transformers' style
  "replicated_with_grad_allreduce", which tpext applies there whatever the plan says; outside
  attention the activations are whole on every rank and the style means "replicate").

The plan: for the families above tpext's own (convert_families.py), for others the model's
tensor-parallel plan (config.base_model_tp_plan, the model's _tp_plan), and `plan` on top:
module name patterns ('*' matches one name component; a pattern matches the end of a name, so
"layers.*.mlp.fc1" matches "model.decoder.layers.3.mlp.fc1") to "column", "row", "replicate" or
"vocab" (or transformers' style names: "colwise", "rowwise", "packed_colwise", ...). The model
must hold the same weights on every rank (same seed, or loaded from the same checkpoint); the
configuration object is left alone (it still describes the full model).
"""
import fnmatch
import warnings
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .attention import head_layout, head_parallel_column, head_parallel_row, out_ranges, qkv_ranges, \
    register_grad_hook, warn_layout
from .convert_families import FAMILY_PLANS, attention_rule, looks_like_attention, normalize_style
from .embedding import ParallelLMHead, VocabParallelEmbedding
from .groups import Group
from .layers import ColumnParallelLinear, RowParallelLinear
from .mappings import copy_to_tensor_parallel_region, resolve_group
from .partition import mark_replicated

_WHAT = "parallelize"


def _is_conv1d(m: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, recognised by name: tpext does not import transformers.
    return type(m).__name__ == "Conv1D" and hasattr(m, "weight") and m.weight.dim() == 2


def _linear_weights(m: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(weight [out, in], bias) of an nn.Linear or a Conv1D (stored [in, out]); not detached, so
    requires_grad says whether the shard is trained."""
    return (m.weight.t() if _is_conv1d(m) else m.weight), m.bias


def _as_linear(m: nn.Module) -> nn.Linear:
    """An nn.Linear view of a Linear or Conv1D (the Conv1D's weight transposed), for from_linear."""
    if isinstance(m, nn.Linear):
        return m
    w, b = _linear_weights(m)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta", dtype=w.dtype)
    lin.weight = nn.Parameter(w.detach(), requires_grad=w.requires_grad)
    lin.bias = nn.Parameter(b.detach(), requires_grad=b.requires_grad) if b is not None else None
    return lin


def _contiguous_input(module, args):
    # transformers modules may hand a view (a slice, a transpose) to a projection; the TP layers
    # take contiguous inputs.
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(),) + tuple(args[1:])
    return None


def _matches(pattern: str, name: str) -> bool:
    p, n = pattern.split("."), name.split(".")
    if len(p) > len(n):
        return False
    return all(fnmatch.fnmatchcase(nc, pc) for pc, nc in zip(p, n[len(n) - len(p):]))


class _Plan:
    """The style of each module name: the last matching pattern of the user's plan, else of the
    base plan (family or model), else the defaults (embeddings)."""

    def __init__(self, base: Dict[str, str], user: Dict[str, str], defaults: Dict[str, str]):
        self.layers = [("plan", user), ("the model's plan", base), ("default", defaults)]

    def style(self, name: str) -> Tuple[Optional[str], dict, str]:
        for source, plan in self.layers:
            hit = None
            for pattern, style in plan.items():
                if _matches(pattern, name):
                    hit = (pattern, style)
            if hit is not None:
                style, opts = normalize_style(hit[1], f"{source}: {hit[0]!r} (module {name!r})")
                return style, opts, source
        return None, {}, ""


def _model_plan(model: nn.Module) -> Dict[str, str]:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILY_PLANS:
        return dict(FAMILY_PLANS[model_type])
    plan: Dict[str, str] = {}
    base = getattr(config, "base_model_tp_plan", None)
    if isinstance(base, dict):
        plan.update(base)
    own = getattr(model, "_tp_plan", None)
    if isinstance(own, dict):
        plan.update(own)
    return plan


def _check_plan(plan) -> Dict[str, str]:
    if plan is None:
        return {}
    if not isinstance(plan, dict):
        raise TypeError(f"{_WHAT}: plan: expected a dict of module name patterns to styles, got {type(plan).__name__}")
    for pattern, style in plan.items():
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"{_WHAT}: plan: expected non-empty module name patterns (str), got {pattern!r}")
        normalize_style(style, f"plan: {pattern!r}")
    return dict(plan)


def _embedding_of(model: nn.Module, getter: str):
    fn = getattr(model, getter, None)
    if fn is None:
        return None
    try:
        return fn()
    except (NotImplementedError, AttributeError):
        return None


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def parallelize(model: nn.Module, group: Optional[Group] = None, plan: Optional[Dict[str, str]] = None) -> nn.Module:
    """Converts `model` in place for the TP group `group` (default: tpext's TP group) and returns it.
    See the module docstring; tpext.full_state_dict gives back the unconverted model's weights."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_WHAT}: model: expected a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, "tpext_info", None) is not None:
        raise RuntimeError(f"{_WHAT}: model: already converted (tpext_info is set)")
    group = resolve_group(group, _WHAT)
    user = _check_plan(plan)
    modules = dict(model.named_modules())
    name_of = {id(m): n for n, m in modules.items()}
    inp, out = _embedding_of(model, "get_input_embeddings"), _embedding_of(model, "get_output_embeddings")
    defaults = {}
    if isinstance(inp, nn.Embedding) and id(inp) in name_of:
        defaults[name_of[id(inp)]] = "vocab"
    if isinstance(out, nn.Linear) and id(out) in name_of:
        defaults[name_of[id(out)]] = "vocab"
    styles = _Plan(_model_plan(model), user, defaults)
    info = {"tp_size": group.size, "rank": group.rank, "modules": {}, "attention": {}}
    handled = set()

    # Embeddings first, so a tied output projection can take the converted embedding's weight.
    tied = isinstance(inp, nn.Embedding) and isinstance(out, nn.Linear) and out.weight is inp.weight
    new_emb = None
    if isinstance(inp, nn.Embedding) and id(inp) in name_of:
        name = name_of[id(inp)]
        style, _, source = styles.style(name)
        handled.add(name)
        if style == "vocab":
            if type(inp).forward is not nn.Embedding.forward:
                if source == "plan":
                    raise NotImplementedError(f"{_WHAT}: plan: {name} ({type(inp).__name__}) overrides "
                                              f"nn.Embedding.forward, which a VocabParallelEmbedding would drop")
                warnings.warn(f"{_WHAT}: {name} ({type(inp).__name__}) has its own forward; it stays replicated")
            else:
                new_emb = VocabParallelEmbedding.from_embedding(inp, group)
                _set(model, name, new_emb)
                info["modules"][name] = "vocab"
        elif style not in (None, "replicate"):
            raise ValueError(f"{_WHAT}: plan: the input embedding {name} can be 'vocab' or 'replicate', got {style!r}")
    if isinstance(out, nn.Linear) and id(out) in name_of:
        name = name_of[id(out)]
        style, _, _ = styles.style(name)
        handled.add(name)
        if style in ("vocab", "column"):
            if tied and new_emb is None:
                warnings.warn(f"{_WHAT}: {name} is tied to the input embedding, which stays replicated; so does it")
            else:
                head = ParallelLMHead.from_linear(out, group, gather_output=True, tied_to=new_emb if tied else None)
                _set(model, name, head)
                info["modules"][name] = "vocab"
        elif style not in (None, "replicate"):
            raise ValueError(f"{_WHAT}: plan: the output projection {name} can be 'vocab' or 'replicate', got {style!r}")
        elif tied and new_emb is not None:
            raise ValueError(f"{_WHAT}: plan: {name} is tied to the input embedding, which is vocab-parallel: it must "
                             f"be 'vocab' too")

    layouts_seen = {}
    for name, m in modules.items():
        if name in handled or any(name.startswith(h + ".") for h in handled if h):
            continue
        rule = attention_rule(m)
        if rule is None:
            continue
        _convert_attention(model, name, m, rule, styles, group, info, handled, layouts_seen)

    for name, m in modules.items():
        if name in handled or not (isinstance(m, nn.Linear) or _is_conv1d(m) or isinstance(m, nn.Embedding)):
            continue
        style, opts, source = styles.style(name)
        if style in (None, "replicate"):
            continue
        parent = modules.get(name.rpartition(".")[0]) if "." in name else model
        if parent is not None and looks_like_attention(parent) and attention_rule(parent) is None \
                and not _whole_activation(style, opts):
            raise NotImplementedError(
                f"{_WHAT}: {name}: its parent {type(parent).__name__} looks like attention, but tpext has no head rule "
                f"for it (splitting it by features would split heads apart); pass plan={{'{name}': 'replicate'}} or "
                f"convert it by hand")
        _convert_linear(model, name, m, style, opts, group, info)
        handled.add(name)

    for p in model.parameters():
        if not hasattr(p, "tensor_model_parallel"):
            mark_replicated(p)
    if group._nccl is not None:
        model.to(group.device)
    for (num_heads, num_kv), layout in layouts_seen.items():
        warn_layout(_WHAT, layout, num_heads, num_kv)  # stacklevel 3: parallelize's caller
    info["shared_input_grad_reduce"] = _share_input_grad_reduce(model, group)
    model.tpext_info = info
    return model


# Modules whose input feeds only the listed column-parallel children (read off their forward in
# transformers): those children can share one all-reduce of the input gradient instead of one
# each, as Megatron's fused QKV and fused gate/up layers do (4 all-reduces per decoder layer per
# step instead of 7). Anything else keeps a reduction per layer, which is always correct.
_SHARED_INPUT = {
    ("q_proj", "k_proj", "v_proj"): ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention",
                                     "OPTAttention"),
    ("gate_proj", "up_proj"): ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"),
}


def _copy_input_hook(group: Group, where: str):
    def hook(module, args, kwargs):
        if args and isinstance(args[0], torch.Tensor):
            return (copy_to_tensor_parallel_region(args[0], group),) + tuple(args[1:]), kwargs
        for key in ("hidden_states", "x"):
            if isinstance(kwargs.get(key), torch.Tensor):
                kwargs = dict(kwargs)
                kwargs[key] = copy_to_tensor_parallel_region(kwargs[key], group)
                return args, kwargs
        # Its column layers skip their own reduction, so running on would lose the gradient sum.
        raise RuntimeError(f"{_WHAT}: {where}: found no input tensor (positional, hidden_states= or x=) to "
                           f"reduce the gradient of; this module's forward is not the one tpext converted")
    return hook


def _share_input_grad_reduce(model: nn.Module, group: Group):
    """Gives the known attention / MLP modules one input-gradient all-reduce (a copy-to-region in
    front) and turns their column layers' own reductions off; returns the names of those modules."""
    shared = []
    if group.size == 1:
        return shared
    for name, m in model.named_modules():
        for children, classes in _SHARED_INPUT.items():
            if type(m).__name__ not in classes:
                continue
            layers = [getattr(m, c, None) for c in children]
            if not all(isinstance(l, ColumnParallelLinear) and not l.gather_output for l in layers):
                continue
            for layer in layers:
                layer.disable_grad_reduce = True
            m.register_forward_pre_hook(_copy_input_hook(group, name or type(m).__name__), with_kwargs=True)
            shared.append(name)
    return shared


def _whole_activation(style: Optional[str], opts: dict) -> bool:
    """A layer split by features whose activations stay whole on every rank: a column layer that
    gathers its output, or a row layer that takes the full input (transformers'
    colwise_gather_output / colwise_rep and rowwise_split_input / rowwise_rep)."""
    return (style == "column" and bool(opts.get("gather_output"))) or \
        (style == "row" and not opts.get("input_is_parallel", True))


def _keeps_whole(proj, out_style, out_opts) -> bool:
    """The plan keeps an attention's activations whole (Olmo2's and Phi-3's plans, whose norms or
    slicing need all heads' features): the projections are split by features, gathered, and the
    attention itself runs on every rank with all its heads; no head bookkeeping."""
    return all(_whole_activation(s, o) for s, o in proj) and _whole_activation(out_style, out_opts)


def _convert_attention(model, name, module, rule, styles, group, info, handled, layouts_seen) -> None:
    prefix = f"{name}." if name else ""
    proj = [styles.style(prefix + c)[:2] for c in rule.projections]
    proj_styles = [s for s, _ in proj]
    out_style, out_opts, _ = styles.style(prefix + rule.out)
    if all(s in (None, "replicate") for s in proj_styles) and out_style in (None, "replicate"):
        handled.update(prefix + c for c in rule.projections + (rule.out,))
        return
    if _keeps_whole(proj, out_style, out_opts):
        return  # split by features in the linear pass below; the attention computes on whole heads
    if any(s != "column" for s in proj_styles) or out_style != "row":
        got = ", ".join(f"{c}={s!r}" for c, s in zip(rule.projections + (rule.out,), proj_styles + [out_style]))
        raise ValueError(f"{_WHAT}: plan: attention {name} ({type(module).__name__}) is split by heads as a whole: its "
                         f"projections {', '.join(rule.projections)} must all be 'column' and {rule.out} 'row' (or all "
                         f"'replicate'), got {got}")
    num_heads, num_kv, head_dim = rule.heads(module, rule.projections)
    per_head = _per_head_params(name, module, rule, head_dim)  # checked before anything changes
    layout = head_layout(num_heads, num_kv, group.size)
    ranges = qkv_ranges(layout, num_heads, num_kv, head_dim, rule.fused)
    ranges = ranges if rule.fused == "separate" else (ranges,)
    for child, child_ranges in zip(rule.projections, ranges):
        old = getattr(module, child)
        w, b = _linear_weights(old)
        new = head_parallel_column(w, b, child_ranges, group)
        _finish(new, old)
        setattr(module, child, new)
    old = getattr(module, rule.out)
    w, b = _linear_weights(old)
    new = head_parallel_row(w, b, out_ranges(layout, head_dim), group)
    _finish(new, old)
    setattr(module, rule.out, new)
    rule.patch(module, layout[group.rank], head_dim)
    for p in per_head:
        mark_replicated(p)
        p.tpext_grad_allreduce = True
        register_grad_hook(p, lambda g, group=group: group.all_reduce(g.contiguous().clone()))
    handled.update(prefix + c for c in rule.projections + (rule.out,))
    layouts_seen[(num_heads, num_kv)] = layout
    mine = layout[group.rank]
    info["attention"][name] = {"heads": len(mine.q), "kv_heads": len(mine.kv), "n_rep": mine.n_rep}
    for c in rule.projections:
        info["modules"][prefix + c] = "column"
    info["modules"][prefix + rule.out] = "row"


def _per_head_params(name: str, module: nn.Module, rule, head_dim: int) -> list:
    """Parameters of a head-split attention other than its projections (Qwen3's q_norm / k_norm:
    one [head_dim] weight applied to every head). They stay replicated, but each rank applies them
    to its own heads only, so its gradient is partial: the caller hooks them to sum it over the TP
    group, as transformers' "replicated_with_grad_allreduce" does. (Copies of a replicated KV head
    each see a part of the query heads, so summing over the ranks counts every query head once.) A
    parameter of any other shape there cannot be told apart from a per-head one (e.g. a norm over
    all heads' features, which would need the whole projection): refused rather than computed wrong."""
    projections = set(rule.projections) | {rule.out}
    out = []
    for pname, p in module.named_parameters():
        if pname.split(".")[0] in projections:
            continue
        if p.dim() != 1 or p.shape[0] != head_dim:
            raise NotImplementedError(
                f"{_WHAT}: {name}.{pname}: a parameter of shape {tuple(p.shape)} inside attention {name} "
                f"({type(module).__name__}), which is split by heads; tpext knows per-head weights of shape "
                f"({head_dim},) (head_dim) only. Pass a plan replicating the attention's projections, or convert it "
                f"by hand")
        out.append(p)
    return out


def _finish(new: nn.Module, old: nn.Module) -> None:
    if _is_conv1d(old):
        new.tpext_from_conv1d = True  # full_state_dict writes the weight back as [in, out]
    new.register_forward_pre_hook(_contiguous_input)


def _convert_linear(model, name, m, style, opts, group, info) -> None:
    if isinstance(m, nn.Embedding):
        if style != "vocab":
            raise ValueError(f"{_WHAT}: plan: {name} is an nn.Embedding: it can be 'vocab' or 'replicate', got {style!r}")
        _set(model, name, VocabParallelEmbedding.from_embedding(m, group))
        info["modules"][name] = "vocab"
        return
    lin = _as_linear(m)
    if style == "vocab":
        new = ParallelLMHead.from_linear(lin, group, gather_output=True)
    elif style == "column" and opts.get("stride", 1) > 1:
        new = _packed_column(lin, opts["stride"], group)
    elif style == "column":
        new = ColumnParallelLinear.from_linear(lin, group, gather_output=opts.get("gather_output", False))
    else:
        new = RowParallelLinear.from_linear(lin, group, input_is_parallel=opts.get("input_is_parallel", True))
    _finish(new, m)
    _set(model, name, new)
    info["modules"][name] = style


def _packed_column(lin: nn.Linear, stride: int, group: Group) -> ColumnParallelLinear:
    """A column layer over a weight stacking `stride` projections (Phi-3's gate_up_proj): each is
    split across the ranks on its own, as ColumnParallelLinear(stride=...) does."""
    if lin.out_features % stride != 0:
        raise ValueError(f"{_WHAT}: a packed projection of {lin.out_features} outputs does not split into {stride}")
    layer = ColumnParallelLinear(lin.in_features, lin.out_features, bias=lin.bias is not None, group=group,
                                 device="meta", dtype=lin.weight.dtype, stride=stride)
    w, b = layer._shards([lin.weight], [lin.bias] if lin.bias is not None else [None])
    device = group.device if group._nccl is not None else lin.weight.device
    layer._set_parameters(w.to(device), b.to(device) if b is not None else None, lin)
    return layer
