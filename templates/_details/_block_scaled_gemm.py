"""The block-scaled GEMM kernel: ``out = act(global_scale * (A @ B^T) + bias)``.

# M: rows of A (tokens), N: output features (rows of the weight B), K: reduction dim
# A [M, K]: dense (bf16/fp16/fp32), fp8 e4m3 with an e8m0 scale per 32 of K, or e2m1 packed two
#           per byte along K (low nibble first) with an e8m0 scale per 32 (MX) / e4m3 per 16 (NV)
# B [N, K/2]: e2m1 packed along K, scale [N, K/32] e8m0 (MXFP4) or [N, K/16] e4m3 (NVFP4)
# Grid: (tiles_m * tiles_n, SPLIT_K).  Tiles are visited in groups of GROUP_M rows of tiles so
# neighbouring programs share weight tiles in L2.  With SPLIT_K > 1 each program reduces one
# K range into an fp32 workspace slice; the last program to finish a tile (an acq_rel counter)
# sums the slices in a fixed order (deterministic) and runs the epilogue, then re-arms the counter.
# DOT_SCALED: use tl.dot_scaled (tcgen05 block-scaled MMA on sm_100; emulated on sm_90);
# otherwise each tile is dequantised to the MMA dtype in registers and fed to tl.dot.
# PREFETCH: issue step k+1's loads before step k's math.  Triton's pipeliner only stages loads
# that feed a dot directly; ours go through the fp4 decode first, so without this every step
# waits a full memory latency.
# SWAP_AB (bf16 A already in moe_common.to_mma_k_order, FP4 weights): acc^T = B @ A^T by the MoE's
# swapped tile (_swapped_k_loop): weight rows fill wgmma's M from registers, the tokens are its N.
# K_ALIGNED: state that each program's K range starts at a whole BLOCK_K.  Knowing the block
# scales' alignment, Triton loads them with cp.async (NVFP4's 4 bytes per row and step) and lays
# the swapped tile out so that NVFP4's decoded weight no longer goes through shared memory (PTX: 8
# st.shared.v4 and 9 barriers a step -> none and 3); it also turns MXFP4's two-warpgroup tile with
# its scales ahead from 2 shuffles a step to 16, so that tile goes without (benchmarks/NOTES_fp4.md,
# "The K range's alignment").
"""

import triton
import triton.language as tl

from ..moe_common import k_loop_steps, pdl_launch_dependents, pdl_wait
from ..moe_tiles import fp4_weight_scales, load_act_tile, prefetch_fp4_weight_scales, weight_tile_dot
from .fp_codes import (E4M3_DECODE_SHIFT, apply_block_scale, e2m1_pairs_to_bf16, e2m1_to_f32, e4m3_to_f32, e8m0_to_bf16,
                       e8m0_to_f32, mul_bf16, unpack_e2m1_rows)

# operand format codes (constexpr A_FORMAT / B_FORMAT)
DENSE, FP8_MX32, MXFP4, NVFP4 = 0, 1, 2, 3
# epilogue activation codes (constexpr ACTIVATION)
NO_ACTIVATION, SILU, GELU, GELU_TANH, RELU = 0, 1, 2, 3, 4


@triton.jit
def _scale_block(ptr, rows, row_mask, stride_r, stride_k, k0, K, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """Raw scale bytes [ROWS, BLOCK_K // GROUP] (int32) for K range k0 .. k0 + BLOCK_K."""
    ks = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
    s = tl.load(ptr + rows[:, None] * stride_r + ks[None, :] * stride_k,
                mask=row_mask[:, None] & (ks[None, :] < K // GROUP), other=0)
    return s.to(tl.int32)


@triton.jit
def _decode_fp4_tile(packed, scale_bytes, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, FORMAT: tl.constexpr):
    """Packed e2m1 [ROWS, BLOCK_K // 2] + block scales -> float32 [ROWS, BLOCK_K]."""
    values = e2m1_to_f32(unpack_e2m1_rows(packed, ROWS, BLOCK_K // 2))
    if FORMAT == 2:
        out = apply_block_scale(values, e8m0_to_f32(scale_bytes), ROWS, BLOCK_K, 32)
    else:
        out = apply_block_scale(values, e4m3_to_f32(scale_bytes), ROWS, BLOCK_K, 16)
    return out


@triton.jit
def _load_step(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, rm64, m_mask, rn64, n_mask, k0, k_end,
               stride_am, stride_ak, stride_asm, stride_ask, stride_bn, stride_bk, stride_bsn, stride_bsk,
               A_FORMAT: tl.constexpr, B_FORMAT: tl.constexpr, BLOCK_K: tl.constexpr):
    """Raw tiles of K step k0 .. k0 + BLOCK_K (nothing at or past k_end): A [BLOCK_M, BLOCK_K (or /2
    packed)], its scales (B's, unused, for dense A), packed B [BLOCK_N, BLOCK_K // 2], B's scales."""
    A_GROUP: tl.constexpr = 16 if A_FORMAT == 3 else 32
    B_GROUP: tl.constexpr = 16 if B_FORMAT == 3 else 32
    kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    b = tl.load(b_ptr + rn64[:, None] * stride_bn + kb[None, :] * stride_bk,
                mask=n_mask[:, None] & (kb[None, :] < k_end // 2), other=0)
    bs = _scale_block(b_scale_ptr, rn64, n_mask, stride_bsn, stride_bsk, k0, k_end, BLOCK_K, B_GROUP)
    if A_FORMAT == 2 or A_FORMAT == 3:
        ka = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        a_lim = k_end // 2
    else:
        ka = k0 + tl.arange(0, BLOCK_K)
        a_lim = k_end
    a = tl.load(a_ptr + rm64[:, None] * stride_am + ka[None, :] * stride_ak,
                mask=m_mask[:, None] & (ka[None, :] < a_lim), other=0)
    if A_FORMAT != 0:
        a_s = _scale_block(a_scale_ptr, rm64, m_mask, stride_asm, stride_ask, k0, k_end, BLOCK_K, A_GROUP)
    else:
        a_s = bs
    return a, a_s, b, bs


@triton.jit
def _mma_step(acc, a, a_s, b, bs, A_FORMAT: tl.constexpr, B_FORMAT: tl.constexpr, DOT_SCALED: tl.constexpr,
              MMA_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += A_tile @ B_tile^T for one K step, by tl.dot_scaled or in-register dequantisation."""
    if DOT_SCALED:
        if B_FORMAT == 2:
            b_sc = bs.to(tl.uint8)
        else:
            b_sc = bs.to(tl.uint8).to(tl.float8e4nv, bitcast=True)
        if A_FORMAT == 0:
            acc = tl.dot_scaled(a, None, "bf16", tl.trans(b), b_sc, "e2m1", acc)
        elif A_FORMAT == 1:
            acc = tl.dot_scaled(a, a_s.to(tl.uint8), "e4m3", tl.trans(b), b_sc, "e2m1", acc)
        elif A_FORMAT == 2:
            acc = tl.dot_scaled(a, a_s.to(tl.uint8), "e2m1", tl.trans(b), b_sc, "e2m1", acc)
        else:
            a_sc = a_s.to(tl.uint8).to(tl.float8e4nv, bitcast=True)
            acc = tl.dot_scaled(a, a_sc, "e2m1", tl.trans(b), b_sc, "e2m1", acc)
    elif A_FORMAT == 0 and a.dtype == tl.bfloat16:
        # the packed decoder (fp_codes.e2m1_pairs_to_bf16): bf16 pairs straight from the bytes,
        # times the block scale in bf16 (exact), low nibbles (even k) against x[:, 0::2], high
        # nibbles against x[:, 1::2] -- no shuffle of the weight tile
        B_GROUP: tl.constexpr = 16 if B_FORMAT == 3 else 32
        b3 = tl.reshape(b, [BLOCK_N, BLOCK_K // B_GROUP, B_GROUP // 2])
        if B_FORMAT == 2:
            scale = e8m0_to_bf16(bs)[:, :, None]
        else:
            scale = bs.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32).to(tl.bfloat16)[:, :, None]
        lo, hi = e2m1_pairs_to_bf16(b3)
        w_even = tl.reshape(mul_bf16(lo, scale), [BLOCK_N, BLOCK_K // 2]).to(MMA_DTYPE)
        w_odd = tl.reshape(mul_bf16(hi, scale), [BLOCK_N, BLOCK_K // 2]).to(MMA_DTYPE)
        x_even, x_odd = tl.split(tl.reshape(a, [BLOCK_M, BLOCK_K // 2, 2]))
        acc = tl.dot(x_even.to(MMA_DTYPE), tl.trans(w_even), acc)
        acc = tl.dot(x_odd.to(MMA_DTYPE), tl.trans(w_odd), acc)
    else:
        w = _decode_fp4_tile(b, bs, BLOCK_N, BLOCK_K, B_FORMAT).to(MMA_DTYPE)
        if A_FORMAT == 0:
            x = a.to(MMA_DTYPE)
        elif A_FORMAT == 1:
            x = apply_block_scale(e4m3_to_f32(a.to(tl.int32)), e8m0_to_f32(a_s), BLOCK_M, BLOCK_K, 32)
            x = x.to(MMA_DTYPE)
        else:
            x = _decode_fp4_tile(a, a_s, BLOCK_M, BLOCK_K, A_FORMAT).to(MMA_DTYPE)
        acc = tl.dot(x, tl.trans(w), acc)
    return acc


@triton.jit
def _swapped_k_loop(a_ptr, b_ptr, b_scale_ptr, rm64, m_mask, rn, n_mask, k_start, k_end, K, N,
                    stride_am, stride_bn, stride_bk, stride_bsn, stride_bsk,
                    B_FORMAT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    EVEN_K: tl.constexpr, SCALES_AHEAD: tl.constexpr, PREFETCH_SCALES: tl.constexpr = False):
    """acc^T [BLOCK_N, BLOCK_M] over K range [k_start, k_end): the MoE's swapped FP4 tile
    (moe_tiles.weight_tile_dot with SWAP_AB): the decoded weight rows are wgmma's register operand
    and the block scale rides in the decode's multiply.  A (bf16, contiguous) was put in
    moe_common.to_mma_k_order by the host, once per call; NVFP4 scales come as e4m3, MXFP4's as
    bytes.  SCALES_AHEAD: each step's scales are loaded a step ahead (lowering.moe_plan.fp4_scales_ahead);
    else PREFETCH_SCALES: the next step's are prefetched to L1 (moe_tiles.prefetch_fp4_weight_scales)."""
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    a_rows = a_ptr + rm64[:, None] * stride_am
    steps = k_loop_steps(k_end - k_start, BLOCK_K, True)  # >= 1: no zero-trip path (see there)
    k_last = k_start + (steps - 1) * BLOCK_K
    s_next = None
    if SCALES_AHEAD:
        s_next = fp4_weight_scales(b_scale_ptr, rn, n_mask, k_start, K, stride_bsn, stride_bsk, BLOCK_K, B_FORMAT,
                                   EVEN_K)
    for step in range(0, steps):
        k0 = k_start + step * BLOCK_K
        s_now = s_next
        if SCALES_AHEAD:
            s_next = fp4_weight_scales(b_scale_ptr, rn, n_mask, tl.minimum(k0 + BLOCK_K, k_last), K, stride_bsn,
                                       stride_bsk, BLOCK_K, B_FORMAT, EVEN_K)
        elif PREFETCH_SCALES:
            prefetch_fp4_weight_scales(b_scale_ptr, rn, n_mask, tl.minimum(k0 + BLOCK_K, k_last), K, stride_bsn,
                                       stride_bsk, BLOCK_K, B_FORMAT)
        a, _ = load_act_tile(a_rows, a_rows, m_mask, k0, K, BLOCK_K, 0, EVEN_K)
        acc = weight_tile_dot(acc, a, b_ptr, b_scale_ptr, rn, k0, K, N, stride_bn, stride_bk, stride_bsn, stride_bsk,
                              BLOCK_K, B_FORMAT, EVEN_K, False, True, s_now)
    return acc


@triton.jit
def _activation(y, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        y = y * tl.sigmoid(y)
    elif ACTIVATION == 2:
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACTIVATION == 3:  # tanh form; tanh(z) = 2 sigmoid(2z) - 1
        z = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = y * tl.sigmoid(2.0 * z)
    elif ACTIVATION == 4:
        y = tl.maximum(y, 0.0)
    return y


@triton.jit
def block_scaled_gemm_kernel(
    a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, out_ptr, bias_ptr, global_scale_ptr, ws_ptr, counter_ptr,
    M, N, K, K_PER_SPLIT,
    stride_am, stride_ak, stride_asm, stride_ask, stride_bn, stride_bk, stride_bsn, stride_bsk,
    stride_om, stride_on,
    A_FORMAT: tl.constexpr, B_FORMAT: tl.constexpr, DOT_SCALED: tl.constexpr, MMA_FP32: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_GLOBAL_SCALE: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH: tl.constexpr, SWAP_AB: tl.constexpr = False,
    EVEN_K: tl.constexpr = False, SCALES_AHEAD: tl.constexpr = False, PREFETCH_SCALES: tl.constexpr = False,
    K_ALIGNED: tl.constexpr = True,
):
    tl.static_assert(B_FORMAT == 2 or B_FORMAT == 3, "the weight operand is MXFP4 or NVFP4")
    tl.static_assert(BLOCK_K % 32 == 0, "BLOCK_K must hold whole scale blocks (multiple of 32)")
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs tiles of at least 16")
    # MMA_FP32: fp32 activations, and TRITON_INTERPRET (whose dot of in-register bf16 casts is wrong)
    MMA_DTYPE: tl.constexpr = tl.float32 if MMA_FP32 else tl.bfloat16

    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    if K_ALIGNED:  # K_PER_SPLIT is whole BLOCK_K steps: written so, the compiler sees it (see above)
        k_start = pid_k * (K_PER_SPLIT // BLOCK_K) * BLOCK_K
    else:
        k_start = pid_k * K_PER_SPLIT
    k_end = min(k_start + K_PER_SPLIT, K)

    pdl_wait(USE_PDL)
    if SWAP_AB:
        tl.static_assert(A_FORMAT == 0 and not DOT_SCALED and not PREFETCH, "SWAP_AB: dense A, in-register decode")
        acc = _swapped_k_loop(a_ptr, b_ptr, b_scale_ptr, rm64, m_mask, rn, n_mask, k_start, k_end, K, N,
                              stride_am, stride_bn, stride_bk, stride_bsn, stride_bsk,
                              B_FORMAT, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, SCALES_AHEAD, PREFETCH_SCALES)
        pdl_launch_dependents(USE_PDL)
        acc = tl.trans(acc)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if PREFETCH:  # registers double-buffered: step k + 1's loads are in flight while step k computes
            a, a_s, b, bs = _load_step(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, rm64, m_mask, rn64, n_mask, k_start,
                                       k_end, stride_am, stride_ak, stride_asm, stride_ask,
                                       stride_bn, stride_bk, stride_bsn, stride_bsk,
                                       A_FORMAT, B_FORMAT, BLOCK_K)
        for k0 in range(k_start, k_end, BLOCK_K):
            if PREFETCH:
                k1 = k0 + BLOCK_K
                na, na_s, nb, nbs = _load_step(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, rm64, m_mask, rn64, n_mask,
                                               k1, k_end, stride_am, stride_ak, stride_asm, stride_ask,
                                               stride_bn, stride_bk, stride_bsn, stride_bsk,
                                               A_FORMAT, B_FORMAT, BLOCK_K)
                acc = _mma_step(acc, a, a_s, b, bs, A_FORMAT, B_FORMAT, DOT_SCALED, MMA_DTYPE, BLOCK_M, BLOCK_N,
                                BLOCK_K)
                a, a_s, b, bs = na, na_s, nb, nbs
            else:
                a, a_s, b, bs = _load_step(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, rm64, m_mask, rn64, n_mask, k0,
                                           k_end, stride_am, stride_ak, stride_asm, stride_ask,
                                           stride_bn, stride_bk, stride_bsn, stride_bsk,
                                           A_FORMAT, B_FORMAT, BLOCK_K)
                acc = _mma_step(acc, a, a_s, b, bs, A_FORMAT, B_FORMAT, DOT_SCALED, MMA_DTYPE, BLOCK_M, BLOCK_N,
                                BLOCK_K)
        pdl_launch_dependents(USE_PDL)

    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K > 1:
        tile = rm64[:, None] * N + rn64[None, :]
        tl.store(ws_ptr + pid_k.to(tl.int64) * M * N + tile, acc, mask=out_mask)
        counter = counter_ptr + pid_m * tiles_n + pid_n
        arrived = tl.atomic_add(counter, 1, sem="acq_rel")
        if arrived != SPLIT_K - 1:
            return
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in range(SPLIT_K):  # fixed order: bitwise reproducible
            acc += tl.load(ws_ptr + s * M * N + tile, mask=out_mask, other=0.0, cache_modifier=".cg")
        tl.store(counter, 0)  # re-arm for the next launch (CUDA-graph replays included)

    if HAS_GLOBAL_SCALE:
        acc = acc * tl.load(global_scale_ptr)
    if SWAP_AB and B_FORMAT == 3:  # the swapped decode left NVFP4 weights this much small (exact)
        acc = acc * E4M3_DECODE_SHIFT
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    acc = _activation(acc, ACTIVATION)
    out_ptrs = out_ptr + rm64[:, None] * stride_om + rn64[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
