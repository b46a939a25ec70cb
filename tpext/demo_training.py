"""Section 3 of the demo (python -m tpext): training a small Llama-style model with tensor
parallelism, step for step against the same model on one device.

The full model is transformers' LlamaForCausalLM built from a LlamaConfig with random weights (a
fixed seed, so every rank builds the same one); without transformers, a plain-torch model with the
same structure and module names (_FallbackLlama below). The TP model holds this rank's shards of
its weights in tpext's modules:

    embed_tokens             VocabParallelEmbedding       forward: 1 all-reduce of b*s*h
    per layer: q, k, v, o    ParallelAttention.from_fused: q|k|v one column-parallel layer,
                             o row-parallel               forward: 1 (o), backward: 1 (dx of qkv)
               gate, up, down ParallelMLP.from_mlp: gate|up one column-parallel layer (stride 2),
                             down row-parallel            forward: 1 (down), backward: 1 (dx of gate|up)
               norms         replicated (deep copies)
    norm                     replicated
    lm_head                  ParallelLMHead(gather_output=False)   backward: 1 all-reduce of b*s*h
    loss                     vocab_parallel_cross_entropy          forward: 2 small all-reduces ([b*s]
                                                                    and [2, b*s] float32)

so 4 all-reduces of b*s*h per layer per step (Megatron-LM), 2 more around the vocabulary and 2
small ones in the loss; the demo counts them with tpext.stats() (module hooks attribute each to
the module that issued it) and checks them against that formula. Both models train with AdamW on
the same token batches (drawn from a fixed seed); the per-step losses must agree. The share of the
step spent communicating is the time of that step's all-reduces run alone, over the TP step time.
"""
import copy
import importlib.util
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import tpext

from . import timing
from .demo import dtype_name
from .demo_layers import worst_over_ranks

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TrainPlan:
    vocab: int
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    batch: int
    seq: int
    steps: int
    lr: float
    dtype: torch.dtype
    # Largest |tp loss - single loss| / single loss allowed at any step. float32 both ways: TP sums
    # partial products in another order, and AdamW carries those last-bit differences along.
    loss_rtol: float


# float32 on GPUs too: the point is step-for-step agreement, which bf16's 8-bit mantissa would blur.
GPU_PLAN = TrainPlan(vocab=32000, hidden=2048, ffn=5632, layers=4, heads=16, kv_heads=8, batch=8, seq=512,
                     steps=10, lr=1e-3, dtype=torch.float32, loss_rtol=1e-3)
CPU_PLAN = TrainPlan(vocab=1024, hidden=256, ffn=688, layers=2, heads=8, kv_heads=4, batch=4, seq=64,
                     steps=8, lr=3e-3, dtype=torch.float32, loss_rtol=1e-4)


def plan_for(device: torch.device, steps: Optional[int] = None) -> TrainPlan:
    plan = GPU_PLAN if device.type == "cuda" else CPU_PLAN
    if steps is not None:
        if steps < 2:
            raise ValueError(f"training: steps: expected at least 2 (step 1 counts, the rest are timed), got {steps}")
        plan = TrainPlan(**{**plan.__dict__, "steps": steps})
    return plan


# -- the full model ----------------------------------------------------------------------------


def transformers_version() -> Optional[str]:
    if importlib.util.find_spec("transformers") is None:
        return None
    from importlib.metadata import version
    return version("transformers")


class _RMSNorm(nn.Module):
    """Llama's RMSNorm as transformers computes it (in float32, then back to the input dtype)."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class _FallbackAttention(nn.Module):
    def __init__(self, plan: TrainPlan, rope_theta: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = plan.heads, plan.kv_heads, plan.hidden // plan.heads
        self.rope_theta = rope_theta
        self.q_proj = nn.Linear(plan.hidden, plan.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(plan.hidden, plan.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(plan.hidden, plan.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(plan.heads * self.head_dim, plan.hidden, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        # Rotary embeddings, Llama's "rotate half" form.
        inv_freq = 1.0 / self.rope_theta ** (torch.arange(0, self.head_dim, 2, device=x.device).float() / self.head_dim)
        angles = torch.arange(s, device=x.device).float()[:, None] * inv_freq
        cos, sin = torch.cat([angles, angles], -1).cos().to(x.dtype), torch.cat([angles, angles], -1).sin().to(x.dtype)

        def rotate(t):
            half = t.shape[-1] // 2
            return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin

        q, k = rotate(q), rotate(k)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(ctx.transpose(1, 2).reshape(b, s, -1))


class _FallbackMLP(nn.Module):
    def __init__(self, plan: TrainPlan):
        super().__init__()
        self.gate_proj = nn.Linear(plan.hidden, plan.ffn, bias=False)
        self.up_proj = nn.Linear(plan.hidden, plan.ffn, bias=False)
        self.down_proj = nn.Linear(plan.ffn, plan.hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _FallbackLayer(nn.Module):
    def __init__(self, plan: TrainPlan, rope_theta: float, eps: float):
        super().__init__()
        self.self_attn = _FallbackAttention(plan, rope_theta)
        self.mlp = _FallbackMLP(plan)
        self.input_layernorm, self.post_attention_layernorm = _RMSNorm(plan.hidden, eps), _RMSNorm(plan.hidden, eps)

    def forward(self, x):
        h = x + self.self_attn(self.input_layernorm(x))
        return h + self.mlp(self.post_attention_layernorm(h))


class _FallbackLlama(nn.Module):
    """A Llama (pre-norm, RMSNorm, rotary, GQA, SwiGLU, untied head) in plain torch with
    transformers' module names, for machines without transformers: the same conversion applies."""

    def __init__(self, plan: TrainPlan, rope_theta: float = 10000.0, eps: float = 1e-5):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(plan.vocab, plan.hidden)
        self.model.layers = nn.ModuleList(_FallbackLayer(plan, rope_theta, eps) for _ in range(plan.layers))
        self.model.norm = _RMSNorm(plan.hidden, eps)
        self.lm_head = nn.Linear(plan.hidden, plan.vocab, bias=False)
        self.rope_theta = rope_theta

    def forward(self, input_ids):
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = layer(h)
        return self.lm_head(self.model.norm(h))


def build_full_model(plan: TrainPlan, device: torch.device, seed: int) -> Tuple[nn.Module, float, str]:
    """(full model, rope theta, description), the same weights on every rank."""
    torch.manual_seed(seed)
    version = transformers_version()
    with torch.device(device):  # drawn where it runs: no large host-to-device copy on GPUs
        if version is None:
            model = _FallbackLlama(plan)
            theta, what = model.rope_theta, "plain-torch Llama (transformers is not installed)"
        else:
            from transformers import LlamaConfig, LlamaForCausalLM
            config = LlamaConfig(vocab_size=plan.vocab, hidden_size=plan.hidden, intermediate_size=plan.ffn,
                                 num_hidden_layers=plan.layers, num_attention_heads=plan.heads,
                                 num_key_value_heads=plan.kv_heads, max_position_embeddings=plan.seq,
                                 rms_norm_eps=1e-5, tie_word_embeddings=False)
            config._attn_implementation = "sdpa"
            model = LlamaForCausalLM(config)
            theta = _rope_theta(config)
            what = f"transformers {version} LlamaForCausalLM(LlamaConfig(...)), random init"
    return model.to(dtype=plan.dtype), theta, what


def _rope_theta(config) -> float:
    # transformers 5 keeps it in rope_parameters, 4.x in rope_theta. Only plain rotary is handled.
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        raise NotImplementedError(f"training demo: rope_type {params['rope_type']!r}: only plain rotary is supported")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def full_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    if isinstance(model, _FallbackLlama):
        return model(ids)
    return model(input_ids=ids, use_cache=False).logits


def next_token_targets(ids: torch.Tensor) -> torch.Tensor:
    """Each position predicts the next token; the last has none (ignored), as transformers'
    causal-LM loss shifts its labels."""
    return torch.cat([ids[:, 1:], ids.new_full((ids.shape[0], 1), IGNORE_INDEX)], dim=1)


def full_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = full_logits(model, ids)
    return F.cross_entropy(logits.float().flatten(0, 1), next_token_targets(ids).flatten(), ignore_index=IGNORE_INDEX)


# -- the TP model ------------------------------------------------------------------------------


def _fused_qkv(attn: nn.Module) -> nn.Linear:
    """One nn.Linear computing [q | k | v]: a single column-parallel layer then, whose backward
    all-reduces dx once instead of three times."""
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    weight = torch.cat([p.weight.detach() for p in projections])
    has_bias = attn.q_proj.bias is not None
    qkv = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta", dtype=weight.dtype)
    qkv.weight = nn.Parameter(weight)
    if has_bias:
        qkv.bias = nn.Parameter(torch.cat([p.bias.detach() for p in projections]))
    return qkv


class TPDecoderLayer(nn.Module):
    """This rank's shard of a Llama decoder layer: h = x + attn(norm1(x)); out = h + mlp(norm2(h))."""

    def __init__(self, layer: nn.Module, plan: TrainPlan, rope_theta: float, group: tpext.Group):
        super().__init__()
        attn = layer.self_attn
        self.self_attn = tpext.ParallelAttention.from_fused(_fused_qkv(attn), attn.o_proj, plan.heads, plan.kv_heads,
                                                            rope_theta=rope_theta, group=group)
        self.mlp = tpext.ParallelMLP.from_mlp(layer.mlp, "swiglu", group)
        # Replicated: every rank holds all of the norm weights, and their gradients agree on every
        # rank because the norms' inputs and output gradients are the all-reduced, full ones.
        self.input_layernorm = copy.deepcopy(layer.input_layernorm)
        self.post_attention_layernorm = copy.deepcopy(layer.post_attention_layernorm)

    def forward(self, x):
        h = x + self.self_attn(self.input_layernorm(x))
        return h + self.mlp(self.post_attention_layernorm(h))


class TPLlama(nn.Module):
    """This rank's shard of the full model; forward returns the logits of this rank's vocabulary
    slice, which vocab_parallel_cross_entropy takes as they are."""

    def __init__(self, full: nn.Module, plan: TrainPlan, rope_theta: float, group: tpext.Group):
        super().__init__()
        base = full.model
        self.group = group
        self.embed_tokens = tpext.VocabParallelEmbedding.from_embedding(base.embed_tokens, group)
        self.layers = nn.ModuleList(TPDecoderLayer(layer, plan, rope_theta, group) for layer in base.layers)
        self.norm = copy.deepcopy(base.norm)
        self.lm_head = tpext.ParallelLMHead.from_linear(full.lm_head, group, gather_output=False)

    def forward(self, ids):
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(self.norm(h))


def tp_loss(model: TPLlama, ids: torch.Tensor) -> torch.Tensor:
    return tpext.vocab_parallel_cross_entropy(model(ids), next_token_targets(ids), model.group,
                                              vocab_sizes=model.lm_head.partition_sizes, ignore_index=IGNORE_INDEX)


# -- counting the collectives of one step ------------------------------------------------------


@dataclass
class Count:
    calls: int = 0
    bytes: int = 0
    other_calls: int = 0  # collectives other than all-reduce

    def __add__(self, o: "Count") -> "Count":
        return Count(self.calls + o.calls, self.bytes + o.bytes, self.other_calls + o.other_calls)

    def __sub__(self, o: "Count") -> "Count":
        return Count(self.calls - o.calls, self.bytes - o.bytes, self.other_calls - o.other_calls)


def _snapshot(group: tpext.Group) -> Count:
    s = tpext.stats(group)
    return Count(s["all_reduce"]["calls"], s["all_reduce"]["bytes"],
                 sum(v["calls"] for k, v in s.items() if k != "all_reduce"))


def counted_step(model: TPLlama, optimizer, ids: torch.Tensor) -> Tuple[torch.Tensor, Dict[Tuple[str, str], Count]]:
    """One training step with module hooks that attribute each collective (tpext.stats() on the TP
    group) to the module running when it was issued. Keys: (part, phase); parts are "layer i",
    "embedding", "LM head", "loss" (what the forward ran outside any module: the cross-entropy),
    "backward elsewhere" and "optimizer" (both expected empty)."""
    group = model.group
    ledger: Dict[Tuple[str, str], Count] = {}
    handles = []

    def watch(module: nn.Module, part: str, backward: bool):
        started = {}

        def begin(phase):
            def hook(*_):
                started[phase] = _snapshot(group)
            return hook

        def end(phase):
            def hook(*_):
                ledger[(part, phase)] += _snapshot(group) - started.pop(phase)
            return hook

        # Entries exist from the start: a hook that never fires reads as "no collectives", which
        # the check then compares with the formula, instead of a missing key.
        ledger[(part, "forward")] = Count()
        handles.append(module.register_forward_pre_hook(begin("forward")))
        handles.append(module.register_forward_hook(end("forward")))
        if backward:
            ledger[(part, "backward")] = Count()
            handles.append(module.register_full_backward_pre_hook(begin("backward")))
            handles.append(module.register_full_backward_hook(end("backward")))

    for i, layer in enumerate(model.layers):
        watch(layer, f"layer {i}", backward=True)
    # The ids need no gradient, so the embedding's backward (local, no collective) has no hook.
    watch(model.embed_tokens, "embedding", backward=False)
    watch(model.lm_head, "LM head", backward=True)
    try:
        tpext.reset_stats(group)
        optimizer.zero_grad(set_to_none=True)
        loss = tp_loss(model, ids)
        after_forward = _snapshot(group)
        loss.backward()
        after_backward = _snapshot(group)
        optimizer.step()
        after_step = _snapshot(group)
    finally:
        for h in handles:
            h.remove()

    def phase_sum(phase):
        return sum((c for (_, p), c in ledger.items() if p == phase), Count())

    ledger[("loss", "forward")] = after_forward - phase_sum("forward")
    ledger[("backward elsewhere", "backward")] = (after_backward - after_forward) - phase_sum("backward")
    ledger[("optimizer", "step")] = after_step - after_backward
    return loss.detach(), ledger


@dataclass
class Expected:
    """What the formula predicts for one part of the step."""
    calls: int
    bytes: int
    exact_calls: bool = True  # False where the native row-parallel forward may split an all-reduce

    def matches(self, c: Count) -> bool:
        calls_ok = c.calls == self.calls if self.exact_calls else c.calls >= self.calls
        return calls_ok and c.bytes == self.bytes and c.other_calls == 0


def activation_bytes(plan: TrainPlan) -> int:
    """Bytes of one [b, s, h] activation: what each all-reduce of the formula moves."""
    return plan.batch * plan.seq * plan.hidden * torch.empty((), dtype=plan.dtype).element_size()


def expected_counts(plan: TrainPlan, n_layers: int, native: bool) -> Dict[Tuple[str, str], Expected]:
    activation = activation_bytes(plan)
    tokens_fp32 = plan.batch * plan.seq * 4
    exp = {}
    for i in range(n_layers):
        exp[(f"layer {i}", "forward")] = Expected(2, 2 * activation, exact_calls=not native)
        exp[(f"layer {i}", "backward")] = Expected(2, 2 * activation)
    exp[("embedding", "forward")] = Expected(1, activation)
    exp[("LM head", "forward")] = Expected(0, 0)
    exp[("LM head", "backward")] = Expected(1, activation)
    exp[("loss", "forward")] = Expected(2, 3 * tokens_fp32)  # max [b*s]; target logit and sum exp [2, b*s]
    exp[("backward elsewhere", "backward")] = Expected(0, 0)
    exp[("optimizer", "step")] = Expected(0, 0)
    return exp


# -- the section -------------------------------------------------------------------------------


# Timed repetitions of one step's all-reduces on their own.
COLLECTIVE_ITERS = 10

# Random tokens hold nothing to learn but themselves: the steps cycle through this many batches, so
# the model can memorise them and the loss visibly falls.
DISTINCT_BATCHES = 2


def _batches(plan: TrainPlan, device, seed: int) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same tokens on every rank
    pool = [torch.randint(plan.vocab, (plan.batch, plan.seq), generator=gen).to(device)
            for _ in range(DISTINCT_BATCHES)]
    return [pool[i % len(pool)] for i in range(plan.steps)]


def _training_steps(model, loss_fn, optimizer, batches, losses) -> Callable[[], None]:
    """A callable running the next training step each time it is called (for timing.time_op);
    losses stay on the device until the end, so no step waits for the host."""
    pending = iter(batches)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, next(pending))
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return step


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{n:g} B"


def _format_counts(ledger, plan: TrainPlan, activation: int, verdicts) -> List[str]:
    """A table: per part of the model, the all-reduces its forward and backward ran, what the
    formula expects of it, and the verdict."""

    def cell(c: Optional[Count]) -> str:
        if c is None:
            return "-"
        if c.calls == 0 and c.other_calls == 0:
            return "none"
        if c.bytes % activation == 0:
            text = f"{c.bytes // activation} x A"
            if c.calls != c.bytes // activation:  # the native row-parallel forward's pipelined pieces
                text += f" ({c.calls} calls)"
        else:
            text = f"{c.calls} calls, {_fmt_bytes(c.bytes)}"
        return text + (f" + {c.other_calls} other collectives" if c.other_calls else "")

    def verdict(*keys) -> str:
        return "ok" if all(verdicts[k] for k in keys) else "FAIL"

    layers = sorted({part for part, _ in ledger if part.startswith("layer ")}, key=lambda p: int(p.split()[1]))
    rows = [(f"decoder {part}", ledger[(part, "forward")], ledger[(part, "backward")],
             "4 x A = 4 x b*s*h: fwd o_proj, down_proj; bwd dx of q|k|v, of gate|up",
             verdict((part, "forward"), (part, "backward"))) for part in layers]
    rows += [
        ("embedding", ledger[("embedding", "forward")], None, "1 x A forward: partial lookups summed",
         verdict(("embedding", "forward"))),
        ("LM head", ledger[("LM head", "forward")], ledger[("LM head", "backward")],
         "1 x A backward: dx summed (column-parallel over the vocabulary)",
         verdict(("LM head", "forward"), ("LM head", "backward"))),
        ("cross-entropy", ledger[("loss", "forward")], None,
         "2 small forward: max [b*s], target logit + sum exp [2, b*s], float32", verdict(("loss", "forward"))),
        ("other backward", None, ledger[("backward elsewhere", "backward")], "none",
         verdict(("backward elsewhere", "backward"))),
        ("AdamW step", ledger[("optimizer", "step")], None, "none: each rank updates its own shards",
         verdict(("optimizer", "step"))),
    ]
    lines = [f"collectives of training step 1: tpext.stats() on the TP group, attributed to modules by hooks; "
             f"A = one all-reduce of b*s*h = {plan.batch}*{plan.seq}*{plan.hidden} {dtype_name(plan.dtype)} "
             f"({_fmt_bytes(activation)})",
             f"  {'part':<16} {'forward':>16} {'backward':>10}   expected"]
    for label, forward, backward, expectation, ok in rows:
        lines.append(f"  {label:<16} {cell(forward):>16} {cell(backward):>10}   {expectation}: {ok}")
    total = sum(ledger.values(), Count())
    big = sum(c.bytes for (part, _), c in ledger.items() if part != "loss") // activation
    lines.append(f"  step total: {total.calls} all-reduce calls, {_fmt_bytes(total.bytes)}: {big} x A "
                 f"(4 per layer x {len(layers)} + embedding + LM head) and the loss's two small ones")
    return lines


def run(group: tpext.Group, device: torch.device, say: Callable[[str], None], steps: Optional[int] = None,
        seed: int = 1234) -> List[str]:
    """Runs the section on every rank (collective); rank 0 prints through `say`. Returns the
    failed checks (the same on every rank)."""
    plan = plan_for(device, steps)
    failures = []
    full, theta, what = build_full_model(plan, device, seed)
    tp_model = TPLlama(full, plan, theta, group)
    n_params = sum(p.numel() for p in full.parameters())
    say(f"model: {what}; {plan.layers} layers, hidden {plan.hidden}, ffn {plan.ffn}, {plan.heads} heads "
        f"({plan.kv_heads} KV), vocab {plan.vocab}, {n_params / 1e6:.2f} M parameters, {dtype_name(plan.dtype)}")
    say(f"training: {plan.steps} AdamW steps (lr {plan.lr}) cycling through {DISTINCT_BATCHES} random token batches "
        f"[{plan.batch} x {plan.seq}] from seed {seed}; TP over {group.size} ranks vs the full model trained "
        f"identically on every rank (single device)")

    batches = _batches(plan, device, seed + 1)
    tp_opt = torch.optim.AdamW(tp_model.parameters(), lr=plan.lr)
    full_opt = torch.optim.AdamW(full.parameters(), lr=plan.lr)

    # Step 1: counted (hooks on), untimed; it also warms up both models.
    first_tp, ledger = counted_step(tp_model, tp_opt, batches[0])
    tp_losses, full_losses = [first_tp], []
    _training_steps(full, full_loss, full_opt, batches[:1], full_losses)()

    native = device.type == "cuda"
    expected = expected_counts(plan, len(tp_model.layers), native)
    verdicts = {k: worst_over_ranks(0.0 if e.matches(ledger[k]) else 1.0) == 0.0 for k, e in expected.items()}
    activation = activation_bytes(plan)

    # Steps 2..N, timed: each model on its own, every rank calling the same number of steps.
    timed = plan.steps - 1
    tp_time = timing.time_op(_training_steps(tp_model, tp_loss, tp_opt, batches[1:], tp_losses), timed, 0, device,
                             barrier=dist.barrier)
    full_time = timing.time_op(_training_steps(full, full_loss, full_opt, batches[1:], full_losses), timed, 0, device,
                               barrier=dist.barrier)
    collectives_us, n_collectives = _time_step_collectives(group, ledger, plan, device)

    tp_values = [float(v) for v in tp_losses]
    full_values = [float(v) for v in full_losses]
    rel = [abs(a - b) / abs(b) for a, b in zip(tp_values, full_values)]
    worst = worst_over_ranks(max(rel) if all(math.isfinite(r) for r in rel) else float("inf"))
    say(f"{'step':>4}  {'TP loss':>10}  {'single-device loss':>18}  {'|TP - single| / single':>22}")
    for i, (a, b, r) in enumerate(zip(tp_values, full_values, rel), start=1):
        say(f"{i:>4}  {a:>10.6f}  {b:>18.6f}  {r:>22.1e}")
    loss_ok = worst <= plan.loss_rtol
    say(f"  losses agree at every step within {plan.loss_rtol:.0e} (worst {worst:.1e} over ranks and steps): "
        f"{'ok' if loss_ok else 'FAIL'}")
    if not loss_ok:
        failures.append("training losses TP vs single device")

    for line in _format_counts(ledger, plan, activation, verdicts):
        say(line)
    failures += [f"collectives of {part} ({phase})" for (part, phase), ok in verdicts.items() if not ok]

    tp_us = worst_over_ranks(tp_time["median_us"])
    full_us = worst_over_ranks(full_time["median_us"])
    clock = "CUDA events" if device.type == "cuda" else "time.perf_counter"
    say(f"step time (forward, backward, AdamW), median of steps 2-{plan.steps} ({clock}), slowest rank: "
        f"TP {tp_us / 1e3:.2f} ms, single device {full_us / 1e3:.2f} ms")
    share = collectives_us / tp_us
    if device.type == "cuda":
        note = ("an upper bound on the exposed share: tpext overlaps the row-parallel all-reduce with its GEMM "
                "pieces and the column-parallel dx all-reduce with the weight-gradient GEMM")
    else:
        note = "gloo runs in line with the compute here, so this is the share of the step spent communicating"
    say(f"communication: the step's {n_collectives} all-reduces (the sizes counted above, each whole) run back to "
        f"back alone on the TP group take {collectives_us / 1e3:.2f} ms = {100 * share:.0f}% of the TP step ({note})")
    return failures


def _time_step_collectives(group: tpext.Group, ledger, plan: TrainPlan, device) -> Tuple[float, int]:
    """(median time of the slowest rank, count) of one step's all-reduces run back to back on their
    own: those of b*s*h in the model's dtype and the loss's two float32 ones. Over zero buffers: a
    sum of zeros stays finite however often it runs, and the collectives' speed does not depend on
    the values."""
    activation = activation_bytes(plan)
    whole = sum(c.bytes for (part, _), c in ledger.items() if part != "loss") // activation
    tokens = plan.batch * plan.seq
    buffers = [torch.zeros(tokens, plan.hidden, device=device, dtype=plan.dtype) for _ in range(whole)]
    buffers += [torch.zeros(tokens, device=device), torch.zeros(2, tokens, device=device)]

    def step():
        for b in buffers:
            group.all_reduce(b)
    stats = timing.time_op(step, COLLECTIVE_ITERS, 2, device, barrier=dist.barrier)
    return worst_over_ranks(stats["median_us"]), len(buffers)
