"""Dequantise a chunk of FP4 weight rows to bf16 (the large-M path on GPUs without FP4 MMA).

# N: weight rows, K: reduction dim.  Rows [row0, row0 + R) of B [N, K/2] (e2m1 packed along K, low
# nibble first) with block scales [N, K/GROUP] are written to ws [R, K] in the workspace dtype,
# times an optional fp32 global scale.  Grid: (cdiv(R, BLOCK_R), cdiv(K, BLOCK_K)).
"""

import triton
import triton.language as tl

from .fp_codes import apply_block_scale, e2m1_to_f32, e4m3_to_f32, e8m0_to_f32, unpack_e2m1_rows


@triton.jit
def fp4_dequant_rows_kernel(b_ptr, b_scale_ptr, global_scale_ptr, ws_ptr, row0, R, K,
                            stride_bn, stride_bsn, stride_wr,
                            NV: tl.constexpr, HAS_GLOBAL_SCALE: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    tl.static_assert(BLOCK_K % 32 == 0, "BLOCK_K must hold whole scale blocks")
    GROUP: tl.constexpr = 16 if NV else 32
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < R
    rows = (row0 + r).to(tl.int64)
    kb = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    packed = tl.load(b_ptr + rows[:, None] * stride_bn + kb[None, :],
                     mask=r_mask[:, None] & (kb[None, :] < K // 2), other=0)
    ks = tl.program_id(1) * (BLOCK_K // GROUP) + tl.arange(0, BLOCK_K // GROUP)
    s = tl.load(b_scale_ptr + rows[:, None] * stride_bsn + ks[None, :],
                mask=r_mask[:, None] & (ks[None, :] < K // GROUP), other=0).to(tl.int32)
    values = e2m1_to_f32(unpack_e2m1_rows(packed, BLOCK_R, BLOCK_K // 2))
    if NV:
        w = apply_block_scale(values, e4m3_to_f32(s), BLOCK_R, BLOCK_K, 16)
    else:
        w = apply_block_scale(values, e8m0_to_f32(s), BLOCK_R, BLOCK_K, 32)
    if HAS_GLOBAL_SCALE:
        w = w * tl.load(global_scale_ptr)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(ws_ptr + r.to(tl.int64)[:, None] * stride_wr + k[None, :], w.to(ws_ptr.dtype.element_ty),
             mask=r_mask[:, None] & (k[None, :] < K))
