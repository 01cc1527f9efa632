"""Hashable descriptions of what a canonical op computes.

A spec travels through the FX graph as a short string (``torch.library`` schemas take
``str``, and a string prints the same in every snapshot), and is parsed back once into a
frozen dataclass that keys kernel and weight caches.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
GATE_UP_LAYOUTS = ("concat", "interleaved")
WEIGHT_FORMATS = ("dense", "fp8_block128", "mxfp4", "nvfp4")
ACT_FORMATS = ("dense", "fp8_block128", "fp8_mx32")
WEIGHT_POSITIONS = ("after_down", "before_down")
GEMM_OPERAND_FORMATS = ("dense", "fp8_mx32", "mxfp4", "nvfp4")


def _check(value, allowed, name):
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")


@dataclass(frozen=True)
class MoESpec:
    """What one ``inductor_moe::moe_experts`` call computes, per (token, slot):

    ``gate, up = split(x @ W13[e]^T + b13[e])``; optional clamp; ``h = act(gate) * (up + up_offset)``;
    ``y = h @ W2[e]^T + b2[e]``; out[t] = sum over slots of ``topk_weights[t, j] * y``.
    """

    activation: str = "silu"  # act(g): silu = g*sigmoid(alpha*g), gelu (erf), gelu_tanh
    alpha: float = 1.0  # slope inside silu's sigmoid; gpt-oss uses 1.702
    limit: Optional[float] = None  # clamp gate <= limit and -limit <= up <= limit (gpt-oss 7, DeepSeek-V4 10)
    up_offset: float = 0.0  # (up + up_offset); gpt-oss uses 1.0
    gate_up: str = "concat"  # "concat": rows [gate | up] of W13; "interleaved": gate even rows, up odd
    transposed: bool = False  # dense weights stored [E, H, 2I] and [E, I, H] (used as x @ w)
    weight_format: str = "dense"  # how w13/w2 arrive: dense float, fp8 e4m3 block-128, mxfp4, nvfp4
    quantize_weights: Optional[str] = None  # dense weights quantised once (cached) to this format
    act_format: str = "dense"  # activations fed to the GEMMs: dense, or fp8 e4m3 (per-128 fp32 / per-32 e8m0)
    weight_position: str = "after_down"  # where topk_weights multiply: after or before the down projection

    def __post_init__(self):
        _check(self.activation, ACTIVATIONS, "activation")
        _check(self.gate_up, GATE_UP_LAYOUTS, "gate_up")
        _check(self.weight_format, WEIGHT_FORMATS, "weight_format")
        _check(self.act_format, ACT_FORMATS, "act_format")
        _check(self.weight_position, WEIGHT_POSITIONS, "weight_position")
        if self.quantize_weights is not None:
            _check(self.quantize_weights, WEIGHT_FORMATS[1:], "quantize_weights")
            if self.weight_format != "dense":
                raise ValueError("quantize_weights needs dense weights to start from")
        if self.alpha != 1.0 and self.activation != "silu":
            raise ValueError("alpha only applies to the silu activation")
        if self.limit is not None and not self.limit > 0:
            raise ValueError(f"limit must be positive, got {self.limit}")
        if self.transposed and self.weight_format != "dense":
            raise ValueError("quantised weights are stored K-major ([E, N, K]); transposed applies to dense only")

    @property
    def effective_weight_format(self) -> str:
        """The format the GEMMs read: the stored one, or the one weights are quantised to."""
        return self.quantize_weights or self.weight_format

    def to_str(self) -> str:
        """Canonical string: only fields that differ from the default, in field order."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                parts.append(f"{f.name}={value}")
        return ",".join(parts)

    @staticmethod
    def from_str(text: str) -> "MoESpec":
        return _parse(MoESpec, text)


@dataclass(frozen=True)
class GemmSpec:
    """What one ``inductor_moe::block_scaled_mm`` call computes:
    ``out = act(alpha * (A @ B^T) + bias)``, with A [M, K] and B [N, K] in the named formats."""

    a_format: str = "dense"  # dense float, fp8_mx32 (e4m3 + e8m0 per 32), mxfp4, nvfp4
    b_format: str = "mxfp4"  # format of the weight operand
    out_dtype: str = "bfloat16"  # torch dtype name of the result
    activation: Optional[str] = None  # epilogue activation applied by the graph: silu, gelu, gelu_tanh, relu

    def __post_init__(self):
        _check(self.a_format, GEMM_OPERAND_FORMATS, "a_format")
        _check(self.b_format, GEMM_OPERAND_FORMATS[1:], "b_format")
        _check(self.out_dtype, ("bfloat16", "float16", "float32"), "out_dtype")
        if self.activation is not None:
            _check(self.activation, ACTIVATIONS + ("relu",), "activation")

    to_str = MoESpec.to_str

    @staticmethod
    def from_str(text: str) -> "GemmSpec":
        return _parse(GemmSpec, text)


def _convert(field: dataclasses.Field, raw: str):
    if raw == "None":
        return None
    if field.type in ("bool",) or isinstance(field.default, bool):
        if raw not in ("True", "False"):
            raise ValueError(f"{field.name} must be True or False, got {raw!r}")
        return raw == "True"
    if isinstance(field.default, float) or "float" in str(field.type):
        return float(raw)
    return raw


@functools.lru_cache(maxsize=None)
def _parse(cls, text: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for item in filter(None, text.split(",")):
        name, sep, raw = item.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"cannot parse {cls.__name__} item {item!r} in {text!r}")
        kwargs[name] = _convert(fields[name], raw)
    return cls(**kwargs)
