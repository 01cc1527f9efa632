"""Deterministic combine: out[t] = sum over j = 0..k-1 of rows[t*k + j], fp32, fixed order.

# T: tokens, k (TOP_K): experts per token, H: hidden, E: experts
# Slots whose expert id is outside [0, E) were never computed and add nothing.  No atomics:
# the same inputs give bitwise the same output.  Grid: (cdiv(T, BLOCK_T), cdiv(H, BLOCK_H)).
"""

import triton
import triton.language as tl

from .moe_common import pdl_launch_dependents, pdl_wait, store_cast


@triton.jit
def moe_combine_kernel(rows_ptr, topk_ids_ptr, out_ptr, T, H, E, stride_ot,
                       TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                       USE_PDL: tl.constexpr):
    tl.static_assert(TOP_K >= 1, "top-k must be at least 1")
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_mask = t < T
    mask = t_mask[:, None] & (h[None, :] < H)
    pdl_wait(USE_PDL)
    total = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        ids = tl.load(topk_ids_ptr + t * TOP_K + j, mask=t_mask, other=-1)
        live = (ids >= 0) & (ids < E)
        entry = (t * TOP_K + j).to(tl.int64)
        y = tl.load(rows_ptr + entry[:, None] * H + h[None, :], mask=mask & live[:, None], other=0.0,
                    eviction_policy="evict_first")  # each row is read once
        total += y.to(tl.float32)
    pdl_launch_dependents(USE_PDL)
    tl.store(out_ptr + t.to(tl.int64)[:, None] * stride_ot + h[None, :], store_cast(total, out_ptr.dtype.element_ty),
             mask=mask)
