"""Where the warp-specialised fp8 x fp8 L2 (templates/moe_gemm2_ws.py) runs, and its launch.

# It replaces moe_gemm2_kernel for DeepSeek's format pair (fp8 block-128 weights and activations)
# on sm_90 (wgmma; sm_100 has none), 128-row M-blocks, weights stored [E, H, I] with K
# contiguous, I and H multiples of 128.  Everything else -- align, L1, combine, the buffers --
# is the two-launch path's (the persistent L1+L2 kernel keeps its own L2), so the choice changes
# only who computes the per-(token, slot) rows.
"""

from __future__ import annotations

from typing import Optional

from ..templates.moe_gemm2_ws import HAS_GLUON, MAX_REGISTERS

BLOCK_M, BLOCK_N, BLOCK_K, STAGES = 128, 128, 128, 4


def ws_l2_reason(fmt: str, act_format: str, block_m: int, hidden: int, intermediate: int, w2_strides: tuple,
                 w2_address: int, arch_major: int, interpreting: bool, setting: bool) -> Optional[str]:
    """None where the warp-specialised L2 takes the call, else why not (config.warp_specialized).
    ``w2_strides``: (expert, row, K) in elements of w2 seen as [E, H, I]; the rows are copied 16
    bytes at a time (cp.async), so they and the tensor's address are 16-byte aligned."""
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
    if w2_strides[2] != 1:
        return "w2 with K contiguous only"
    if w2_strides[0] % 16 or w2_strides[1] % 16 or w2_address % 16:
        return "w2 rows 16-byte aligned only"
    return None


def launch_ws_l2(l2_args: tuple, has_bias: bool, weight_after_down: bool, max_blocks: int, num_sms: int,
                 use_pdl: bool) -> None:
    """moe_gemm2_kernel's arguments (lowering/moe.py: l2_args) -> the warp-specialised L2."""
    from ..templates.moe_gemm2_ws import moe_gemm2_fp8_ws_kernel

    (inter, w2, s2, _gscale, b2, tw, rows, sorted_ids, block_expert, expert_start, expert_count, inter_s,
     H, I, w2_se, w2_sn, _w2_sk, s2_se, s2_sn, s2_sk, b2_se, inter_s_stride) = l2_args
    grid = max(1, min(num_sms, max_blocks * (H // BLOCK_N)))
    moe_gemm2_fp8_ws_kernel[(grid,)](
        inter, w2, s2, b2, tw, rows, sorted_ids, block_expert, expert_start, expert_count, inter_s,
        H, I, inter.shape[0], max_blocks, w2_se, w2_sn, s2_se, s2_sn, s2_sk, b2_se, inter_s_stride,
        HAS_BIAS=has_bias, WEIGHT_AFTER_DOWN=weight_after_down, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K, STAGES=STAGES, USE_PDL=use_pdl, num_warps=4, maxnreg=MAX_REGISTERS,
        **({"launch_pdl": True} if use_pdl else {}))
