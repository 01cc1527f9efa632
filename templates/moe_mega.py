"""Persistent "mega" kernel: the L1 and L2 tiles of the expert GEMMs in one launch.

# T: tokens, k: experts per token, H: hidden, I: expert intermediate size, N = T*k
# max_blocks M-blocks (align's upper bound; blocks past the last used one have block_expert -1).
# N1 = cdiv(I, L1_BLOCK_N) L1 tiles per block (gather x w13, SwiGLU -> intermediate, moe_gemm1),
# N2 = cdiv(H, L2_BLOCK_N) L2 tiles per block (intermediate x w2 -> per-(token, slot) rows, moe_gemm2).
# Tile list: the max_blocks * N1 L1 tiles, then the max_blocks * N2 L2 tiles, each block-major
# (N-tiles fastest).  Program p of G runs entries p, p + G, p + 2G, ... (static round-robin).
# ready [max_blocks] int32: finished L1 tiles per block.  Zeroed by the align kernel of the same
# call (ZERO_READY), so there is no host memset and every CUDA-graph replay starts from zero; an
# epoch scheme would need a per-call value the graph cannot carry, or a second counter.
#
# Handshake.  L1 tile of block b: store h (and its fp8 scales), CTA barrier, then one thread adds 1
# to ready[b] with release semantics at GPU scope (the barrier makes every thread's stores part of
# what that release publishes).  L2 tile of block b: one thread spins on an acquire load of ready[b]
# until it reaches N1, CTA barrier, then every thread reads the intermediate rows of block b.
#
# Deadlock freedom.  (1) An L1 tile never waits.  (2) In every program's list all L1 tiles come
# before all L2 tiles (they are the first entries of the list, and a program walks its entries in
# increasing order).  (3) All G programs are resident at once: the launcher takes G <= #SMs x the
# programs per SM that the compiled kernel's registers, shared memory and warps allow, and a
# resident program is never descheduled.  Suppose an L2 tile of block b waited forever.  Each L1
# tile of block b belongs to some program q; q is resident (3), reaches that tile after only L1
# tiles (2), none of which wait (1): so every L1 tile of b finishes and ready[b] reaches N1, a
# contradiction.  PDL keeps (3): the dependent (combine) may start only once every program of this
# grid has triggered or exited, i.e. after all of them are resident, and the primary (align) never
# waits on this kernel.  Blocks without an expert are skipped by both phases (no count, no wait).
#
# TRITON_INTERPRET runs programs one after another, so the launcher uses G = 1 there: the whole list
# in order, every count already complete when an L2 tile reads it.  There the kernel does not spin:
# a count that is not exactly N1 leaves the tile unwritten (the tests poison outputs, so a broken
# count, e.g. an unzeroed counter, shows up as NaN rather than as a hang).
#
# PDL: waits for align before its first global access (like L1); lets combine launch once the
# program's L1 tiles are done (combine still waits for this whole grid before reading rows).
# All weight formats, activations, biases and fp8 activation formats are those of gemm1_tile /
# gemm2_tile, the same tile bodies the two-launch path runs.
"""

import triton
import triton.language as tl

from .moe_common import INTERPRET, pdl_launch_dependents, pdl_wait
from .moe_gemm1 import gemm1_tile
from .moe_gemm2 import gemm2_tile


@triton.jit
def _publish_l1_tile(ready_ptr):
    """After an L1 tile's stores: count it, with release semantics, once per CTA."""
    tl.debug_barrier()  # every thread's stores of h happen before the one release below
    tl.atomic_add(ready_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _wait_l1_block(ready_ptr, target):
    """Before an L2 tile: wait until all ``target`` L1 tiles of the block are counted (acquire).
    Returns whether the count is exactly ``target`` (always, unless the scheme is broken)."""
    count = tl.atomic_add(ready_ptr, 0, sem="acquire", scope="gpu")
    if not INTERPRET:  # interpreted programs run in order (grid 1): never spin there
        while count < target:
            count = tl.atomic_add(ready_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()  # every thread's reads of the intermediate happen after the acquire
    return count == target


@triton.jit
def moe_mega_kernel(
    x_ptr, l1_w_ptr, l1_w_scale_ptr, l1_w_gscale_ptr, l1_b_ptr,
    l2_w_ptr, l2_w_scale_ptr, l2_w_gscale_ptr, l2_b_ptr,
    topk_weights_ptr, inter_ptr, rows_out_ptr,
    sorted_ids_ptr, block_expert_ptr, expert_start_ptr, expert_count_ptr, x_scale_ptr, inter_scale_ptr,
    ready_ptr,
    H, I, top_k, max_blocks,
    stride_xt, l1_stride_we, l1_stride_wn, l1_stride_wk, l1_stride_se, l1_stride_sn, l1_stride_sk, l1_stride_be,
    l2_stride_we, l2_stride_wn, l2_stride_wk, l2_stride_se, l2_stride_sn, l2_stride_sk, l2_stride_be,
    stride_xst, stride_ist,
    alpha, limit, up_offset,
    ACTIVATION: tl.constexpr, HAS_LIMIT: tl.constexpr, INTERLEAVED: tl.constexpr,
    WEIGHT_BEFORE_DOWN: tl.constexpr, WEIGHT_FORMAT: tl.constexpr, BLOCK_M: tl.constexpr,
    GATE_UP_ONE_DOT: tl.constexpr, FP4_DOT_SCALED: tl.constexpr, USE_PDL: tl.constexpr,
    ACT_FORMAT: tl.constexpr, SWAP_AB: tl.constexpr,
    L1_HAS_BIAS: tl.constexpr, L1_BLOCK_N: tl.constexpr, L1_BLOCK_K: tl.constexpr, L1_EVEN_K: tl.constexpr,
    L2_HAS_BIAS: tl.constexpr, L2_BLOCK_N: tl.constexpr, L2_BLOCK_K: tl.constexpr, L2_EVEN_K: tl.constexpr,
    GATE_UP_GSCALES: tl.constexpr = False,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    n1 = tl.cdiv(I, L1_BLOCK_N)
    n2 = tl.cdiv(H, L2_BLOCK_N)
    l1_tiles = max_blocks * n1
    all_tiles = l1_tiles + max_blocks * n2
    pdl_wait(USE_PDL)
    for t in range(pid, l1_tiles, num_programs):
        pid_m = t // n1
        e = tl.load(block_expert_ptr + pid_m)
        if e >= 0:
            gemm1_tile(pid_m * BLOCK_M, t % n1, e, x_ptr, l1_w_ptr, l1_w_scale_ptr, l1_w_gscale_ptr, l1_b_ptr,
                       topk_weights_ptr, inter_ptr, sorted_ids_ptr, expert_start_ptr, expert_count_ptr,
                       x_scale_ptr, inter_scale_ptr, H, I, top_k,
                       stride_xt, l1_stride_we, l1_stride_wn, l1_stride_wk, l1_stride_se, l1_stride_sn,
                       l1_stride_sk, l1_stride_be, stride_xst, stride_ist, alpha, limit, up_offset,
                       ACTIVATION, HAS_LIMIT, L1_HAS_BIAS, INTERLEAVED, WEIGHT_BEFORE_DOWN, WEIGHT_FORMAT,
                       BLOCK_M, L1_BLOCK_N, L1_BLOCK_K, L1_EVEN_K, GATE_UP_ONE_DOT, FP4_DOT_SCALED, False,
                       ACT_FORMAT, SWAP_AB, GATE_UP_GSCALES)
            _publish_l1_tile(ready_ptr + pid_m)
    pdl_launch_dependents(USE_PDL)
    # this program's first L2 entry: the smallest index >= l1_tiles congruent to pid mod G
    first = l1_tiles + (pid - l1_tiles % num_programs + num_programs) % num_programs
    for t in range(first, all_tiles, num_programs):
        pid_m = (t - l1_tiles) // n2
        e = tl.load(block_expert_ptr + pid_m)
        if e >= 0:
            if _wait_l1_block(ready_ptr + pid_m, n1):
                gemm2_tile(pid_m * BLOCK_M, (t - l1_tiles) % n2, e, inter_ptr, l2_w_ptr, l2_w_scale_ptr,
                           l2_w_gscale_ptr,
                           l2_b_ptr, topk_weights_ptr, rows_out_ptr, sorted_ids_ptr, expert_start_ptr,
                           expert_count_ptr, inter_scale_ptr, H, I,
                           l2_stride_we, l2_stride_wn, l2_stride_wk, l2_stride_se, l2_stride_sn, l2_stride_sk,
                           l2_stride_be, stride_ist,
                           L2_HAS_BIAS, not WEIGHT_BEFORE_DOWN, WEIGHT_FORMAT, BLOCK_M, L2_BLOCK_N, L2_BLOCK_K,
                           L2_EVEN_K, FP4_DOT_SCALED, False, ACT_FORMAT, SWAP_AB)
