"""Decode GEMV for FP4 weights: ``out = act(global_scale * (X @ B^T) + bias)`` for a few rows of X.

# M: rows of X (tokens, M <= ROWS <= 16), N: output features (rows of B), K: reduction dim
# X [M, K] dense (bf16 / fp16 / fp32); B [N, K/2] e2m1 packed along K (low nibble = even k), scales
# [N, K/32] e8m0 (MXFP4) or [N, K/16] e4m3 (NVFP4).
# Grid: (cdiv(N, BLOCK_N), SPLIT_K).  No tl.dot: each program loads its [BLOCK_N, BLOCK_K/2] weight
# slice as [BLOCK_N, groups, bytes-per-scale-group] (16-byte vector loads for MXFP4, one scale
# group per thread-chunk), decodes the even (low nibble) and odd (high nibble) K halves to fp32
# without any shuffles, multiplies by the matching even / odd activations, reduces each scale
# group in registers, applies the group's scale once, and reduces across groups.  The weight slice
# is decoded once and reused for every row of X (static loop over ROWS).
# Why not tl.dot: Triton does not software-pipeline loads that feed an in-register decode, so the
# decode path is latency bound; here occupancy (many small programs, each with one or two big K
# steps whose loads are all issued up front) provides the bytes in flight instead.
# SPLIT_K > 1: partials go to an fp32 workspace [SPLIT_K, M, N]; the last program to arrive at an
# N tile (acq_rel counter) sums the slices in a fixed order (bitwise deterministic), runs the
# epilogue, then re-arms the counter for the next launch (CUDA-graph replays included).
"""

import triton
import triton.language as tl

from ..moe_common import pdl_launch_dependents, pdl_wait
from ._block_scaled_gemm import _activation
from .fp_codes import e2m1_to_f32, e4m3_to_f32, e8m0_to_f32


@triton.jit
def fp4_gemv_kernel(
    x_ptr, b_ptr, b_scale_ptr, out_ptr, bias_ptr, global_scale_ptr, ws_ptr, counter_ptr,
    M, N, K, K_PER_SPLIT, stride_xm, stride_bn, stride_bsn, stride_om,
    NV: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GLOBAL_SCALE: tl.constexpr, ACTIVATION: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    USE_PDL: tl.constexpr, WORDS: tl.constexpr,
):
    GROUP: tl.constexpr = 16 if NV else 32  # K per block scale
    BPG: tl.constexpr = GROUP // 2  # packed bytes per scale group
    G: tl.constexpr = BLOCK_K // GROUP  # scale groups per K step
    tl.static_assert(BLOCK_K % GROUP == 0, "BLOCK_K must hold whole scale groups")

    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rn64 = rn.to(tl.int64)
    k_start = pid_k * K_PER_SPLIT
    k_end = min(k_start + K_PER_SPLIT, K)
    g_end = k_end // GROUP  # K is a multiple of GROUP (validated by the op)
    gi = tl.arange(0, G)
    j = tl.arange(0, BPG)
    two = tl.arange(0, 2)
    rows = tl.arange(0, ROWS)

    pdl_wait(USE_PDL)
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        gk = k0 // GROUP + gi  # scale-group index [G]
        g_mask = gk < g_end
        sb = tl.load(b_scale_ptr + rn64[:, None] * stride_bsn + gk[None, :],
                     mask=n_mask[:, None] & g_mask[None, :], other=0).to(tl.int32)
        if NV:
            scale = e4m3_to_f32(sb)
        else:
            scale = e8m0_to_f32(sb)  # [BLOCK_N, G]
        if WORDS:
            # 32-bit words of 8 codes; code i of a word -> fp32 bits (magnitude at 22..24, sign at
            # 31) = value * 2^-126, with no per-element multiply: x is pre-scaled by 2^64 (amortised
            # over the BLOCK_N rows), the result rescaled by 2^62 after the group scale
            WPG: tl.constexpr = BPG // 4
            wi = tl.arange(0, WPG)
            kw = gk[:, None] * WPG + wi[None, :]  # word index [G, WPG]
            pw = tl.load(b_ptr.to(tl.pointer_type(tl.int32)) + rn64[:, None, None] * (stride_bn // 4) + kw[None, :, :],
                         mask=n_mask[:, None, None] & g_mask[None, :, None], other=0)
            for r in tl.static_range(ROWS):
                xmask = (g_mask & (gi * 0 + r < M))[:, None]
                part = tl.zeros((BLOCK_N, G), dtype=tl.float32)
                for i in tl.static_range(8):
                    xi = tl.load(x_ptr + r * stride_xm + 8 * kw + i, mask=xmask, other=0.0).to(tl.float32)
                    xi = xi * 18446744073709551616.0  # 2^64
                    bits = (((pw >> (4 * i)) & 7) << 22) | (((pw >> (4 * i + 3)) & 1) << 31)
                    part += tl.sum(bits.to(tl.float32, bitcast=True) * xi[None, :, :], axis=2)
                dot = tl.sum(part * scale, axis=1) * 4611686018427387904.0  # 2^62
                acc = tl.where(rows[:, None] == r, acc + dot[None, :], acc)
        else:
            kb = gk[:, None] * BPG + j[None, :]  # packed byte index [G, BPG]
            p = tl.load(b_ptr + rn64[:, None, None] * stride_bn + kb[None, :, :],
                        mask=n_mask[:, None, None] & g_mask[None, :, None], other=0)
            p = p.to(tl.int32)
            w_even = e2m1_to_f32(p & 15)  # [BLOCK_N, G, BPG]: k = 2 * byte
            w_odd = e2m1_to_f32(p >> 4)  # k = 2 * byte + 1
            for r in tl.static_range(ROWS):
                xk = (2 * kb)[:, :, None] + two[None, None, :]  # [G, BPG, 2] contiguous K
                xv = tl.load(x_ptr + r * stride_xm + xk, mask=(g_mask & (gi * 0 + r < M))[:, None, None], other=0.0)
                x_even, x_odd = tl.split(xv.to(tl.float32))  # [G, BPG] each
                part = tl.sum(w_even * x_even[None, :, :] + w_odd * x_odd[None, :, :], axis=2)  # [BLOCK_N, G]
                dot = tl.sum(part * scale, axis=1)  # [BLOCK_N]
                acc = tl.where(rows[:, None] == r, acc + dot[None, :], acc)
    pdl_launch_dependents(USE_PDL)

    row_mask = rows < M
    out_mask = row_mask[:, None] & n_mask[None, :]
    if SPLIT_K > 1:
        tile = rows.to(tl.int64)[:, None] * N + rn64[None, :]
        tl.store(ws_ptr + pid_k.to(tl.int64) * M * N + tile, acc, mask=out_mask)
        counter = counter_ptr + pid_n
        arrived = tl.atomic_add(counter, 1, sem="acq_rel")
        if arrived != SPLIT_K - 1:
            return
        acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        for s in range(SPLIT_K):  # fixed order: bitwise reproducible
            acc += tl.load(ws_ptr + s * M * N + tile, mask=out_mask, other=0.0, cache_modifier=".cg")
        tl.store(counter, 0)  # re-arm for the next launch

    if HAS_GLOBAL_SCALE:
        acc = acc * tl.load(global_scale_ptr)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    acc = _activation(acc, ACTIVATION)
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + rn64[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
