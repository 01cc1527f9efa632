"""``inductor_moe::block_scaled_mm``: the canonical block-scaled (MX / NV) matmul.

# M: rows of A (tokens), N: output features, K: reduction dim

``out = act(global_scale * (A @ B^T) + bias)`` where A [..., K] and B [N, K] are stored in the
formats ``GemmSpec`` names (FP4 packed two per byte along K, low nibble first).  The
reference is the numerical definition; GPU kernels register from ``inductor_moe.lowering``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import formats
from ..spec import GemmSpec

Tensor = torch.Tensor

_BLOCK = {"fp8_mx32": 32, "mxfp4": 32, "nvfp4": 16}
_SCALE_DTYPES = {"fp8_mx32": (torch.float8_e8m0fnu, torch.uint8), "mxfp4": (torch.float8_e8m0fnu, torch.uint8),
                 "nvfp4": (torch.float8_e4m3fn,)}
_PACKED = {"mxfp4", "nvfp4"}


@torch.library.custom_op("inductor_moe::block_scaled_mm", mutates_args=())
def block_scaled_mm(
    a: Tensor,
    b: Tensor,
    b_scale: Tensor,
    spec: str,
    a_scale: Optional[Tensor] = None,
    global_scale: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """A [..., K] (or packed [..., K/2]) times block-scaled B [N, K/2 or K]^T -> [..., N]."""
    return block_scaled_mm_reference(a, b, b_scale, spec, a_scale, global_scale, bias)


@block_scaled_mm.register_fake
def _(a, b, b_scale, spec, a_scale=None, global_scale=None, bias=None):
    s = GemmSpec.from_str(spec)
    validate_gemm_inputs(a, b, b_scale, s, a_scale, global_scale, bias)
    return a.new_empty((*a.shape[:-1], b.shape[0]), dtype=getattr(torch, s.out_dtype))


def logical_k(fmt: str, stored: Tensor) -> int:
    return stored.shape[-1] * 2 if fmt in _PACKED else stored.shape[-1]


def validate_gemm_inputs(a, b, b_scale, spec: GemmSpec, a_scale=None, global_scale=None, bias=None) -> None:
    """Clear errors for every operand; called by the reference, the fake and the kernels."""
    if b.dim() != 2:
        raise ValueError(f"block_scaled_mm: b must be 2-D [N, K'], got {tuple(b.shape)}")
    expected_b = torch.uint8 if spec.b_format in _PACKED else torch.float8_e4m3fn
    if b.dtype != expected_b:
        raise ValueError(f"block_scaled_mm: {spec.b_format} weights must be {expected_b}, got {b.dtype}")
    if not b.is_contiguous():
        raise ValueError("block_scaled_mm: packed weights must be contiguous (call .contiguous() once at load)")
    k = logical_k(spec.b_format, b)
    block = _BLOCK[spec.b_format]
    if k % block:
        raise ValueError(f"block_scaled_mm: K={k} is not a multiple of the {spec.b_format} block {block}")
    _check_scale("b_scale", b_scale, spec.b_format, (b.shape[0], k // block))
    if spec.a_format == "dense":
        if not a.dtype.is_floating_point or a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise ValueError(f"block_scaled_mm: dense A must be bf16/fp16/fp32, got {a.dtype}")
        if a_scale is not None:
            raise ValueError("block_scaled_mm: dense A takes no a_scale")
    else:
        expected_a = torch.uint8 if spec.a_format in _PACKED else torch.float8_e4m3fn
        if a.dtype != expected_a:
            raise ValueError(f"block_scaled_mm: {spec.a_format} A must be {expected_a}, got {a.dtype}")
        if a_scale is None:
            raise ValueError(f"block_scaled_mm: {spec.a_format} A needs a_scale")
        _check_scale("a_scale", a_scale, spec.a_format, (*a.shape[:-1], k // _BLOCK[spec.a_format]))
    if logical_k(spec.a_format, a) != k:
        raise ValueError(f"block_scaled_mm: A has K={logical_k(spec.a_format, a)} but B has K={k}")
    if global_scale is not None and (global_scale.numel() != 1 or global_scale.dtype != torch.float32):
        raise ValueError("block_scaled_mm: global_scale must be a one-element float32 tensor")
    if bias is not None and tuple(bias.shape) != (b.shape[0],):
        raise ValueError(f"block_scaled_mm: bias must be [{b.shape[0]}], got {tuple(bias.shape)}")
    devices = {t.device for t in (a, b, b_scale, a_scale, global_scale, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"block_scaled_mm: all tensors must be on one device, got {sorted(map(str, devices))}")


def _check_scale(name, scale, fmt, shape):
    if scale.dtype not in _SCALE_DTYPES[fmt]:
        raise ValueError(f"block_scaled_mm: {name} for {fmt} must be {_SCALE_DTYPES[fmt][0]}, got {scale.dtype}")
    if tuple(scale.shape) != tuple(shape):
        raise ValueError(f"block_scaled_mm: {name} must be {tuple(shape)}, got {tuple(scale.shape)}")


def dequantize_operand(fmt: str, t: Tensor, scale: Optional[Tensor], dtype) -> Tensor:
    """A stored GEMM operand -> dense [..., K] in ``dtype`` (global scales excluded)."""
    if fmt == "dense":
        return t.to(dtype)
    if fmt == "fp8_mx32":
        return formats.dequantize_fp8_groups(t, scale, 32).to(dtype)
    if fmt == "mxfp4":
        return formats.dequantize_mxfp4(t, scale, dtype=dtype)
    ones = torch.ones((), dtype=torch.float32, device=t.device)
    return formats.dequantize_nvfp4(t, scale, ones, dtype=dtype)


def apply_epilogue_activation(y: Tensor, activation: Optional[str]) -> Tensor:
    if activation is None:
        return y
    if activation == "silu":
        return F.silu(y)
    if activation == "relu":
        return F.relu(y)
    return F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")


def block_scaled_mm_reference(a, b, b_scale, spec, a_scale=None, global_scale=None, bias=None) -> Tensor:
    """Dequantise both operands, multiply in float32 (float64 for float64 A), apply the epilogue."""
    spec = GemmSpec.from_str(spec) if isinstance(spec, str) else spec
    validate_gemm_inputs(a, b, b_scale, spec, a_scale, global_scale, bias)
    compute = torch.float64 if a.dtype == torch.float64 else torch.float32
    a_f = dequantize_operand(spec.a_format, a, a_scale, compute)
    b_f = dequantize_operand(spec.b_format, b, b_scale, compute)
    y = a_f @ b_f.T
    if global_scale is not None:
        y = y * global_scale.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    out_dtype = torch.float64 if compute == torch.float64 else getattr(torch, spec.out_dtype)
    return apply_epilogue_activation(y, spec.activation).to(out_dtype)
