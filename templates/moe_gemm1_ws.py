"""L1 for fp8 x fp8 (block-128 weights and activations) as a warp-specialised persistent kernel.

# The L2's structure (moe_gemm2_ws.py, which says why; tiles from the same grid-wide counter) on
# the gate/up GEMM: per K step the producer gathers the M-block's token rows of the quantised x
# [BM, BK] (cp.async) and the gate and up weight tiles (rows n and I + n, two TMA boxes into one
# [2 * BN, BK] tile) into one ring slot.  Each consumer warpgroup (64 rows) runs the
# gate wgmma, promotes it, then the up wgmma and promotes that: one fp32 partial live at a time, so
# the two [64, BN] accumulators and the partial fit in the consumer's registers (a single
# n = 2 * BN wgmma would need two partials' worth).  The other warpgroup's MMAs fill the tensor
# cores during a promotion.  Epilogue as gemm1_tile's for fp8 activations: bias, SwiGLU, routing
# weight (before down), one fp32 scale per row per 128 columns (BN = 128: the tile is one group),
# e4m3 rows at the pairs' own intermediate rows.  Same MMA shape and the same promotion and
# epilogue expressions as gemm1_tile's two-dot W_SCALE_UNIFORM tiles, so the same bits.
# I = 128n + 64 (gpt-oss): every up tile's rows (I + n) straddle two 128-row scale blocks, so the
# up partial is promoted with one scale per column (its first UP_SPLIT columns the lower block's),
# and both dots in gemm1_tile's per-column expression (part * row scale * column scale), its bits;
# the last tile's columns past I are computed, left out of the row scale and not stored.  H =
# 128n + 64: the last K step's x columns past H are copied as zeros (TMA zero-fills the weight's),
# as are the pad rows of an expert's last block (no reads for them).
# Takes: e4m3 x [T, H] with fp32 scales [T, ceil(H/128)], e4m3 w13 [E, 2I, H] (gate rows, then up
# rows) with K contiguous and experts back to back (one TMA descriptor of [E * 2I, H]) and fp32
# scales [E, ceil(2I/128), ceil(H/128)]; H and I multiples of 64, BN = 128; a zeroed int32 tile counter.
"""

from .moe_gemm2_ws import HAS_GLUON

if HAS_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

    from .moe_gemm2_ws import (CONSUMER_REGISTERS, PRODUCER_REGISTERS, PRODUCER_WARPS, _pass_slots, _pdl_wait,
                               _promoted_wgmma, _publish_tile, _receive_tile, _row_end, _slot_ring, _tile_rows,
                               _tile_schedule_buffers, _tile_schedule_init, _wait_slot, cp_async_load, tma_load)

    @gluon.jit
    def _l1_ws_producer(x_ptr, w_desc, sorted_ids_ptr, block_expert_ptr, expert_start_ptr, expert_count_ptr, a_bufs,
                        b_bufs, ready, w_ready, empty, counter_ptr, tile_ids, tile_full, tile_free, H, I, top_k,
                        num_pairs, stride_xt, num_tiles, n_tiles_n, k_steps,
                        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
        # 16 e4m3 (one 16-byte cp.async) per thread, 8 threads per 128-byte row, 4 warps
        layout: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0])
        rows_l: gl.constexpr = gl.SliceLayout(1, layout)
        k = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, layout))
        block_rows = gl.arange(0, BLOCK_M, layout=rows_l)
        i = 0
        t = _publish_tile(counter_ptr, 0, tile_ids, tile_full, tile_free, i)
        e_next, ids_next = _tile_rows(t, num_tiles, n_tiles_n, block_expert_ptr, sorted_ids_ptr, block_rows, BLOCK_M)
        end_next = _row_end(e_next, expert_start_ptr, expert_count_ptr)
        it = 0
        while t < num_tiles:
            i += 1
            t_next = _publish_tile(counter_ptr, 0, tile_ids, tile_full, tile_free, i)
            e = e_next
            ids = ids_next
            row_end = end_next
            e_next, ids_next = _tile_rows(t_next, num_tiles, n_tiles_n, block_expert_ptr, sorted_ids_ptr,
                                          block_rows, BLOCK_M)
            end_next = _row_end(e_next, expert_start_ptr, expert_count_ptr)
            if e >= 0:
                token = gl.minimum(gl.maximum(ids, 0), num_pairs - 1) // top_k
                a_ptrs = x_ptr + token.to(gl.int64)[:, None] * stride_xt + k[None, :]
                live = ((t // n_tiles_n) * BLOCK_M + block_rows < row_end)[:, None]  # pad rows: zeros, no reads
                gate_row = e * 2 * I + (t % n_tiles_n) * BLOCK_N  # rows of w13 seen as [E * 2I, H]
                for ks in range(k_steps):
                    s = it % STAGES
                    mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                    # the last step's columns past H and pad rows: zeros (cp.async's zero-fill form)
                    cp_async_load(a_bufs.index(s), a_ptrs + ks * BLOCK_K, mask=live & (ks * BLOCK_K + k < H)[None, :])
                    async_copy.mbarrier_arrive(ready.index(s), increment_count=False)
                    b_slot = b_bufs.index(s)
                    mbarrier.expect(w_ready.index(s), 2 * BLOCK_N * BLOCK_K)  # e4m3: bytes = elements
                    tma_load(w_desc, [gate_row, ks * BLOCK_K], w_ready.index(s), b_slot.slice(0, BLOCK_N))
                    tma_load(w_desc, [gate_row + I, ks * BLOCK_K], w_ready.index(s), b_slot.slice(BLOCK_N, BLOCK_N))
                    it += 1
            t = t_next

    @gluon.jit
    def _l1_tile_loads(e, ids, t, n_tiles_n, expert_start_ptr, expert_count_ptr, x_scale_ptr, w_scale_ptr,
                       topk_weights_ptr, I, top_k, num_pairs, stride_se, stride_sn, stride_xst,
                       BLOCK_N: gl.constexpr, UP_SPLIT: gl.constexpr):
        """moe_gemm2_ws._tile_loads for L1: the expert's row end, the rows' x-scale pointers (by token)
        and first scales, the gate and up tiles' scale pointers and first scales (UP_SPLIT: also of the
        up tile's second scale block, clamped to the last one), the routing weights."""
        ec = gl.maximum(e, 0)
        row_end = _row_end(e, expert_start_ptr, expert_count_ptr)
        safe_ids = gl.minimum(gl.maximum(ids, 0), num_pairs - 1)
        xs_rows = x_scale_ptr + (safe_ids // top_k).to(gl.int64) * stride_xst
        n0 = (t % n_tiles_n) * BLOCK_N
        ws_expert = w_scale_ptr + ec.to(gl.int64) * stride_se
        ws_gate = ws_expert + (n0 // 128) * stride_sn
        ws_up = ws_expert + ((I + n0) // 128) * stride_sn
        ws_up_hi = ws_up
        if UP_SPLIT:
            ws_up_hi = ws_expert + gl.minimum((I + n0) // 128 + 1, (2 * I - 1) // 128) * stride_sn
        tw = gl.load(topk_weights_ptr + safe_ids)
        return (row_end, xs_rows, ws_gate, ws_up, ws_up_hi, gl.load(xs_rows), gl.load(ws_gate), gl.load(ws_up),
                gl.load(ws_up_hi), tw)

    @gluon.jit
    def _column_promoted_wgmma(acc, a_tile, b_tile, zero, a_s, w_s):
        """acc + (a_tile @ b_tile) * a_s[:, None] * w_s, w_s a scalar or [1, BN] column scales:
        gemm1_tile's promotion where the weight scale may vary along the tile
        (moe_tiles.act_weight_tile_dot), the same roundings."""
        part = warpgroup_mma(a_tile, b_tile, zero, use_acc=False, is_async=True)
        part = warpgroup_mma_wait(0, deps=(part, ))
        return acc + part * a_s[:, None] * w_s

    @gluon.jit
    def _l1_ws_consumer(w_scale_ptr, b_ptr, topk_weights_ptr, inter_ptr, sorted_ids_ptr, block_expert_ptr,
                        expert_start_ptr, expert_count_ptr, x_scale_ptr, inter_scale_ptr, a_bufs, b_bufs, ready,
                        w_ready, empty, tile_ids, tile_full, tile_free, I, top_k, num_pairs, stride_se, stride_sn,
                        stride_sk, stride_be, stride_xst, stride_ist, alpha, limit, up_offset, num_tiles, n_tiles_n,
                        k_steps, WG: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_LIMIT: gl.constexpr,
                        WEIGHT_BEFORE_DOWN: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                        BLOCK_K: gl.constexpr, STAGES: gl.constexpr, UP_SPLIT: gl.constexpr):
        HALF: gl.constexpr = BLOCK_M // 2
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BLOCK_N, 32])
        # the store: 16 e4m3 (16 bytes) per thread, 8 threads per 128-byte row
        store_l: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0])
        rows_l: gl.constexpr = gl.SliceLayout(1, mma)
        zero = gl.zeros([HALF, BLOCK_N], gl.float32, mma)
        half_rows = WG * HALF + gl.arange(0, HALF, layout=rows_l)
        store_rows = WG * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, store_l))
        store_cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, store_l))
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
        i = 0
        t = _receive_tile(tile_ids, tile_full, tile_free, i)
        e_next, ids_next = _tile_rows(t, num_tiles, n_tiles_n, block_expert_ptr, sorted_ids_ptr, half_rows, BLOCK_M)
        row_end_n, xs_rows_n, wsg_n, wsu_n, wsh_n, a_s_n, g_s_n, u_s_n, h_s_n, tw_n = _l1_tile_loads(
            e_next, ids_next, t, n_tiles_n, expert_start_ptr, expert_count_ptr, x_scale_ptr, w_scale_ptr,
            topk_weights_ptr, I, top_k, num_pairs, stride_se, stride_sn, stride_xst, BLOCK_N, UP_SPLIT)
        it = 0
        while t < num_tiles:
            i += 1
            t_next = _receive_tile(tile_ids, tile_full, tile_free, i)
            e = e_next
            ids = ids_next
            row_end = row_end_n
            xs_rows = xs_rows_n
            ws_gate = wsg_n
            ws_up = wsu_n
            ws_up_hi = wsh_n
            a_s_next = a_s_n
            g_s_next = g_s_n
            u_s_next = u_s_n
            h_s_next = h_s_n
            tw = tw_n
            e_next, ids_next = _tile_rows(t_next, num_tiles, n_tiles_n, block_expert_ptr, sorted_ids_ptr,
                                          half_rows, BLOCK_M)
            acc_gate = zero
            acc_up = zero
            half_live = (t // n_tiles_n) * BLOCK_M + WG * HALF < row_end  # else all padding
            if (e >= 0) & half_live:
                for ks in range(k_steps):
                    a_s = a_s_next
                    g_s = g_s_next
                    u_s = u_s_next
                    h_s = h_s_next
                    k_next = gl.minimum(ks + 1, k_steps - 1)  # the scales one K step ahead of the MMA
                    a_s_next = gl.load(xs_rows + k_next)
                    g_s_next = gl.load(ws_gate + k_next * stride_sk)
                    u_s_next = gl.load(ws_up + k_next * stride_sk)
                    if UP_SPLIT:
                        h_s_next = gl.load(ws_up_hi + k_next * stride_sk)
                    s = _wait_slot(ready, w_ready, it, STAGES)
                    a_tile = a_bufs.index(s).slice(WG * HALF, HALF)
                    b_gate = b_bufs.index(s).slice(0, BLOCK_N).permute((1, 0))
                    b_up = b_bufs.index(s).slice(BLOCK_N, BLOCK_N).permute((1, 0))
                    if UP_SPLIT:
                        acc_gate = _column_promoted_wgmma(acc_gate, a_tile, b_gate, zero, a_s, g_s)
                        acc_up = _column_promoted_wgmma(acc_up, a_tile, b_up, zero, a_s,
                                                        gl.where(cols < UP_SPLIT, u_s, h_s)[None, :])
                    else:
                        acc_gate = _promoted_wgmma(acc_gate, a_tile, b_gate, zero, a_s * g_s)
                        acc_up = _promoted_wgmma(acc_up, a_tile, b_up, zero, a_s * u_s)
                    mbarrier.arrive(empty.index(s), count=1)
                    it += 1
            elif e >= 0:
                it = _pass_slots(ready, empty, it, k_steps, STAGES)
            # the next tile's loads, in flight during this tile's epilogue
            row_end_n, xs_rows_n, wsg_n, wsu_n, wsh_n, a_s_n, g_s_n, u_s_n, h_s_n, tw_n = _l1_tile_loads(
                e_next, ids_next, t_next, n_tiles_n, expert_start_ptr, expert_count_ptr, x_scale_ptr, w_scale_ptr,
                topk_weights_ptr, I, top_k, num_pairs, stride_se, stride_sn, stride_xst, BLOCK_N, UP_SPLIT)
            if (e >= 0) & half_live:
                n = (t % n_tiles_n) * BLOCK_N + cols
                if HAS_BIAS:
                    acc_gate += gl.load(b_ptr + e * stride_be + n, mask=n < I, other=0.0).to(gl.float32)[None, :]
                    acc_up += gl.load(b_ptr + e * stride_be + I + n, mask=n < I, other=0.0).to(gl.float32)[None, :]
                if HAS_LIMIT:  # moe_common.swiglu_epilogue, silu: the same expressions
                    acc_gate = gl.minimum(acc_gate, limit)
                    acc_up = gl.minimum(gl.maximum(acc_up, -limit), limit)
                h = acc_gate * (1 / (1 + gl.exp(-(alpha * acc_gate)))) * (acc_up + up_offset)
                if WEIGHT_BEFORE_DOWN:
                    h *= tw.to(gl.float32)[:, None]
                live = (t // n_tiles_n) * BLOCK_M + half_rows < row_end
                h = gl.where(live[:, None] & (n < I)[None, :], h, 0.0)  # neither in the row's scale
                # moe_common.quantize_fp8_groups for one 128-column group
                scale = gl.max(gl.abs(h), axis=1) / 448.0
                scale = gl.where(scale == 0.0, 1.0, scale)
                scale = gl.where(gl.max((h != h).to(gl.int32), axis=1) > 0, float("nan"), scale)  # NaN stays NaN
                q = gl.minimum(gl.maximum(h / scale[:, None], -448.0), 448.0).to(gl.float8e4nv)
                q = gl.convert_layout(q, store_l)
                out_ids = gl.convert_layout(ids, gl.SliceLayout(1, store_l))
                row_mask = (t // n_tiles_n) * BLOCK_M + store_rows < row_end
                out_cols = (t % n_tiles_n) * BLOCK_N + store_cols
                out = inter_ptr + out_ids.to(gl.int64)[:, None] * I + out_cols[None, :]
                gl.store(out, q, mask=row_mask[:, None] & (out_cols < I)[None, :])
                gl.store(inter_scale_ptr + ids.to(gl.int64) * stride_ist + (t % n_tiles_n) * (BLOCK_N // 128), scale,
                         mask=live)
            t = t_next

    @gluon.jit
    def moe_gemm1_fp8_ws_kernel(
        x_ptr, w_desc, w_scale_ptr, b_ptr, topk_weights_ptr, inter_ptr,
        sorted_ids_ptr, block_expert_ptr, expert_start_ptr, expert_count_ptr, x_scale_ptr, inter_scale_ptr,
        counter_ptr, H, I, top_k, num_pairs, max_blocks,
        stride_xt, stride_se, stride_sn, stride_sk, stride_be, stride_xst, stride_ist,
        alpha, limit, up_offset,
        HAS_BIAS: gl.constexpr, HAS_LIMIT: gl.constexpr, WEIGHT_BEFORE_DOWN: gl.constexpr, BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, USE_PDL: gl.constexpr,
        UP_SPLIT: gl.constexpr = 0,
    ):
        a_bufs, b_bufs, ready, w_ready, empty = _slot_ring(BLOCK_M, 2 * BLOCK_N, BLOCK_K, STAGES, gl.float8e4nv, 8)
        tile_ids, tile_full, tile_free = _tile_schedule_buffers()
        _tile_schedule_init(tile_full, tile_free)
        _pdl_wait(USE_PDL)
        n_tiles_n = gl.cdiv(I, BLOCK_N)
        num_tiles = max_blocks * n_tiles_n
        k_steps = gl.cdiv(H, BLOCK_K)
        gl.warp_specialize([
            (_l1_ws_consumer, (w_scale_ptr, b_ptr, topk_weights_ptr, inter_ptr, sorted_ids_ptr, block_expert_ptr,
                               expert_start_ptr, expert_count_ptr, x_scale_ptr, inter_scale_ptr, a_bufs, b_bufs, ready,
                               w_ready, empty, tile_ids, tile_full, tile_free, I, top_k, num_pairs, stride_se,
                               stride_sn, stride_sk, stride_be, stride_xst, stride_ist, alpha, limit, up_offset,
                               num_tiles, n_tiles_n, k_steps, 0, HAS_BIAS, HAS_LIMIT, WEIGHT_BEFORE_DOWN, BLOCK_M,
                               BLOCK_N, BLOCK_K, STAGES, UP_SPLIT)),
            (_l1_ws_consumer, (w_scale_ptr, b_ptr, topk_weights_ptr, inter_ptr, sorted_ids_ptr, block_expert_ptr,
                               expert_start_ptr, expert_count_ptr, x_scale_ptr, inter_scale_ptr, a_bufs, b_bufs, ready,
                               w_ready, empty, tile_ids, tile_full, tile_free, I, top_k, num_pairs, stride_se,
                               stride_sn, stride_sk, stride_be, stride_xst, stride_ist, alpha, limit, up_offset,
                               num_tiles, n_tiles_n, k_steps, 1, HAS_BIAS, HAS_LIMIT, WEIGHT_BEFORE_DOWN, BLOCK_M,
                               BLOCK_N, BLOCK_K, STAGES, UP_SPLIT)),
            (_l1_ws_producer, (x_ptr, w_desc, sorted_ids_ptr, block_expert_ptr, expert_start_ptr, expert_count_ptr,
                               a_bufs, b_bufs, ready, w_ready,
                               empty, counter_ptr, tile_ids, tile_full, tile_free, H, I, top_k, num_pairs, stride_xt,
                               num_tiles, n_tiles_n, k_steps, BLOCK_M, BLOCK_N, BLOCK_K, STAGES)),
        ], [4, PRODUCER_WARPS], [CONSUMER_REGISTERS, PRODUCER_REGISTERS])
