"""Bit-level decoders of the small float formats, in Triton (exact; no fp8 dtypes needed, so they
run the same under TRITON_INTERPRET and on every GPU).  Each takes raw codes as int32 and
returns float32, matching ``inductor_moe.formats`` value for value (NaN codes included).
"""

import os

import triton
import triton.language as tl

# inline PTX cannot run under TRITON_INTERPRET (numpy): the packed decoders fall back to the fp32 ones
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")

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


# Two e2m1 codes per byte -> bf16, two values per 32-bit register (bf16x2).  Per 4 bytes (8 values):
# 2 byte permutes, 6 shifts, 8 logic ops and 4 bf16x2 multiplies -- ~1.75 integer ops per value,
# against ~10 for the fp32 decode plus the conversions (ptxas/nvdisasm, sm_90a).  A byte pair is
# spread to the high byte of each 16-bit half (prmt); a nibble's sign is then one shift from bf16
# bit 15 and its 3 magnitude bits one shift from bits 6..8, where they read as value * 2^-126
# (exponent field e, mantissa bit m: 2^(e-127) * (1 + m/2), or the subnormal m * 2^-127 for e = 0).
# fma.rn.bf16x2 by 2^126 (0x7E80) makes them exact e2m1 values; bf16 fma keeps subnormal inputs,
# and adding -0.0 keeps the sign of zero.  The scaled form multiplies by (block scale * 2^126)
# instead: the scale costs no multiply of its own (``e8m0_decode_factor``, ``e4m3_decode_factor``).
def _e2m1_pair_ptx(selector: str, lo: str, hi: str, factor: str) -> str:
    """PTX for one byte pair of the packed input $4 (bytes picked by the prmt selector): the two
    low nibbles as bf16x2 into register ``lo``, the two high nibbles into ``hi``, each times the
    bf16x2 register ``factor`` (the first byte's factor in its low half, the second's in its high)."""
    return f"""
prmt.b32 t, $4, 0, {selector};
shl.b32 u, t, 4;
and.b32 u, u, 0x80008000;
shr.b32 v, t, 2;
and.b32 v, v, 0x01C001C0;
or.b32 u, u, v;
fma.rn.bf16x2 {lo}, u, {factor}, z;
and.b32 u, t, 0x80008000;
shr.b32 v, t, 6;
and.b32 v, v, 0x01C001C0;
or.b32 u, u, v;
fma.rn.bf16x2 {hi}, u, {factor}, z;"""


# bytes 0, 1 -> low nibbles $0, high nibbles $2; bytes 2, 3 -> $1, $3.  Scaled: the four bytes'
# bf16 factors arrive packed as $5 (bytes 0, 1) and $6 (bytes 2, 3).
_E2M1_PAIRS_PTX = tl.constexpr("{\n.reg .b32 t, u, v, c, z;\nmov.b32 c, 0x7E807E80;\nmov.b32 z, 0x80008000;"
                               + _e2m1_pair_ptx("0x1404", "$0", "$2", "c") + _e2m1_pair_ptx("0x3424", "$1", "$3", "c")
                               + "\n}")
_E2M1_PAIRS_SCALED_PTX = tl.constexpr("{\n.reg .b32 t, u, v, z;\nmov.b32 z, 0x80008000;"
                                      + _e2m1_pair_ptx("0x1404", "$0", "$2", "$5")
                                      + _e2m1_pair_ptx("0x3424", "$1", "$3", "$6") + "\n}")
_TWO_POW_M126 = tl.constexpr(2.0**-126)


@triton.jit
def e2m1_pairs_to_bf16(packed):
    """uint8 codes, two e2m1 per byte (low nibble first) -> (low-nibble, high-nibble) bfloat16
    values of the same shape, exact.  Inline PTX on NVIDIA GPUs (sm_80+); the fp32 decoder under
    the interpreter."""
    if _INTERPRET:
        codes = packed.to(tl.int32)
        return e2m1_to_f32(codes & 15).to(tl.bfloat16), e2m1_to_f32(codes >> 4).to(tl.bfloat16)
    else:
        return tl.inline_asm_elementwise(_E2M1_PAIRS_PTX, "=r,=r,=r,=r,r", [packed],
                                         dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)


@triton.jit
def e2m1_pairs_to_scaled_bf16(packed, factor):
    """``e2m1_pairs_to_bf16`` times 2^-126 * ``factor`` (bfloat16, one per byte, e.g. broadcast
    from a block scale: ``e8m0_decode_factor`` / ``e4m3_decode_factor``), in the decode's one
    multiply per value pair; exact wherever the product fits bf16."""
    if _INTERPRET:
        codes = packed.to(tl.int32)
        f = factor.to(tl.float32) * _TWO_POW_M126
        return (e2m1_to_f32(codes & 15) * f).to(tl.bfloat16), (e2m1_to_f32(codes >> 4) * f).to(tl.bfloat16)
    else:
        return tl.inline_asm_elementwise(_E2M1_PAIRS_SCALED_PTX, "=r,=r,=r,=r,r,r,r", [packed, factor],
                                         dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)


@triton.jit
def e8m0_decode_factor(byte):
    """e8m0 scale byte (int32) -> the factor ``e2m1_pairs_to_scaled_bf16`` takes for it: the scale
    times 2^126, 2^(byte - 1), in bfloat16 (byte 255: NaN).  Bytes 129..254 (scales above 2) do
    not fit bf16: callers check the weight's scales first (lowering.moe.mxfp4_scales_in_decode)."""
    bits = tl.minimum((byte + 126) << 7, 0x7FC0)  # 255: 0xBE80, clamped to NaN; 0..128 unchanged
    return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)


# An e4m3 scale (up to 448) times 2^126 does not fit bf16; times 2^118 it does, for every e4m3 scale,
# and the decoded weights, 2^-8 of their values, stay normal (>= 2^-18): exact.  The kernel takes the
# 2^8 back on the fp32 accumulator, with the NVFP4 global scale.
E4M3_DECODE_SHIFT = tl.constexpr(256.0)
_TWO_POW_118 = tl.constexpr(2.0**118)


@triton.jit
def e4m3_decode_factor(scale):
    """e4m3 scale -> the factor ``e2m1_pairs_to_scaled_bf16`` takes for it: scale * 2^118 in
    bfloat16 (exact: 4 significant bits), i.e. weights come out ``E4M3_DECODE_SHIFT`` times small."""
    return (scale.to(tl.float32) * _TWO_POW_118).to(tl.bfloat16)


@triton.jit
def e8m0_to_bf16(byte):
    """e8m0 scale byte (int32) -> 2^(byte - 127) as bfloat16, exactly (bf16 has fp32's exponent
    range: byte 0 is the subnormal 2^-127, 255 is NaN)."""
    bits = tl.where(byte == 0, 0x0040, tl.where(byte == 255, 0x7FC0, byte << 7))
    return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def mul_bf16(x, y):
    """x * y for bfloat16 tensors (packed bf16x2 multiplies on the GPU).  The interpreter of triton
    3.9 multiplies bfloat16 wrongly, so it goes through fp32 there (the same value: the callers'
    products are exact in bf16)."""
    if _INTERPRET:
        return (x.to(tl.float32) * y.to(tl.float32)).to(tl.bfloat16)
    else:
        return x * y
