"""Numeric formats: the one place that defines how FP4/FP8 weights and activations are packed,
quantised and dequantised.

Plain, vectorised PyTorch (no per-element Python loops), so it runs on any device and is the
reference every kernel is compared against, bit for bit.

Formats (blocks always run along the LAST dim, "K"):
  e2m1        4-bit float, code = sign << 3 | magnitude index, magnitudes {0,.5,1,1.5,2,3,4,6}.
              Two codes per byte, element 2i in the LOW nibble.
  e8m0        8-bit power-of-two scale 2^(s-127); s = 255 is NaN (torch.float8_e8m0fnu).
  MXFP4       e2m1 values, one e8m0 scale per MX_BLOCK = 32; scale = 2^ceil(log2(amax / 6)),
              so no element saturates.
  NVFP4       e2m1 values, one e4m3 scale per NV_BLOCK = 16, times one fp32 global scale per
              matrix (the last two dims).
  FP8 block   DeepSeek weights: e4m3 values, one fp32 scale per 128x128 tile of the last two dims.
  FP8 token   activations: e4m3 values, one fp32 scale per row per `group` (default 128) of K.
  FP8 mx32    activations: e4m3 values, one e8m0 scale per row per 32 of K,
              scale = 2^ceil(log2(amax / 448)).

Arithmetic: quantisers cast their input to float32 first (float64 input is thus rounded once to
float32) and compute every scale and quotient in float32, in the order written in each docstring;
kernels must reproduce that order to match bit for bit.

Non-finite inputs (NaN never silently passes):
  * a NaN anywhere in a block makes that block's scale NaN, so the whole block dequantises to NaN;
  * MXFP4 / FP8 mx32: an Inf makes the scale the largest power of two (2^127); the Inf element
    saturates and dequantises to Inf again (6 * 2^127 and 448 * 2^127 overflow float32);
  * NVFP4: a block holding an Inf gets a NaN scale too (the global scale is taken over the
    finite elements only, so one Inf does not flush the rest of the matrix to zero);
  * FP8 block / FP8 token: an Inf makes the fp32 scale Inf, and the tile/group dequantises to NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "E2M1_MAX",
    "E2M1_VALUES",
    "E4M3_MAX",
    "E4M3_NAN",
    "E8M0_BIAS",
    "E8M0_MAX_EXPONENT",
    "E8M0_NAN",
    "FP8_BLOCK",
    "MX_BLOCK",
    "NV_BLOCK",
    "dequantize_fp8_block128",
    "dequantize_fp8_groups",
    "dequantize_mxfp4",
    "dequantize_nvfp4",
    "e2m1_to_float",
    "e8m0_to_float",
    "float_to_e2m1",
    "float_to_e8m0_ceil",
    "pack_fp4",
    "quantize_fp8_block128",
    "quantize_fp8_mx32",
    "quantize_fp8_per_token",
    "quantize_mxfp4",
    "quantize_nvfp4",
    "unpack_fp4",
]

# --- constants -----------------------------------------------------------------------------

E2M1_MAX = 6.0  # largest e2m1 magnitude; quantisers saturate here
E2M1_SIGN_BIT = 0x8  # bit 3 of an e2m1 code
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # indexed by code & 0x7
# The 16 code values, code = sign << 3 | magnitude index (code 8 is -0.0).
E2M1_VALUES = torch.tensor(E2M1_MAGNITUDES + tuple(-m for m in E2M1_MAGNITUDES), dtype=torch.float32)

# Round-to-nearest-even boundaries between neighbouring e2m1 magnitudes, as
# (midpoint, True if the tie goes UP). A tie goes to the even magnitude index (even mantissa):
# 0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0, 1.75 -> 2.0, 2.5 -> 2.0, 3.5 -> 4.0, 5.0 -> 4.0.
_E2M1_ROUNDING_BOUNDARIES = (
    (0.25, False),
    (0.75, True),
    (1.25, False),
    (1.75, True),
    (2.5, False),
    (3.5, True),
    (5.0, False),
)

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
E4M3_NAN = 0x7F  # the (positive) NaN byte of float8_e4m3fn

E8M0_BIAS = 127  # e8m0 value is 2^(s - E8M0_BIAS)
E8M0_MAX_EXPONENT = 254  # largest finite e8m0 byte: 2^127
E8M0_NAN = 255  # the e8m0 NaN byte
_FP32_MANTISSA_BITS = 23
_FP32_EXPONENT_MASK = 0xFF
_FP32_MANTISSA_MASK = (1 << _FP32_MANTISSA_BITS) - 1
_FP32_SUBNORMAL_HALF = 1 << (_FP32_MANTISSA_BITS - 1)  # fp32 bits of 2^-127 (the e8m0 byte 0)

MX_BLOCK = 32  # elements per e8m0 scale (MXFP4 weights, FP8 mx32 activations)
NV_BLOCK = 16  # elements per e4m3 scale (NVFP4)
FP8_BLOCK = 128  # tile edge of DeepSeek FP8 weights; default activation group

# e2m1 decode table over all 256 byte values: bytes above 15 are not codes and decode to NaN,
# so a corrupt code is loud without a data-dependent check (which would sync the device).
_E2M1_DECODE_256 = torch.cat([E2M1_VALUES, torch.full((240,), float("nan"))])


# --- validation helpers --------------------------------------------------------------------


def _check_tensor(name: str, t: object) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_floating(name: str, t: object) -> None:
    _check_tensor(name, t)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_dtype(name: str, t: object, allowed: tuple[torch.dtype, ...]) -> None:
    _check_tensor(name, t)
    if t.dtype not in allowed:
        names = " or ".join(str(d) for d in allowed)
        raise TypeError(f"{name} must have dtype {names}, got {t.dtype}")


def _check_ndim(name: str, t: Tensor, ndim: int) -> None:
    if t.dim() < ndim:
        raise ValueError(f"{name} must have at least {ndim} dim(s), got shape {tuple(t.shape)}")


def _check_multiple(name: str, t: Tensor, block: int, fmt: str) -> None:
    k = t.shape[-1]
    if k % block != 0:
        raise ValueError(
            f"{fmt}: the last dim of {name} (K = {k}) must be a multiple of {block}; "
            f"pad K up to {-(-k // block) * block} first"
        )


def _check_out_dtype(dtype: torch.dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")


def _check_prefix(name: str, t: Tensor, ref_name: str, ref: Tensor, ndim_tail: int) -> None:
    """Leading dims (all but the last `ndim_tail`) must match between t and ref."""
    if t.dim() != ref.dim() or t.shape[: t.dim() - ndim_tail] != ref.shape[: ref.dim() - ndim_tail]:
        raise ValueError(
            f"{name} shape {tuple(t.shape)} does not match {ref_name} shape {tuple(ref.shape)} "
            f"in the leading dims"
        )


def _as_float32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float32 else x.to(torch.float32)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _pad_last_dims(x: Tensor, multiples: tuple[int, ...]) -> Tensor:
    """Zero-pad the trailing len(multiples) dims up to the given multiples."""
    pad: list[int] = []
    for dim, m in zip(reversed(range(x.dim())), reversed(multiples)):
        pad += [0, _ceil_div(x.shape[dim], m) * m - x.shape[dim]]
    return torch.nn.functional.pad(x, pad) if any(pad) else x


# --- e2m1 ----------------------------------------------------------------------------------


def float_to_e2m1(x: Tensor) -> Tensor:
    """Round floats to e2m1 codes (uint8, 0..15): nearest, ties to even mantissa, saturating.

    |x| above 6 (Inf included) saturates to ±6; the sign of zero is kept (-0.0 and small negatives
    give code 8). e2m1 has no NaN: a bare NaN maps to code 0 (+0). Block quantisers carry NaN
    in the block scale instead, so it still reaches the dequantised output.
    """
    _check_floating("x", x)
    # fp16/bf16/fp8 widen to fp32 exactly; fp64 is compared as is (the boundaries are exact in
    # every float dtype), so no double rounding.
    if x.dtype != torch.float64:
        x = _as_float32(x)
    mag = x.abs()
    index = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for midpoint, tie_goes_up in _E2M1_ROUNDING_BOUNDARIES:
        index += (mag >= midpoint) if tie_goes_up else (mag > midpoint)
    codes = index | (torch.signbit(x).to(torch.uint8) << 3)
    return torch.where(torch.isnan(x), torch.zeros_like(codes), codes)


_decode_tables: dict = {}


def _decode_table(device: torch.device) -> Tensor:
    """The 256-entry decode table on ``device``, copied there once: a per-call host-to-device
    copy would also break CUDA-graph capture of anything that decodes (the reference fallback)."""
    table = _decode_tables.get(device)
    if table is None:
        table = _decode_tables[device] = _E2M1_DECODE_256.to(device)
    return table


def e2m1_to_float(codes: Tensor) -> Tensor:
    """Decode e2m1 codes (uint8) to float32. Bytes above 15 are not codes and decode to NaN."""
    _check_dtype("codes", codes, (torch.uint8,))
    return _decode_table(codes.device)[codes.long()]


def pack_fp4(codes: Tensor) -> Tensor:
    """Pack e2m1 codes [..., K] into bytes [..., K//2]: element 2i low nibble, 2i+1 high nibble.

    Only the low nibble of each code is kept (codes from float_to_e2m1 are always 0..15).
    """
    _check_dtype("codes", codes, (torch.uint8,))
    _check_ndim("codes", codes, 1)
    if codes.shape[-1] % 2 != 0:
        raise ValueError(f"pack_fp4: the last dim (K = {codes.shape[-1]}) must be even, two codes per byte")
    low = codes[..., 0::2] & 0x0F
    high = codes[..., 1::2] & 0x0F
    return low | (high << 4)


def unpack_fp4(packed: Tensor) -> Tensor:
    """Unpack bytes [..., K2] into e2m1 codes [..., 2*K2] (low nibble first)."""
    _check_dtype("packed", packed, (torch.uint8,))
    _check_ndim("packed", packed, 1)
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1)
    return codes.reshape(*packed.shape[:-1], 2 * packed.shape[-1])


# --- e8m0 ----------------------------------------------------------------------------------


def e8m0_to_float(s: Tensor) -> Tensor:
    """Decode e8m0 scales (uint8 bytes or torch.float8_e8m0fnu) to float32: 2^(s-127), 255 -> NaN.

    Built from the float32 bits, so it is exact on every device; byte 0 is the fp32 subnormal
    2^-127.
    """
    _check_dtype("s", s, (torch.uint8, torch.float8_e8m0fnu))
    byte = s.view(torch.uint8).to(torch.int32)
    bits = torch.where(byte == 0, torch.full_like(byte, _FP32_SUBNORMAL_HALF), byte << _FP32_MANTISSA_BITS)
    value = bits.view(torch.float32)
    return torch.where(byte == E8M0_NAN, torch.full_like(value, float("nan")), value)


def float_to_e8m0_ceil(x: Tensor) -> Tensor:
    """The e8m0 byte (uint8) of the smallest power of two >= x: ceil(log2(x)) + 127 in [0, 254].

    Read off the float32 bits (exponent, plus one unless the mantissa is zero), so exact powers
    of two are never bumped up by log2 rounding. Rounding up is what keeps amax / scale within
    the element format's range. NaN -> 255; x <= 0 -> 0; Inf and x > 2^127 clamp to 254;
    0 < x <= 2^-127 clamps to 0. float64 input is read on its own bits (no rounding to fp32 first).
    """
    _check_floating("x", x)
    if x.dtype == torch.float64:
        bits = x.view(torch.int64)
        biased = (bits >> 52) & 0x7FF
        nonzero_mantissa = (bits & ((1 << 52) - 1)) != 0
        # fp64 subnormals (biased == 0) lie far below 2^-127 and clamp to byte 0 below.
        exponent = torch.where(biased == 0, torch.zeros_like(biased), biased - 1023 + E8M0_BIAS + nonzero_mantissa)
    else:
        x = _as_float32(x)
        bits = x.view(torch.int32)
        biased = (bits >> _FP32_MANTISSA_BITS) & _FP32_EXPONENT_MASK
        mantissa = bits & _FP32_MANTISSA_MASK
        # A normal fp32 2^(b-127) * 1.m rounds up to 2^(b-127+1) unless m == 0: the e8m0 byte is b
        # or b + 1. A subnormal lies in (0, 2^-126): byte 1 if it exceeds 2^-127, else byte 0.
        exponent = torch.where(biased == 0, (mantissa > _FP32_SUBNORMAL_HALF).to(biased.dtype), biased + (mantissa != 0))
    exponent = exponent.clamp(0, E8M0_MAX_EXPONENT)
    exponent = torch.where(x <= 0, torch.zeros_like(exponent), exponent)
    exponent = torch.where(torch.isnan(x), torch.full_like(exponent, E8M0_NAN), exponent)
    return exponent.to(torch.uint8)


# --- MXFP4 ---------------------------------------------------------------------------------


def quantize_mxfp4(w: Tensor) -> tuple[Tensor, Tensor]:
    """Quantise w [..., K] to MXFP4: packed e2m1 uint8 [..., K//2], e8m0 scales [..., K//32].

    scale = 2^ceil(log2(amax_block / 6)) (float_to_e8m0_ceil of the fp32 quotient), so
    |w / scale| <= 6 and nothing saturates; an all-zero block gets byte 0 (2^-127).
    values = float_to_e2m1(w / scale), exact division by a power of two. A NaN in a block makes
    its scale NaN (byte 255).
    """
    _check_floating("w", w)
    _check_ndim("w", w, 1)
    _check_multiple("w", w, MX_BLOCK, "MXFP4")
    blocks = _as_float32(w).reshape(*w.shape[:-1], w.shape[-1] // MX_BLOCK, MX_BLOCK)
    amax = blocks.abs().amax(dim=-1)  # amax propagates NaN
    scale_bytes = float_to_e8m0_ceil(amax / E2M1_MAX)
    codes = float_to_e2m1(blocks / e8m0_to_float(scale_bytes).unsqueeze(-1))
    return pack_fp4(codes.reshape(w.shape)), scale_bytes.view(torch.float8_e8m0fnu)


def dequantize_mxfp4(packed: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """MXFP4 -> float: e2m1 value * 2^(s-127) per block of 32, in fp32, then cast to dtype.

    scales may be torch.float8_e8m0fnu or their raw uint8 bytes; a NaN scale gives a NaN block.
    """
    _check_dtype("packed", packed, (torch.uint8,))
    _check_dtype("scales", scales, (torch.float8_e8m0fnu, torch.uint8))
    _check_out_dtype(dtype)
    _check_ndim("packed", packed, 1)
    _check_prefix("scales", scales, "packed", packed, 1)
    k = 2 * packed.shape[-1]
    if scales.shape[-1] * MX_BLOCK != k:
        raise ValueError(
            f"MXFP4: {k} values (packed K//2 = {packed.shape[-1]}) need {k // MX_BLOCK} scales "
            f"per row (one per {MX_BLOCK}), got {scales.shape[-1]}"
        )
    values = e2m1_to_float(unpack_fp4(packed)).reshape(*packed.shape[:-1], k // MX_BLOCK, MX_BLOCK)
    out = values * e8m0_to_float(scales).unsqueeze(-1)
    return out.reshape(*packed.shape[:-1], k).to(dtype)


# --- NVFP4 ---------------------------------------------------------------------------------


def quantize_nvfp4(w: Tensor, global_scale: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Quantise w [..., N, K] to NVFP4: packed uint8 [..., N, K//2], e4m3 scales [..., N, K//16],
    fp32 global_scale [...] (0-d for a 2-D w).

    global_scale (if None) = amax(|w| over the finite elements of the last two dims) / (448 * 6),
    1.0 where that is 0, so the largest block scale lands on e4m3's 448.
    block scale = e4m3(min(amax_block / 6 / global_scale, 448)), round to nearest even.
    values = float_to_e2m1(w / (block_scale * global_scale)); a zero block scale gives code 0.
    A block holding NaN or Inf gets the e4m3 NaN scale (0x7f). A given global_scale must be
    positive and finite, of shape w.shape[:-2] or 0-d.
    """
    _check_floating("w", w)
    _check_ndim("w", w, 2)
    _check_multiple("w", w, NV_BLOCK, "NVFP4")
    w32 = _as_float32(w)
    batch = w.shape[:-2]
    if global_scale is None:
        finite_abs = torch.where(torch.isfinite(w32), w32.abs(), torch.zeros_like(w32))
        if w32.shape[-2] * w32.shape[-1] == 0:
            amax = torch.zeros(batch, dtype=torch.float32, device=w.device)
        else:
            amax = finite_abs.amax(dim=(-2, -1))
        global_scale = amax / (E4M3_MAX * E2M1_MAX)
        global_scale = torch.where(global_scale == 0, torch.ones_like(global_scale), global_scale)
    else:
        _check_floating("global_scale", global_scale)
        if global_scale.dim() != 0 and global_scale.shape != batch:
            raise ValueError(
                f"NVFP4: global_scale must be 0-d or have shape w.shape[:-2] = {tuple(batch)}, "
                f"got {tuple(global_scale.shape)}"
            )
        global_scale = _as_float32(global_scale).to(w.device)
    gs = global_scale.reshape(*global_scale.shape, 1, 1)  # broadcast over [N, K // 16]

    blocks = w32.reshape(*w.shape[:-1], w.shape[-1] // NV_BLOCK, NV_BLOCK)
    amax_block = blocks.abs().amax(dim=-1)
    scale_raw = (amax_block / E2M1_MAX / gs).clamp(max=E4M3_MAX)  # clamp keeps NaN
    scale_bytes = scale_raw.to(torch.float8_e4m3fn).view(torch.uint8)
    not_finite = ~torch.isfinite(blocks).all(dim=-1)
    scale_bytes = torch.where(not_finite | torch.isnan(scale_raw), torch.full_like(scale_bytes, E4M3_NAN), scale_bytes)
    scales = scale_bytes.view(torch.float8_e4m3fn)

    scale_f32 = scales.to(torch.float32)
    codes = float_to_e2m1(blocks / (scale_f32 * gs).unsqueeze(-1))
    codes = torch.where((scale_f32 == 0).unsqueeze(-1), torch.zeros_like(codes), codes)
    return pack_fp4(codes.reshape(w.shape)), scales, global_scale


def dequantize_nvfp4(
    packed: Tensor, scales: Tensor, global_scale: Tensor, dtype: torch.dtype = torch.float32
) -> Tensor:
    """NVFP4 -> float: (e2m1 value * e4m3 block scale) * global_scale in fp32, then cast to dtype.

    The first product is exact (2-bit times 4-bit mantissas); NaN scales give NaN blocks.
    """
    _check_dtype("packed", packed, (torch.uint8,))
    _check_dtype("scales", scales, (torch.float8_e4m3fn,))
    _check_floating("global_scale", global_scale)
    _check_out_dtype(dtype)
    _check_ndim("packed", packed, 2)
    _check_prefix("scales", scales, "packed", packed, 1)
    k = 2 * packed.shape[-1]
    if scales.shape[-1] * NV_BLOCK != k:
        raise ValueError(
            f"NVFP4: {k} values (packed K//2 = {packed.shape[-1]}) need {k // NV_BLOCK} scales "
            f"per row (one per {NV_BLOCK}), got {scales.shape[-1]}"
        )
    batch = packed.shape[:-2]
    if global_scale.dim() != 0 and global_scale.shape != batch:
        raise ValueError(
            f"NVFP4: global_scale must be 0-d or have shape packed.shape[:-2] = {tuple(batch)}, "
            f"got {tuple(global_scale.shape)}"
        )
    values = e2m1_to_float(unpack_fp4(packed)).reshape(*packed.shape[:-1], k // NV_BLOCK, NV_BLOCK)
    out = (values * scales.to(torch.float32).unsqueeze(-1)).reshape(*packed.shape[:-1], k)
    gs = _as_float32(global_scale).reshape(*global_scale.shape, 1, 1)
    return (out * gs).to(dtype)


# --- FP8 -----------------------------------------------------------------------------------


def _scale_from_amax(amax: Tensor) -> Tensor:
    """fp32 scale amax / 448, 1.0 for an all-zero group (so zeros stay zeros, no 0/0)."""
    scale = amax / E4M3_MAX
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def _to_e4m3(x: Tensor) -> Tensor:
    """Saturating cast: clamp to ±448 (keeps NaN), then torch's round-to-nearest-even cast."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_fp8_block128(w: Tensor) -> tuple[Tensor, Tensor]:
    """DeepSeek FP8 weights: w [..., N, K] -> e4m3 [..., N, K], fp32 scales [..., ceil(N/128), ceil(K/128)].

    Per 128x128 tile of the last two dims (edge tiles are partial): scale = amax / 448 (1.0 for
    an all-zero tile), values = e4m3(clamp(w / scale, ±448)).
    """
    _check_floating("w", w)
    _check_ndim("w", w, 2)
    n, k = w.shape[-2:]
    padded = _pad_last_dims(_as_float32(w), (FP8_BLOCK, FP8_BLOCK))
    tn, tk = padded.shape[-2] // FP8_BLOCK, padded.shape[-1] // FP8_BLOCK
    tiles = padded.reshape(*w.shape[:-2], tn, FP8_BLOCK, tk, FP8_BLOCK)
    scales = _scale_from_amax(tiles.abs().amax(dim=(-3, -1)))
    q = _to_e4m3(tiles / scales[..., :, None, :, None])
    q = q.reshape(padded.shape)[..., :n, :k]
    return q.contiguous(), scales


def dequantize_fp8_block128(q: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """DeepSeek FP8 weights -> float: value * its tile's fp32 scale (N, K any size)."""
    _check_dtype("q", q, (torch.float8_e4m3fn,))
    _check_dtype("scales", scales, (torch.float32,))
    _check_out_dtype(dtype)
    _check_ndim("q", q, 2)
    _check_prefix("scales", scales, "q", q, 2)
    n, k = q.shape[-2:]
    want = (_ceil_div(n, FP8_BLOCK), _ceil_div(k, FP8_BLOCK))
    if tuple(scales.shape[-2:]) != want:
        raise ValueError(
            f"FP8 block-128: q of shape (..., {n}, {k}) needs scales of shape (..., {want[0]}, {want[1]}), "
            f"got {tuple(scales.shape)}"
        )
    expanded = scales.repeat_interleave(FP8_BLOCK, dim=-2).repeat_interleave(FP8_BLOCK, dim=-1)
    return (q.to(torch.float32) * expanded[..., :n, :k]).to(dtype)


def quantize_fp8_per_token(x: Tensor, group: int = FP8_BLOCK) -> tuple[Tensor, Tensor]:
    """FP8 activations: x [..., K] -> e4m3 [..., K], fp32 scales [..., ceil(K/group)].

    One scale per row per group of K (the last group may be partial): amax / 448 (1.0 for an
    all-zero group), values = e4m3(clamp(x / scale, ±448)).
    """
    _check_floating("x", x)
    _check_ndim("x", x, 1)
    if isinstance(group, bool) or not isinstance(group, int) or group <= 0:
        raise ValueError(f"group must be a positive int, got {group!r}")
    k = x.shape[-1]
    padded = _pad_last_dims(_as_float32(x), (group,))
    groups = padded.reshape(*x.shape[:-1], padded.shape[-1] // group, group)
    scales = _scale_from_amax(groups.abs().amax(dim=-1))
    q = _to_e4m3(groups / scales.unsqueeze(-1)).reshape(padded.shape)[..., :k]
    return q.contiguous(), scales


def quantize_fp8_mx32(x: Tensor) -> tuple[Tensor, Tensor]:
    """FP8 activations with MX scales: x [..., K] -> e4m3 [..., K], e8m0 scales [..., K//32].

    scale = 2^ceil(log2(amax / 448)) (float_to_e8m0_ceil of the fp32 quotient), values =
    e4m3(clamp(x / scale, ±448)); the division by a power of two is exact. NaN -> scale 255.
    """
    _check_floating("x", x)
    _check_ndim("x", x, 1)
    _check_multiple("x", x, MX_BLOCK, "FP8 mx32")
    groups = _as_float32(x).reshape(*x.shape[:-1], x.shape[-1] // MX_BLOCK, MX_BLOCK)
    scale_bytes = float_to_e8m0_ceil(groups.abs().amax(dim=-1) / E4M3_MAX)
    q = _to_e4m3(groups / e8m0_to_float(scale_bytes).unsqueeze(-1)).reshape(x.shape)
    return q, scale_bytes.view(torch.float8_e8m0fnu)


def dequantize_fp8_groups(q: Tensor, scales: Tensor, group: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """FP8 activations -> float: value * its row-group scale, in fp32, then cast to dtype.

    For both activation formats: fp32 scales (quantize_fp8_per_token) or e8m0 scales
    (quantize_fp8_mx32, group 32). scales has shape [..., ceil(K/group)].
    """
    _check_dtype("q", q, (torch.float8_e4m3fn,))
    _check_dtype("scales", scales, (torch.float32, torch.float8_e8m0fnu))
    _check_out_dtype(dtype)
    if isinstance(group, bool) or not isinstance(group, int) or group <= 0:
        raise ValueError(f"group must be a positive int, got {group!r}")
    _check_ndim("q", q, 1)
    _check_prefix("scales", scales, "q", q, 1)
    k = q.shape[-1]
    if scales.shape[-1] != _ceil_div(k, group):
        raise ValueError(
            f"FP8 groups: K = {k} with group {group} needs {_ceil_div(k, group)} scales per row, "
            f"got {scales.shape[-1]}"
        )
    scale_f32 = e8m0_to_float(scales) if scales.dtype == torch.float8_e8m0fnu else scales
    expanded = scale_f32.repeat_interleave(group, dim=-1)[..., :k]
    return (q.to(torch.float32) * expanded).to(dtype)
