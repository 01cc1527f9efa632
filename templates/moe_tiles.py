"""Tile helpers shared by the two expert GEMMs: the weight-tile product per weight format.

# K: reduction dim of the GEMM; N: output columns; BK/BN: tile sizes.
# A weight tile is addressed as w[e][n, k] through (stride_wn, stride_wk), so both orientations
# of dense weights (spec.transposed) use the same code; quantised weights are K-major.
# WEIGHT_FORMAT: 0 dense (bf16/fp16), 1 fp8 e4m3 with fp32 scale per 128x128 tile,
#                2 mxfp4 (e2m1 packed along K, low nibble first; e8m0 scale per 32 along K),
#                3 nvfp4 (e2m1; e4m3 scale per 16 along K; the kernels multiply the
#                  accumulator by the expert's fp32 global scale once, after the K loop).
# FP4_DOT_SCALED: mxfp4 through tl.dot_scaled (tcgen05 block-scaled MMA on sm_100; emulated on
# sm_90); otherwise e2m1 is decoded in registers (exact: value * power-of-two or e4m3 scale fits
# the activation dtype) and fed to tl.dot.  Neither ever writes a dequantised weight to memory.
"""

import triton
import triton.language as tl

from .moe_common import INTERPRET

DENSE, FP8_BLOCK128, MXFP4, NVFP4 = 0, 1, 2, 3
WEIGHT_FORMAT_CODES = {"dense": DENSE, "fp8_block128": FP8_BLOCK128, "mxfp4": MXFP4, "nvfp4": NVFP4}


@triton.jit
def decode_fp4_tile(packed, scale, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    """packed [BK/2, BN] uint8 (two e2m1 along K, low nibble first), scale [BK/GROUP, BN] fp32
    -> values [BK, BN] fp32 = e2m1 * scale."""
    codes = tl.join(packed & 0xF, packed >> 4)  # [BK/2, BN, 2]
    codes = tl.reshape(tl.permute(codes, (0, 2, 1)), [BLOCK_K, BLOCK_N]).to(tl.int32)
    mag = codes & 7
    e = mag >> 1
    m = mag & 1
    normal = (((e + 126) << 23) | (m << 22)).to(tl.float32, bitcast=True)  # 2^(e-1) * (1 + m/2)
    val = tl.where(e == 0, m.to(tl.float32) * 0.5, normal)
    val = tl.where((codes & 8) != 0, -val, val)
    val = tl.reshape(val, [BLOCK_K // GROUP, GROUP, BLOCK_N]) * scale[:, None, :]
    return tl.reshape(val, [BLOCK_K, BLOCK_N])


@triton.jit
def weight_tile_dot(acc, a, w_ptr, s_ptr, n, k0, K, N, stride_wn, stride_wk, stride_sn, stride_sk,
                    BLOCK_K: tl.constexpr, WEIGHT_FORMAT: tl.constexpr, EVEN_K: tl.constexpr,
                    FP4_DOT_SCALED: tl.constexpr):
    """acc += a [BM, BK] @ w[n, k0:k0+BK]^T, dequantising the weight tile in registers only."""
    n_mask = n < N
    if WEIGHT_FORMAT >= 2:
        GROUP: tl.constexpr = 32 if WEIGHT_FORMAT == 2 else 16
        # e2m1 pairs along K: BK // 2 bytes; one scale per GROUP of K
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        b = tl.load(w_ptr + kb[:, None] * stride_wk + n[None, :] * stride_wn,
                    mask=n_mask[None, :] & (kb[:, None] < K // 2), other=0)
        ks = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
        if WEIGHT_FORMAT == 2 and FP4_DOT_SCALED:
            bs = tl.load(s_ptr + n[:, None] * stride_sn + ks[None, :] * stride_sk,
                         mask=n_mask[:, None] & (ks[None, :] < K // GROUP), other=0)
            acc = tl.dot_scaled(a, None, "bf16", b, bs, "e2m1", acc)
        else:
            s_ptrs = s_ptr + ks[:, None] * stride_sk + n[None, :] * stride_sn
            s_mask = n_mask[None, :] & (ks[:, None] < K // GROUP)
            if WEIGHT_FORMAT == 2:  # e8m0: 2^(s-127); 255 is NaN
                sbits = tl.load(s_ptrs, mask=s_mask, other=0).to(tl.int32)
                scale = (sbits << 23).to(tl.float32, bitcast=True)
                scale = tl.where(sbits == 255, float("nan"), scale)
            else:  # e4m3 block scale (exact in bf16 with the e2m1 value); the caller applies the
                scale = tl.load(s_ptrs, mask=s_mask, other=0.0).to(tl.float32)  # fp32 global scale
            w = decode_fp4_tile(b, scale, BLOCK_K, n.shape[0], GROUP).to(a.dtype)
            if INTERPRET:  # see moe_common.INTERPRET
                acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc)
            else:
                acc = tl.dot(a, w, acc)
    else:
        k = k0 + tl.arange(0, BLOCK_K)
        ptrs = w_ptr + k[:, None] * stride_wk + n[None, :] * stride_wn
        if EVEN_K:
            b = tl.load(ptrs, mask=n_mask[None, :], other=0.0)
        else:
            b = tl.load(ptrs, mask=n_mask[None, :] & (k[:, None] < K), other=0.0)
        if WEIGHT_FORMAT != 0:
            b = b.to(a.dtype)
        if INTERPRET:  # see moe_common.INTERPRET
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if WEIGHT_FORMAT == 0:
            acc = tl.dot(a, b, acc)
        else:
            # one fp32 scale per 128x128 tile; BLOCK_K divides 128 so the K block is uniform
            s = tl.load(s_ptr + (n // 128) * stride_sn + (k0 // 128) * stride_sk, mask=n_mask, other=0.0)
            acc += tl.dot(a, b) * s[None, :]
    return acc
