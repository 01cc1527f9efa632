"""Where the warp-specialised fp8 x fp8 GEMMs (templates/moe_gemm1_ws.py, moe_gemm2_ws.py) run,
and their launches.

# They replace moe_gemm1_kernel / moe_gemm2_kernel for DeepSeek's format pair (fp8 block-128
# weights and activations) on sm_90 (wgmma; sm_100 has none), 128-row M-blocks, weights stored
# with K contiguous and experts back to back (one TMA descriptor each), I and H multiples of 128;
# L1 also needs gate rows before up rows (not interleaved) and a silu gate.  Each GEMM is chosen on
# its own and writes the Triton kernel's bits, so combine and the buffers -- the two-launch path's
# (the persistent L1+L2 kernel keeps its own GEMMs) -- do not change; align also zeroes the tile
# counter both take their tiles from (AlignedBlocks.ready[0]).
"""

from __future__ import annotations

from typing import Optional

from ..templates.moe_gemm2_ws import HAS_GLUON, MAX_REGISTERS

BLOCK_M, BLOCK_N, BLOCK_K, STAGES = 128, 128, 128, 4
L1_STAGES = 4  # 48 KB a slot: x rows, gate and up tiles


def ws_l1_reason(fmt: str, act_format: str, block_m: int, hidden: int, intermediate: int, w13_strides: tuple,
                 w13_address: int, gate_up: str, activation: str, arch_major: int, interpreting: bool,
                 setting: bool) -> Optional[str]:
    """None where the warp-specialised L1 takes the call, else why not (config.warp_specialized).
    ``w13_strides``: (expert, row, K) in elements of w13 seen as [E, 2I, H]."""
    why = _ws_reason(fmt, act_format, block_m, hidden, intermediate, arch_major, interpreting, setting)
    why = why or _weight_reason("w13", w13_strides, w13_address, 2 * intermediate)
    if why is None and gate_up != "concat":
        return "gate rows before up rows only (not interleaved)"
    if why is None and activation != "silu":
        return "a silu gate only"
    return why


def ws_l2_reason(fmt: str, act_format: str, block_m: int, hidden: int, intermediate: int, w2_strides: tuple,
                 w2_address: int, arch_major: int, interpreting: bool, setting: bool) -> Optional[str]:
    """None where the warp-specialised L2 takes the call, else why not (config.warp_specialized).
    ``w2_strides``: (expert, row, K) in elements of w2 seen as [E, H, I]."""
    why = _ws_reason(fmt, act_format, block_m, hidden, intermediate, arch_major, interpreting, setting)
    return why or _weight_reason("w2", w2_strides, w2_address, hidden)


def _ws_reason(fmt, act_format, block_m, hidden, intermediate, arch_major, interpreting, setting) -> Optional[str]:
    if not setting:
        return "config.warp_specialized is off"
    if fmt != "fp8_block128" or act_format != "fp8_block128":
        return "fp8 block-128 weights with fp8 block-128 activations only"
    if not HAS_GLUON:
        return "this triton has no Gluon"
    if interpreting or arch_major != 9:
        return "sm_90 only (wgmma)"
    if block_m != BLOCK_M:
        return f"{BLOCK_M}-row M-blocks only"
    if hidden % BLOCK_N or intermediate % BLOCK_K:
        return f"H and I multiples of {BLOCK_N}"
    return None


def _weight_reason(name: str, strides: tuple, address: int, rows: int) -> Optional[str]:
    """The weight's tiles come through one TMA descriptor of it seen as [E * rows, K]
    (_weight_rows_descriptor): K contiguous, experts back to back, rows and base 16-byte aligned."""
    if strides[2] != 1:
        return f"{name} with K contiguous only"
    if strides[1] % 16 or address % 16:
        return f"{name} rows 16-byte aligned only"
    if strides[0] != rows * strides[1]:
        return f"{name} with its experts back to back only (one TMA descriptor)"
    return None


def _weight_rows_descriptor(w, row_stride: int):
    """A TMA descriptor of BLOCK_N x BLOCK_K boxes over the weight [E, N, K] seen as [E * N, K]
    (experts back to back: the rules check it), in the kernels' 128-byte-swizzled layout."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    rows = w.as_strided((w.shape[0] * w.shape[1], w.shape[2]), (row_stride, 1))
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
    return TensorDescriptor(rows, shape=list(rows.shape), strides=[row_stride, 1], block_shape=[BLOCK_N, BLOCK_K],
                            layout=layout)


def launch_ws_l1(l1_args: tuple, l1_kw: dict, counter, max_blocks: int, num_sms: int, use_pdl: bool) -> int:
    """moe_gemm1_kernel's arguments and constexprs (lowering/moe.py: l1_args, l1_kw) -> the
    warp-specialised L1, its tiles from ``counter`` (an int32 that is 0).  Returns the tickets it
    takes: every tile, then one that ends each program."""
    from ..templates.moe_gemm1_ws import moe_gemm1_fp8_ws_kernel

    (xq, w13, s13, _gscale, b13, tw, inter, sorted_ids, block_expert, expert_start, expert_count, x_s, inter_s,
     H, I, top_k, stride_xt, _w13_se, w13_sn, _w13_sk, s13_se, s13_sn, s13_sk, b13_se, x_s_stride, inter_s_stride,
     alpha, limit, up_offset) = l1_args
    num_tiles = max_blocks * (I // BLOCK_N)
    grid = max(1, min(num_sms, num_tiles))
    moe_gemm1_fp8_ws_kernel[(grid,)](
        xq, _weight_rows_descriptor(w13, w13_sn), s13, b13, tw, inter, sorted_ids, block_expert, expert_start,
        expert_count, x_s, inter_s, counter, H, I, top_k, inter.shape[0], max_blocks, stride_xt, s13_se, s13_sn,
        s13_sk, b13_se, x_s_stride, inter_s_stride, alpha, limit, up_offset,
        HAS_BIAS=l1_kw["HAS_BIAS"], HAS_LIMIT=l1_kw["HAS_LIMIT"], WEIGHT_BEFORE_DOWN=l1_kw["WEIGHT_BEFORE_DOWN"],
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, STAGES=L1_STAGES, USE_PDL=use_pdl, num_warps=4,
        maxnreg=MAX_REGISTERS, **({"launch_pdl": True} if use_pdl else {}))
    return num_tiles + grid


def launch_ws_l2(l2_args: tuple, has_bias: bool, weight_after_down: bool, counter, ticket_base: int,
                 max_blocks: int, num_sms: int, use_pdl: bool) -> None:
    """moe_gemm2_kernel's arguments (lowering/moe.py: l2_args) -> the warp-specialised L2, its tiles
    from ``counter`` less ``ticket_base`` (the tickets the warp-specialised L1 took, else 0)."""
    from ..templates.moe_gemm2_ws import moe_gemm2_fp8_ws_kernel

    (inter, w2, s2, _gscale, b2, tw, rows, sorted_ids, block_expert, expert_start, expert_count, inter_s,
     H, I, _w2_se, w2_sn, _w2_sk, s2_se, s2_sn, s2_sk, b2_se, inter_s_stride) = l2_args
    grid = max(1, min(num_sms, max_blocks * (H // BLOCK_N)))
    moe_gemm2_fp8_ws_kernel[(grid,)](
        inter, _weight_rows_descriptor(w2, w2_sn), s2, b2, tw, rows, sorted_ids, block_expert, expert_start,
        expert_count, inter_s, counter, H, I, inter.shape[0], max_blocks, ticket_base, s2_se, s2_sn, s2_sk, b2_se,
        inter_s_stride, HAS_BIAS=has_bias, WEIGHT_AFTER_DOWN=weight_after_down, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K, STAGES=STAGES, USE_PDL=use_pdl, num_warps=4, maxnreg=MAX_REGISTERS,
        **({"launch_pdl": True} if use_pdl else {}))
