"""Tile helpers shared by the two expert GEMMs: the weight-tile product per weight format.

# K: reduction dim of the GEMM; N: output columns; BK/BN: tile sizes.
# A weight tile is addressed as w[e][n, k] through (stride_wn, stride_wk), so both orientations
# of dense weights (spec.transposed) use the same code; quantised weights are K-major.
# WEIGHT_FORMAT: 0 dense (bf16/fp16), 1 fp8 e4m3 with fp32 scale per 128x128 tile,
#                2 mxfp4 (e2m1 packed along K, low nibble first; e8m0 scale per 32 along K).
"""

import triton
import triton.language as tl

from .moe_common import INTERPRET

DENSE, FP8_BLOCK128, MXFP4 = 0, 1, 2
WEIGHT_FORMAT_CODES = {"dense": DENSE, "fp8_block128": FP8_BLOCK128, "mxfp4": MXFP4}


@triton.jit
def weight_tile_dot(acc, a, w_ptr, s_ptr, n, k0, K, N, stride_wn, stride_wk, stride_sn, stride_sk,
                    BLOCK_K: tl.constexpr, WEIGHT_FORMAT: tl.constexpr, EVEN_K: tl.constexpr):
    """acc += a [BM, BK] @ w[n, k0:k0+BK]^T, dequantising the weight tile in registers only."""
    n_mask = n < N
    if WEIGHT_FORMAT == 2:
        # e2m1 pairs along K: BK // 2 bytes; one e8m0 scale per 32 of K
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        b = tl.load(w_ptr + kb[:, None] * stride_wk + n[None, :] * stride_wn,
                    mask=n_mask[None, :] & (kb[:, None] < K // 2), other=0)
        ks = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        bs = tl.load(s_ptr + n[:, None] * stride_sn + ks[None, :] * stride_sk,
                     mask=n_mask[:, None] & (ks[None, :] < K // 32), other=0)
        acc = tl.dot_scaled(a, None, "bf16", b, bs, "e2m1", acc)
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
