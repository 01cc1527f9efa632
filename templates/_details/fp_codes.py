"""Bit-level decoders of the small float formats, in Triton (exact; no fp8 dtypes needed, so they
run the same under TRITON_INTERPRET and on every GPU).  Each takes raw codes as int32 and
returns float32, matching ``inductor_moe.formats`` value for value (NaN codes included).
"""

import triton
import triton.language as tl

# fp32 bit patterns used below
_TWO_POW_126 = tl.constexpr(2.0**126)  # rescales e2m1 bits placed at the bottom of the fp32 exponent
_F32_SUBNORMAL_2M127 = tl.constexpr(0x00400000)  # 2^-127, the value of e8m0 byte 0


@triton.jit
def e2m1_to_f32(code):
    """e2m1 code (sign << 3 | exponent << 1 | mantissa) -> float32, in five integer ops and one
    multiply: placing the 3 magnitude bits at fp32 bits 22..24 gives 2^(e-127) * (1 + m/2), or the
    subnormal m * 2^-127 for e == 0; times 2^126 that is exactly the e2m1 value (IEEE multiply,
    subnormal input kept: Triton does not flush fp32 multiplies to zero)."""
    bits = ((code & 7) << 22) | ((code & 8) << 28)
    return bits.to(tl.float32, bitcast=True) * _TWO_POW_126


@triton.jit
def e8m0_to_f32(byte):
    """e8m0 scale byte -> 2^(byte - 127); 0 is the fp32 subnormal 2^-127, 255 is NaN."""
    bits = tl.where(byte == 0, _F32_SUBNORMAL_2M127, byte << 23)
    return tl.where(byte == 255, float("nan"), bits.to(tl.float32, bitcast=True))


@triton.jit
def e4m3_to_f32(byte):
    """float8_e4m3fn byte -> float32 (bias 7, no Inf, 0x7f / 0xff NaN, subnormals m * 2^-9)."""
    sign = byte & 0x80
    exp = (byte >> 3) & 15
    man = byte & 7
    normal = ((sign << 24) | ((exp + 120) << 23) | (man << 20)).to(tl.float32, bitcast=True)
    sub = man.to(tl.float32) * 0.001953125
    sub = tl.where(sign != 0, -sub, sub)
    value = tl.where(exp == 0, sub, normal)
    return tl.where((byte & 0x7F) == 0x7F, float("nan"), value)


@triton.jit
def unpack_e2m1_rows(packed, ROWS: tl.constexpr, PACKED_COLS: tl.constexpr):
    """uint8 [ROWS, PACKED_COLS] (two codes per byte along the columns, low nibble first) ->
    int32 codes [ROWS, 2 * PACKED_COLS]."""
    p = packed.to(tl.int32)
    pair = tl.join(p & 15, p >> 4)  # [ROWS, PACKED_COLS, 2]: element 2i low, 2i+1 high
    return tl.reshape(pair, (ROWS, 2 * PACKED_COLS))


@triton.jit
def apply_block_scale(values, scale, ROWS: tl.constexpr, COLS: tl.constexpr, BLOCK: tl.constexpr):
    """values [ROWS, COLS] * scale [ROWS, COLS // BLOCK], each scale over BLOCK consecutive columns."""
    v = tl.reshape(values, (ROWS, COLS // BLOCK, BLOCK))
    return tl.reshape(v * scale[:, :, None], (ROWS, COLS))
