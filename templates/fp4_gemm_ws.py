"""Block-scaled FP4 GEMM at large M on Hopper: the weight decoded into wgmma's registers, warp-specialised.

# M: rows of A (tokens), N: output features (weight rows), K: reduction dim.
# Why: Hopper has no FP4 MMA, so the weight must become bf16 before the tensor cores see it.  The
# Triton kernels decode it in the same warps that wait on the MMAs, and "dequant_chunks" (decode
# to a bf16 workspace, then cuBLAS) pays a second pass over 2.5 bytes per weight: at M = 1024 both
# stood at 1.3-1.65x bf16 torch.mm (benchmarks/NOTES_fp4.md, "Large M").  Here the decode happens
# where the MMA wants the operand, in registers, and warps are split by role (Gluon, sm_90a):
#
#   loader (4 warps, one issues): per K step of 64, TMA copies of the activations [TOKENS, 64]
#     (bf16, 128-byte swizzle: wgmma's B operand), the tile's packed weight (2 KB per m64 tile)
#     and its scales into a ring of STAGES slots; one `ready` mbarrier counts the bytes.
#   consumer warpgroup g (4 warps each, g = 0, 1): M64S m64 tiles of weight rows (W_ROWS / 128).
#     Per K step each thread reads its 16 packed bytes of an m64 tile with one 16-byte shared
#     load, decodes them (fp_codes' e2m1 -> bf16x2 PTX, the block scale folded into its one
#     multiply) straight into the registers of wgmma's A fragment, and issues
#     out^T[m64 rows, tokens] += W_tile @ A_tile^T (A from registers, B from shared memory); the
#     next step is decoded while those MMAs run, and the other warpgroup's fill the gaps.
#   Tiles of 128 weight rows x 256 tokens (one m64n256 accumulator per warpgroup) measured 12-17%
#   faster than 256 x 128 (two m64n128): half the decode and half the wgmma instructions per FLOP
#   for 40% more activation bytes per FLOP (benchmarks/NOTES_fp4.md).
#   Where the last wave's tiles would leave most SMs idle they are split in K (``tail_split``):
#   each part stores its fp32 accumulator and _details/_fp4_gemm_ws_reduce.py adds them in order.
#
# The packed weight is re-laid-out once per weight version (``fp4_ws_weight_layout``, in
# ``weight_cache``): for every tile and K step, thread t of m64 tile i finds at byte 16 t of the
# m64 tile's 2 KB block exactly the 32 e2m1 codes of its A fragment -- rows R0 = 16 w + l // 4
# and R0 + 8, k = 16 q + 2 c + {0, 1} (low nibbles) and + 8 (high nibbles), q = 0..3, l = lane,
# c = l % 4 -- ordered so that each 32-bit word decodes into the fragment's four registers for
# one k16 chunk.  Scales follow the same thread order (4 bytes a thread for MXFP4, 8 for NVFP4;
# the four lanes of a row hold copies).  N and K are padded to the tile with zero codes.
# Output: act(global_scale * acc + bias) stored transposed back to [M, N] rows, 16 bytes a thread.
# MXFP4 scales must fit the decode's multiply (e8m0 <= 128, or NaN: lowering.moe.mxfp4_scales_in_decode);
# NVFP4 weights come out 2^-8 small (fp_codes.E4M3_DECODE_SHIFT) and the epilogue takes it back.
"""

import torch

from .moe_gemm2_ws import HAS_GLUON

W_ROWS = 128  # weight rows per tile: 2 consumer warpgroups x M64S = 1 m64 wgmma tile (256: 2 each)
TOKENS = 256  # activation rows per tile (the wgmma's n: 256 with M64S = 1, 128 with 2)
BLOCK_K = 64  # one 128-byte row of bf16 activations per K step
STAGES = 4
M64_BYTES = 2048  # one m64 tile's packed codes of a K step: 128 threads x 16 bytes
SCALE_BYTES = {False: 4, True: 8}  # per thread and m64 tile of a K step: MXFP4, NVFP4 (NV)
MAX_SPLIT, MIN_PART_STEPS = 4, 8  # the last wave's tiles split in K (tail_split)
# registers per thread: 168 x 12 warps at launch; then the consumer warpgroups 232, the loader 40
MAX_REGISTERS = 168


def fp4_ws_weight_layout(b: torch.Tensor, b_scale: torch.Tensor, nv: bool, w_rows: int = W_ROWS) -> tuple:
    """(packed codes, scales) of the weight B [N, K/2] (e2m1 pairs, low nibble first) and its block
    scales [N, K/G] (e8m0 bytes, G = 32; or e4m3 bytes, G = 16 for NVFP4) in the kernel's thread
    order (module docstring) for tiles of ``w_rows`` weight rows (64 per m64 tile), as uint8 rows of
    128 bytes for the TMA boxes: [tiles * steps * w_rows / 4, 128] and [tiles * steps * (w_rows / 64)
    * SCALE_BYTES, 128].  A stack of experts [E, N, K/2] (the MoE's) gives each expert its own
    ``tiles`` (N padded per expert), experts back to back.  Pure torch: the same function on any device."""
    if b.dim() == 2:
        b, b_scale = b.unsqueeze(0), b_scale.unsqueeze(0)
    E, N, K = b.shape[0], b.shape[1], b.shape[2] * 2
    m64s = w_rows // 64
    G = 16 if nv else 32
    tiles, steps = -(-N // w_rows), -(-K // BLOCK_K)
    codes = torch.zeros((E, tiles * w_rows, steps * BLOCK_K), dtype=torch.uint8, device=b.device)
    packed = b.view(torch.uint8)
    codes[:, :N, 0:K:2] = packed & 15
    codes[:, :N, 1:K:2] = packed >> 4
    # rows: tile, m64 tile i, warp w, row half, a, bb (lane // 4 = 2 a + bb); K: step, q, nibble h, c, t
    codes = codes.view(E, tiles, m64s, 4, 2, 4, 2, steps, 4, 2, 4, 2)
    # -> tile, step, i, thread (w, a, bb, c), byte (q, row half, t), nibble h
    codes = codes.permute(0, 1, 7, 2, 3, 5, 6, 10, 8, 4, 11, 9)
    codes = codes.reshape(-1, 2)
    w = (codes[:, 0] | (codes[:, 1] << 4)).reshape(E * tiles * steps * m64s * M64_BYTES // 128, 128)

    blocks_per_step = BLOCK_K // G
    s = torch.zeros((E, tiles * w_rows, steps * blocks_per_step), dtype=torch.uint8, device=b.device)
    s[:, :N, :K // G] = b_scale.view(torch.uint8)
    # rows as above; K: step, block.  -> tile, step, i, thread (w, a, bb, c: copies), byte (row half, block)
    s = s.view(E, tiles, m64s, 4, 2, 4, 2, steps, blocks_per_step)
    s = s.permute(0, 1, 7, 2, 3, 5, 6, 4, 8).unsqueeze(7).expand(E, tiles, steps, m64s, 4, 4, 2, 4, 2,
                                                                   blocks_per_step)
    s = s.reshape(E * tiles * steps * m64s * SCALE_BYTES[nv], 128)
    return w.contiguous(), s.contiguous()

if HAS_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

    from ._details.fp_codes import _E2M1_PAIRS_SCALED_PTX, _TWO_POW_118, E4M3_DECODE_SHIFT
    from .moe_gemm2_ws import _pdl_wait, tma_load

    LOADER_REGISTERS, CONSUMER_REGISTERS = gl.constexpr(40), gl.constexpr(232)

    if hasattr(gl.shared_memory_descriptor, "reinterpret"):  # triton >= 3.7
        @gluon.jit
        def _view(smem, dtype: gl.constexpr, shape: gl.constexpr, layout: gl.constexpr):
            return smem.reinterpret(dtype, shape, layout)
    else:
        @gluon.jit
        def _view(smem, dtype: gl.constexpr, shape: gl.constexpr, layout: gl.constexpr):
            return smem._reinterpret(dtype, shape, layout)

    @gluon.jit
    def _loader(a_desc, w_desc, s_desc, a_bufs, w_bufs, s_bufs, ready, empty, m0, tile_n, k0, k_count, k_steps,
                TOKENS: gl.constexpr, W_BOX: gl.constexpr, S_ROWS: gl.constexpr, STAGES: gl.constexpr):
        """K steps [k0, k0 + k_count) of the tile into the ring."""
        slot_bytes: gl.constexpr = TOKENS * 64 * 2 + (W_BOX + S_ROWS) * 128
        for i in range(k_count):
            s = i % STAGES
            mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(s), slot_bytes)
            block = tile_n * k_steps + k0 + i
            tma_load(a_desc, [m0, (k0 + i) * 64], ready.index(s), a_bufs.index(s))
            tma_load(w_desc, [block * W_BOX, 0], ready.index(s), w_bufs.index(s))
            tma_load(s_desc, [block * S_ROWS, 0], ready.index(s), s_bufs.index(s))

    @gluon.jit
    def _decode_m64(w_slot, s_slot, i: gl.constexpr, M64_TILES: gl.constexpr, NV: gl.constexpr,
                    a_layout: gl.constexpr):
        """m64 tile ``i`` of a K step: the thread's 16 packed bytes and its scales -> wgmma's A
        fragment [64, 64] bf16 (module docstring: the byte order)."""
        packed_l: gl.constexpr = gl.BlockedLayout([1, 16], [32, 1], [4, 1], [1, 0])
        plain3: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])  # rank 2: the leading dim is indexed
        packed = _view(w_slot, gl.uint8, [M64_TILES, 128, 16], plain3).index(i).load(packed_l)
        if NV:  # one e4m3 scale per row half and k16 chunk q: factor scale * 2^118 (fp_codes.e4m3_decode_factor)
            scale_l: gl.constexpr = gl.BlockedLayout([1, 8], [32, 1], [4, 1], [1, 0])
            sc = _view(s_slot, gl.uint8, [M64_TILES, 128, 8], plain3).index(i).load(scale_l)
            f = (sc.to(gl.float8e4nv, bitcast=True).to(gl.float32) * _TWO_POW_118).to(gl.bfloat16)
            f = gl.join(gl.reshape(f, [128, 2, 4]), gl.reshape(f, [128, 2, 4]))  # row half, q, copy t2
            f = gl.permute(f, [0, 2, 1, 3])  # byte order: q, row half, t2
        else:  # one e8m0 scale per row half and 32-block: factor 2^(byte - 1) (fp_codes.e8m0_decode_factor)
            scale_l: gl.constexpr = gl.BlockedLayout([1, 4], [32, 1], [4, 1], [1, 0])
            sc = _view(s_slot, gl.uint8, [M64_TILES, 128, 4], plain3).index(i).load(scale_l).to(gl.int32)
            f = gl.minimum((sc + 126) << 7, 0x7FC0).to(gl.int16).to(gl.bfloat16, bitcast=True)
            f = gl.reshape(f, [128, 2, 2])  # row half, block
            f = gl.join(f, f)  # + copy t2
            f = gl.join(f, f)  # + copy q' (q = 2 block + q')
            f = gl.permute(f, [0, 2, 4, 1, 3])  # byte order: block, q', row half, t2
        f = gl.convert_layout(gl.reshape(f, [128, 16]), packed_l)
        lo, hi = gl.inline_asm_elementwise(_E2M1_PAIRS_SCALED_PTX, "=r,=r,=r,=r,r,r,r", [packed, f],
                                           dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=4)
        # thread t = (w, a, bb, c), byte = (q, row half, t2), nibble h -> row (w, half, a, bb), k (q, h, c, t2)
        v = gl.reshape(gl.join(lo, hi), [4, 4, 2, 4, 4, 2, 2, 2])
        v = gl.permute(v, [0, 5, 1, 2, 4, 7, 3, 6])
        return gl.convert_layout(gl.reshape(v, [64, 64]), a_layout)

    @gluon.jit
    def _activation(y, ACTIVATION: gl.constexpr):
        """block_scaled_gemm_kernel's epilogue activations (codes SILU 1, GELU 2, GELU_TANH 3, RELU 4),
        in Gluon (which calls Gluon functions only)."""
        if ACTIVATION == 1:
            y = y / (1.0 + gl.exp(-y))
        elif ACTIVATION == 2:
            y = 0.5 * y * (1.0 + gl.erf(y * 0.7071067811865476))
        elif ACTIVATION == 3:
            z = 0.7978845608028654 * (y + 0.044715 * y * y * y)
            y = y / (1.0 + gl.exp(-2.0 * z))
        elif ACTIVATION == 4:
            y = gl.maximum(y, 0.0)
        return y

    @gluon.jit
    def _epilogue(acc, out_ptr, bias_ptr, gscale_ptr, m0, n0, M, N, stride_om, NV: gl.constexpr,
                  HAS_BIAS: gl.constexpr, HAS_GLOBAL_SCALE: gl.constexpr, ACTIVATION: gl.constexpr,
                  TOKENS: gl.constexpr):
        """acc [64 weight rows n0.., TOKENS tokens m0..] -> out[m, n] = act(gs * acc + bias), one rounding."""
        n_l: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
        if HAS_GLOBAL_SCALE:
            acc = acc * gl.load(gscale_ptr)
        if NV:
            acc = acc * E4M3_DECODE_SHIFT
        if HAS_BIAS:
            n = n0 + gl.arange(0, 64, layout=n_l)
            acc = acc + gl.load(bias_ptr + n, mask=n < N, other=0.0).to(gl.float32)[:, None]
        acc = _activation(acc, ACTIVATION)
        store_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])  # 8 outputs of a row: 16 bytes
        vals = gl.convert_layout(gl.permute(acc.to(out_ptr.dtype.element_ty), [1, 0]), store_l)
        m = m0 + gl.arange(0, TOKENS, layout=gl.SliceLayout(1, store_l))
        n = n0 + gl.arange(0, 64, layout=gl.SliceLayout(0, store_l))
        gl.store(out_ptr + m.to(gl.int64)[:, None] * stride_om + n[None, :], vals,
                 mask=(m < M)[:, None] & (n < N)[None, :])

    @gluon.jit
    def _consumer(a_bufs, w_bufs, s_bufs, ready, empty, out_ptr, bias_ptr, gscale_ptr, ws_ptr, part_slot, m0, tile_n,
                  M, N, k_steps, stride_om, WG: gl.constexpr, NV: gl.constexpr, HAS_BIAS: gl.constexpr,
                  HAS_GLOBAL_SCALE: gl.constexpr, ACTIVATION: gl.constexpr, STAGES: gl.constexpr,
                  M64S: gl.constexpr, TOKENS: gl.constexpr, SPLIT: gl.constexpr):
        """Weight rows [64 M64S WG, +64 M64S) of the tile: M64S (1 or 2) m64 wgmma tiles of TOKENS columns."""
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, TOKENS, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        i0: gl.constexpr = M64S * WG
        acc0 = gl.zeros([64, TOKENS], gl.float32, mma)
        acc1 = gl.zeros([64, TOKENS], gl.float32, mma)  # unused where M64S == 1
        mbarrier.wait(ready.index(0), 0)
        w0 = _decode_m64(w_bufs.index(0), s_bufs.index(0), i0, M64S * 2, NV, a_layout)
        w1 = w0
        if M64S == 2:
            w1 = _decode_m64(w_bufs.index(0), s_bufs.index(0), i0 + 1, M64S * 2, NV, a_layout)
        for ks in range(k_steps):  # the tile's (or its part's) steps, counted from 0
            s = ks % STAGES
            tokens = a_bufs.index(s).permute((1, 0))  # [64 K, TOKENS]
            acc0 = warpgroup_mma(w0, tokens, acc0, is_async=True)
            if M64S == 2:
                acc1 = warpgroup_mma(w1, tokens, acc1, is_async=True)
            # the next step's fragments decoded while these MMAs run (the last step's again at the
            # end: its slot is still held, so the wait passes)
            nxt = gl.minimum(ks + 1, k_steps - 1)
            sn = nxt % STAGES
            mbarrier.wait(ready.index(sn), (nxt // STAGES) & 1)
            w0n = _decode_m64(w_bufs.index(sn), s_bufs.index(sn), i0, M64S * 2, NV, a_layout)
            w1n = w0n
            if M64S == 2:
                w1n = _decode_m64(w_bufs.index(sn), s_bufs.index(sn), i0 + 1, M64S * 2, NV, a_layout)
                acc0, acc1, w0, w1 = warpgroup_mma_wait(0, deps=(acc0, acc1, w0, w1))
            else:
                acc0, w0 = warpgroup_mma_wait(0, deps=(acc0, w0))
            mbarrier.arrive(empty.index(s), count=1)
            w0 = w0n
            w1 = w1n
        if SPLIT > 1 and part_slot >= 0:  # a K part of a split tile: raw fp32 partials for the reduce kernel
            _store_partial(acc0, ws_ptr, part_slot, M64S * WG, M64S, TOKENS)
            if M64S == 2:
                _store_partial(acc1, ws_ptr, part_slot, M64S * WG + 1, M64S, TOKENS)
        else:
            n0 = tile_n * (128 * M64S) + WG * (64 * M64S)
            _epilogue(acc0, out_ptr, bias_ptr, gscale_ptr, m0, n0, M, N, stride_om, NV, HAS_BIAS, HAS_GLOBAL_SCALE,
                      ACTIVATION, TOKENS)
            if M64S == 2:
                _epilogue(acc1, out_ptr, bias_ptr, gscale_ptr, m0, n0 + 64, M, N, stride_om, NV, HAS_BIAS,
                          HAS_GLOBAL_SCALE, ACTIVATION, TOKENS)

    @gluon.jit
    def _store_partial(acc, ws_ptr, part_slot, i: gl.constexpr, M64S: gl.constexpr, TOKENS: gl.constexpr):
        """m64 tile i's accumulator [64, TOKENS] at rows 64 i of the part's [128 M64S, TOKENS] fp32 slot."""
        rows = 64 * i + gl.arange(0, 64, layout=gl.SliceLayout(1, acc.type.layout))
        cols = gl.arange(0, TOKENS, layout=gl.SliceLayout(0, acc.type.layout))
        base = ws_ptr + part_slot.to(gl.int64) * (128 * M64S * TOKENS)
        gl.store(base + rows[:, None] * TOKENS + cols[None, :], acc)

    @gluon.jit
    def fp4_gemm_ws_kernel(a_desc, w_desc, s_desc, out_ptr, bias_ptr, gscale_ptr, ws_ptr, M, N, k_steps, tiles_m,
                           full_tiles, k_per_part, stride_om, NV: gl.constexpr, HAS_BIAS: gl.constexpr,
                           HAS_GLOBAL_SCALE: gl.constexpr, ACTIVATION: gl.constexpr, SPLIT: gl.constexpr,
                           STAGES: gl.constexpr, USE_PDL: gl.constexpr):
        """Programs below ``full_tiles`` compute a whole tile each; with SPLIT > 1 the rest split each
        remaining tile's K steps in SPLIT parts of ``k_per_part`` (the last wave would otherwise leave
        SMs idle) and leave fp32 partials in ``ws_ptr`` for fp4_gemm_ws_reduce_kernel."""
        TOKENS: gl.constexpr = a_desc.block_type.shape[0]
        W_BOX: gl.constexpr = w_desc.block_type.shape[0]  # 16 rows of 128 bytes per m64 tile
        M64S: gl.constexpr = W_BOX // 32  # m64 tiles per consumer warpgroup
        S_ROWS: gl.constexpr = s_desc.block_type.shape[0]
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
        w_bufs = gl.allocate_shared_memory(gl.uint8, [STAGES] + w_desc.block_type.shape, w_desc.layout)
        s_bufs = gl.allocate_shared_memory(gl.uint8, [STAGES] + s_desc.block_type.shape, s_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)
        pid = gl.program_id(0)
        tile = pid
        k0 = 0
        k_count = k_steps
        part_slot = -1
        if SPLIT > 1:
            if pid >= full_tiles:
                part_slot = pid - full_tiles
                tile = full_tiles + part_slot // SPLIT
                k0 = (part_slot % SPLIT) * k_per_part
                k_count = gl.minimum(k_steps - k0, k_per_part)
        m0 = (tile % tiles_m) * TOKENS  # consecutive programs share the weight tile
        tile_n = tile // tiles_m
        _pdl_wait(USE_PDL)
        gl.warp_specialize([
            (_consumer, (a_bufs, w_bufs, s_bufs, ready, empty, out_ptr, bias_ptr, gscale_ptr, ws_ptr, part_slot, m0,
                         tile_n, M, N, k_count, stride_om, 0, NV, HAS_BIAS, HAS_GLOBAL_SCALE, ACTIVATION, STAGES,
                         M64S, TOKENS, SPLIT)),
            (_consumer, (a_bufs, w_bufs, s_bufs, ready, empty, out_ptr, bias_ptr, gscale_ptr, ws_ptr, part_slot, m0,
                         tile_n, M, N, k_count, stride_om, 1, NV, HAS_BIAS, HAS_GLOBAL_SCALE, ACTIVATION, STAGES,
                         M64S, TOKENS, SPLIT)),
            (_loader, (a_desc, w_desc, s_desc, a_bufs, w_bufs, s_bufs, ready, empty, m0, tile_n, k0, k_count, k_steps,
                       TOKENS, W_BOX, S_ROWS, STAGES)),
        ], [4, 4], [CONSUMER_REGISTERS, LOADER_REGISTERS])


def ws_operands_reason(spec, a_dtype: torch.dtype) -> "str | None":
    """Why the kernel cannot take these operands (None when it can; the device and the MXFP4
    scales' range are the caller's: sm_90 only, ``mxfp4_scales_in_decode``)."""
    if not HAS_GLUON:
        return "this triton has no Gluon"
    if spec.a_format != "dense" or a_dtype != torch.bfloat16:
        return "bf16 activations only"
    if spec.b_format not in ("mxfp4", "nvfp4"):
        return "MXFP4 / NVFP4 weights only"
    return None


def layout_descriptors(codes: torch.Tensor, scales: torch.Tensor, nv: bool, w_rows: int) -> tuple:
    """(TMA descriptor of the codes, of the scales, the two tensors) of ``fp4_ws_weight_layout``'s
    output: one box per m64 tile's K step (2 KB of codes, 128 x SCALE_BYTES of scales) x w_rows / 64."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    plain = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8, rank=2)
    m64s = w_rows // 64
    w_desc = TensorDescriptor(codes, shape=list(codes.shape), strides=[128, 1], block_shape=[16 * m64s, 128],
                              layout=plain)
    s_desc = TensorDescriptor(scales, shape=list(scales.shape), strides=[128, 1],
                              block_shape=[m64s * SCALE_BYTES[nv], 128], layout=plain)
    return w_desc, s_desc, codes, scales


def cached_weight_layout(b: torch.Tensor, b_scale: torch.Tensor, nv: bool, w_rows: int = 0):
    """``layout_descriptors`` of the weight for tiles of ``w_rows`` weight rows (default W_ROWS), made
    once per weight version (``weight_cache``).  During CUDA-graph capture nothing can be built (the
    capture would record the re-layout, not run it): None where it was not made before."""
    from .. import weight_cache

    w_rows = w_rows or W_ROWS
    tag = f"fp4_gemm_ws_layout_{w_rows}"
    if b.is_cuda and torch.cuda.is_current_stream_capturing():
        return weight_cache.lookup(tag, (b, b_scale))
    return weight_cache.cached(tag, (b, b_scale), lambda: layout_descriptors(
        *fp4_ws_weight_layout(b, b_scale, nv, w_rows), nv, w_rows))


def tail_split(tiles: int, k_steps: int, num_sms: int) -> tuple:
    """(tiles computed whole, K parts per remaining tile).  Where the last wave's tiles would leave
    at least half of the SMs idle, each of them is split in K into as many parts as the SMs take (at
    most MAX_SPLIT, each at least MIN_PART_STEPS steps): e.g. 448 tiles on 132 SMs, 3 full waves and
    52 tiles split in 2 -- 3.5 tile times instead of 4."""
    rem = tiles % num_sms
    split = min(num_sms // rem, MAX_SPLIT, k_steps // MIN_PART_STEPS) if rem else 1
    return (tiles - rem, split) if split >= 2 else (tiles, 1)


def launch_fp4_gemm_ws(a2, layout, nv: bool, global_scale, bias, out, activation_code: int, use_pdl: bool,
                       tokens: int = 0, num_sms: int = 0):
    """out[M, N] = act(global_scale * a2 @ B^T + bias) with B as ``cached_weight_layout`` holds it;
    a2 [M, K] bf16 with K contiguous; ``tokens`` rows of a2 a tile (default TOKENS); the last wave
    split in K where it would leave SMs idle (``tail_split``; ``num_sms`` default: the device's, asked
    anew: callers on a hot path pass their cached count)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from ._details._fp4_gemm_ws_reduce import fp4_gemm_ws_reduce_kernel

    tokens = tokens or TOKENS
    M, K = a2.shape
    N = out.shape[1]
    if a2.data_ptr() % 16 or (a2.stride(0) * 2) % 16:  # TMA: 16-byte aligned base and rows
        a2 = a2.contiguous()
    a_layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    a_desc = TensorDescriptor(a2, shape=[M, K], strides=[a2.stride(0), 1], block_shape=[tokens, BLOCK_K],
                              layout=a_layout)
    w_desc, s_desc = layout[0], layout[1]
    w_rows = w_desc.block_shape[0] * 4  # 16 rows of 128 bytes per m64 tile
    tiles_m, tiles_n = -(-M // tokens), -(-N // w_rows)
    k_steps = -(-K // BLOCK_K)
    num_sms = num_sms or torch.cuda.get_device_properties(a2.device).multi_processor_count
    full, split = tail_split(tiles_m * tiles_n, k_steps, num_sms)
    rem = tiles_m * tiles_n - full
    ws = torch.empty((rem * split, w_rows, tokens) if split > 1 else (1,), dtype=torch.float32, device=a2.device)
    bias_arg = bias if bias is not None else out
    gs_arg = global_scale if global_scale is not None else out
    fp4_gemm_ws_kernel[(full + rem * split,)](
        a_desc, w_desc, s_desc, out, bias_arg, gs_arg, ws, M, N, k_steps, tiles_m, full, -(-k_steps // split),
        out.stride(0), NV=nv, HAS_BIAS=bias is not None, HAS_GLOBAL_SCALE=global_scale is not None,
        ACTIVATION=activation_code, SPLIT=split, STAGES=STAGES, USE_PDL=use_pdl, num_warps=4, maxnreg=MAX_REGISTERS,
        **({"launch_pdl": True} if use_pdl else {}))
    if split > 1:
        fp4_gemm_ws_reduce_kernel[(rem, w_rows // 32)](
            ws, out, bias_arg, gs_arg, full, tiles_m, M, N, out.stride(0), SPLIT=split, W_ROWS=w_rows,
            TOKENS=tokens, NV=nv, HAS_BIAS=bias is not None, HAS_GLOBAL_SCALE=global_scale is not None,
            ACTIVATION=activation_code, BLOCK_R=32, num_warps=4)
    return out


def _isa_specs() -> list:
    """What ``python -m inductor_moe.isa`` compiles: both formats with a bias and silu, sm_90a only."""
    if not HAS_GLUON:
        return []
    from ..isa import auto_signature

    def box(dtype, bits, rows, cols, swizzle):
        layout = gl.NVMMASharedLayout(swizzle_byte_width=swizzle, element_bitwidth=bits, rank=2)
        return f"tensordesc<{dtype}[{rows},{cols}],{layout!r}>"

    specs = []
    for nv in (False, True):
        const = dict(NV=nv, HAS_BIAS=True, HAS_GLOBAL_SCALE=nv, ACTIVATION=1, SPLIT=2, STAGES=STAGES, USE_PDL=True)
        m64s = W_ROWS // 64
        ptrs = {"a_desc": box("bf16", 16, TOKENS, BLOCK_K, 128), "w_desc": box("u8", 8, 16 * m64s, 128, 0),
                "s_desc": box("u8", 8, m64s * SCALE_BYTES[nv], 128, 0), "out_ptr": "*bf16", "bias_ptr": "*bf16",
                "gscale_ptr": "*fp32", "ws_ptr": "*fp32"}
        options = {"num_warps": 4, "maxnreg": MAX_REGISTERS, "only_arch": 90,
                   "divisible_by_16": ("out_ptr", "bias_ptr", "gscale_ptr", "ws_ptr", "stride_om"),
                   "why_only": "wgmma + setmaxnreg: sm_90 only (sm_100 multiplies FP4 natively: the Triton kernel)"}
        label = f"fp4_gemm_ws[bf16 x {'nvfp4' if nv else 'mxfp4'}, decode in wgmma's registers]"
        specs.append((label, fp4_gemm_ws_kernel, auto_signature(fp4_gemm_ws_kernel, ptrs, const), const, options))
    return specs


ISA_SPECS = _isa_specs()
