"""The K parts of fp4_gemm_ws_kernel's split tiles summed, then its epilogue (templates/fp4_gemm_ws.py).

# The last wave of a ws GEMM whose tiles leave most SMs idle is split in K: each of its tiles'
# SPLIT parts writes its raw fp32 accumulator [W_ROWS weight rows, TOKENS tokens] to a workspace
# slot (tail tile r, part p at slot r * SPLIT + p).  Here the parts are added in part order (the
# same bits whatever order the programs ran in), then act(global_scale * acc + bias), stored
# transposed to out[m, n].  Grid: (tail tiles, W_ROWS / BLOCK_R).
"""

import triton
import triton.language as tl

from ._block_scaled_gemm import _activation
from .fp_codes import E4M3_DECODE_SHIFT


@triton.jit
def fp4_gemm_ws_reduce_kernel(ws_ptr, out_ptr, bias_ptr, gscale_ptr, full_tiles, tiles_m, M, N, stride_om,
                              SPLIT: tl.constexpr, W_ROWS: tl.constexpr, TOKENS: tl.constexpr, NV: tl.constexpr,
                              HAS_BIAS: tl.constexpr, HAS_GLOBAL_SCALE: tl.constexpr, ACTIVATION: tl.constexpr,
                              BLOCK_R: tl.constexpr):
    r = tl.program_id(0)
    tile = full_tiles + r
    m0 = (tile % tiles_m) * TOKENS
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, TOKENS)
    acc = tl.zeros([BLOCK_R, TOKENS], tl.float32)
    for p in tl.static_range(SPLIT):
        base = ws_ptr + (r * SPLIT + p).to(tl.int64) * (W_ROWS * TOKENS)
        acc += tl.load(base + rows[:, None] * TOKENS + cols[None, :])
    if HAS_GLOBAL_SCALE:
        acc = acc * tl.load(gscale_ptr)
    if NV:  # the decode left NVFP4 weights this much small (fp_codes.e4m3_decode_factor)
        acc = acc * E4M3_DECODE_SHIFT
    n = (tile // tiles_m) * W_ROWS + rows
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)[:, None]
    acc = _activation(acc, ACTIVATION)
    m = m0 + cols
    tl.store(out_ptr + m[None, :].to(tl.int64) * stride_om + n[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=(n < N)[:, None] & (m < M)[None, :])
