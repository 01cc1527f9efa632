"""Expert weight layouts per format: expected shapes, dequantisation, one-time quantisation.

Canonical orientation is ``nn.Linear``'s: w13 [E, 2I, H] and w2 [E, H, I] (out, in).  Quantised
formats always store K (the reduction dim) last, packed two e2m1 per byte for FP4.
"""

from __future__ import annotations

import torch

from .. import formats, weight_cache
from ..spec import MoESpec

DENSE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
E8M0 = (torch.float8_e8m0fnu, torch.uint8)


def intermediate_size(spec: MoESpec, w13: torch.Tensor, w2: torch.Tensor) -> int:
    if spec.weight_format == "dense":
        return w2.shape[1] if spec.transposed else w2.shape[2]
    if spec.weight_format == "fp8_block128":
        return w2.shape[2]
    return w2.shape[2] * 2


def expert_weight_shapes(spec: MoESpec, num_experts: int, hidden: int, intermediate: int) -> dict:
    """name -> (shape or None if unused, allowed dtypes)."""
    E, H, I = num_experts, hidden, intermediate
    fmt = spec.weight_format
    none = (None, ())
    if fmt == "dense":
        w13 = (E, H, 2 * I) if spec.transposed else (E, 2 * I, H)
        w2 = (E, I, H) if spec.transposed else (E, H, I)
        return {"w13": (w13, DENSE_DTYPES), "w2": (w2, DENSE_DTYPES), "w13_scale": none, "w2_scale": none,
                "w13_global_scale": none, "w2_global_scale": none}
    if fmt == "fp8_block128":
        cdiv = lambda a: -(-a // 128)  # noqa: E731
        return {"w13": ((E, 2 * I, H), (torch.float8_e4m3fn,)), "w2": ((E, H, I), (torch.float8_e4m3fn,)),
                "w13_scale": ((E, cdiv(2 * I), cdiv(H)), (torch.float32,)),
                "w2_scale": ((E, cdiv(H), cdiv(I)), (torch.float32,)),
                "w13_global_scale": none, "w2_global_scale": none}
    block = 32 if fmt == "mxfp4" else 16
    for name, k in (("H", H), ("I", I)):
        if k % block:
            raise ValueError(f"moe_experts: {fmt} needs {name}={k} to be a multiple of {block}")
    scale_dtypes = E8M0 if fmt == "mxfp4" else (torch.float8_e4m3fn,)
    glob = ((E,), (torch.float32,)) if fmt == "nvfp4" else none
    return {"w13": ((E, 2 * I, H // 2), (torch.uint8,)), "w2": ((E, H, I // 2), (torch.uint8,)),
            "w13_scale": ((E, 2 * I, H // block), scale_dtypes), "w2_scale": ((E, H, I // block), scale_dtypes),
            "w13_global_scale": glob, "w2_global_scale": glob}


def gate_up_global_scales(spec: MoESpec, w13_global_scale) -> bool:
    """NVFP4 w13 takes one fp32 global scale per expert ``[E]``, or gate's and up's own ``[E, 2]``:
    experts held as separate gate / up linears (``nn.ModuleList``) quantise each on its own."""
    return spec.weight_format == "nvfp4" and w13_global_scale is not None and w13_global_scale.dim() == 2


def w13_row_global_scales(spec: MoESpec, g: torch.Tensor, intermediate: int) -> torch.Tensor:
    """``[E, 2]`` (gate, up) global scales -> one per w13 row ``[E, 2I]`` in the gate/up layout."""
    if spec.gate_up == "interleaved":
        return g.repeat(1, intermediate)  # gate even rows, up odd rows
    return g.repeat_interleave(intermediate, dim=1)


def dequantize_weight(fmt: str, w, scale, global_scale, dtype) -> torch.Tensor:
    """One stored expert weight stack [E, N, K(packed)] -> dense [E, N, K] in ``dtype``."""
    if fmt == "dense":
        return w.to(dtype)
    if fmt == "fp8_block128":
        return formats.dequantize_fp8_block128(w, scale, dtype=dtype)
    if fmt == "mxfp4":
        return formats.dequantize_mxfp4(w, scale, dtype=dtype)
    return formats.dequantize_nvfp4(w, scale, global_scale, dtype=dtype)


def quantize_weight(fmt: str, w: torch.Tensor):
    """Dense [E, N, K] -> (stored, scale, global_scale) in ``fmt``."""
    if fmt == "fp8_block128":
        q, s = formats.quantize_fp8_block128(w)
        return q, s, None
    if fmt == "mxfp4":
        q, s = formats.quantize_mxfp4(w)
        return q, s, None
    q, s, g = formats.quantize_nvfp4(w)
    return q, s, g.reshape(w.shape[0]).float()


def quantized_expert_weights(spec: MoESpec, w13: torch.Tensor, w2: torch.Tensor):
    """Dense expert weights quantised to ``spec.quantize_weights`` once (cached on the params)."""
    fmt = spec.quantize_weights

    def build():
        c13, c2 = canonical_dense(spec, w13, w2)
        return quantize_weight(fmt, c13), quantize_weight(fmt, c2)

    return weight_cache.cached(f"quantize_experts:{fmt}:{spec.transposed}", (w13, w2), build)


def canonical_dense(spec: MoESpec, w13, w2):
    """Dense weights in nn.Linear orientation, [E, 2I, H] and [E, H, I]."""
    if spec.transposed:
        return w13.transpose(1, 2), w2.transpose(1, 2)
    return w13, w2


def dense_expert_weights(spec: MoESpec, w13, w2, w13_scale, w2_scale, w13_global_scale, w2_global_scale, dtype):
    """The weights the GEMMs multiply by, as dense [E, 2I, H] and [E, H, I] in ``dtype``."""
    if spec.quantize_weights is not None:
        (q13, s13, g13), (q2, s2, g2) = quantized_expert_weights(spec, w13, w2)
        fmt = spec.quantize_weights
        return (dequantize_weight(fmt, q13, s13, g13, dtype), dequantize_weight(fmt, q2, s2, g2, dtype))
    if spec.weight_format == "dense":
        c13, c2 = canonical_dense(spec, w13, w2)
        return c13.to(dtype), c2.to(dtype)
    fmt = spec.weight_format
    if gate_up_global_scales(spec, w13_global_scale):  # fp32 products as dequantize_nvfp4, then one cast
        ones = torch.ones(w13.shape[0], dtype=torch.float32, device=w13.device)
        rows = w13_row_global_scales(spec, w13_global_scale.float(), w13.shape[1] // 2)
        w13_f = (dequantize_weight(fmt, w13, w13_scale, ones, torch.float32) * rows[..., None]).to(dtype)
    else:
        w13_f = dequantize_weight(fmt, w13, w13_scale, w13_global_scale, dtype)
    return w13_f, dequantize_weight(fmt, w2, w2_scale, w2_global_scale, dtype)
