"""Where the warp-specialised GEMMs (templates/moe_gemm1_ws.py, moe_gemm2_ws.py: fp8 x fp8;
moe_gemm2_ws_dense.py: a bf16 / fp16 L2) run, and their launches.

# They replace moe_gemm1_kernel / moe_gemm2_kernel for DeepSeek's format pair (fp8 block-128
# weights and activations, I and H multiples of 64: gpt-oss's 2880 ends in half a 128-column tile and
# half a K step), and moe_gemm2_kernel for dense experts
# (weights in the activations' 16-bit dtype) where I is short (DENSE_L2_MAX_I; benchmarks/NOTES.md,
# "Warp-specialised dense GEMMs": the Triton kernels are L2-cache bound at long K, and so was a
# dense WS L1), on sm_90 (wgmma; sm_100 has none), 128-row M-blocks, weights stored with K
# contiguous and experts back to back (one TMA descriptor each); L1 also needs gate rows before up
# rows (not interleaved) and a silu gate.  Each GEMM is chosen on its own and writes the Triton
# kernel's bits, so combine and the buffers -- the two-launch path's (the persistent L1+L2 kernel
# keeps its own GEMMs) -- do not change; align also zeroes the tile counter both take their tiles
# from (AlignedBlocks.ready[0]).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..templates.moe_gemm2_ws import HAS_GLUON, MAX_REGISTERS
from .launch import jit_launch

BLOCK_M, BLOCK_N, BLOCK_K, STAGES = 128, 128, 128, 4  # BLOCK_K in bytes: 128 e4m3, 64 bf16 / fp16
L1_STAGES = 4  # 48 KB a slot: x rows, gate and up tiles
# fp8 L2: 256-column tiles where H allows (two 128-column wgmmas a K step, as L1's gate and up), so
# each tile's fixed cost (epilogue, next tile's start) and gathered-row loads serve twice the MMAs
FP8_L2_WIDE_BLOCK_N = 256
# dense L2: 256-column tiles (each warpgroup's wgmma n = 256: at n = 128 the MMAs' operand reads and
# the ring's fills outran shared memory's bandwidth), and only up to 16 K steps: its persistent walk
# hides the per-tile cost that short K leaves exposed (qwen3-30b-a3b, I = 768: 0.7-2.4% of the layer),
# while at I = 2048 / 2880 it measured 0.3-2.3% slower than the Triton L2
DENSE_L2_BLOCK_N = 256
DENSE_L2_MAX_I = 1024
DENSE_DTYPES = (torch.bfloat16, torch.float16)


def ws_l1_reason(fmt: str, act_format: str, dtypes: tuple, block_m: int, hidden: int, intermediate: int,
                 w13_strides: tuple, w13_address: int, gate_up: str, activation: str, arch_major: int,
                 interpreting: bool, setting: bool) -> Optional[str]:
    """None where the warp-specialised L1 takes the call, else why not (config.warp_specialized).
    ``dtypes``: (activations, weight); ``w13_strides``: (expert, row, K) in elements of w13 seen as
    [E, 2I, H]."""
    why = _ws_reason(fmt, act_format, dtypes, block_m, hidden, intermediate, arch_major, interpreting, setting)
    if why is None and fmt == "dense":
        return "fp8 x fp8 only: for dense experts the Triton L1 measured faster"
    why = why or _weight_reason("w13", w13_strides, w13_address, 2 * intermediate)
    if why is None and gate_up != "concat":
        return "gate rows before up rows only (not interleaved)"
    if why is None and activation != "silu":
        return "a silu gate only"
    return why


def ws_l2_reason(fmt: str, act_format: str, dtypes: tuple, block_m: int, hidden: int, intermediate: int,
                 w2_strides: tuple, w2_address: int, arch_major: int, interpreting: bool,
                 setting: bool) -> Optional[str]:
    """None where the warp-specialised L2 takes the call, else why not (config.warp_specialized).
    ``dtypes``: (activations, weight); ``w2_strides``: (expert, row, K) in elements of w2 seen as
    [E, H, I]."""
    why = _ws_reason(fmt, act_format, dtypes, block_m, hidden, intermediate, arch_major, interpreting, setting)
    if why is None and fmt == "dense" and intermediate > DENSE_L2_MAX_I:
        return f"dense experts with I <= {DENSE_L2_MAX_I} only (at longer K the Triton L2 measured faster)"
    return why or _weight_reason("w2", w2_strides, w2_address, hidden)


def _ws_reason(fmt, act_format, dtypes, block_m, hidden, intermediate, arch_major, interpreting,
               setting) -> Optional[str]:
    if not setting:
        return "config.warp_specialized is off"
    dense = fmt == "dense" and act_format == "dense"
    if not dense and (fmt != "fp8_block128" or act_format != "fp8_block128"):
        return "fp8 block-128 weights with fp8 block-128 activations, or dense weights and activations, only"
    if dense and (dtypes[0] not in DENSE_DTYPES or dtypes[1] != dtypes[0]):
        return "dense weights in the activations' dtype, bf16 or fp16, only"
    if not HAS_GLUON:
        return "this triton has no Gluon"
    if interpreting or arch_major != 9:
        return "sm_90 only (wgmma)"
    if block_m != BLOCK_M:
        return f"{BLOCK_M}-row M-blocks only"
    # dense: whole K steps (N tiles may end short); fp8: K steps and N tiles may end half full
    multiple = _block_k(dtypes[0]) if dense else BLOCK_N // 2
    if hidden % multiple or intermediate % multiple:
        return f"H and I multiples of {multiple}"
    return None


def _block_k(dtype: torch.dtype) -> int:
    """One K step: a 128-byte row (the swizzle's) of the operands."""
    return BLOCK_K // dtype.itemsize


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


def _weight_rows_descriptor(w, row_stride: int, block_n: int = BLOCK_N):
    """A TMA descriptor of block_n x (one K step) boxes over the weight [E, N, K] seen as [E * N, K]
    (experts back to back: the rules check it), in the kernels' 128-byte-swizzled layout."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    rows = w.as_strided((w.shape[0] * w.shape[1], w.shape[2]), (row_stride, 1))
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8 * w.element_size(), rank=2)
    return TensorDescriptor(rows, shape=list(rows.shape), strides=[row_stride, 1],
                            block_shape=[block_n, _block_k(w.dtype)], layout=layout)


def launch_ws_l1(l1_args: tuple, l1_kw: dict, counter, max_blocks: int, num_sms: int, use_pdl: bool,
                 launch=jit_launch) -> int:
    """moe_gemm1_kernel's arguments and constexprs (lowering/moe.py: l1_args, l1_kw) -> the
    warp-specialised L1, its tiles from ``counter`` (an int32 that is 0).  Returns the tickets it
    takes: every tile, then one that ends each program."""
    from ..templates.moe_gemm1_ws import moe_gemm1_fp8_ws_kernel

    (xq, w13, s13, _gscale, b13, tw, inter, sorted_ids, block_expert, expert_start, expert_count, x_s, inter_s,
     H, I, top_k, stride_xt, _w13_se, w13_sn, _w13_sk, s13_se, s13_sn, s13_sk, b13_se, x_s_stride, inter_s_stride,
     alpha, limit, up_offset) = l1_args
    num_tiles = max_blocks * -(-I // BLOCK_N)
    grid = max(1, min(num_sms, num_tiles))
    launch("ws_l1", moe_gemm1_fp8_ws_kernel, (grid,), (
        xq, _weight_rows_descriptor(w13, w13_sn), s13, b13, tw, inter, sorted_ids, block_expert, expert_start,
        expert_count, x_s, inter_s, counter, H, I, top_k, inter.shape[0], max_blocks, stride_xt, s13_se, s13_sn,
        s13_sk, b13_se, x_s_stride, inter_s_stride, alpha, limit, up_offset), dict(
        HAS_BIAS=l1_kw["HAS_BIAS"], HAS_LIMIT=l1_kw["HAS_LIMIT"], WEIGHT_BEFORE_DOWN=l1_kw["WEIGHT_BEFORE_DOWN"],
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, STAGES=L1_STAGES, USE_PDL=use_pdl,
        UP_SPLIT=l1_up_split(I), num_warps=4, maxnreg=MAX_REGISTERS,
        **({"launch_pdl": True} if use_pdl else {})))
    return num_tiles + grid


def l1_up_split(intermediate: int) -> int:
    """The columns of an L1 up tile (w13 rows I + n, n % 128 == 0) in its first 128-row fp8 scale
    block: 0 where the tile lies in one block (I % 128 == 0), else 128 - I % 128."""
    return -intermediate % BLOCK_N


def launch_ws_l2(l2_args: tuple, has_bias: bool, weight_after_down: bool, counter, ticket_base: int,
                 max_blocks: int, num_sms: int, use_pdl: bool, launch=jit_launch) -> None:
    """moe_gemm2_kernel's arguments (lowering/moe.py: l2_args) -> the warp-specialised L2, its tiles
    from ``counter`` less ``ticket_base`` (the tickets the warp-specialised L1 took, else 0)."""
    from ..templates.moe_gemm2_ws import moe_gemm2_fp8_ws_kernel
    from ..templates.moe_gemm2_ws_dense import moe_gemm2_dense_ws_kernel

    (inter, w2, s2, _gscale, b2, tw, rows, sorted_ids, block_expert, expert_start, expert_count, inter_s,
     H, I, _w2_se, w2_sn, _w2_sk, s2_se, s2_sn, s2_sk, b2_se, inter_s_stride) = l2_args
    pdl = {"launch_pdl": True} if use_pdl else {}
    if w2.dtype in DENSE_DTYPES:
        bn = DENSE_L2_BLOCK_N
        launch("ws_l2", moe_gemm2_dense_ws_kernel, (max(1, min(num_sms, max_blocks * -(-H // bn))),), (
            inter, _weight_rows_descriptor(w2, w2_sn, bn), b2, tw, rows, sorted_ids, block_expert, expert_start,
            expert_count, counter, H, I, inter.shape[0], max_blocks, ticket_base, b2_se), dict(HAS_BIAS=has_bias,
            WEIGHT_AFTER_DOWN=weight_after_down, BLOCK_M=BLOCK_M, BLOCK_N=bn, BLOCK_K=_block_k(w2.dtype),
            STAGES=STAGES, USE_PDL=use_pdl, num_warps=4, maxnreg=MAX_REGISTERS, **pdl))
        return
    bn = fp8_l2_block_n(H)
    grid = max(1, min(num_sms, max_blocks * -(-H // bn)))
    launch("ws_l2", moe_gemm2_fp8_ws_kernel, (grid,), (
        inter, _weight_rows_descriptor(w2, w2_sn, bn), s2, b2, tw, rows, sorted_ids, block_expert, expert_start,
        expert_count, inter_s, counter, H, I, inter.shape[0], max_blocks, ticket_base, s2_se, s2_sn, s2_sk, b2_se,
        inter_s_stride), dict(HAS_BIAS=has_bias, WEIGHT_AFTER_DOWN=weight_after_down, BLOCK_M=BLOCK_M, BLOCK_N=bn,
        BLOCK_K=BLOCK_K, STAGES=STAGES, USE_PDL=use_pdl, N_TAIL=H % bn != 0,
        num_warps=4, maxnreg=MAX_REGISTERS, **pdl))


def fp8_l2_block_n(hidden: int) -> int:
    """The fp8 L2's tile width: 256 columns where the last tile's padding is at most an eighth of H
    (gpt-oss's 2880: 12 tiles, the last a quarter full), else 128."""
    return FP8_L2_WIDE_BLOCK_N if -hidden % FP8_L2_WIDE_BLOCK_N <= hidden // 8 else BLOCK_N


def ws_isa_specs() -> dict:
    """{template module: [(label, kernel, signature, constexprs, options)]} for ``inductor_moe.isa``:
    the warp-specialised GEMMs as launch_ws_l1 / launch_ws_l2 build them for a qwen3-30b-a3b prefill
    call (H = 2048, I = 768, 128-row blocks; the fp8 L2 also on the 128-column tiles of an H that is
    an odd multiple of 128, both fp8 GEMMs also at gpt-oss-120b's H = I = 2880 -- half a K step,
    half an N tile, L1's up tiles across two scale blocks -- the dense L2 in bf16 and fp16), with
    the JIT's 16-divisibility of pointers and sizes.  sm_90a only: wgmma and setmaxnreg have no
    sm_100 form (Blackwell runs the Triton kernels: _ws_reason)."""
    if not HAS_GLUON:
        return {}
    from triton.experimental.gluon.language import NVMMASharedLayout

    from ..isa import auto_signature
    from ..templates.moe_gemm1_ws import moe_gemm1_fp8_ws_kernel
    from ..templates.moe_gemm2_ws import moe_gemm2_fp8_ws_kernel
    from ..templates.moe_gemm2_ws_dense import moe_gemm2_dense_ws_kernel

    def weight_box(dtype: str, bits: int, rows: int) -> str:
        layout = NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=bits, rank=2)
        return f"tensordesc<{dtype}[{rows},{BLOCK_K * 8 // bits}],{layout!r}>"

    def spec(label, kernel, pointers, const, floats=()):
        sig = auto_signature(kernel, pointers, const, floats)
        divisible = tuple(a for a in kernel.arg_names if a.endswith("_ptr") or a in ("H", "I", "stride_xt"))
        options = {"num_warps": 4, "maxnreg": MAX_REGISTERS, "only_arch": 90, "divisible_by_16": divisible,
                   "why_only": "wgmma + setmaxnreg: sm_90 only, Blackwell runs the Triton kernels"}
        return label, kernel, sig, const, options

    fp8 = {"w_scale_ptr": "*fp32", "b_ptr": "*bf16", "topk_weights_ptr": "*fp32"}
    common = dict(BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, USE_PDL=True, HAS_BIAS=False)
    l1 = [spec(f"moe_gemm1_ws[fp8_block128 x fp8_block128{label}]", moe_gemm1_fp8_ws_kernel,
               {**fp8, "x_ptr": "*fp8e4nv", "inter_ptr": "*fp8e4nv", "x_scale_ptr": "*fp32",
                "inter_scale_ptr": "*fp32", "w_desc": weight_box("fp8e4nv", 8, BLOCK_N)},
               dict(common, HAS_LIMIT=False, WEIGHT_BEFORE_DOWN=False, BLOCK_N=BLOCK_N, STAGES=L1_STAGES,
                    UP_SPLIT=l1_up_split(i)),
               ("alpha", "limit", "up_offset"))
          for label, i in (("", 768), (", H = I = 2880", 2880))]
    l2 = [spec(f"moe_gemm2_ws[fp8_block128 x fp8_block128, {bn} columns{label}]", moe_gemm2_fp8_ws_kernel,
               {**fp8, "inter_ptr": "*fp8e4nv", "rows_out_ptr": "*bf16", "inter_scale_ptr": "*fp32",
                "w_desc": weight_box("fp8e4nv", 8, bn)},
               dict(common, WEIGHT_AFTER_DOWN=True, BLOCK_N=bn, STAGES=STAGES, N_TAIL=n_tail))
          for bn, label, n_tail in ((FP8_L2_WIDE_BLOCK_N, "", False), (BLOCK_N, "", False),
                                    (fp8_l2_block_n(2880), ", H = I = 2880", True))]
    dense = [spec(f"moe_gemm2_ws_dense[{dtype} x dense]", moe_gemm2_dense_ws_kernel,
                  {"inter_ptr": "*" + dtype, "b_ptr": "*" + dtype, "topk_weights_ptr": "*fp32",
                   "rows_out_ptr": "*" + dtype, "w_desc": weight_box(dtype, 16, DENSE_L2_BLOCK_N)},
                  dict(common, WEIGHT_AFTER_DOWN=True, BLOCK_N=DENSE_L2_BLOCK_N, BLOCK_K=BLOCK_K // 2, STAGES=STAGES))
             for dtype in ("bf16", "fp16")]
    return {"moe_gemm1_ws": l1, "moe_gemm2_ws": l2, "moe_gemm2_ws_dense": dense}

