"""L2 for dense (bf16 / fp16) experts as a warp-specialised persistent kernel.

# The fp8 x fp8 L2's structure (moe_gemm2_ws.py says why) -- its producer, ring and tile counter --
# on 16-bit operands: a K step is 64 elements (one 128-byte row, as the fp8 step's 128).  Without
# block scales there is nothing to promote: each consumer warpgroup accumulates in the wgmma's own
# registers and keeps one K step's MMAs in flight (waits for the step before, then frees that
# step's slot).  Tiles are 128 x 256: at n = 128 the MMAs' operand reads plus the ring's fills
# outran shared memory's bandwidth (measured slower than the Triton L2).  What it buys over the
# Triton L2 is the persistent walk: the producer loads the next tile during this one's epilogue,
# which pays where K is short (lowering/moe_ws.py: ws_l2_reason says where it runs and why; at
# long K both are bound by L2-cache bandwidth, benchmarks/NOTES.md).  N tiles past H are computed
# whole and stored masked (the TMA box past an expert's rows reads the next expert's, or zeros
# past the last).  Epilogue as gemm2_tile's for dense activations (bias, routing weight, one
# rounding to the output dtype), so the Triton kernel's bits.
# Takes: the intermediate [T*k, I] and w2 [E, H, I] in one dtype, K contiguous, experts back to
# back (one TMA descriptor); I % BK == 0; a zeroed int32 tile counter.
"""

from .moe_gemm2_ws import HAS_GLUON

if HAS_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

    from .moe_gemm2_ws import (CONSUMER_REGISTERS, PRODUCER_REGISTERS, PRODUCER_WARPS, _l2_epilogue, _l2_ws_producer,
                               _pass_slots, _pdl_wait, _receive_tile, _row_end, _slot_ring, _tile_rows,
                               _tile_schedule_buffers, _tile_schedule_init, _wait_slot)

    @gluon.jit
    def _row_end_and_weight(e, ids, expert_start_ptr, expert_count_ptr, topk_weights_ptr, num_pairs):
        """What a consumer needs of a tile beyond its ids, loaded during the previous tile's epilogue:
        one past the expert's last row, the rows' routing weights (clamped ids: pad rows are masked at
        the store)."""
        row_end = _row_end(e, expert_start_ptr, expert_count_ptr)
        return row_end, gl.load(topk_weights_ptr + gl.minimum(gl.maximum(ids, 0), num_pairs - 1))

    @gluon.jit
    def _free_step(empty, it, STAGES: gl.constexpr):
        """Consumer: K step ``it``'s MMAs are done reading its slot."""
        mbarrier.arrive(empty.index(it % STAGES), count=1)

    @gluon.jit
    def _l2_dense_consumer(b_ptr, topk_weights_ptr, rows_out_ptr, sorted_ids_ptr, block_expert_ptr, expert_start_ptr,
                           expert_count_ptr, a_bufs, b_bufs, ready, w_ready, empty, tile_ids, tile_full, tile_free,
                           H, num_pairs, stride_be, num_tiles, n_tiles_n, k_steps, WG: gl.constexpr,
                           HAS_BIAS: gl.constexpr, WEIGHT_AFTER_DOWN: gl.constexpr, BLOCK_M: gl.constexpr,
                           BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        HALF: gl.constexpr = BLOCK_M // 2
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BLOCK_N, 16])
        zero = gl.zeros([HALF, BLOCK_N], gl.float32, mma)
        half_rows = WG * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, mma))
        i = 0
        t = _receive_tile(tile_ids, tile_full, tile_free, i)
        e_next, ids_next = _tile_rows(t, num_tiles, n_tiles_n, block_expert_ptr, sorted_ids_ptr, half_rows, BLOCK_M)
        row_end_n, tw_n = _row_end_and_weight(e_next, ids_next, expert_start_ptr, expert_count_ptr, topk_weights_ptr,
                                              num_pairs)
        it = 0
        while t < num_tiles:
            i += 1
            t_next = _receive_tile(tile_ids, tile_full, tile_free, i)
            e = e_next
            ids = ids_next
            row_end = row_end_n
            tw = tw_n
            e_next, ids_next = _tile_rows(t_next, num_tiles, n_tiles_n, block_expert_ptr, sorted_ids_ptr,
                                          half_rows, BLOCK_M)
            acc = zero
            half_live = (t // n_tiles_n) * BLOCK_M + WG * HALF < row_end  # else all padding
            if (e >= 0) & half_live:
                for ks in range(k_steps):
                    s = _wait_slot(ready, w_ready, it, STAGES)
                    acc = warpgroup_mma(a_bufs.index(s).slice(WG * HALF, HALF), b_bufs.index(s).permute((1, 0)), acc,
                                        is_async=True)
                    acc = warpgroup_mma_wait(1, deps=(acc, ))  # the step before is done
                    if ks > 0:
                        _free_step(empty, it - 1, STAGES)
                    it += 1
                acc = warpgroup_mma_wait(0, deps=(acc, ))
                _free_step(empty, it - 1, STAGES)
            elif e >= 0:
                it = _pass_slots(ready, empty, it, k_steps, STAGES)
            row_end_n, tw_n = _row_end_and_weight(e_next, ids_next, expert_start_ptr, expert_count_ptr,
                                                  topk_weights_ptr, num_pairs)
            if (e >= 0) & half_live:
                _l2_epilogue(acc, e, ids, tw, (t % n_tiles_n) * BLOCK_N, (t // n_tiles_n) * BLOCK_M, row_end, b_ptr,
                             rows_out_ptr, H, stride_be, WG, HALF, BLOCK_N, HAS_BIAS, WEIGHT_AFTER_DOWN)
            t = t_next

    @gluon.jit
    def moe_gemm2_dense_ws_kernel(
        inter_ptr, w_desc, b_ptr, topk_weights_ptr, rows_out_ptr, sorted_ids_ptr, block_expert_ptr, expert_start_ptr,
        expert_count_ptr, counter_ptr, H, I, num_pairs, max_blocks, ticket_base, stride_be,
        HAS_BIAS: gl.constexpr, WEIGHT_AFTER_DOWN: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        BLOCK_K: gl.constexpr, STAGES: gl.constexpr, USE_PDL: gl.constexpr,
    ):
        DTYPE: gl.constexpr = inter_ptr.dtype.element_ty
        a_bufs, b_bufs, ready, w_ready, empty = _slot_ring(BLOCK_M, BLOCK_N, BLOCK_K, STAGES, DTYPE, 16)
        tile_ids, tile_full, tile_free = _tile_schedule_buffers()
        _tile_schedule_init(tile_full, tile_free)
        _pdl_wait(USE_PDL)
        n_tiles_n = gl.cdiv(H, BLOCK_N)
        num_tiles = max_blocks * n_tiles_n
        k_steps = I // BLOCK_K
        gl.warp_specialize([
            (_l2_dense_consumer, (b_ptr, topk_weights_ptr, rows_out_ptr, sorted_ids_ptr, block_expert_ptr,
                                  expert_start_ptr, expert_count_ptr, a_bufs, b_bufs, ready, w_ready, empty, tile_ids,
                                  tile_full, tile_free, H, num_pairs, stride_be, num_tiles, n_tiles_n, k_steps, 0,
                                  HAS_BIAS, WEIGHT_AFTER_DOWN, BLOCK_M, BLOCK_N, STAGES)),
            (_l2_dense_consumer, (b_ptr, topk_weights_ptr, rows_out_ptr, sorted_ids_ptr, block_expert_ptr,
                                  expert_start_ptr, expert_count_ptr, a_bufs, b_bufs, ready, w_ready, empty, tile_ids,
                                  tile_full, tile_free, H, num_pairs, stride_be, num_tiles, n_tiles_n, k_steps, 1,
                                  HAS_BIAS, WEIGHT_AFTER_DOWN, BLOCK_M, BLOCK_N, STAGES)),
            (_l2_ws_producer, (inter_ptr, w_desc, sorted_ids_ptr, block_expert_ptr, expert_start_ptr, expert_count_ptr,
                               a_bufs, b_bufs, ready, w_ready,
                               empty, counter_ptr, ticket_base, tile_ids, tile_full, tile_free, H, I, num_pairs,
                               num_tiles, n_tiles_n, k_steps, BLOCK_M, BLOCK_N, BLOCK_K, STAGES, 2)),
        ], [4, PRODUCER_WARPS], [CONSUMER_REGISTERS, PRODUCER_REGISTERS])
