"""Two canonical ops that feed ``inductor_moe::block_scaled_mm`` from weights that are not yet in
its layout, doing the conversion ONCE per weight (``weight_cache``, keyed on the parameter and
its version counter), never per call:

* ``inductor_moe::linear_quantized(x, weight, bias, spec)``: a plain bf16/fp16/fp32 ``nn.Linear``
  weight [N, K], quantised to ``spec.b_format`` (MXFP4 or NVFP4) at first use
  (``config.linear_weight_format``, opt-in: it changes numerics).
* ``inductor_moe::block_scaled_mm_relayout(a, b, b_scale, spec, layout, ...)``: FP4 weights
  stored high nibble first, and/or scales in the swizzled 128x4 layout that cuBLAS's
  ``_scaled_mm`` reads; weights are re-laid out once (cached), activation scales per call.
  Plain scales of another shape (one row per operand row, e.g. gpt-oss's or flat ones) are
  reshaped inside the op, so graphs never view e8m0 tensors (Inductor's CPU codegen has no e8m0).

Both are defined by their references, which call ``block_scaled_mm``; on CUDA that dispatches
to its Triton lowering.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import formats, weight_cache
from ..spec import GemmSpec

Tensor = torch.Tensor
BLOCKS = {"mxfp4": formats.MX_BLOCK, "nvfp4": formats.NV_BLOCK, "fp8_mx32": formats.MX_BLOCK}
# layout items understood by block_scaled_mm_relayout, comma separated
LAYOUT_ITEMS = ("b_high_nibble_first", "a_high_nibble_first", "b_scale_swizzled", "a_scale_swizzled")


# --- linear_quantized ---------------------------------------------------------------------------

def quantized_linear_weight(weight: Tensor, fmt: str):
    """(packed [N, K/2], scales, global scale or None) of ``weight`` in ``fmt``, built once."""
    def build():
        w = weight.detach()
        if fmt == "mxfp4":
            q, s = formats.quantize_mxfp4(w)
            return q, s, None
        q, s, g = formats.quantize_nvfp4(w)
        return q, s, g.reshape(1).float()

    return weight_cache.cached(f"linear_quantized:{fmt}", (weight,), build)


def _check_linear(x, weight, bias, spec: GemmSpec):
    if spec.a_format != "dense":
        raise ValueError("linear_quantized: activations stay dense (a_format='dense')")
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError(f"linear_quantized: weight must be a 2-D float [N, K], got {weight.dtype}{tuple(weight.shape)}")
    block = BLOCKS[spec.b_format]
    if weight.shape[1] % block:
        raise ValueError(f"linear_quantized: K={weight.shape[1]} is not a multiple of the {spec.b_format} block {block}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_quantized: x has K={x.shape[-1]} but weight has K={weight.shape[1]}")


@torch.library.custom_op("inductor_moe::linear_quantized", mutates_args=())
def linear_quantized(x: Tensor, weight: Tensor, bias: Optional[Tensor], spec: str) -> Tensor:
    """``act(x @ Q(weight)^T + bias)`` with Q the one-time MXFP4/NVFP4 quantisation of ``weight``."""
    s = GemmSpec.from_str(spec)
    _check_linear(x, weight, bias, s)
    q, scales, g = quantized_linear_weight(weight, s.b_format)
    return torch.ops.inductor_moe.block_scaled_mm(x, q, scales, spec, global_scale=g, bias=bias)


@linear_quantized.register_fake
def _(x, weight, bias, spec):
    s = GemmSpec.from_str(spec)
    _check_linear(x, weight, bias, s)
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=getattr(torch, s.out_dtype))


# --- block_scaled_mm_relayout -------------------------------------------------------------------

def swap_nibbles(packed: Tensor) -> Tensor:
    """High-nibble-first bytes -> the canonical low-nibble-first packing (and back)."""
    return ((packed << 4) | (packed >> 4)).contiguous()


def unswizzle_128x4(scale: Tensor, rows: int, cols: int) -> Tensor:
    """Scales in cuBLAS's blocked layout -> plain [rows, cols].

    The blocked layout pads to (ceil(rows/128)*128, ceil(cols/4)*4) and stores each 128x4 tile as
    512 contiguous bytes, row r = 32*i + j, column c at byte j*16 + i*4 + c."""
    rb, cb = -(-rows // 128), -(-cols // 4)
    if scale.numel() != rb * cb * 512:
        raise ValueError(f"swizzled scales for [{rows}, {cols}] must hold {rb * cb * 512} bytes "
                         f"(padded to 128x4 tiles), got {scale.numel()}")
    raw = scale.contiguous().view(torch.uint8).reshape(rb, cb, 32, 4, 4)  # tile, j, i, c
    plain = raw.permute(0, 3, 2, 1, 4).reshape(rb * 128, cb * 4)[:rows, :cols]
    return plain.contiguous().view(scale.dtype)


def swizzle_128x4(scale: Tensor) -> Tensor:
    """Plain [rows, cols] scales -> cuBLAS's blocked layout (flat), the inverse of unswizzle_128x4."""
    rows, cols = scale.shape
    rb, cb = -(-rows // 128), -(-cols // 4)
    raw = torch.zeros(rb * 128, cb * 4, dtype=torch.uint8, device=scale.device)
    raw[:rows, :cols] = scale.view(torch.uint8)
    tiles = raw.reshape(rb, 4, 32, cb, 4).permute(0, 3, 2, 1, 4)  # tile, j, i, c
    return tiles.reshape(-1).contiguous().view(scale.dtype)


def _parse_layout(layout: str) -> set:
    items = set(filter(None, layout.split(",")))
    unknown = items - set(LAYOUT_ITEMS)
    if unknown:
        raise ValueError(f"block_scaled_mm_relayout: unknown layout items {sorted(unknown)}; known: {LAYOUT_ITEMS}")
    return items


def _as_u8(t: Tensor) -> Tensor:
    return t.view(torch.uint8) if t.dtype in (torch.float4_e2m1fn_x2, torch.int8) else t


def canonical_operands(a, b, b_scale, spec: str, layout: str, a_scale=None):
    """(a, b, b_scale, a_scale) in block_scaled_mm's layout; weight-side work is cached."""
    s = GemmSpec.from_str(spec)
    items = _parse_layout(layout)
    a, b = _as_u8(a), _as_u8(b)
    n, k = b.shape[0], b.shape[-1] * 2
    if "b_high_nibble_first" in items:
        b = weight_cache.cached("fp4_swap_nibbles", (b,), lambda: swap_nibbles(b))
    if "a_high_nibble_first" in items:
        a = swap_nibbles(a)
    if "b_scale_swizzled" in items:
        cols = k // BLOCKS[s.b_format]
        b_scale = weight_cache.cached("fp4_unswizzle_128x4", (b_scale,), lambda: unswizzle_128x4(b_scale, n, cols))
    if "a_scale_swizzled" in items and a_scale is not None:
        rows = a.numel() // a.shape[-1]
        a_scale = unswizzle_128x4(a_scale, rows, k // BLOCKS[s.a_format]).reshape(*a.shape[:-1], -1)
    # plain scales of any shape holding one row per operand row (e.g. flat): [rows, K / block]
    if b_scale.dim() != 2 or b_scale.shape[0] != n:
        b_scale = b_scale.reshape(n, -1)
    if a_scale is not None and a_scale.shape[:-1] != a.shape[:-1]:
        a_scale = a_scale.reshape(*a.shape[:-1], -1)
    return a, b, b_scale, a_scale


@torch.library.custom_op("inductor_moe::block_scaled_mm_relayout", mutates_args=())
def block_scaled_mm_relayout(a: Tensor, b: Tensor, b_scale: Tensor, spec: str, layout: str,
                             a_scale: Optional[Tensor] = None, global_scale: Optional[Tensor] = None,
                             bias: Optional[Tensor] = None) -> Tensor:
    """``block_scaled_mm`` of operands stored in ``layout`` (see LAYOUT_ITEMS)."""
    a, b, b_scale, a_scale = canonical_operands(a, b, b_scale, spec, layout, a_scale)
    return torch.ops.inductor_moe.block_scaled_mm(a, b, b_scale, spec, a_scale=a_scale,
                                                  global_scale=global_scale, bias=bias)


@block_scaled_mm_relayout.register_fake
def _(a, b, b_scale, spec, layout, a_scale=None, global_scale=None, bias=None):
    s = GemmSpec.from_str(spec)
    _parse_layout(layout)
    if b.dim() != 2:
        raise ValueError(f"block_scaled_mm_relayout: b must be 2-D, got {tuple(b.shape)}")
    return a.new_empty((*a.shape[:-1], b.shape[0]), dtype=getattr(torch, s.out_dtype))
