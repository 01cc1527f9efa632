"""L1: gather token rows (dispatch) x w13 -> SwiGLU epilogue -> intermediate [T*k, I].

# T: tokens, k: experts per token, H: hidden (the K of this GEMM), I: expert intermediate size
# M-block b holds rows of one expert (block_expert[b]); row r's flat entry is sorted_ids[r] = t*k + j
# and it reads x[t].  Each program computes BLOCK_N intermediate columns: a gate tile and an up
# tile (two accumulators), so gate/up never leave registers; only h = act(gate)*(up+offset),
# rounded to x's dtype, is written, at row t*k + j of the intermediate.
# GATE_UP_ONE_DOT: one [BK, 2*BLOCK_N] weight tile per step with gate and up columns alternating,
# one wider MMA, then split; else two [BK, BLOCK_N] tiles and two accumulators.
# ACT_FORMAT 1/2 (fp8 activations): x_ptr is e4m3 x with per-row scales at x_scale_ptr (quantised
# once by moe_quant_act_kernel), and the epilogue quantises the fp32 h per row per group of I
# (128, fp32 scales / 32, e8m0 bytes) into the e4m3 intermediate + inter_scale_ptr.
# Grid: (cdiv(I, BLOCK_N) * max_blocks,), N tiles fastest, so the programs running together share
# one M-block's gathered rows (read once from DRAM, then from L2); blocks past the last exit at once.
# ``gemm1_tile`` is one (M-block, N-tile) of this GEMM; the persistent kernel (moe_mega.py) runs
# the same tiles from its own tile loop.
# TAIL_BLOCK_M (kernel): an expert's last, short block runs a tile of TAIL_BLOCK_M or twice that
# many rows.  K_HALF_TAIL: K = n * BLOCK_K + BLOCK_K / 2 ends in one unmasked half-deep step.
# SCALES_AHEAD: the swapped tile loads each K step's FP4 block scales one step ahead (where
# Triton cannot pipeline them; lowering/moe_plan.py: fp4_scales_ahead); else PREFETCH_SCALES:
# the next step's are prefetched to L1 (moe_tiles.prefetch_fp4_weight_scales; opt-in,
# MoEKernelConfig.fp4_prefetch_scales).  All four: L2 as well.
"""

import triton
import triton.language as tl

from .moe_common import (expert_block_of_program, expert_row_end, k_loop_steps, pdl_launch_dependents, quantize_fp8_groups,
                          round_to_fp8_mx32, store_cast, swiglu_epilogue, to_mma_k_order)
from .moe_tiles import (act_weight_tile_dot, desc_dense_dot, fp4_weight_scales, load_act_tile, nvfp4_global_scale,
                        prefetch_fp4_weight_scales)


@triton.jit
def _gemm1_k_step(acc_gate, acc_up, x_rows, xs_rows, row_mask, w_base, s_base, n_gate, n_up, n_cat, k0, H, I,
                  stride_wn, stride_wk, stride_sn, stride_sk, BLOCK_K: tl.constexpr, WEIGHT_FORMAT: tl.constexpr,
                  ACT_FORMAT: tl.constexpr, EVEN_K: tl.constexpr, GATE_UP_ONE_DOT: tl.constexpr,
                  FP4_DOT_SCALED: tl.constexpr, SWAP_AB: tl.constexpr, w_scales=None, w_block_gate=None,
                  w_block_up=None):
    """One K step of L1: gather the token rows' x[:, k0:k0+BK], multiply by the gate/up weight tile(s)
    (GATE_UP_ONE_DOT: acc_gate is the one accumulator, acc_up a placeholder; ``w_scales``: the
    swapped one-dot tile's scales, loaded a step ahead; ``w_block_gate`` / ``w_block_up``: the fp8
    scale block of each two-dot weight tile, W_SCALE_UNIFORM)."""
    a, a_s = load_act_tile(x_rows, xs_rows, row_mask, k0, H, BLOCK_K, ACT_FORMAT, EVEN_K)
    if GATE_UP_ONE_DOT:
        acc_gate = act_weight_tile_dot(acc_gate, a, a_s, w_base, s_base, n_cat, k0, H, 2 * I, stride_wn, stride_wk,
                                       stride_sn, stride_sk, BLOCK_K, WEIGHT_FORMAT, ACT_FORMAT, EVEN_K,
                                       FP4_DOT_SCALED, SWAP_AB, w_scales)
    else:
        acc_gate = act_weight_tile_dot(acc_gate, a, a_s, w_base, s_base, n_gate, k0, H, 2 * I, stride_wn,
                                       stride_wk, stride_sn, stride_sk, BLOCK_K, WEIGHT_FORMAT, ACT_FORMAT,
                                       EVEN_K, FP4_DOT_SCALED, SWAP_AB, None, w_block_gate)
        acc_up = act_weight_tile_dot(acc_up, a, a_s, w_base, s_base, n_up, k0, H, 2 * I, stride_wn,
                                     stride_wk, stride_sn, stride_sk, BLOCK_K, WEIGHT_FORMAT, ACT_FORMAT,
                                     EVEN_K, FP4_DOT_SCALED, SWAP_AB, None, w_block_up)
    return acc_gate, acc_up


@triton.jit
def gemm1_tile(
    row_start, pid_n, e,
    x_ptr, w_ptr, w_scale_ptr, w_gscale_ptr, b_ptr, topk_weights_ptr, inter_ptr,
    sorted_ids_ptr, expert_start_ptr, expert_count_ptr, x_scale_ptr, inter_scale_ptr,
    H, I, top_k,
    stride_xt, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, stride_be,
    stride_xst, stride_ist,
    alpha, limit, up_offset,
    ACTIVATION: tl.constexpr, HAS_LIMIT: tl.constexpr, HAS_BIAS: tl.constexpr,
    INTERLEAVED: tl.constexpr, WEIGHT_BEFORE_DOWN: tl.constexpr, WEIGHT_FORMAT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    GATE_UP_ONE_DOT: tl.constexpr, FP4_DOT_SCALED: tl.constexpr, USE_PDL: tl.constexpr,
    ACT_FORMAT: tl.constexpr, SWAP_AB: tl.constexpr = False, GATE_UP_GSCALES: tl.constexpr = False,
    K_HALF_TAIL: tl.constexpr = False, SCALES_AHEAD: tl.constexpr = False,
    PREFETCH_SCALES: tl.constexpr = False, W_DESC_K_MAJOR: tl.constexpr = True, w_desc=None,
    W_SCALE_UNIFORM: tl.constexpr = False, ROUND_INTER_MX32: tl.constexpr = False,
):
    """Intermediate columns [pid_n * BLOCK_N, +BLOCK_N) of the BLOCK_M rows from row_start (one
    expert's, e >= 0).
    USE_PDL: trigger the dependent launch once the K loop is done (the persistent kernel passes
    False and triggers on its own).  SWAP_AB: x is in moe_common.to_mma_k_order, the accumulators
    are [columns, rows] in the K loop (moe_tiles._fp4_weight_rows_dot), transposed once after it,
    and h is written in to_mma_k_order for L2's swapped tiles.  ``w_desc``: dense one-dot weights
    through TMA (moe_tiles.desc_weight_tile; a non-interleaved box holds the gate columns, then up's).
    ROUND_INTER_MX32 (dense activations): h rounded as fp8_mx32 would carry it and stored in bf16
    (moe_common.round_to_fp8_mx32): fp8_mx32 activations on the swapped tiles, whose x is so rounded
    once before L1 (moe_kperm_kernel)."""
    tl.static_assert(w_desc is None or (GATE_UP_ONE_DOT and WEIGHT_FORMAT == 0 and ACT_FORMAT == 0 and not SWAP_AB),
                     "TMA weight tiles: dense one-dot L1 with dense activations only")
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_K >= 16, "tl.dot needs tiles of at least 16")
    tl.static_assert(WEIGHT_FORMAT != 1 or 128 % BLOCK_K == 0, "fp8 block-128 scales need BLOCK_K | 128")
    tl.static_assert(WEIGHT_FORMAT < 2 or BLOCK_K % 32 == 0, "fp4 scales need 32 | BLOCK_K")
    tl.static_assert(ACT_FORMAT != 1 or 128 % BLOCK_K == 0, "fp8 block-128 activations need BLOCK_K | 128")
    tl.static_assert(ACT_FORMAT != 2 or BLOCK_K % 32 == 0, "fp8 mx32 activations need 32 | BLOCK_K")
    tl.static_assert(not SWAP_AB or BLOCK_N % 64 == 0, "swapped tiles write whole 64-column K-order groups")
    tl.static_assert(not ROUND_INTER_MX32 or (ACT_FORMAT == 0 and BLOCK_N % 32 == 0),
                     "ROUND_INTER_MX32: dense activations, whole groups of 32 intermediate columns")
    rows = row_start + tl.arange(0, BLOCK_M)
    row_end = expert_row_end(expert_start_ptr, expert_count_ptr, e)
    row_mask = rows < row_end
    entry = tl.load(sorted_ids_ptr + rows, mask=row_mask, other=0)
    token = entry // top_k

    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if INTERLEAVED:
        n_gate = 2 * n
        n_up = 2 * n + 1
    else:
        n_gate = n
        n_up = n + I
    w_base = w_ptr + e.to(tl.int64) * stride_we
    s_base = w_scale_ptr + e.to(tl.int64) * stride_se
    x_rows = x_ptr + token.to(tl.int64)[:, None] * stride_xt
    xs_rows = x_scale_ptr + token.to(tl.int64) * stride_xst  # fp8 activations: the row's scales
    n_cat = n  # the one-dot weight rows (unused with two dots)
    if GATE_UP_ONE_DOT:
        j = tl.arange(0, 2 * BLOCK_N)
        col = pid_n * BLOCK_N + j // 2
        if INTERLEAVED:
            n_cat = 2 * col + j % 2
        else:
            n_cat = col + (j % 2) * I
        if SWAP_AB:
            acc = tl.zeros([2 * BLOCK_N, BLOCK_M], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
    elif SWAP_AB:
        acc_gate = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if GATE_UP_ONE_DOT:
        acc_gate, acc_up = acc, 0.0  # one accumulator: gate and up columns alternating
    # K_HALF_TAIL: H = n * BLOCK_K + BLOCK_K / 2, so the last step is an unmasked half-deep one
    k_main = H - BLOCK_K // 2 if K_HALF_TAIL else H
    w_block_gate, w_block_up = None, None
    if W_SCALE_UNIFORM:  # fp8 x fp8, two dots: gate rows n and up rows I + n (I % BLOCK_N == 0) each
        # lie in one 128-row scale block (lowering/moe_plan.py: fp8_weight_scales_uniform)
        tl.static_assert(WEIGHT_FORMAT == 1 and ACT_FORMAT == 1 and not GATE_UP_ONE_DOT and not INTERLEAVED
                         and 128 % BLOCK_N == 0, "W_SCALE_UNIFORM: fp8 x fp8 two-dot tiles of BLOCK_N | 128 rows")
        w_block_gate = pid_n * BLOCK_N // 128
        w_block_up = (I + pid_n * BLOCK_N) // 128
    s_next = None
    if SCALES_AHEAD:  # the swapped one-dot tile only (ignored elsewhere)
        if SWAP_AB and GATE_UP_ONE_DOT:  # its scales one K step ahead (moe_tiles.fp4_weight_scales)
            s_next = fp4_weight_scales(s_base, n_cat, n_cat < 2 * I, 0, H, stride_sn, stride_sk, BLOCK_K,
                                       WEIGHT_FORMAT, EVEN_K)
    for step in range(0, k_loop_steps(k_main, BLOCK_K, SWAP_AB)):
        k0 = step * BLOCK_K
        s_now = s_next
        k_next = tl.maximum(tl.minimum(k0 + BLOCK_K, k_main - BLOCK_K), 0)  # the last step's is its own
        if s_next is not None:  # (always a whole step inside K)
            s_next = fp4_weight_scales(s_base, n_cat, n_cat < 2 * I, k_next, H, stride_sn, stride_sk, BLOCK_K,
                                       WEIGHT_FORMAT, EVEN_K)
        elif PREFETCH_SCALES and SWAP_AB and GATE_UP_ONE_DOT:
            prefetch_fp4_weight_scales(s_base, n_cat, n_cat < 2 * I, k_next, H, stride_sn, stride_sk, BLOCK_K,
                                       WEIGHT_FORMAT)
        if w_desc is not None:
            a, a_s = load_act_tile(x_rows, xs_rows, row_mask, k0, H, BLOCK_K, ACT_FORMAT, EVEN_K)
            n0 = 2 * pid_n * BLOCK_N if INTERLEAVED else pid_n * BLOCK_N
            acc_gate = desc_dense_dot(acc_gate, a, w_desc, e, n0, k0, 2 * BLOCK_N, BLOCK_K, W_DESC_K_MAJOR,
                                      not INTERLEAVED)
        else:
            acc_gate, acc_up = _gemm1_k_step(acc_gate, acc_up, x_rows, xs_rows, row_mask, w_base, s_base, n_gate,
                                             n_up, n_cat, k0, H, I, stride_wn, stride_wk, stride_sn, stride_sk, BLOCK_K,
                                             WEIGHT_FORMAT, ACT_FORMAT, EVEN_K, GATE_UP_ONE_DOT, FP4_DOT_SCALED,
                                             SWAP_AB, s_now, w_block_gate, w_block_up)
    if K_HALF_TAIL:
        acc_gate, acc_up = _gemm1_k_step(acc_gate, acc_up, x_rows, xs_rows, row_mask, w_base, s_base, n_gate, n_up,
                                         n_cat, k_main, H, I, stride_wn, stride_wk, stride_sn, stride_sk,
                                         BLOCK_K // 2, WEIGHT_FORMAT, ACT_FORMAT, True, GATE_UP_ONE_DOT,
                                         FP4_DOT_SCALED, SWAP_AB, None, w_block_gate, w_block_up)
    if GATE_UP_ONE_DOT:
        acc = acc_gate
    if SWAP_AB:
        if GATE_UP_ONE_DOT:
            acc = tl.trans(acc)
        else:
            acc_gate = tl.trans(acc_gate)
            acc_up = tl.trans(acc_up)
    if GATE_UP_ONE_DOT:
        if w_desc is not None and not INTERLEAVED:  # the box's columns: BN gate, then BN up
            acc_gate, acc_up = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, BLOCK_N]), (0, 2, 1)))
        else:  # gate and up columns alternating
            acc_gate, acc_up = tl.split(tl.reshape(acc, [BLOCK_M, BLOCK_N, 2]))
    if WEIGHT_FORMAT == 3:  # nvfp4: the expert's fp32 global scale, once (GATE_UP_GSCALES: gate's, up's)
        if GATE_UP_GSCALES:
            acc_gate *= nvfp4_global_scale(w_gscale_ptr + 2 * e, SWAP_AB)
            acc_up *= nvfp4_global_scale(w_gscale_ptr + 2 * e + 1, SWAP_AB)
        else:
            gscale = nvfp4_global_scale(w_gscale_ptr + e, SWAP_AB)
            acc_gate *= gscale
            acc_up *= gscale
    pdl_launch_dependents(USE_PDL)

    n_mask = n < I
    if HAS_BIAS:
        b_base = b_ptr + e * stride_be
        acc_gate += tl.load(b_base + n_gate, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        acc_up += tl.load(b_base + n_up, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    h = swiglu_epilogue(acc_gate, acc_up, alpha, limit, up_offset, ACTIVATION, HAS_LIMIT)
    if WEIGHT_BEFORE_DOWN:
        h *= tl.load(topk_weights_ptr + entry, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    out = inter_ptr + entry.to(tl.int64)[:, None] * I + n[None, :]
    if ACT_FORMAT == 0:
        if ROUND_INTER_MX32:  # whole groups of 32 (BLOCK_N % 32 == 0, I % 32 == 0)
            h = round_to_fp8_mx32(tl.where(row_mask[:, None] & n_mask[None, :], h, 0.0), BLOCK_M, BLOCK_N)
        if SWAP_AB:  # L2's swapped tiles read the intermediate's K in to_mma_k_order (I % 64 == 0)
            h = to_mma_k_order(h, BLOCK_M, BLOCK_N)
        if WEIGHT_FORMAT == 0:  # kept in the L2 cache for L2, as L2 keeps its rows for the combine
            tl.store(out, store_cast(h, inter_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :],
                     eviction_policy="evict_last")
        else:
            tl.store(out, store_cast(h, inter_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])
    else:  # fp8 intermediate: e4m3 + one scale per row per group of I (BLOCK_N holds whole groups)
        G: tl.constexpr = 128 if ACT_FORMAT == 1 else 32
        h = tl.where(row_mask[:, None] & n_mask[None, :], h, 0.0)
        q, s = quantize_fp8_groups(h, BLOCK_M, BLOCK_N, ACT_FORMAT)
        tl.store(out, q, mask=row_mask[:, None] & n_mask[None, :])
        g = pid_n * (BLOCK_N // G) + tl.arange(0, BLOCK_N // G)
        tl.store(inter_scale_ptr + entry.to(tl.int64)[:, None] * stride_ist + g[None, :], s,
                 mask=row_mask[:, None] & (g[None, :] < tl.cdiv(I, G)))


@triton.jit
def moe_gemm1_kernel(
    x_ptr, w_ptr, w_scale_ptr, w_gscale_ptr, b_ptr, topk_weights_ptr, inter_ptr,
    sorted_ids_ptr, block_expert_ptr, expert_start_ptr, expert_count_ptr, x_scale_ptr, inter_scale_ptr,
    H, I, top_k,
    stride_xt, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, stride_be,
    stride_xst, stride_ist,
    alpha, limit, up_offset,
    ACTIVATION: tl.constexpr, HAS_LIMIT: tl.constexpr, HAS_BIAS: tl.constexpr,
    INTERLEAVED: tl.constexpr, WEIGHT_BEFORE_DOWN: tl.constexpr, WEIGHT_FORMAT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    GATE_UP_ONE_DOT: tl.constexpr, FP4_DOT_SCALED: tl.constexpr, USE_PDL: tl.constexpr,
    ACT_FORMAT: tl.constexpr, SWAP_AB: tl.constexpr = False, GATE_UP_GSCALES: tl.constexpr = False,
    K_HALF_TAIL: tl.constexpr = False, TAIL_BLOCK_M: tl.constexpr = 0, SCALES_AHEAD: tl.constexpr = False,
    PREFETCH_SCALES: tl.constexpr = False, W_DESC_K_MAJOR: tl.constexpr = True, w_desc=None,
    W_SCALE_UNIFORM: tl.constexpr = False, EXPERT_MAJOR: tl.constexpr = False, ROUND_INTER_MX32: tl.constexpr = False,
):
    """TAIL_BLOCK_M > 0: a block holding at most that many rows (an expert's last) runs a tile of
    TAIL_BLOCK_M rows, so its MMA does not spend BLOCK_M rows' work on a few tokens.  ``w_desc``:
    gemm1_tile's.  EXPERT_MAJOR: the order of the programs (moe_common.expert_block_of_program)."""
    pid_m, pid_n, e = expert_block_of_program(block_expert_ptr, expert_start_ptr, expert_count_ptr, tl.cdiv(I, BLOCK_N),
                                              BLOCK_M, EXPERT_MAJOR, USE_PDL)
    if e >= 0:  # blocks past the last used one have no expert
        row_start = pid_m * BLOCK_M
        if TAIL_BLOCK_M == 0:
            gemm1_tile(row_start, pid_n, e, x_ptr, w_ptr, w_scale_ptr, w_gscale_ptr, b_ptr, topk_weights_ptr,
                       inter_ptr, sorted_ids_ptr, expert_start_ptr, expert_count_ptr, x_scale_ptr, inter_scale_ptr,
                       H, I, top_k,
                       stride_xt, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, stride_be,
                       stride_xst, stride_ist, alpha, limit, up_offset,
                       ACTIVATION, HAS_LIMIT, HAS_BIAS, INTERLEAVED, WEIGHT_BEFORE_DOWN, WEIGHT_FORMAT,
                       BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, GATE_UP_ONE_DOT, FP4_DOT_SCALED, USE_PDL,
                       ACT_FORMAT, SWAP_AB, GATE_UP_GSCALES, K_HALF_TAIL, SCALES_AHEAD,
                       PREFETCH_SCALES, W_DESC_K_MAJOR, w_desc, W_SCALE_UNIFORM, ROUND_INTER_MX32)
        else:  # the first of TAIL_BLOCK_M, 2 * TAIL_BLOCK_M (below BLOCK_M), BLOCK_M rows that holds the rest
            left = expert_row_end(expert_start_ptr, expert_count_ptr, e) - row_start
            if left <= TAIL_BLOCK_M:
                gemm1_tile(row_start, pid_n, e, x_ptr, w_ptr, w_scale_ptr, w_gscale_ptr, b_ptr, topk_weights_ptr,
                           inter_ptr, sorted_ids_ptr, expert_start_ptr, expert_count_ptr, x_scale_ptr, inter_scale_ptr,
                           H, I, top_k,
                           stride_xt, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, stride_be,
                           stride_xst, stride_ist, alpha, limit, up_offset,
                           ACTIVATION, HAS_LIMIT, HAS_BIAS, INTERLEAVED, WEIGHT_BEFORE_DOWN, WEIGHT_FORMAT,
                           TAIL_BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, GATE_UP_ONE_DOT, FP4_DOT_SCALED, USE_PDL,
                           ACT_FORMAT, SWAP_AB, GATE_UP_GSCALES, K_HALF_TAIL, SCALES_AHEAD,
                           PREFETCH_SCALES, W_DESC_K_MAJOR, w_desc, W_SCALE_UNIFORM, ROUND_INTER_MX32)
            elif 2 * TAIL_BLOCK_M == BLOCK_M:
                gemm1_tile(row_start, pid_n, e, x_ptr, w_ptr, w_scale_ptr, w_gscale_ptr, b_ptr, topk_weights_ptr,
                           inter_ptr, sorted_ids_ptr, expert_start_ptr, expert_count_ptr, x_scale_ptr, inter_scale_ptr,
                           H, I, top_k,
                           stride_xt, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, stride_be,
                           stride_xst, stride_ist, alpha, limit, up_offset,
                           ACTIVATION, HAS_LIMIT, HAS_BIAS, INTERLEAVED, WEIGHT_BEFORE_DOWN, WEIGHT_FORMAT,
                           BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, GATE_UP_ONE_DOT, FP4_DOT_SCALED, USE_PDL,
                           ACT_FORMAT, SWAP_AB, GATE_UP_GSCALES, K_HALF_TAIL, SCALES_AHEAD,
                           PREFETCH_SCALES, W_DESC_K_MAJOR, w_desc, W_SCALE_UNIFORM, ROUND_INTER_MX32)
            elif left <= 2 * TAIL_BLOCK_M:
                gemm1_tile(row_start, pid_n, e, x_ptr, w_ptr, w_scale_ptr, w_gscale_ptr, b_ptr, topk_weights_ptr,
                           inter_ptr, sorted_ids_ptr, expert_start_ptr, expert_count_ptr, x_scale_ptr, inter_scale_ptr,
                           H, I, top_k,
                           stride_xt, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, stride_be,
                           stride_xst, stride_ist, alpha, limit, up_offset,
                           ACTIVATION, HAS_LIMIT, HAS_BIAS, INTERLEAVED, WEIGHT_BEFORE_DOWN, WEIGHT_FORMAT,
                           2 * TAIL_BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, GATE_UP_ONE_DOT, FP4_DOT_SCALED, USE_PDL,
                           ACT_FORMAT, SWAP_AB, GATE_UP_GSCALES, K_HALF_TAIL, SCALES_AHEAD,
                           PREFETCH_SCALES, W_DESC_K_MAJOR, w_desc, W_SCALE_UNIFORM, ROUND_INTER_MX32)
            else:
                gemm1_tile(row_start, pid_n, e, x_ptr, w_ptr, w_scale_ptr, w_gscale_ptr, b_ptr, topk_weights_ptr,
                           inter_ptr, sorted_ids_ptr, expert_start_ptr, expert_count_ptr, x_scale_ptr, inter_scale_ptr,
                           H, I, top_k,
                           stride_xt, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, stride_be,
                           stride_xst, stride_ist, alpha, limit, up_offset,
                           ACTIVATION, HAS_LIMIT, HAS_BIAS, INTERLEAVED, WEIGHT_BEFORE_DOWN, WEIGHT_FORMAT,
                           BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, GATE_UP_ONE_DOT, FP4_DOT_SCALED, USE_PDL,
                           ACT_FORMAT, SWAP_AB, GATE_UP_GSCALES, K_HALF_TAIL, SCALES_AHEAD,
                           PREFETCH_SCALES, W_DESC_K_MAJOR, w_desc, W_SCALE_UNIFORM, ROUND_INTER_MX32)
