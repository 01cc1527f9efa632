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
# SWAP_AB (FP4 or fp8 weights decoded in registers, bf16 activations): the tile computes
# acc^T = W @ X^T with the activations' K in moe_common.to_mma_k_order, so the decoded weight is
# wgmma's register operand.
"""

import triton
import triton.language as tl

from ._details.fp_codes import (E4M3_DECODE_SHIFT, e2m1_pairs_to_bf16, e2m1_pairs_to_scaled_bf16, e4m3_decode_factor,
                               e8m0_decode_factor, e8m0_to_bf16, mul_bf16)
from .moe_common import INTERPRET, dequant_mx32_tile, store_cast, to_mma_k_order

DENSE, FP8_BLOCK128, MXFP4, NVFP4 = 0, 1, 2, 3
WEIGHT_FORMAT_CODES = {"dense": DENSE, "fp8_block128": FP8_BLOCK128, "mxfp4": MXFP4, "nvfp4": NVFP4}


@triton.jit
def decode_e2m1(codes):
    """e2m1 codes (low 4 bits of an int32 tensor) -> fp32 values, exactly."""
    mag = codes & 7
    # e = mag >> 1, m = mag & 1: for e >= 1 the value is 2^(e-1) * (1 + m/2), i.e. fp32 bits
    # (e + 126) << 23 | m << 22 == (mag << 22) + (126 << 23); mag 0 and 1 are 0 and 0.5
    normal = ((mag << 22) + (126 << 23)).to(tl.float32, bitcast=True)
    val = tl.where(mag < 2, mag.to(tl.float32) * 0.5, normal)
    return tl.where((codes & 8) != 0, -val, val)


@triton.jit
def _dense_weight_tile(w_ptr, n, n_mask, k0, K, stride_wn, stride_wk, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """The unpacked (bf16/fp16/e4m3) weight tile w[n, k0:k0+BK]^T as [BK, BN]."""
    k = k0 + tl.arange(0, BLOCK_K)
    ptrs = w_ptr + k[:, None] * stride_wk + n[None, :] * stride_wn
    if EVEN_K:
        b = tl.load(ptrs, mask=n_mask[None, :], other=0.0)
    else:
        b = tl.load(ptrs, mask=n_mask[None, :] & (k[:, None] < K), other=0.0)
    return b


@triton.jit
def _fp8_tile_scale(s_ptr, n, n_mask, k0, stride_sn, stride_sk):
    """fp32 scale of the 128x128 weight block of each column n at K step k0 (BLOCK_K | 128)."""
    return tl.load(s_ptr + (n // 128) * stride_sn + (k0 // 128) * stride_sk, mask=n_mask, other=0.0)


@triton.jit
def _even_odd_dot(acc, a, w_even, w_odd, BLOCK_K: tl.constexpr):
    """acc += a[:, 0::2] @ w_even + a[:, 1::2] @ w_odd: low nibbles (even k) and high nibbles (odd k)
    of a packed e2m1 tile meet their activations without any shuffle of the weight tile."""
    a_even, a_odd = tl.split(tl.reshape(a, [a.shape[0], BLOCK_K // 2, 2]))
    if INTERPRET:  # see moe_common.INTERPRET
        a_even, a_odd = a_even.to(tl.float32), a_odd.to(tl.float32)
        w_even, w_odd = w_even.to(tl.float32), w_odd.to(tl.float32)
    acc = tl.dot(a_even, w_even, acc)
    acc = tl.dot(a_odd, w_odd, acc)
    return acc


@triton.jit
def fp4_weight_scales(s_ptr, n, n_mask, k0, K, stride_sn, stride_sk, BLOCK_K: tl.constexpr,
                      WEIGHT_FORMAT: tl.constexpr, EVEN_K: tl.constexpr):
    """The raw block scales [BN, BK / GROUP] of FP4 weight rows n at K step k0.  The swapped tiles
    load them a K step ahead: a row's one or two scale bytes per step are too narrow for Triton to
    pipeline (cp.async takes 4 bytes and more), so a load issued in the step that uses it stalls
    the warps on DRAM latency every step (ncu, gpt-oss: 20-28% of the L1 kernel's stall samples)."""
    GROUP: tl.constexpr = 32 if WEIGHT_FORMAT == 2 else 16
    ks = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
    s_ptrs = s_ptr + n[:, None] * stride_sn + ks[None, :] * stride_sk
    if EVEN_K:
        mask = n_mask[:, None]
    else:
        mask = n_mask[:, None] & (ks[None, :] < K // GROUP)
    if WEIGHT_FORMAT == 2:  # e8m0 bytes
        return tl.load(s_ptrs, mask=mask, other=0)
    else:  # e4m3
        return tl.load(s_ptrs, mask=mask, other=0.0)


@triton.jit
def prefetch_fp4_weight_scales(s_ptr, n, n_mask, k0, K, stride_sn, stride_sk, BLOCK_K: tl.constexpr,
                               WEIGHT_FORMAT: tl.constexpr):
    """Pull the block scales of weight rows n at K step k0 towards L1 (``prefetch.global.L1``, no
    registers held), so that step's own load, in the layout the decode wants, does not wait on DRAM.
    The alternative, loading them a step ahead (``fp4_weight_scales``), makes Triton send the GEMM's
    decoded NVFP4 tile through shared memory (benchmarks/NOTES_fp4.md).  A no-op interpreted."""
    if not INTERPRET:
        GROUP: tl.constexpr = 32 if WEIGHT_FORMAT == 2 else 16
        ks = tl.minimum(k0 // GROUP + tl.arange(0, BLOCK_K // GROUP), K // GROUP - 1)  # inside the tensor
        ptrs = s_ptr + tl.where(n_mask, n, 0)[:, None] * stride_sn + ks[None, :] * stride_sk
        tl.inline_asm_elementwise("prefetch.global.L1 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _fp4_weight_rows_dot(acc, a, w_ptr, w_scales, n, n_mask, k0, K, stride_wn, stride_wk,
                         BLOCK_K: tl.constexpr, WEIGHT_FORMAT: tl.constexpr, EVEN_K: tl.constexpr):
    """acc [BN, BM] += W[n, k0:k0+BK] @ a^T, the swapped tile: the decoded weight rows are wgmma's
    register A operand (64 weight rows per warpgroup, the tokens as N) and the activation tile,
    already in ``to_mma_k_order``, is B straight from shared memory.  Each lane loads the 8
    consecutive bytes per row and 64 of K that its A fragment needs (moe_common.to_mma_k_order),
    so neither operand is shuffled or stored back to shared memory in the K loop, and wgmma
    runs asynchronously with the next tile's decode.  The block scale rides in the decode's one
    multiply per value pair (fp_codes.e2m1_pairs_to_scaled_bf16).  ``w_scales``: fp4_weight_scales
    of this step."""
    GROUP: tl.constexpr = 32 if WEIGHT_FORMAT == 2 else 16
    BN: tl.constexpr = n.shape[0]
    kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    w_ptrs = w_ptr + n[:, None] * stride_wn + kb[None, :] * stride_wk
    if EVEN_K:
        b = tl.load(w_ptrs, mask=n_mask[:, None], other=0)
    else:
        b = tl.load(w_ptrs, mask=n_mask[:, None] & (kb[None, :] < K // 2), other=0)
    if WEIGHT_FORMAT == 2:  # every scale byte <= 128 or 255 (lowering.moe.mxfp4_scales_in_decode)
        factor = e8m0_decode_factor(w_scales.to(tl.int32))
    else:  # NVFP4: weights E4M3_DECODE_SHIFT times small; the caller applies it with the global scale
        factor = e4m3_decode_factor(w_scales)
    b = tl.reshape(b, [BN, BLOCK_K // GROUP, GROUP // 2])
    factor = tl.broadcast_to(factor[:, :, None], [BN, BLOCK_K // GROUP, GROUP // 2])
    lo, hi = e2m1_pairs_to_scaled_bf16(b, factor)
    w = to_mma_k_order(tl.reshape(tl.join(lo, hi), [BN, BLOCK_K]), BN, BLOCK_K)
    if INTERPRET:  # see moe_common.INTERPRET
        w, a = w.to(tl.float32), a.to(tl.float32)
    return tl.dot(w, tl.trans(a), acc)


@triton.jit
def _fp8_weight_rows_dot(acc, a, w_ptr, s_ptr, n, n_mask, k0, K, stride_wn, stride_wk, stride_sn, stride_sk,
                         BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """acc [BN, BM] += W[n, k0:k0+BK] @ a^T for fp8 e4m3 weights, the swapped tile (as
    ``_fp4_weight_rows_dot``): in to_mma_k_order a lane's values of a row are 16 consecutive weight
    bytes, one 16-byte load, so the scaled weight is wgmma's register A operand with no trip through
    shared memory (the unswapped tile converts the weight in registers and stores it back for
    wgmma's B).  Each row's 128x128-block scale multiplies it in fp32 and the product is rounded
    once to bf16, exactly as the unswapped tile does (BLOCK_K divides 128: one scale per row)."""
    BN: tl.constexpr = n.shape[0]
    k = k0 + tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + n[:, None] * stride_wn + k[None, :] * stride_wk
    if EVEN_K:
        b = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0)
    else:
        b = tl.load(w_ptrs, mask=n_mask[:, None] & (k[None, :] < K), other=0.0)
    s = _fp8_tile_scale(s_ptr, n, n_mask, k0, stride_sn, stride_sk)[:, None]
    # scaled as even / odd bytes, then joined (the FP4 decode's shape): so Triton gives the loaded bytes
    # the MMA operand's layout; scaled as one [BN, BK] tile, the bf16 tile went through shared memory
    even, odd = tl.split(tl.reshape(b, [BN, BLOCK_K // 2, 2]))
    w = tl.join(store_cast(even.to(tl.float32) * s, tl.bfloat16), store_cast(odd.to(tl.float32) * s, tl.bfloat16))
    w = to_mma_k_order(tl.reshape(w, [BN, BLOCK_K]), BN, BLOCK_K)
    if INTERPRET:  # see moe_common.INTERPRET
        w, a = w.to(tl.float32), a.to(tl.float32)
    return tl.dot(w, tl.trans(a), acc)


@triton.jit
def desc_weight_tile(w_desc, e, n0, k0, R: tl.constexpr, BLOCK_K: tl.constexpr, K_MAJOR: tl.constexpr,
                     HALVES: tl.constexpr):
    """The dense weight tile [BK, R] of expert e, columns from n0, K from k0, through a host-built
    TMA descriptor (lowering/moe_tma.py: weight_tma_arguments): the copy engine fills shared memory
    while the warps run the MMAs, and out-of-range rows and K read as zeros.  The descriptor is
    [E, N, K] (K_MAJOR) or [E, K, N]; HALVES: L1's non-interleaved w13 seen as [E, 2, I, K] (or
    [E, K, 2, I]), so one box holds BN gate columns then the BN up columns beside them."""
    if HALVES:
        if K_MAJOR:
            b = tl.trans(tl.reshape(w_desc.load([e, 0, n0, k0]), [R, BLOCK_K]))
        else:
            b = tl.reshape(w_desc.load([e, k0, 0, n0]), [BLOCK_K, R])
    else:
        if K_MAJOR:
            b = tl.trans(tl.reshape(w_desc.load([e, n0, k0]), [R, BLOCK_K]))
        else:
            b = tl.reshape(w_desc.load([e, k0, n0]), [BLOCK_K, R])
    return b


@triton.jit
def desc_dense_dot(acc, a, w_desc, e, n0, k0, R: tl.constexpr, BLOCK_K: tl.constexpr, K_MAJOR: tl.constexpr,
                   HALVES: tl.constexpr):
    """acc += a [BM, BK] @ desc_weight_tile (dense weights, dense activations)."""
    b = desc_weight_tile(w_desc, e, n0, k0, R, BLOCK_K, K_MAJOR, HALVES)
    if INTERPRET:  # see moe_common.INTERPRET
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc)


@triton.jit
def nvfp4_global_scale(gscale_ptr, SWAP_AB: tl.constexpr):
    """The fp32 factor of an NVFP4 accumulator, once after its K loop: the global scale at
    ``gscale_ptr``, times E4M3_DECODE_SHIFT where the swapped tiles decoded the weights that small."""
    g = tl.load(gscale_ptr)
    if SWAP_AB:
        g = g * E4M3_DECODE_SHIFT
    return g


@triton.jit
def weight_tile_dot(acc, a, w_ptr, s_ptr, n, k0, K, N, stride_wn, stride_wk, stride_sn, stride_sk,
                    BLOCK_K: tl.constexpr, WEIGHT_FORMAT: tl.constexpr, EVEN_K: tl.constexpr,
                    FP4_DOT_SCALED: tl.constexpr, SWAP_AB: tl.constexpr = False, w_scales=None):
    """acc += a [BM, BK] @ w[n, k0:k0+BK]^T, dequantising the weight tile in registers only.
    SWAP_AB (bf16 activations in ``to_mma_k_order``, fp8 or FP4 weights decoded in registers, BK a
    multiple of 64): acc is [BN, BM]; ``w_scales``: this step's fp4_weight_scales if the caller
    loaded them ahead."""
    tl.static_assert(not SWAP_AB or (WEIGHT_FORMAT >= 1 and not FP4_DOT_SCALED and a.dtype == tl.bfloat16
                                     and BLOCK_K % 64 == 0),
                     "SWAP_AB runs fp8 or FP4 weights decoded in registers only, in 64-deep K steps")
    n_mask = n < N
    if SWAP_AB and WEIGHT_FORMAT == 1:
        acc = _fp8_weight_rows_dot(acc, a, w_ptr, s_ptr, n, n_mask, k0, K, stride_wn, stride_wk, stride_sn,
                                   stride_sk, BLOCK_K, EVEN_K)
    elif SWAP_AB:
        if w_scales is None:  # not loaded ahead by the caller
            w_scales = fp4_weight_scales(s_ptr, n, n_mask, k0, K, stride_sn, stride_sk, BLOCK_K, WEIGHT_FORMAT, EVEN_K)
        acc = _fp4_weight_rows_dot(acc, a, w_ptr, w_scales, n, n_mask, k0, K, stride_wn, stride_wk,
                                   BLOCK_K, WEIGHT_FORMAT, EVEN_K)
    elif WEIGHT_FORMAT >= 2:
        GROUP: tl.constexpr = 32 if WEIGHT_FORMAT == 2 else 16
        # e2m1 pairs along K: BK // 2 bytes; one scale per GROUP of K
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        ks = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
        if WEIGHT_FORMAT == 2 and FP4_DOT_SCALED:
            b = tl.load(w_ptr + kb[:, None] * stride_wk + n[None, :] * stride_wn,
                        mask=n_mask[None, :] & (kb[:, None] < K // 2), other=0)
            bs = tl.load(s_ptr + n[:, None] * stride_sn + ks[None, :] * stride_sk,
                         mask=n_mask[:, None] & (ks[None, :] < K // GROUP), other=0)
            acc = tl.dot_scaled(a, None, "bf16", b, bs, "e2m1", acc)
        elif a.dtype == tl.bfloat16:
            # the packed decoder: bf16 pairs straight from the bytes (fp_codes.e2m1_pairs_to_bf16),
            # times the block scale in bf16 (exact: 2 x 4 significant bits).  The tile is read as
            # [groups, bytes per group, BN] so one scale per (group, column) broadcasts in registers.
            HALF: tl.constexpr = GROUP // 2
            NG: tl.constexpr = BLOCK_K // GROUP
            kg = k0 // GROUP + tl.arange(0, NG)
            kb3 = kg[:, None, None] * HALF + tl.arange(0, HALF)[None, :, None]
            if EVEN_K:
                b3 = tl.load(w_ptr + kb3 * stride_wk + n[None, None, :] * stride_wn, mask=n_mask[None, None, :],
                             other=0)
            else:
                b3 = tl.load(w_ptr + kb3 * stride_wk + n[None, None, :] * stride_wn,
                             mask=n_mask[None, None, :] & (kb3 < K // 2), other=0)
            s_ptrs = s_ptr + kg[:, None] * stride_sk + n[None, :] * stride_sn
            if WEIGHT_FORMAT == 2:
                s_raw = tl.load(s_ptrs, mask=n_mask[None, :] & (kg[:, None] < K // GROUP), other=0)
                scale = e8m0_to_bf16(s_raw.to(tl.int32))[:, None, :]
            else:  # e4m3 -> bf16 is exact
                s_raw = tl.load(s_ptrs, mask=n_mask[None, :] & (kg[:, None] < K // GROUP), other=0.0)
                scale = s_raw.to(tl.float32).to(tl.bfloat16)[:, None, :]
            lo, hi = e2m1_pairs_to_bf16(b3)
            w_even = tl.reshape(mul_bf16(lo, scale), [BLOCK_K // 2, n.shape[0]])
            w_odd = tl.reshape(mul_bf16(hi, scale), [BLOCK_K // 2, n.shape[0]])
            acc = _even_odd_dot(acc, a, w_even, w_odd, BLOCK_K)
        else:  # fp16 activations: the fp32 decoder
            b = tl.load(w_ptr + kb[:, None] * stride_wk + n[None, :] * stride_wn,
                        mask=n_mask[None, :] & (kb[:, None] < K // 2), other=0)
            kp = tl.arange(0, BLOCK_K // 2)
            s_ptrs = s_ptr + ((k0 + 2 * kp) // GROUP)[:, None] * stride_sk + n[None, :] * stride_sn
            s_mask = n_mask[None, :] & (kb[:, None] < K // 2)
            if WEIGHT_FORMAT == 2:  # e8m0: 2^(s-127); 255 is NaN
                sbits = tl.load(s_ptrs, mask=s_mask, other=0).to(tl.int32)
                scale = (sbits << 23).to(tl.float32, bitcast=True)
                scale = tl.where(sbits == 255, float("nan"), scale)
            else:  # e4m3 block scale (exact in bf16 with the e2m1 value); the caller applies the
                scale = tl.load(s_ptrs, mask=s_mask, other=0.0).to(tl.float32)  # fp32 global scale
            codes = b.to(tl.int32)
            w_even = (decode_e2m1(codes & 0xF) * scale).to(a.dtype)
            w_odd = (decode_e2m1(codes >> 4) * scale).to(a.dtype)
            acc = _even_odd_dot(acc, a, w_even, w_odd, BLOCK_K)
    else:
        b = _dense_weight_tile(w_ptr, n, n_mask, k0, K, stride_wn, stride_wk, BLOCK_K, EVEN_K)
        if WEIGHT_FORMAT == 1:
            # one fp32 scale per 128x128 tile (BLOCK_K divides 128, so uniform along this K step),
            # applied to the weight tile in registers: the MMAs keep accumulating asynchronously
            # (the scaled weight is rounded once to the activation dtype, within fp8 tolerance)
            s = _fp8_tile_scale(s_ptr, n, n_mask, k0, stride_sn, stride_sk)
            b = store_cast(b.to(tl.float32) * s[None, :], a.dtype)
        if INTERPRET:  # see moe_common.INTERPRET
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def load_act_tile(a_rows, s_rows, row_mask, k0, K, BLOCK_K: tl.constexpr, ACT_FORMAT: tl.constexpr,
                  EVEN_K: tl.constexpr):
    """The A tile of one K step ([BM, BK], as stored) and its activation scales: ACT_FORMAT 0: a
    dummy; 1: [BM] fp32 (BK divides 128, so one scale per row per step); 2: [BM, BK // 32] e8m0 bytes."""
    k = k0 + tl.arange(0, BLOCK_K)
    if EVEN_K:
        a = tl.load(a_rows + k[None, :], mask=row_mask[:, None], other=0.0)
    else:
        a = tl.load(a_rows + k[None, :], mask=row_mask[:, None] & (k[None, :] < K), other=0.0)
    if ACT_FORMAT == 1:
        a_s = tl.load(s_rows + k0 // 128, mask=row_mask, other=0.0)
    elif ACT_FORMAT == 2:
        ks = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        a_s = tl.load(s_rows[:, None] + ks[None, :], mask=row_mask[:, None] & (ks[None, :] < K // 32), other=0)
    else:
        a_s = 0.0
    return a, a_s


@triton.jit
def act_weight_tile_dot(acc, a, a_s, w_ptr, s_ptr, n, k0, K, N, stride_wn, stride_wk, stride_sn, stride_sk,
                        BLOCK_K: tl.constexpr, WEIGHT_FORMAT: tl.constexpr, ACT_FORMAT: tl.constexpr,
                        EVEN_K: tl.constexpr, FP4_DOT_SCALED: tl.constexpr, SWAP_AB: tl.constexpr = False,
                        w_scales=None, w_block=None):
    """acc += dequant(a, a_s) [BM, BK] @ w[n, k0:k0+BK]^T for any activation format (SWAP_AB: acc
    is [BN, BM]; dense bf16 activations with FP4 weights decoded in registers only; ``w_scales``:
    this step's fp4_weight_scales if the caller loaded them ahead; ``w_block``: fp8 weights whose
    tile rows all lie in this one 128-row scale block, so a K step's weight scale is one scalar).

    fp8_mx32 x mxfp4 with FP4_DOT_SCALED: one tl.dot_scaled(e4m3, e8m0, e2m1, e8m0) -- tcgen05
    ``kind::mxf8f6f4.block_scale`` on sm_100.  fp8_block128 x fp8_block128 (DeepSeek): an e4m3 x
    e4m3 MMA per K step (BK divides 128: both scales uniform on it), promoted into the fp32
    accumulator times (activation row scale x weight tile scale).  Otherwise the operands reach
    the MMA exactly (e4m3 as bf16, mx32 as e4m3 x 2^s in bf16) and any non-power-of-two scale
    (block-128 activation row scale, fp8 weight tile scale) multiplies the fp32 partial of the
    K step: rounding a scaled operand to bf16 (2^-9) would flip e4m3 roundings of the
    intermediate (2^-4) often enough to cost ~1e-2 of error on small layers."""
    tl.static_assert(not SWAP_AB or ACT_FORMAT == 0, "SWAP_AB takes dense activations")
    if ACT_FORMAT == 0:
        acc = weight_tile_dot(acc, a, w_ptr, s_ptr, n, k0, K, N, stride_wn, stride_wk, stride_sn, stride_sk,
                              BLOCK_K, WEIGHT_FORMAT, EVEN_K, FP4_DOT_SCALED, SWAP_AB, w_scales)
    elif ACT_FORMAT == 2 and WEIGHT_FORMAT == 2 and FP4_DOT_SCALED:
        n_mask = n < N
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        b = tl.load(w_ptr + kb[:, None] * stride_wk + n[None, :] * stride_wn,
                    mask=n_mask[None, :] & (kb[:, None] < K // 2), other=0)
        ks = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        bs = tl.load(s_ptr + n[:, None] * stride_sn + ks[None, :] * stride_sk,
                     mask=n_mask[:, None] & (ks[None, :] < K // 32), other=0)
        acc = tl.dot_scaled(a, a_s, "e4m3", b, bs, "e2m1", acc)
    elif ACT_FORMAT == 1 and WEIGHT_FORMAT == 1:
        n_mask = n < N
        b = _dense_weight_tile(w_ptr, n, n_mask, k0, K, stride_wn, stride_wk, BLOCK_K, EVEN_K)
        if INTERPRET:
            part = tl.dot(a.to(tl.float32), b.to(tl.float32))
        else:
            part = tl.dot(a, b)
        if w_block is None:
            acc += part * a_s[:, None] * _fp8_tile_scale(s_ptr, n, n_mask, k0, stride_sn, stride_sk)[None, :]
        else:  # one scale load and one FMA per accumulator element (a whole-tile scale vector is
            # replicated per thread in the MMA layout: 16 loads of one address per step)
            w_s = tl.load(s_ptr + w_block * stride_sn + (k0 // 128) * stride_sk)
            acc += part * (a_s * w_s)[:, None]
    elif ACT_FORMAT == 2 and WEIGHT_FORMAT == 1:
        # mx32 x fp8 weights: both operands exact in bf16; the weight tile's scale (uniform on this
        # K step) goes on the fp32 partial, never rounded into the operand
        n_mask = n < N
        b = _dense_weight_tile(w_ptr, n, n_mask, k0, K, stride_wn, stride_wk, BLOCK_K, EVEN_K)
        w_s = _fp8_tile_scale(s_ptr, n, n_mask, k0, stride_sn, stride_sk)
        a = dequant_mx32_tile(a, a_s, BLOCK_K)
        if INTERPRET:
            part = tl.dot(a.to(tl.float32), b.to(tl.float32))
        else:
            part = tl.dot(a, b.to(tl.bfloat16))
        acc += part * w_s[None, :]
    elif ACT_FORMAT == 1:
        # per-128 activation scale: uniform per row on this K step (BLOCK_K | 128), so the e4m3
        # values go to the MMA exactly (as bf16) and the row scale multiplies the fp32 partial
        part = weight_tile_dot(tl.zeros_like(acc), a.to(tl.bfloat16), w_ptr, s_ptr, n, k0, K, N, stride_wn,
                               stride_wk, stride_sn, stride_sk, BLOCK_K, WEIGHT_FORMAT, EVEN_K, FP4_DOT_SCALED)
        acc += part * a_s[:, None]
    else:  # mx32 with dense / mxfp4-in-registers weights: e4m3 x 2^s is exact in bf16
        a = dequant_mx32_tile(a, a_s, BLOCK_K)
        acc = weight_tile_dot(acc, a, w_ptr, s_ptr, n, k0, K, N, stride_wn, stride_wk, stride_sn, stride_sk,
                              BLOCK_K, WEIGHT_FORMAT, EVEN_K, FP4_DOT_SCALED)
    return acc
