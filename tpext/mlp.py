"""ParallelMLP: the transformer MLP as a column-parallel then a row-parallel linear (Megatron-LM):
the hidden activations stay split across the TP group, so the block costs one all-reduce forward
(the row-parallel output) and one backward (the column-parallel input gradient).

    activation="gelu":    fc2(gelu(fc1(x))), GELU in its tanh approximation
                          (F.gelu(approximate="tanh")), fused into fc1's GEMM epilogue on GPUs.
    activation="swiglu":  down(silu(gate(x)) * up(x)) as in Llama. gate and up are split across the
                          ranks separately (each the same uneven way) and stacked into one
                          column-parallel weight, so both come out of one GEMM.

Fresh weights equal those of the full MLP built from nn.Linear in the order fc1, fc2 (swiglu:
gate, up, down) under the same seed; from_linears / from_mlp shard an existing MLP.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .groups import Group
from .layers import (ColumnParallelLinear, RowParallelLinear, _check_input, _check_linear, _positive_int,
                     _target_device)
from .mappings import resolve_group

_ACTIVATIONS = ("gelu", "swiglu")
# Attribute names of the full MLPs from_mlp understands, in from_linears order.
_KNOWN_NAMES = {
    "gelu": (("fc1", "fc2"), ("dense_h_to_4h", "dense_4h_to_h"), ("linear_fc1", "linear_fc2")),
    "swiglu": (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")),
}


def _check_activation(what: str, activation) -> str:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{what}: activation: expected 'gelu' or 'swiglu', got {activation!r}")
    return activation


class ParallelMLP(nn.Module):
    """hidden -> ffn_hidden -> hidden over the TP group: linear_fc1 is a ColumnParallelLinear
    (for swiglu: gate and up stacked, stride 2), linear_fc2 a RowParallelLinear; `chunks` and
    `chunk_by` go to the latter. Parameters as in ColumnParallelLinear / RowParallelLinear."""

    def __init__(self, hidden: int, ffn_hidden: int, activation: str = "gelu", bias: bool = True,
                 group: Optional[Group] = None, device=None, dtype=None, *, chunks: int = 0,
                 chunk_by: str = "auto"):
        super().__init__()
        what = type(self).__name__
        self.hidden = _positive_int(what, "hidden", hidden)
        self.ffn_hidden = _positive_int(what, "ffn_hidden", ffn_hidden)
        self.activation = _check_activation(what, activation)
        group = resolve_group(group, what)
        if activation == "gelu":
            self.linear_fc1 = ColumnParallelLinear(hidden, ffn_hidden, bias, False, group, device, dtype,
                                                   activation="gelu")
        else:
            self.linear_fc1 = ColumnParallelLinear(hidden, 2 * ffn_hidden, bias, False, group, device, dtype, stride=2)
        self.linear_fc2 = RowParallelLinear(ffn_hidden, hidden, bias, True, group, device, dtype, chunks=chunks,
                                            chunk_by=chunk_by)

    @property
    def group(self) -> Group:
        return self.linear_fc1.group

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # The MLP's own words for a wrong input (fc1 would name itself and its in_features).
        _check_input(type(self).__name__, input, self.linear_fc1.weight, self.hidden, "hidden", self.group)
        return self.linear_fc2(self.activate(self.linear_fc1(input)))

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        """The activation between fc1 and fc2 on this rank's slice: GELU is already in fc1's
        epilogue; SwiGLU combines this rank's slices of gate and up."""
        if self.activation == "swiglu":
            n = h.shape[-1] // 2  # this rank's slice of gate, then of up (chunk() fails on an empty shard)
            h = F.silu(h[..., :n]) * h[..., n:]
        return h

    @classmethod
    def from_linears(cls, linears: Sequence[nn.Linear], activation: str = "gelu", group: Optional[Group] = None,
                     *, chunks: int = 0, chunk_by: str = "auto") -> "ParallelMLP":
        """This rank's shard of the full MLP made of `linears`: (fc1, fc2) for gelu, (gate, up,
        down) for swiglu; any device and dtype (the copy lands on the GPU of an NCCL group, else
        where the linears are)."""
        what = f"{cls.__name__}.from_linears"
        _check_activation(what, activation)
        names = ("fc1", "fc2") if activation == "gelu" else ("gate", "up", "down")
        linears = list(linears)
        if len(linears) != len(names):
            raise ValueError(f"{what}: linears: expected {len(names)} nn.Linear ({', '.join(names)}) for "
                             f"activation={activation!r}, got {len(linears)}")
        for name, lin in zip(names, linears):
            _check_linear(what, lin, name)
        *first, last = linears
        hidden, ffn = first[0].in_features, first[0].out_features
        for name, lin in zip(names, linears):
            expected = (hidden, ffn) if lin is not last else (ffn, hidden)
            if (lin.in_features, lin.out_features) != expected:
                raise ValueError(f"{what}: {name}: expected in_features={expected[0]}, out_features={expected[1]} "
                                 f"(hidden={hidden}, ffn_hidden={ffn} from {names[0]}), got "
                                 f"in_features={lin.in_features}, out_features={lin.out_features}")
            if (lin.bias is not None) != (first[0].bias is not None):
                raise ValueError(f"{what}: {name}: expected {'a' if first[0].bias is not None else 'no'} bias, as "
                                 f"{names[0]} has")
            for attr in ("dtype", "device"):
                if getattr(lin.weight, attr) != getattr(first[0].weight, attr):
                    raise ValueError(f"{what}: {name}: expected {attr} {getattr(first[0].weight, attr)} (that of "
                                     f"{names[0]}), got {getattr(lin.weight, attr)}")
        bias = first[0].bias is not None
        mlp = cls(hidden, ffn, activation, bias, group, device="meta", dtype=first[0].weight.dtype, chunks=chunks,
                  chunk_by=chunk_by)
        device = _target_device(what, mlp.group, first[0], names[0])
        fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
        w, b = fc1._shards([lin.weight for lin in first], [lin.bias for lin in first])
        fc1._set_parameters(w.to(device), b.to(device) if bias else None, first[0])
        fc2._set_parameters(fc2._shard(last.weight).to(device),
                            last.bias.detach().to(device, copy=True) if bias else None, last)
        return mlp

    @classmethod
    def from_mlp(cls, mlp: nn.Module, activation: Optional[str] = None, group: Optional[Group] = None,
                 *, chunks: int = 0, chunk_by: str = "auto") -> "ParallelMLP":
        """Shards a full MLP module found by its attribute names: gelu fc1/fc2 (or dense_h_to_4h /
        dense_4h_to_h, linear_fc1 / linear_fc2), swiglu gate_proj/up_proj/down_proj (Hugging Face
        Llama) or w1/w3/w2 (Meta's Llama: w2(silu(w1(x)) * w3(x))). activation=None infers it from
        the names. The GELU here is the tanh approximation whatever the full MLP used."""
        what = f"{cls.__name__}.from_mlp"
        if not isinstance(mlp, nn.Module):
            raise TypeError(f"{what}: mlp: expected a torch.nn.Module, got {type(mlp).__name__}")
        if activation is not None:
            _check_activation(what, activation)
        for act in ((activation,) if activation else _ACTIVATIONS):
            for names in _KNOWN_NAMES[act]:
                if all(isinstance(getattr(mlp, n, None), nn.Linear) for n in names):
                    return cls.from_linears([getattr(mlp, n) for n in names], act, group, chunks=chunks,
                                            chunk_by=chunk_by)
        known = "; ".join(f"{a}: " + " or ".join("/".join(n) for n in _KNOWN_NAMES[a])
                          for a in ((activation,) if activation else _ACTIVATIONS))
        raise ValueError(f"{what}: mlp: expected nn.Linear attributes named {known}; {type(mlp).__name__} has none of "
                         f"these sets")

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, ffn_hidden={self.ffn_hidden}, activation={self.activation!r}"
