"""The MoE's FP4 GEMMs at prefill sizes on Hopper: fp4_gemm_ws's decode-into-wgmma consumer with a
gathering producer (Gluon, sm_90a).

# T: tokens, k: experts per token, H: hidden, I: expert intermediate size, E: experts.
# Why: the Triton FP4 MoE tiles decode the weight in the warps that also wait on the MMAs; the
# dense FP4 GEMM measured 1.1-1.55x bf16 that way and 0.94-1.06x with the warps split by role
# (fp4_gemm_ws.py, benchmarks/NOTES_fp4.md).  Here the same consumer runs the two expert GEMMs:
#
#   producer (4 warps): per K step of 64, cp.async of the M-block's token rows [TOKENS, 64] (bf16,
#     128-byte swizzle: wgmma's B operand) gathered by sorted id -- x[id // k] for L1, the
#     intermediate's row id for L2 -- arriving on `a_ready`, and TMA copies of the tile's packed
#     weight and scales (fp4_ws_weight_layout of the expert's rows) counted on `w_ready`.
#   consumer warpgroup g (g = 0, 1): weight rows [64 g, +64) of the tile's 128, decoded from shared
#     memory into wgmma's A registers, out^T[64 rows, TOKENS] += W @ X^T, the next step decoded
#     while the MMAs run (fp4_gemm_ws._consumer's loop).
#   Persistent: tiles (M-block, 128 weight rows), weight tiles fastest, taken in id order from the
#   grid-wide counter align zeroes (moe_gemm2_ws._publish_tile); blocks without an expert are
#   skipped by every partition alike.  L2 counts its tickets on from L1's (``ticket_base``).
#
# L1 (gate/up, K = H): the expert's 2I rows are re-ordered once (``l1_row_order``) so that each
# warp's 16 accumulator rows hold 8 gate rows then their 8 up rows: a thread's rows r and r + 8
# (the wgmma accumulator's) are the gate and up of one intermediate column, so SwiGLU is a split
# of the accumulator's registers.  Epilogue: global scale, bias, act(gate) * (up + offset), routing
# weight (before down), bf16 at the pairs' own intermediate rows.  L2 (down, K = I): global scale,
# bias, routing weight (after down), rows at the pairs' own output rows for the deterministic
# combine.  Both as moe_gemm1 / moe_gemm2 define them (same order of operations).
# Takes: bf16 activations; FP4 weights [E, N, K/2] (MXFP4 scales within the decode's multiply:
# lowering.moe.mxfp4_scales_in_decode); H and I multiples of 64; TOKENS-row M-blocks from align.
"""

import torch

from .fp4_gemm_ws import BLOCK_K, SCALE_BYTES, STAGES, W_ROWS, fp4_ws_weight_layout, layout_descriptors
from .moe_gemm2_ws import HAS_GLUON

# M-block rows (the wgmma's n) -> ring slots: a 128-row block's slot is 21 KB, and 8 of them
# measured 6-9% faster than 4 (ad hoc, benchmarks/NOTES_fp4.md); 256 rows: 37 KB, 4 fit
STAGES_BY_TOKENS = {128: 8, 256: STAGES}
MAX_REGISTERS = 168  # x 12 warps at launch; then the consumers 224, the producer 56
L1, L2 = 1, 2


def l1_row_order(intermediate: int, interleaved: bool) -> torch.Tensor:
    """w13 row feeding each row of the re-ordered gate/up weight (module docstring): tile j (128
    rows) holds intermediate columns [64 j, +64); within it warp-row group q (16 rows) holds
    columns 8 q .. 8 q + 7 as gate rows, then the same columns' up rows."""
    p = torch.arange(2 * intermediate)
    column = (p // 16) * 8 + p % 8
    up = (p // 8) % 2
    return 2 * column + up if interleaved else column + up * intermediate


def moe_fp4_ws_layout(w: torch.Tensor, scale: torch.Tensor, nv: bool, gate_up: "str | None") -> tuple:
    """(codes, scales) of an expert stack w [E, N, K/2] for the kernel (fp4_ws_weight_layout per
    expert; ``gate_up``: "concat" / "interleaved" for w13, whose rows are first put in
    ``l1_row_order``; None for w2)."""
    if gate_up is not None:
        order = l1_row_order(w.shape[1] // 2, gate_up == "interleaved").to(w.device)
        w, scale = w.index_select(1, order), scale.index_select(1, order)
    return fp4_ws_weight_layout(w.contiguous(), scale.contiguous(), nv, W_ROWS)


def layout_bytes(w: torch.Tensor, scale: torch.Tensor, nv: bool) -> int:
    """Bytes of ``moe_fp4_ws_layout``'s output for w [E, N, K/2] (checked against free memory)."""
    E, N, K = w.shape[0], w.shape[1], w.shape[2] * 2
    blocks = E * -(-N // W_ROWS) * -(-K // BLOCK_K)
    return blocks * (W_ROWS // 64) * (2048 + 128 * SCALE_BYTES[nv])


if HAS_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                   warpgroup_mma_wait)

    from ._details.fp_codes import E4M3_DECODE_SHIFT
    from .fp4_gemm_ws import _decode_m64
    from .moe_gemm2_ws import (_pdl_wait, _publish_tile, _receive_tile, _tile_schedule_buffers,
                               _tile_schedule_init, cp_async_load, tma_load)

    CONSUMER_REGISTERS, PRODUCER_REGISTERS = gl.constexpr(224), gl.constexpr(56)
    K_STEP = gl.constexpr(BLOCK_K)

    @gluon.jit
    def _producer(act_ptr, w_desc, s_desc, sorted_ids_ptr, block_expert_ptr, a_bufs, w_bufs, s_bufs, a_ready,
                  w_ready, empty, counter_ptr, ticket_base, tile_ids, tile_full, tile_free, stride_at, row_div,
                  num_pairs, num_tiles, n_tiles_n, k_steps, TOKENS: gl.constexpr, W_BOX: gl.constexpr,
                  S_ROWS: gl.constexpr, STAGES: gl.constexpr):
        # 8 bf16 (one 16-byte cp.async) per thread, 8 threads per 128-byte row; 128 rows a copy
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        HALVES: gl.constexpr = TOKENS // 128
        k = gl.arange(0, K_STEP, layout=gl.SliceLayout(0, layout))
        rows = gl.arange(0, 128, layout=gl.SliceLayout(1, layout))
        i = 0
        t = _publish_tile(counter_ptr, ticket_base, tile_ids, tile_full, tile_free, i)
        it = 0
        while t < num_tiles:
            i += 1
            t_next = _publish_tile(counter_ptr, ticket_base, tile_ids, tile_full, tile_free, i)
            pid_m = t // n_tiles_n
            e = gl.load(block_expert_ptr + pid_m)
            if e >= 0:
                # pad rows' ids are whatever align left: clamped to some valid row
                ids = gl.load(sorted_ids_ptr + pid_m * TOKENS + rows)
                lo = act_ptr + (gl.minimum(gl.maximum(ids, 0), num_pairs - 1) // row_div).to(gl.int64)[:, None] * \
                    stride_at + k[None, :]
                hi = lo
                if HALVES == 2:
                    ids = gl.load(sorted_ids_ptr + pid_m * TOKENS + 128 + rows)
                    hi = act_ptr + (gl.minimum(gl.maximum(ids, 0), num_pairs - 1) // row_div).to(gl.int64)[:, None] * \
                        stride_at + k[None, :]
                block0 = (e * n_tiles_n + t % n_tiles_n) * k_steps
                for ks in range(k_steps):
                    s = it % STAGES
                    mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                    mbarrier.expect(w_ready.index(s), (W_BOX + S_ROWS) * 128)
                    tma_load(w_desc, [(block0 + ks) * W_BOX, 0], w_ready.index(s), w_bufs.index(s))
                    tma_load(s_desc, [(block0 + ks) * S_ROWS, 0], w_ready.index(s), s_bufs.index(s))
                    a_slot = a_bufs.index(s)
                    cp_async_load(a_slot.slice(0, 128), lo + ks * K_STEP)
                    if HALVES == 2:
                        cp_async_load(a_slot.slice(128, 128), hi + ks * K_STEP)
                    async_copy.mbarrier_arrive(a_ready.index(s), increment_count=False)
                    it += 1
            t = t_next

    @gluon.jit
    def _swiglu(gate, up, alpha, limit, up_offset, ACTIVATION: gl.constexpr, HAS_LIMIT: gl.constexpr):
        """moe_common.swiglu_epilogue in Gluon (the same expressions)."""
        if HAS_LIMIT:
            gate = gl.minimum(gate, limit)
            up = gl.minimum(gl.maximum(up, -limit), limit)
        if ACTIVATION == 0:
            act = gate * (1.0 / (1.0 + gl.exp(-(alpha * gate))))
        elif ACTIVATION == 1:
            act = 0.5 * gate * (1.0 + gl.erf(gate * 0.7071067811865476))
        else:
            z = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
            act = 0.5 * gate * (2.0 * (1.0 / (1.0 + gl.exp(-2.0 * z))))
        return act * (up + up_offset)

    @gluon.jit
    def _tile_tokens(first_row, row_end, sorted_ids_ptr, topk_weights_ptr, num_pairs, ROWS: gl.constexpr,
                     layout: gl.constexpr):
        """The epilogue's view of ROWS tokens of the M-block from ``first_row``: their pair ids (clamped:
        pad rows' ids are whatever align left), whether they are the expert's, their routing weights."""
        rows = first_row + gl.arange(0, ROWS, layout=layout)
        live = rows < row_end
        ids = gl.minimum(gl.maximum(gl.load(sorted_ids_ptr + rows), 0), num_pairs - 1)
        return ids, live, gl.load(topk_weights_ptr + ids).to(gl.float32)

    @gluon.jit
    def _l1_epilogue(acc, e, first_row, row_end, tile_n, sorted_ids_ptr, out_ptr, bias_ptr, gscale_ptr,
                     topk_weights_ptr, I, num_pairs, stride_be, alpha, limit, up_offset, WG: gl.constexpr,
                     NV: gl.constexpr, HAS_BIAS: gl.constexpr, GATE_UP_GSCALES: gl.constexpr,
                     INTERLEAVED: gl.constexpr, ACTIVATION: gl.constexpr, HAS_LIMIT: gl.constexpr,
                     ROUTING_WEIGHT: gl.constexpr, TOKENS: gl.constexpr):
        """acc [64 re-ordered w13 rows, TOKENS]: row r is column c = 64 tile_n + 32 WG + 8 (r // 16) + r % 8,
        gate where (r // 8) % 2 == 0, else up.  h -> intermediate[id, c] (the expert's tokens only)."""
        r = gl.arange(0, 64, layout=gl.SliceLayout(1, acc.type.layout))
        col = tile_n * 64 + WG * 32 + (r // 16) * 8 + r % 8
        is_up = (r // 8) % 2
        if NV:  # gemm1_tile: the expert's global scale (gate's and up's) first
            if GATE_UP_GSCALES:
                g = gl.load(gscale_ptr + 2 * e + is_up)
            else:
                g = gl.load(gscale_ptr + e + 0 * r)
            acc = acc * (g * E4M3_DECODE_SHIFT)[:, None]
        if HAS_BIAS:
            b_row = 2 * col + is_up if INTERLEAVED else col + is_up * I
            acc = acc + gl.load(bias_ptr + e * stride_be + b_row).to(gl.float32)[:, None]
        # rows (warp, gate/up, 8) -> (warp, 8, tokens, gate/up): a thread's rows r, r + 8 pair up
        gate, up = gl.split(gl.permute(gl.reshape(acc, [4, 2, 8, TOKENS]), [0, 2, 3, 1]))
        h = _swiglu(gate, up, alpha, limit, up_offset, ACTIVATION, HAS_LIMIT)
        store_l: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])  # 8 columns (16 bytes) a thread
        h = gl.convert_layout(gl.permute(gl.reshape(h, [32, TOKENS]), [1, 0]), store_l)
        ids, live, tw = _tile_tokens(first_row, row_end, sorted_ids_ptr, topk_weights_ptr, num_pairs, TOKENS,
                                     gl.SliceLayout(1, store_l))
        if ROUTING_WEIGHT:
            h = h * tw[:, None]
        cols = tile_n * 64 + WG * 32 + gl.arange(0, 32, layout=gl.SliceLayout(0, store_l))
        gl.store(out_ptr + ids.to(gl.int64)[:, None] * I + cols[None, :], h.to(out_ptr.dtype.element_ty),
                 mask=live[:, None])

    @gluon.jit
    def _l2_store_half(acc, first_row, row_end, n, sorted_ids_ptr, out_ptr, topk_weights_ptr, H, num_pairs,
                       ROUTING_WEIGHT: gl.constexpr, ROWS: gl.constexpr):
        """[64 output columns n, ROWS tokens from first_row] -> rows_out[id, n], routing weight applied."""
        store_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])  # 8 columns (16 bytes) a thread
        vals = gl.convert_layout(gl.permute(acc, [1, 0]), store_l)
        ids, live, tw = _tile_tokens(first_row, row_end, sorted_ids_ptr, topk_weights_ptr, num_pairs, ROWS,
                                     gl.SliceLayout(1, store_l))
        if ROUTING_WEIGHT:
            vals = vals * tw[:, None]
        cols = gl.convert_layout(n, gl.SliceLayout(0, store_l))
        gl.store(out_ptr + ids.to(gl.int64)[:, None] * H + cols[None, :], vals.to(out_ptr.dtype.element_ty),
                 mask=live[:, None] & (cols < H)[None, :])

    @gluon.jit
    def _l2_epilogue(acc, e, first_row, row_end, tile_n, sorted_ids_ptr, out_ptr, bias_ptr, gscale_ptr,
                     topk_weights_ptr, H, num_pairs, stride_be, WG: gl.constexpr, NV: gl.constexpr,
                     HAS_BIAS: gl.constexpr, ROUTING_WEIGHT: gl.constexpr, TOKENS: gl.constexpr):
        """acc [64 w2 rows (output columns n), TOKENS] -> rows_out[id, n] (gemm2_tile's epilogue), in two
        halves of tokens: the fp32 values cross to the store layout through shared memory."""
        n = tile_n * 128 + WG * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, acc.type.layout))
        if NV:
            acc = acc * (gl.load(gscale_ptr + e) * E4M3_DECODE_SHIFT)
        if HAS_BIAS:
            acc = acc + gl.load(bias_ptr + e * stride_be + n, mask=n < H, other=0.0).to(gl.float32)[:, None]
        lo, hi = gl.split(gl.permute(gl.reshape(acc, [64, 2, TOKENS // 2]), [0, 2, 1]))
        _l2_store_half(lo, first_row, row_end, n, sorted_ids_ptr, out_ptr, topk_weights_ptr, H, num_pairs,
                       ROUTING_WEIGHT, TOKENS // 2)
        _l2_store_half(hi, first_row + TOKENS // 2, row_end, n, sorted_ids_ptr, out_ptr, topk_weights_ptr, H,
                       num_pairs, ROUTING_WEIGHT, TOKENS // 2)

    @gluon.jit
    def _consumer(a_bufs, w_bufs, s_bufs, a_ready, w_ready, empty, tile_ids, tile_full, tile_free, sorted_ids_ptr,
                  block_expert_ptr, expert_start_ptr, expert_count_ptr, topk_weights_ptr, bias_ptr, gscale_ptr,
                  out_ptr, n_out, num_pairs, num_tiles, n_tiles_n, k_steps, stride_be, alpha, limit, up_offset,
                  WG: gl.constexpr, GEMM: gl.constexpr, NV: gl.constexpr, HAS_BIAS: gl.constexpr,
                  GATE_UP_GSCALES: gl.constexpr, INTERLEAVED: gl.constexpr, ACTIVATION: gl.constexpr,
                  HAS_LIMIT: gl.constexpr, ROUTING_WEIGHT: gl.constexpr, TOKENS: gl.constexpr,
                  STAGES: gl.constexpr):
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, TOKENS, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        i = 0
        t = _receive_tile(tile_ids, tile_full, tile_free, i)
        it = 0
        while t < num_tiles:
            i += 1
            t_next = _receive_tile(tile_ids, tile_full, tile_free, i)
            pid_m = t // n_tiles_n
            e = gl.load(block_expert_ptr + pid_m)
            if e >= 0:
                acc = gl.zeros([64, TOKENS], gl.float32, mma)
                s0 = it % STAGES
                mbarrier.wait(w_ready.index(s0), (it // STAGES) & 1)
                w = _decode_m64(w_bufs.index(s0), s_bufs.index(s0), WG, 2, NV, a_layout)
                for ks in range(k_steps):
                    s = it % STAGES
                    mbarrier.wait(a_ready.index(s), (it // STAGES) & 1)
                    fence_async_shared()  # cp.async wrote the rows through the generic proxy
                    acc = warpgroup_mma(w, a_bufs.index(s).permute((1, 0)), acc, is_async=True)
                    # the next step's fragments decoded while these MMAs run (the last step's again
                    # at the end: its slot is still held, so the wait passes)
                    nxt = it + gl.minimum(ks + 1, k_steps - 1) - ks
                    sn = nxt % STAGES
                    mbarrier.wait(w_ready.index(sn), (nxt // STAGES) & 1)
                    wn = _decode_m64(w_bufs.index(sn), s_bufs.index(sn), WG, 2, NV, a_layout)
                    acc, w = warpgroup_mma_wait(0, deps=(acc, w))
                    mbarrier.arrive(empty.index(s), count=1)
                    w = wn
                    it += 1
                row_end = gl.load(expert_start_ptr + e) + gl.load(expert_count_ptr + e)
                if GEMM == 1:
                    _l1_epilogue(acc, e, pid_m * TOKENS, row_end, t % n_tiles_n, sorted_ids_ptr, out_ptr, bias_ptr,
                                 gscale_ptr, topk_weights_ptr, n_out, num_pairs, stride_be, alpha, limit, up_offset,
                                 WG, NV, HAS_BIAS, GATE_UP_GSCALES, INTERLEAVED, ACTIVATION, HAS_LIMIT,
                                 ROUTING_WEIGHT, TOKENS)
                else:
                    _l2_epilogue(acc, e, pid_m * TOKENS, row_end, t % n_tiles_n, sorted_ids_ptr, out_ptr, bias_ptr,
                                 gscale_ptr, topk_weights_ptr, n_out, num_pairs, stride_be, WG, NV, HAS_BIAS,
                                 ROUTING_WEIGHT, TOKENS)
            t = t_next

    @gluon.jit
    def moe_fp4_ws_kernel(act_ptr, w_desc, s_desc, bias_ptr, gscale_ptr, topk_weights_ptr, out_ptr,
                          sorted_ids_ptr, block_expert_ptr, expert_start_ptr, expert_count_ptr, counter_ptr,
                          n_out, num_pairs, max_blocks, n_tiles_n, k_steps, ticket_base, stride_at, row_div,
                          stride_be, alpha, limit, up_offset,
                          GEMM: gl.constexpr, NV: gl.constexpr, HAS_BIAS: gl.constexpr,
                          GATE_UP_GSCALES: gl.constexpr, INTERLEAVED: gl.constexpr, ACTIVATION: gl.constexpr,
                          HAS_LIMIT: gl.constexpr, ROUTING_WEIGHT: gl.constexpr, TOKENS: gl.constexpr,
                          STAGES: gl.constexpr, USE_PDL: gl.constexpr):
        """GEMM 1: intermediate = swiglu(x[ids // k] @ w13^T) (n_out = I); GEMM 2: rows_out =
        intermediate[ids] @ w2^T (n_out = H); module docstring."""
        W_BOX: gl.constexpr = w_desc.block_type.shape[0]
        S_ROWS: gl.constexpr = s_desc.block_type.shape[0]
        a_smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        a_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, TOKENS, K_STEP], a_smem)
        w_bufs = gl.allocate_shared_memory(gl.uint8, [STAGES] + w_desc.block_type.shape, w_desc.layout)
        s_bufs = gl.allocate_shared_memory(gl.uint8, [STAGES] + s_desc.block_type.shape, s_desc.layout)
        a_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        w_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(a_ready.index(i), count=128)  # the producer's threads' cp.async arrivals
            mbarrier.init(w_ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)
        tile_ids, tile_full, tile_free = _tile_schedule_buffers()
        _tile_schedule_init(tile_full, tile_free)
        _pdl_wait(USE_PDL)
        num_tiles = max_blocks * n_tiles_n
        gl.warp_specialize([
            (_consumer, (a_bufs, w_bufs, s_bufs, a_ready, w_ready, empty, tile_ids, tile_full, tile_free,
                         sorted_ids_ptr, block_expert_ptr, expert_start_ptr, expert_count_ptr, topk_weights_ptr,
                         bias_ptr, gscale_ptr, out_ptr, n_out, num_pairs, num_tiles, n_tiles_n, k_steps, stride_be,
                         alpha, limit, up_offset, 0, GEMM, NV, HAS_BIAS, GATE_UP_GSCALES, INTERLEAVED, ACTIVATION,
                         HAS_LIMIT, ROUTING_WEIGHT, TOKENS, STAGES)),
            (_consumer, (a_bufs, w_bufs, s_bufs, a_ready, w_ready, empty, tile_ids, tile_full, tile_free,
                         sorted_ids_ptr, block_expert_ptr, expert_start_ptr, expert_count_ptr, topk_weights_ptr,
                         bias_ptr, gscale_ptr, out_ptr, n_out, num_pairs, num_tiles, n_tiles_n, k_steps, stride_be,
                         alpha, limit, up_offset, 1, GEMM, NV, HAS_BIAS, GATE_UP_GSCALES, INTERLEAVED, ACTIVATION,
                         HAS_LIMIT, ROUTING_WEIGHT, TOKENS, STAGES)),
            (_producer, (act_ptr, w_desc, s_desc, sorted_ids_ptr, block_expert_ptr, a_bufs, w_bufs, s_bufs, a_ready,
                         w_ready, empty, counter_ptr, ticket_base, tile_ids, tile_full, tile_free, stride_at,
                         row_div, num_pairs, num_tiles, n_tiles_n, k_steps, TOKENS, W_BOX, S_ROWS, STAGES)),
        ], [4, 4], [CONSUMER_REGISTERS, PRODUCER_REGISTERS])


def layout_tag(gate_up: "str | None") -> str:
    """``weight_cache``'s tag of an expert stack's re-laid-out copy (w13 by its gate/up layout, or w2)."""
    return f"moe_fp4_ws_{gate_up or 'down'}"


def cached_moe_layout(w: torch.Tensor, scale: torch.Tensor, nv: bool, gate_up: "str | None"):
    """``layout_descriptors`` of an expert stack (``moe_fp4_ws_layout``), made once per weight version
    (``weight_cache``); never during CUDA-graph capture (the caller looks it up there)."""
    from .. import weight_cache

    return weight_cache.cached(layout_tag(gate_up), (w, scale), lambda: layout_descriptors(
        *moe_fp4_ws_layout(w, scale, nv, gate_up), nv, W_ROWS))


def launch_moe_fp4_ws(gemm: int, act, layout, n_out: int, k_dim: int, out, bias, gscale, topk_weights, blocks,
                      tokens: int, top_k: int, num_pairs: int, nv: bool, *, gate_up_gscales: bool = False,
                      interleaved: bool = False, activation: int = 0, limit=None, alpha: float = 1.0,
                      up_offset: float = 0.0, routing_weight: bool = False, ticket_base: int = 0,
                      num_sms: int = 132, use_pdl: bool = False, launch=None) -> int:
    """One of the two GEMMs (``gemm`` L1 or L2) over align's ``blocks`` of ``tokens`` rows; ``act``:
    x [T, H] (L1) or the intermediate [T*k, I] (L2), bf16, rows 16-byte aligned; ``layout``:
    ``cached_moe_layout``'s.  Returns the counter tickets it takes (every tile, then one per program)."""
    if launch is None:
        from ..lowering.launch import jit_launch as launch
    n_tiles_n = -(-n_out * (2 if gemm == L1 else 1) // W_ROWS)
    num_tiles = blocks.max_blocks * n_tiles_n
    grid = max(1, min(num_sms, num_tiles))
    pdl = {"launch_pdl": True} if use_pdl else {}
    launch(f"fp4_ws_l{gemm}", moe_fp4_ws_kernel, (grid,), (
        act, layout[0], layout[1], bias if bias is not None else out, gscale if gscale is not None else out,
        topk_weights, out, blocks.sorted_ids, blocks.block_expert, blocks.expert_start, blocks.expert_count,
        blocks.ready, n_out, num_pairs, blocks.max_blocks, n_tiles_n, k_dim // BLOCK_K, ticket_base, act.stride(0),
        top_k if gemm == L1 else 1, bias.stride(0) if bias is not None else 0, float(alpha),
        float(limit or 0.0), float(up_offset)), dict(
        GEMM=gemm, NV=nv, HAS_BIAS=bias is not None, GATE_UP_GSCALES=gate_up_gscales, INTERLEAVED=interleaved,
        ACTIVATION=activation, HAS_LIMIT=limit is not None, ROUTING_WEIGHT=routing_weight, TOKENS=tokens,
        STAGES=STAGES_BY_TOKENS[tokens], USE_PDL=use_pdl, num_warps=4, maxnreg=MAX_REGISTERS, **pdl))
    return num_tiles + grid


def _isa_specs() -> list:
    """What ``python -m inductor_moe.isa`` compiles: L1 (silu, biases) and L2 for both formats at
    256-row blocks, sm_90a only."""
    if not HAS_GLUON:
        return []
    from ..isa import auto_signature

    def box(rows):
        layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8, rank=2)
        return f"tensordesc<u8[{rows},128],{layout!r}>"

    specs = []
    for gemm in (L1, L2):
        for nv in (False, True):
            const = dict(GEMM=gemm, NV=nv, HAS_BIAS=True, GATE_UP_GSCALES=False, INTERLEAVED=False, ACTIVATION=0,
                         HAS_LIMIT=gemm == L1, ROUTING_WEIGHT=gemm == L2, TOKENS=256, STAGES=STAGES, USE_PDL=True)
            ptrs = {"act_ptr": "*bf16", "w_desc": box(2 * 16), "s_desc": box(2 * SCALE_BYTES[nv]), "bias_ptr": "*bf16",
                    "gscale_ptr": "*fp32", "topk_weights_ptr": "*fp32", "out_ptr": "*bf16"}
            options = {"num_warps": 4, "maxnreg": MAX_REGISTERS, "only_arch": 90,
                       "divisible_by_16": ("act_ptr", "out_ptr", "bias_ptr", "stride_at", "n_out"),
                       "why_only": "wgmma + setmaxnreg: sm_90 only (sm_100 multiplies FP4 natively: the Triton kernels)"}
            label = f"moe_fp4_ws[L{gemm}, bf16 x {'nvfp4' if nv else 'mxfp4'}, decode in wgmma's registers]"
            specs.append((label, moe_fp4_ws_kernel,
                          auto_signature(moe_fp4_ws_kernel, ptrs, const, ("alpha", "limit", "up_offset")), const,
                          options))
    return specs


ISA_SPECS = _isa_specs()
