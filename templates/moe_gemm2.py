"""L2: intermediate rows x w2 (+ b2), routing weight -> per-(token, slot) output rows [T*k, H].

# T: tokens, k: experts per token, I: expert intermediate size (the K of this GEMM), H: hidden
# M-block b holds rows of expert block_expert[b]; row r reads intermediate[sorted_ids[r]] and
# writes rows_out[sorted_ids[r]], so every (token, slot) owns one output row and the combine
# can add them in a fixed order.  ACT_FORMAT 1/2: the intermediate is e4m3 with per-row scales
# at inter_scale_ptr (see moe_gemm1).  Grid: (cdiv(H, BLOCK_N) * max_blocks,), N tiles fastest.
# ``gemm2_tile`` is one (M-block, N-tile); the persistent kernel (moe_mega.py) calls it too.
"""

import triton
import triton.language as tl

from .moe_common import expert_block_of_program, expert_row_end, k_loop_steps, pdl_launch_dependents, store_cast
from .moe_tiles import (act_weight_tile_dot, desc_dense_dot, fp4_weight_scales, load_act_tile, nvfp4_global_scale,
                        prefetch_fp4_weight_scales)


@triton.jit
def gemm2_tile(
    row_start, pid_n, e,
    inter_ptr, w_ptr, w_scale_ptr, w_gscale_ptr, b_ptr, topk_weights_ptr, rows_out_ptr,
    sorted_ids_ptr, expert_start_ptr, expert_count_ptr, inter_scale_ptr,
    H, I,
    stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, stride_be, stride_ist,
    HAS_BIAS: tl.constexpr, WEIGHT_AFTER_DOWN: tl.constexpr, WEIGHT_FORMAT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    FP4_DOT_SCALED: tl.constexpr, USE_PDL: tl.constexpr, ACT_FORMAT: tl.constexpr, SWAP_AB: tl.constexpr = False,
    K_HALF_TAIL: tl.constexpr = False, SCALES_AHEAD: tl.constexpr = False,
    PREFETCH_SCALES: tl.constexpr = False, W_DESC_K_MAJOR: tl.constexpr = True, w_desc=None,
):
    """Output columns [pid_n * BLOCK_N, +BLOCK_N) of the BLOCK_M rows from row_start (one expert's,
    e >= 0).
    USE_PDL: trigger the dependent launch once the K loop is done (the persistent kernel passes
    False and triggers on its own).  SWAP_AB: the intermediate is in moe_common.to_mma_k_order (L1
    wrote it so), the accumulator is [columns, rows] in the K loop (moe_tiles._fp4_weight_rows_dot),
    transposed once after it.  ``w_desc``: dense weights through TMA (moe_tiles.desc_weight_tile)."""
    tl.static_assert(w_desc is None or (WEIGHT_FORMAT == 0 and ACT_FORMAT == 0 and not SWAP_AB),
                     "TMA weight tiles: dense weights with dense activations only")
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_K >= 16, "tl.dot needs tiles of at least 16")
    tl.static_assert(WEIGHT_FORMAT != 1 or 128 % BLOCK_K == 0, "fp8 block-128 scales need BLOCK_K | 128")
    tl.static_assert(ACT_FORMAT != 1 or 128 % BLOCK_K == 0, "fp8 block-128 activations need BLOCK_K | 128")
    tl.static_assert(ACT_FORMAT != 2 or BLOCK_K % 32 == 0, "fp8 mx32 activations need 32 | BLOCK_K")
    rows = row_start + tl.arange(0, BLOCK_M)
    row_end = expert_row_end(expert_start_ptr, expert_count_ptr, e)
    row_mask = rows < row_end
    entry = tl.load(sorted_ids_ptr + rows, mask=row_mask, other=0)

    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_base = w_ptr + e.to(tl.int64) * stride_we
    s_base = w_scale_ptr + e.to(tl.int64) * stride_se
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    a_rows = inter_ptr + entry.to(tl.int64)[:, None] * I
    as_rows = inter_scale_ptr + entry.to(tl.int64) * stride_ist  # fp8 intermediate: the row's scales
    # K_HALF_TAIL: I = n * BLOCK_K + BLOCK_K / 2, so the last step is an unmasked half-deep one
    k_main = I - BLOCK_K // 2 if K_HALF_TAIL else I
    w_block = None
    if WEIGHT_FORMAT == 1 and ACT_FORMAT == 1 and 128 % BLOCK_N == 0:  # the tile's rows: one scale block
        w_block = pid_n * BLOCK_N // 128
    s_next = None
    if SCALES_AHEAD and SWAP_AB:  # the swapped tile's scales, one K step ahead (moe_tiles.fp4_weight_scales)
        s_next = fp4_weight_scales(s_base, n, n < H, 0, I, stride_sn, stride_sk, BLOCK_K, WEIGHT_FORMAT, EVEN_K)
    for step in range(0, k_loop_steps(k_main, BLOCK_K, SWAP_AB)):
        k0 = step * BLOCK_K
        s_now = s_next
        k_next = tl.maximum(tl.minimum(k0 + BLOCK_K, k_main - BLOCK_K), 0)  # the last step's is its own
        if s_next is not None:  # (always a whole step inside K)
            s_next = fp4_weight_scales(s_base, n, n < H, k_next, I, stride_sn, stride_sk, BLOCK_K, WEIGHT_FORMAT,
                                       EVEN_K)
        elif PREFETCH_SCALES and SWAP_AB:
            prefetch_fp4_weight_scales(s_base, n, n < H, k_next, I, stride_sn, stride_sk, BLOCK_K, WEIGHT_FORMAT)
        a, a_s = load_act_tile(a_rows, as_rows, row_mask, k0, I, BLOCK_K, ACT_FORMAT, EVEN_K)
        if w_desc is not None:
            acc = desc_dense_dot(acc, a, w_desc, e, pid_n * BLOCK_N, k0, BLOCK_N, BLOCK_K, W_DESC_K_MAJOR, False)
        else:
            acc = act_weight_tile_dot(acc, a, a_s, w_base, s_base, n, k0, I, H, stride_wn, stride_wk,
                                      stride_sn, stride_sk, BLOCK_K, WEIGHT_FORMAT, ACT_FORMAT, EVEN_K, FP4_DOT_SCALED,
                                      SWAP_AB, s_now, w_block)
    if K_HALF_TAIL:
        a, a_s = load_act_tile(a_rows, as_rows, row_mask, k_main, I, BLOCK_K // 2, ACT_FORMAT, True)
        acc = act_weight_tile_dot(acc, a, a_s, w_base, s_base, n, k_main, I, H, stride_wn, stride_wk,
                                  stride_sn, stride_sk, BLOCK_K // 2, WEIGHT_FORMAT, ACT_FORMAT, True, FP4_DOT_SCALED,
                                  SWAP_AB, None, w_block)
    if SWAP_AB:
        acc = tl.trans(acc)
    pdl_launch_dependents(USE_PDL)

    n_mask = n < H
    if WEIGHT_FORMAT == 3:  # nvfp4: the expert's fp32 global scale, once
        acc *= nvfp4_global_scale(w_gscale_ptr + e, SWAP_AB)
    if HAS_BIAS:
        acc += tl.load(b_ptr + e * stride_be + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if WEIGHT_AFTER_DOWN:
        acc *= tl.load(topk_weights_ptr + entry, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    out = rows_out_ptr + entry.to(tl.int64)[:, None] * H + n[None, :]
    if WEIGHT_FORMAT == 0:  # kept in the L2 cache for the combine: 1-3% of the bf16 layer at T = 256-4096
        tl.store(out, store_cast(acc, rows_out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :],
                 eviction_policy="evict_last")
    else:  # not for quantised weights: MXFP4 read 1-2% slower with it at gpt-oss T = 1024 / 4096
        tl.store(out, store_cast(acc, rows_out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def moe_gemm2_kernel(
    inter_ptr, w_ptr, w_scale_ptr, w_gscale_ptr, b_ptr, topk_weights_ptr, rows_out_ptr,
    sorted_ids_ptr, block_expert_ptr, expert_start_ptr, expert_count_ptr, inter_scale_ptr,
    H, I,
    stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, stride_be, stride_ist,
    HAS_BIAS: tl.constexpr, WEIGHT_AFTER_DOWN: tl.constexpr, WEIGHT_FORMAT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    FP4_DOT_SCALED: tl.constexpr, USE_PDL: tl.constexpr, ACT_FORMAT: tl.constexpr, SWAP_AB: tl.constexpr = False,
    K_HALF_TAIL: tl.constexpr = False, TAIL_BLOCK_M: tl.constexpr = 0, SCALES_AHEAD: tl.constexpr = False,
    PREFETCH_SCALES: tl.constexpr = False, W_DESC_K_MAJOR: tl.constexpr = True, w_desc=None,
    EXPERT_MAJOR: tl.constexpr = False,
):
    """TAIL_BLOCK_M, ``w_desc``, EXPERT_MAJOR: as in moe_gemm1_kernel / gemm2_tile."""
    pid_m, pid_n, e = expert_block_of_program(block_expert_ptr, expert_start_ptr, expert_count_ptr, tl.cdiv(H, BLOCK_N),
                                              BLOCK_M, EXPERT_MAJOR, USE_PDL)
    if e >= 0:  # blocks past the last used one have no expert
        row_start = pid_m * BLOCK_M
        if TAIL_BLOCK_M == 0:
            gemm2_tile(row_start, pid_n, e, inter_ptr, w_ptr, w_scale_ptr, w_gscale_ptr, b_ptr, topk_weights_ptr,
                       rows_out_ptr, sorted_ids_ptr, expert_start_ptr, expert_count_ptr, inter_scale_ptr, H, I,
                       stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, stride_be, stride_ist,
                       HAS_BIAS, WEIGHT_AFTER_DOWN, WEIGHT_FORMAT, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
                       FP4_DOT_SCALED, USE_PDL, ACT_FORMAT, SWAP_AB, K_HALF_TAIL, SCALES_AHEAD,
                       PREFETCH_SCALES, W_DESC_K_MAJOR, w_desc)
        else:  # the first of TAIL_BLOCK_M, 2 * TAIL_BLOCK_M (below BLOCK_M), BLOCK_M rows that holds the rest
            left = expert_row_end(expert_start_ptr, expert_count_ptr, e) - row_start
            if left <= TAIL_BLOCK_M:
                gemm2_tile(row_start, pid_n, e, inter_ptr, w_ptr, w_scale_ptr, w_gscale_ptr, b_ptr, topk_weights_ptr,
                           rows_out_ptr, sorted_ids_ptr, expert_start_ptr, expert_count_ptr, inter_scale_ptr, H, I,
                           stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, stride_be, stride_ist,
                           HAS_BIAS, WEIGHT_AFTER_DOWN, WEIGHT_FORMAT, TAIL_BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
                           FP4_DOT_SCALED, USE_PDL, ACT_FORMAT, SWAP_AB, K_HALF_TAIL, SCALES_AHEAD,
                           PREFETCH_SCALES, W_DESC_K_MAJOR, w_desc)
            elif 2 * TAIL_BLOCK_M == BLOCK_M:
                gemm2_tile(row_start, pid_n, e, inter_ptr, w_ptr, w_scale_ptr, w_gscale_ptr, b_ptr, topk_weights_ptr,
                           rows_out_ptr, sorted_ids_ptr, expert_start_ptr, expert_count_ptr, inter_scale_ptr, H, I,
                           stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, stride_be, stride_ist,
                           HAS_BIAS, WEIGHT_AFTER_DOWN, WEIGHT_FORMAT, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
                           FP4_DOT_SCALED, USE_PDL, ACT_FORMAT, SWAP_AB, K_HALF_TAIL, SCALES_AHEAD,
                           PREFETCH_SCALES, W_DESC_K_MAJOR, w_desc)
            elif left <= 2 * TAIL_BLOCK_M:
                gemm2_tile(row_start, pid_n, e, inter_ptr, w_ptr, w_scale_ptr, w_gscale_ptr, b_ptr, topk_weights_ptr,
                           rows_out_ptr, sorted_ids_ptr, expert_start_ptr, expert_count_ptr, inter_scale_ptr, H, I,
                           stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, stride_be, stride_ist,
                           HAS_BIAS, WEIGHT_AFTER_DOWN, WEIGHT_FORMAT, 2 * TAIL_BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
                           FP4_DOT_SCALED, USE_PDL, ACT_FORMAT, SWAP_AB, K_HALF_TAIL, SCALES_AHEAD,
                           PREFETCH_SCALES, W_DESC_K_MAJOR, w_desc)
            else:
                gemm2_tile(row_start, pid_n, e, inter_ptr, w_ptr, w_scale_ptr, w_gscale_ptr, b_ptr, topk_weights_ptr,
                           rows_out_ptr, sorted_ids_ptr, expert_start_ptr, expert_count_ptr, inter_scale_ptr, H, I,
                           stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, stride_be, stride_ist,
                           HAS_BIAS, WEIGHT_AFTER_DOWN, WEIGHT_FORMAT, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
                           FP4_DOT_SCALED, USE_PDL, ACT_FORMAT, SWAP_AB, K_HALF_TAIL, SCALES_AHEAD,
                           PREFETCH_SCALES, W_DESC_K_MAJOR, w_desc)
