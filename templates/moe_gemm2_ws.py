"""L2 for fp8 x fp8 (block-128 weights and activations) as a warp-specialised persistent kernel.

# Why (benchmarks/NOTES.md, "Seven ways", items 5-6): DeepSeek's format needs every K step's fp32
# partial promoted into the accumulator times (activation row scale x weight tile scale).  In one
# Triton program all warps pass the same CTA barriers each K step, so the promotion stalls the
# tensor cores.  Here (Gluon, sm_90) the warps are split by role and synchronised by mbarriers
# only, so the two consumer warpgroups drift apart and one's promotion overlaps the other's MMA:
#
#   producer (4 warps): per K step, cp.async of the M-block's gathered intermediate rows [BM, BK]
#     into a ring of STAGES shared-memory slots (each thread's copies arrive on the slot's `ready`
#     mbarrier when they land, count: the producer's 128 threads) and a TMA copy of the weight
#     tile [BN, BK] (bytes counted on `w_ready`).
#   consumer warpgroup g (4 warps each, g = 0, 1): rows [g * BM/2, +BM/2) of the block; per K step
#     and 128 columns (one weight scale block) one e4m3 x e4m3 wgmma from shared memory, wait,
#     promote; then release the slot (`empty`, count 2).  A 256-column tile runs its two halves one
#     after the other (L1's gate / up order): two accumulators and one partial fit the registers,
#     and the tile's fixed cost (epilogue, next tile's start, the gathered rows) is spread over
#     twice the MMAs (benchmarks/NOTES.md: 15-18% off the kernel at 128 columns).
#     Epilogue as gemm2_tile: bias, routing weight, bf16 rows at the pairs' own output rows.  A
#     warpgroup whose rows of the block are all padding (an expert's last block of <= 64 rows)
#     releases the tile's slots without MMAs (_pass_slots): the other has the tensor cores alone.
#
# Persistent: the tiles are max_blocks x (H / BN), N tiles fastest, and each program takes its next
# one from a grid-wide counter (_publish_tile), so tiles start in id order as a non-persistent
# grid's do (a static p, p + G, ... walk let the programs drift apart, and the M-blocks sharing a
# weight tile then re-read it from DRAM: 2.7x the bytes at dsv4-flash T = 16384).  The producer
# takes the ids a tile ahead and hands them to the consumers through shared memory; blocks
# without an expert (-1) are skipped by every partition alike, so the ring's slot and phase
# counters agree.  The producer runs up to STAGES steps ahead, into the next tile while the
# consumers store the last one.
# I = 128n + 64 (gpt-oss): the last K step's intermediate columns past I are copied as zeros (TMA
# zero-fills the weight's), as are the pad rows of an expert's last block (no reads for them);
# H % BN != 0 (N_TAIL): the last N tile is computed whole and
# stored masked, a 128-column half of it wholly past H promoted with 1.0 for its missing scales.
# Takes: e4m3 intermediate [T*k, I] with fp32 scales [T*k, ceil(I/128)], e4m3 weights [E, H, I]
# with K contiguous and experts back to back (one TMA descriptor of [E * H, I]) and fp32 scales
# [E, ceil(H/128), ceil(I/128)]; H and I multiples of 64, BN 128 or 256; a zeroed int32 tile counter.
"""

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                   warpgroup_mma_wait)

    # cp.async of a pointer tile / a TMA box into shared memory: async_load in newer triton (3.9),
    # the older names in 3.6
    cp_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
    tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    HAS_GLUON = True
except ImportError:  # pragma: no cover - triton without Gluon
    HAS_GLUON = False

# registers per thread: maxnreg for the kernel's 12 warps, then the two worker partitions'
# (consumer warpgroup 1, producer); the default partition (consumer warpgroup 0) gets the rest
MAX_REGISTERS = 168


if HAS_GLUON:
    PRODUCER_WARPS = gl.constexpr(4)
    CONSUMER_REGISTERS, PRODUCER_REGISTERS = gl.constexpr(208), gl.constexpr(88)

    @gluon.jit
    def _pdl_wait(USE_PDL: gl.constexpr):
        if USE_PDL:
            gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _tile_rows(t, num_tiles, n_tiles_n, block_expert_ptr, sorted_ids_ptr, rows,
                   BLOCK_M: gl.constexpr):
        """(expert or -1, sorted ids of ``rows`` of the M-block) of tile t (-1 past the list).  Loaded
        a tile ahead: the ids of pad rows are whatever align left there, so they are clamped, not
        masked by the expert's row count (a load that would wait for the expert's)."""
        live = t < num_tiles
        pid_m = gl.where(live, t, 0) // n_tiles_n
        e = gl.load(block_expert_ptr + pid_m, mask=live, other=-1)
        ids = gl.load(sorted_ids_ptr + pid_m * BLOCK_M + rows)
        return e, ids

    @gluon.jit
    def _row_end(e, expert_start_ptr, expert_count_ptr):
        """One past expert e's last row (any valid value where e is -1)."""
        ec = gl.maximum(e, 0)
        return gl.load(expert_start_ptr + ec) + gl.load(expert_count_ptr + ec)

    @gluon.jit
    def _slot_ring(BLOCK_M: gl.constexpr, W_ROWS: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
                   DTYPE: gl.constexpr, ELEM_BITS: gl.constexpr):
        """The K-step ring: STAGES slots of [BLOCK_M, BLOCK_K] gathered rows and [W_ROWS, BLOCK_K] weight
        rows (DTYPE, one 128-byte row per K step, 128-byte swizzle: wgmma's and the TMA box's layout),
        and their barriers: `ready` (the producer's 128 cp.async arrivals), `w_ready` (the weight TMA's
        bytes), `empty` (both consumer warpgroups)."""
        smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=ELEM_BITS, rank=2)
        a_bufs = gl.allocate_shared_memory(DTYPE, [STAGES, BLOCK_M, BLOCK_K], smem)
        b_bufs = gl.allocate_shared_memory(DTYPE, [STAGES, W_ROWS, BLOCK_K], smem)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        w_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=PRODUCER_WARPS * 32)
            mbarrier.init(w_ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)
        return a_bufs, b_bufs, ready, w_ready, empty

    @gluon.jit
    def _wait_slot(ready, w_ready, it, STAGES: gl.constexpr):
        """Consumer: wait until K step ``it``'s slot holds both operands (returns the slot)."""
        s = it % STAGES
        mbarrier.wait(ready.index(s), (it // STAGES) & 1)
        mbarrier.wait(w_ready.index(s), (it // STAGES) & 1)
        fence_async_shared()  # cp.async wrote the rows through the generic proxy
        return s

    @gluon.jit
    def _pass_slots(ready, empty, it, k_steps, STAGES: gl.constexpr):
        """Consumer: a tile whose rows in this warpgroup's half are all padding (an expert's last
        block): each K step's slot is waited for (so the release lands in the slot's current phase)
        and released without MMAs, leaving the tensor cores to the other warpgroup.  Returns the
        ring position after the tile."""
        for _ in range(k_steps):
            s = it % STAGES
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            mbarrier.arrive(empty.index(s), count=1)
            it += 1
        return it

    @gluon.jit
    def _publish_tile(counter_ptr, ticket_base, tile_ids, tile_full, tile_free, i):
        """Producer: the CTA's i-th tile is the next ticket of the grid's counter (less ``ticket_base``,
        where an earlier kernel counted first), handed to the consumers through slot i % 2.  Tiles
        start in id order across the grid, as a non-persistent grid's do: the M-blocks that read the
        same weight tile run it together, not a drift of K steps apart (L2 hits, not DRAM re-reads)."""
        s = i % 2
        mbarrier.wait(tile_free.index(s), ((i // 2) & 1) ^ 1)
        t = gl.atomic_add(counter_ptr, 1) - ticket_base
        tile_ids.index(s).store(gl.full([1], t, gl.int32, gl.BlockedLayout([1], [32], [4], [0])))
        mbarrier.arrive(tile_full.index(s), count=1)
        return t

    @gluon.jit
    def _receive_tile(tile_ids, tile_full, tile_free, i):
        """Consumer: the CTA's i-th tile id (_publish_tile)."""
        s = i % 2
        mbarrier.wait(tile_full.index(s), (i // 2) & 1)
        t = gl.max(tile_ids.index(s).load(gl.BlockedLayout([1], [32], [4], [0])), axis=0)
        mbarrier.arrive(tile_free.index(s), count=1)
        return t

    @gluon.jit
    def _tile_schedule_buffers():
        """Two tile-id slots and their full / free barriers (_publish_tile, _receive_tile)."""
        tile_ids = gl.allocate_shared_memory(gl.int32, [2, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        tile_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        tile_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        return tile_ids, tile_full, tile_free

    @gluon.jit
    def _tile_schedule_init(tile_full, tile_free):
        """The tile-id slots' barriers: one publisher, two consumer warpgroups."""
        for i in gl.static_range(2):
            mbarrier.init(tile_full.index(i), count=1)
            mbarrier.init(tile_free.index(i), count=2)

    @gluon.jit
    def _l2_ws_producer(inter_ptr, w_desc, sorted_ids_ptr, block_expert_ptr, expert_start_ptr, expert_count_ptr,
                        a_bufs, b_bufs, ready, w_ready, empty, counter_ptr, ticket_base, tile_ids, tile_full,
                        tile_free, H, I, num_pairs, num_tiles, n_tiles_n, k_steps, BLOCK_M: gl.constexpr,
                        BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, ELEM_BYTES: gl.constexpr):
        # one 16-byte cp.async per thread, 8 threads per 128-byte row (BLOCK_K elements), 4 warps
        layout: gl.constexpr = gl.BlockedLayout([1, 16 // ELEM_BYTES], [4, 8], [4, 1], [1, 0])
        rows_l: gl.constexpr = gl.SliceLayout(1, layout)
        k = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, layout))
        block_rows = gl.arange(0, BLOCK_M, layout=rows_l)
        i = 0
        t = _publish_tile(counter_ptr, ticket_base, tile_ids, tile_full, tile_free, i)
        e_next, ids_next = _tile_rows(t, num_tiles, n_tiles_n, block_expert_ptr, sorted_ids_ptr, block_rows, BLOCK_M)
        end_next = _row_end(e_next, expert_start_ptr, expert_count_ptr)
        it = 0
        while t < num_tiles:
            i += 1
            t_next = _publish_tile(counter_ptr, ticket_base, tile_ids, tile_full, tile_free, i)
            e = e_next
            ids = ids_next
            row_end = end_next
            e_next, ids_next = _tile_rows(t_next, num_tiles, n_tiles_n, block_expert_ptr, sorted_ids_ptr,
                                          block_rows, BLOCK_M)
            end_next = _row_end(e_next, expert_start_ptr, expert_count_ptr)
            if e >= 0:
                entry = gl.minimum(gl.maximum(ids, 0), num_pairs - 1)
                a_ptrs = inter_ptr + entry.to(gl.int64)[:, None] * I + k[None, :]
                live = ((t // n_tiles_n) * BLOCK_M + block_rows < row_end)[:, None]  # pad rows: zeros, no reads
                w_row = e * H + (t % n_tiles_n) * BLOCK_N  # rows of w2 seen as [E * H, I]
                for ks in range(k_steps):
                    s = it % STAGES
                    mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                    # the last step's columns past I and pad rows: zeros (cp.async's zero-fill form)
                    cp_async_load(a_bufs.index(s), a_ptrs + ks * BLOCK_K, mask=live & (ks * BLOCK_K + k < I)[None, :])
                    async_copy.mbarrier_arrive(ready.index(s), increment_count=False)
                    mbarrier.expect(w_ready.index(s), BLOCK_N * BLOCK_K * ELEM_BYTES)
                    tma_load(w_desc, [w_row, ks * BLOCK_K], w_ready.index(s), b_bufs.index(s))
                    it += 1
            t = t_next

    @gluon.jit
    def _tile_loads(e, ids, t, n_tiles_n, expert_start_ptr, expert_count_ptr, inter_scale_ptr, w_scale_ptr,
                    topk_weights_ptr, H, num_pairs, stride_se, stride_sn, stride_ist, BLOCK_N: gl.constexpr,
                    N_TAIL: gl.constexpr):
        """What a consumer needs of tile t beyond its ids, issued before the previous tile's epilogue:
        one past the expert's last row, the rows' activation-scale pointers and first scales, the
        weight tile's scale pointer and the first scales of its (one or two) 128-row scale blocks
        (N_TAIL: a second block wholly past H has none, 1.0: its columns are not stored), the routing
        weights (clamped ids: pad rows are masked at the store)."""
        ec = gl.maximum(e, 0)
        row_end = _row_end(e, expert_start_ptr, expert_count_ptr)
        safe_ids = gl.minimum(gl.maximum(ids, 0), num_pairs - 1)
        as_rows = inter_scale_ptr + safe_ids.to(gl.int64) * stride_ist
        ws_base = w_scale_ptr + ec.to(gl.int64) * stride_se + ((t % n_tiles_n) * BLOCK_N // 128) * stride_sn
        tw = gl.load(topk_weights_ptr + safe_ids)
        ws_hi = ws_base + (BLOCK_N // 128 - 1) * stride_sn
        if N_TAIL:
            w_hi = gl.load(ws_hi, mask=(t % n_tiles_n) * BLOCK_N + BLOCK_N - 128 < H, other=1.0)
        else:
            w_hi = gl.load(ws_hi)
        return row_end, as_rows, ws_base, gl.load(as_rows), gl.load(ws_base), w_hi, tw

    @gluon.jit
    def _promoted_wgmma(acc, a_tile, b_tile, zero, scale):
        """acc + (a_tile @ b_tile) * scale[:, None], the fp32 partial of one K step (the Triton tiles'
        order)."""
        part = warpgroup_mma(a_tile, b_tile, zero, use_acc=False, is_async=True)
        part = warpgroup_mma_wait(0, deps=(part, ))
        return acc + part * scale[:, None]

    @gluon.jit
    def _l2_epilogue(acc, e, ids, tw, n0, first_row, row_end, b_ptr, out_ptr, H, stride_be, WG: gl.constexpr,
                     HALF: gl.constexpr, COLS: gl.constexpr, HAS_BIAS: gl.constexpr,
                     WEIGHT_AFTER_DOWN: gl.constexpr):
        """gemm2_tile's epilogue on a warpgroup's [HALF, COLS] accumulator at columns n0..: bias, routing
        weight, one rounding to the output dtype, stored at the pairs' own rows (out rows of length H;
        the expert's live rows and the columns below H only), 16 bytes per thread, 16 threads per 256
        bytes of a row."""
        store_l: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
        if HAS_BIAS:
            n = n0 + gl.arange(0, COLS, layout=gl.SliceLayout(0, acc.type.layout))
            acc += gl.load(b_ptr + e * stride_be + n, mask=n < H, other=0.0).to(gl.float32)[None, :]
        if WEIGHT_AFTER_DOWN:
            acc *= tw.to(gl.float32)[:, None]
        rows = WG * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, store_l))
        cols = n0 + gl.arange(0, COLS, layout=gl.SliceLayout(0, store_l))
        vals = gl.convert_layout(acc.to(out_ptr.dtype.element_ty), store_l)
        out_ids = gl.convert_layout(ids, gl.SliceLayout(1, store_l))
        mask = (first_row + rows < row_end)[:, None] & (cols < H)[None, :]
        gl.store(out_ptr + out_ids.to(gl.int64)[:, None] * H + cols[None, :], vals, mask=mask)

    @gluon.jit
    def _l2_ws_consumer(w_scale_ptr, b_ptr, topk_weights_ptr, rows_out_ptr, sorted_ids_ptr, block_expert_ptr,
                        expert_start_ptr, expert_count_ptr, inter_scale_ptr, a_bufs, b_bufs, ready, w_ready, empty,
                        tile_ids, tile_full, tile_free, H, num_pairs, stride_se, stride_sn, stride_sk, stride_be,
                        stride_ist, num_tiles, n_tiles_n, k_steps, WG: gl.constexpr, HAS_BIAS: gl.constexpr,
                        WEIGHT_AFTER_DOWN: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                        BLOCK_K: gl.constexpr, STAGES: gl.constexpr, N_TAIL: gl.constexpr):
        HALF: gl.constexpr = BLOCK_M // 2
        # a 256-column tile is two 128-column wgmmas, one weight scale block each, promoted one at a
        # time (L1's gate / up order): two accumulators and one partial fit a consumer's registers
        WIDE: gl.constexpr = BLOCK_N == 256
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 128, 32])
        rows_l: gl.constexpr = gl.SliceLayout(1, mma)
        zero = gl.zeros([HALF, 128], gl.float32, mma)
        half_rows = WG * HALF + gl.arange(0, HALF, layout=rows_l)
        i = 0
        t = _receive_tile(tile_ids, tile_full, tile_free, i)
        e_next, ids_next = _tile_rows(t, num_tiles, n_tiles_n, block_expert_ptr, sorted_ids_ptr, half_rows, BLOCK_M)
        row_end_n, as_rows_n, ws_base_n, a_s_n, w_s_n, w_hi_n, tw_n = _tile_loads(
            e_next, ids_next, t, n_tiles_n, expert_start_ptr, expert_count_ptr, inter_scale_ptr, w_scale_ptr,
            topk_weights_ptr, H, num_pairs, stride_se, stride_sn, stride_ist, BLOCK_N, N_TAIL)
        it = 0
        while t < num_tiles:
            i += 1
            t_next = _receive_tile(tile_ids, tile_full, tile_free, i)
            e = e_next
            ids = ids_next
            row_end = row_end_n
            as_rows = as_rows_n
            ws_base = ws_base_n
            a_s_next = a_s_n
            w_s_next = w_s_n
            w_hi_next = w_hi_n
            tw = tw_n
            e_next, ids_next = _tile_rows(t_next, num_tiles, n_tiles_n, block_expert_ptr, sorted_ids_ptr,
                                          half_rows, BLOCK_M)
            acc = zero
            acc_hi = zero
            half_live = (t // n_tiles_n) * BLOCK_M + WG * HALF < row_end  # else all padding
            if (e >= 0) & half_live:
                for ks in range(k_steps):
                    a_s = a_s_next
                    w_s = w_s_next
                    w_hi = w_hi_next
                    k_next = gl.minimum(ks + 1, k_steps - 1)  # the scales one K step ahead of the MMA
                    a_s_next = gl.load(as_rows + k_next)
                    w_s_next = gl.load(ws_base + k_next * stride_sk)
                    if WIDE and N_TAIL:
                        w_hi_next = gl.load(ws_base + stride_sn + k_next * stride_sk,
                                            mask=(t % n_tiles_n) * BLOCK_N + 128 < H, other=1.0)
                    elif WIDE:
                        w_hi_next = gl.load(ws_base + stride_sn + k_next * stride_sk)
                    s = _wait_slot(ready, w_ready, it, STAGES)
                    a_tile = a_bufs.index(s).slice(WG * HALF, HALF)
                    b_slot = b_bufs.index(s)
                    acc = _promoted_wgmma(acc, a_tile, b_slot.slice(0, 128).permute((1, 0)), zero, a_s * w_s)
                    if WIDE:
                        acc_hi = _promoted_wgmma(acc_hi, a_tile, b_slot.slice(128, 128).permute((1, 0)), zero,
                                                 a_s * w_hi)
                    mbarrier.arrive(empty.index(s), count=1)
                    it += 1
            elif e >= 0:
                it = _pass_slots(ready, empty, it, k_steps, STAGES)
            # the next tile's loads, in flight during this tile's epilogue
            row_end_n, as_rows_n, ws_base_n, a_s_n, w_s_n, w_hi_n, tw_n = _tile_loads(
                e_next, ids_next, t_next, n_tiles_n, expert_start_ptr, expert_count_ptr, inter_scale_ptr,
                w_scale_ptr, topk_weights_ptr, H, num_pairs, stride_se, stride_sn, stride_ist, BLOCK_N, N_TAIL)
            if (e >= 0) & half_live:
                n0 = (t % n_tiles_n) * BLOCK_N
                first_row = (t // n_tiles_n) * BLOCK_M
                _l2_epilogue(acc, e, ids, tw, n0, first_row, row_end, b_ptr, rows_out_ptr, H, stride_be, WG, HALF,
                             128, HAS_BIAS, WEIGHT_AFTER_DOWN)
                if WIDE:
                    _l2_epilogue(acc_hi, e, ids, tw, n0 + 128, first_row, row_end, b_ptr, rows_out_ptr, H, stride_be,
                                 WG, HALF, 128, HAS_BIAS, WEIGHT_AFTER_DOWN)
            t = t_next

    @gluon.jit
    def moe_gemm2_fp8_ws_kernel(
        inter_ptr, w_desc, w_scale_ptr, b_ptr, topk_weights_ptr, rows_out_ptr,
        sorted_ids_ptr, block_expert_ptr, expert_start_ptr, expert_count_ptr, inter_scale_ptr, counter_ptr,
        H, I, num_pairs, max_blocks, ticket_base,
        stride_se, stride_sn, stride_sk, stride_be, stride_ist,
        HAS_BIAS: gl.constexpr, WEIGHT_AFTER_DOWN: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        BLOCK_K: gl.constexpr, STAGES: gl.constexpr, USE_PDL: gl.constexpr, N_TAIL: gl.constexpr = False,
    ):
        a_bufs, b_bufs, ready, w_ready, empty = _slot_ring(BLOCK_M, BLOCK_N, BLOCK_K, STAGES, gl.float8e4nv, 8)
        tile_ids, tile_full, tile_free = _tile_schedule_buffers()
        _tile_schedule_init(tile_full, tile_free)
        _pdl_wait(USE_PDL)
        n_tiles_n = gl.cdiv(H, BLOCK_N)
        num_tiles = max_blocks * n_tiles_n
        k_steps = gl.cdiv(I, BLOCK_K)
        gl.warp_specialize([
            (_l2_ws_consumer, (w_scale_ptr, b_ptr, topk_weights_ptr, rows_out_ptr, sorted_ids_ptr, block_expert_ptr,
                               expert_start_ptr, expert_count_ptr, inter_scale_ptr, a_bufs, b_bufs, ready, w_ready,
                               empty, tile_ids, tile_full, tile_free, H, num_pairs, stride_se, stride_sn, stride_sk,
                               stride_be, stride_ist, num_tiles, n_tiles_n, k_steps, 0, HAS_BIAS, WEIGHT_AFTER_DOWN,
                               BLOCK_M, BLOCK_N, BLOCK_K, STAGES, N_TAIL)),
            (_l2_ws_consumer, (w_scale_ptr, b_ptr, topk_weights_ptr, rows_out_ptr, sorted_ids_ptr, block_expert_ptr,
                               expert_start_ptr, expert_count_ptr, inter_scale_ptr, a_bufs, b_bufs, ready, w_ready,
                               empty, tile_ids, tile_full, tile_free, H, num_pairs, stride_se, stride_sn, stride_sk,
                               stride_be, stride_ist, num_tiles, n_tiles_n, k_steps, 1, HAS_BIAS, WEIGHT_AFTER_DOWN,
                               BLOCK_M, BLOCK_N, BLOCK_K, STAGES, N_TAIL)),
            (_l2_ws_producer, (inter_ptr, w_desc, sorted_ids_ptr, block_expert_ptr, expert_start_ptr, expert_count_ptr,
                               a_bufs, b_bufs, ready, w_ready,
                               empty, counter_ptr, ticket_base, tile_ids, tile_full, tile_free, H, I, num_pairs,
                               num_tiles, n_tiles_n, k_steps, BLOCK_M, BLOCK_N, BLOCK_K, STAGES, 1)),
        ], [4, PRODUCER_WARPS], [CONSUMER_REGISTERS, PRODUCER_REGISTERS])
