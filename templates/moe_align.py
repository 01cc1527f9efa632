"""Route/align: group the (token, slot) entries by expert into BLOCK_M-aligned row ranges.

# T: tokens, k: experts per token, E: experts, N = T*k routed entries (flat index t*k + j)
# BLOCK_M: rows per GEMM M-block; each expert's rows start on a BLOCK_M boundary.
# CHUNK: entries one program handles per step; E_P2: E rounded up to a power of two.
#
# Outputs (no host sync; buffers sized by the upper bound max_blocks = (N + E'(BLOCK_M-1)) // BLOCK_M):
#   expert_count [E]          entries routed to each expert; ids outside [0, E) are skipped
#   expert_start [E]          first (padded) row of each expert
#   sorted_ids  [max_blocks * BLOCK_M]  flat entry index per row; rows past an expert's count
#                             are padding, never written and masked by the GEMMs via expert_count
#   block_expert [max_blocks] expert of each M-block, -1 for blocks past the last used one
#   ready       [max_blocks]  ZERO_READY only: zeroed here, the persistent L1+L2 kernel's per-block
#                             count of finished L1 tiles (moe_mega.py); zeroing it in the same
#                             call's align keeps the count correct on every CUDA-graph replay
# Within an expert, entries keep their flat order (stable), so the layout is deterministic.

Two forms: ``moe_align_fused`` (one launch: every program counts all entries, then places its own
chunk; up to a few thousand entries, where it takes 3-15 µs on an H100 against 12-23 µs for the three
launches) and ``moe_align_count`` -> ``moe_align_prefix`` -> ``moe_align_scatter`` (one program per
chunk for the histogram and the scatter, one per expert for the prefix over chunks; prefill sizes,
where counting everything in every program would cost more).  The per-chunk counts are stored
expert-major, so each expert's prefix is one program's 1-D scan: a single program scanning the
[chunks, experts] table row block by row block took 42 µs of qwen3-30b-a3b's 68 at 16384 tokens.
"""

import torch
import triton
import triton.language as tl

from .moe_common import pdl_launch_dependents, pdl_wait


@triton.jit
def _chunk_onehot(ids_ptr, c0, N, E, CHUNK: tl.constexpr, E_P2: tl.constexpr):
    offs = c0 + tl.arange(0, CHUNK)
    e = tl.load(ids_ptr + offs, mask=offs < N, other=-1)
    valid = (e >= 0) & (e < E) & (offs < N)
    onehot = (e[:, None] == tl.arange(0, E_P2)[None, :]) & valid[:, None]
    return offs, valid, onehot


@triton.jit
def _write_block_experts(start, padded, pid, grid, max_blocks, block_expert_ptr, ready_ptr,
                         BLOCK_M: tl.constexpr, E_P2: tl.constexpr, NB_CHUNK: tl.constexpr,
                         ZERO_READY: tl.constexpr):
    """Program ``pid`` of ``grid``: block_expert for every expert's blocks pid, pid + grid, ..., its
    share of the unused tail (-1), and of the zeroed ready counters.  Expert e owns blocks
    [start / BLOCK_M, + padded / BLOCK_M)."""
    experts = tl.arange(0, E_P2)
    blocks = padded // BLOCK_M
    first_block = start // BLOCK_M
    for j in range(pid, tl.max(blocks, axis=0), grid):
        tl.store(block_expert_ptr + first_block + j, experts, mask=j < blocks)
    used = tl.sum(blocks, axis=0)
    for b0 in range(used + pid * NB_CHUNK, max_blocks, grid * NB_CHUNK):
        b = b0 + tl.arange(0, NB_CHUNK)
        tl.store(block_expert_ptr + b, tl.full([NB_CHUNK], -1, dtype=tl.int32), mask=b < max_blocks)
    if ZERO_READY:
        for b0 in range(pid * NB_CHUNK, max_blocks, grid * NB_CHUNK):
            b = b0 + tl.arange(0, NB_CHUNK)
            tl.store(ready_ptr + b, tl.zeros([NB_CHUNK], dtype=tl.int32), mask=b < max_blocks)


@triton.jit
def _scatter_chunk(ids_ptr, sorted_ids_ptr, c0, N, E, base,
                   CHUNK: tl.constexpr, E_P2: tl.constexpr):
    """Write the chunk's entries at base[e] + rank among the chunk's entries of expert e."""
    offs, valid, onehot = _chunk_onehot(ids_ptr, c0, N, E, CHUNK, E_P2)
    oh = onehot.to(tl.int32)
    rank = tl.cumsum(oh, axis=0) - 1  # [CHUNK, E_P2] inclusive count - 1
    pos = tl.sum(tl.where(onehot, rank + base[None, :], 0), axis=1)
    tl.store(sorted_ids_ptr + pos, offs, mask=valid)
    return tl.sum(oh, axis=0)


@triton.jit
def _valid_histogram(e, valid, E_P2: tl.constexpr):
    """Entries per expert among the valid ones (the invalid ones are counted in bin 0, then removed)."""
    counts = tl.histogram(tl.where(valid, e, 0), E_P2)
    return counts - tl.where(tl.arange(0, E_P2) == 0, tl.sum((~valid).to(tl.int32), axis=0), 0)


@triton.jit
def moe_align_fused(ids_ptr, N, E, max_blocks,
                    expert_count_ptr, expert_start_ptr, sorted_ids_ptr, block_expert_ptr, ready_ptr,
                    BLOCK_M: tl.constexpr, E_P2: tl.constexpr, CHUNK: tl.constexpr, LOG_CHUNK: tl.constexpr,
                    SCAN: tl.constexpr, NB_CHUNK: tl.constexpr, USE_PDL: tl.constexpr,
                    ZERO_READY: tl.constexpr = False):
    """Program p places entries [p * CHUNK, (p + 1) * CHUNK).  Every program counts all N entries
    (the totals give each expert's rows, the entries before its chunk the rank they start from), so
    one launch needs no grid-wide sync; within the chunk one sort of (expert, entry) keys gives the
    order.  Program 0 writes the counts and starts; the blocks' experts are spread over the grid."""
    tl.static_assert(CHUNK == 1 << LOG_CHUNK, "CHUNK is 2 ** LOG_CHUNK")
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    pdl_wait(USE_PDL)
    chunk0 = pid * CHUNK
    total = tl.zeros([E_P2], dtype=tl.int32)
    before = tl.zeros([E_P2], dtype=tl.int32)
    for s0 in range(0, N, SCAN):
        offs = s0 + tl.arange(0, SCAN)
        e = tl.load(ids_ptr + offs, mask=offs < N, other=-1)
        valid = (e >= 0) & (e < E)  # before the cast: an int64 id past 2^31 must not wrap into range
        e = e.to(tl.int32)
        total += _valid_histogram(e, valid, E_P2)
        if s0 < chunk0:
            before += _valid_histogram(e, valid & (offs < chunk0), E_P2)
    experts = tl.arange(0, E_P2)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    start = tl.cumsum(padded, axis=0) - padded
    if pid == 0:
        tl.store(expert_count_ptr + experts, total, mask=experts < E)
        tl.store(expert_start_ptr + experts, start, mask=experts < E)

    # this chunk's entries: sorted by (expert, entry), the one at sorted position i is rank
    # before[e] + i - (chunk entries of experts below e) within expert e
    local = tl.arange(0, CHUNK)
    e = tl.load(ids_ptr + chunk0 + local, mask=chunk0 + local < N, other=-1)
    valid = (e >= 0) & (e < E)
    e = e.to(tl.int32)
    chunk_counts = _valid_histogram(e, valid, E_P2)
    keys = tl.sort((tl.where(valid, e, E_P2) << LOG_CHUNK) | local)
    key_expert = keys >> LOG_CHUNK
    base = start + before - (tl.cumsum(chunk_counts, axis=0) - chunk_counts)
    pos = tl.gather(base, tl.minimum(key_expert, E_P2 - 1), 0) + local
    tl.store(sorted_ids_ptr + pos, chunk0 + (keys & (CHUNK - 1)), mask=key_expert < E)

    _write_block_experts(start, padded, pid, grid, max_blocks, block_expert_ptr, ready_ptr, BLOCK_M, E_P2, NB_CHUNK,
                         ZERO_READY)
    pdl_launch_dependents(USE_PDL)


@triton.jit
def moe_align_count(ids_ptr, N, E, chunk_counts_ptr, num_chunks,
                    E_P2: tl.constexpr, CHUNK: tl.constexpr, USE_PDL: tl.constexpr):
    """chunk_counts[e, pid] (expert-major): entries of expert e in chunk pid."""
    pid = tl.program_id(0)
    pdl_wait(USE_PDL)
    _, _, onehot = _chunk_onehot(ids_ptr, pid * CHUNK, N, E, CHUNK, E_P2)
    tl.store(chunk_counts_ptr + tl.arange(0, E_P2) * num_chunks + pid, tl.sum(onehot.to(tl.int32), axis=0))
    pdl_launch_dependents(USE_PDL)


@triton.jit
def moe_align_prefix(chunk_counts_ptr, num_chunks, E, expert_count_ptr,
                     BLOCK_C: tl.constexpr, USE_PDL: tl.constexpr):
    """Program e: expert e's row of chunk_counts -> its exclusive prefix over chunks (in place),
    and its total -> expert_count[e]."""
    e = tl.program_id(0)
    pdl_wait(USE_PDL)
    row = chunk_counts_ptr + e * num_chunks
    carry = 0
    for c0 in range(0, num_chunks, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        counts = tl.load(row + c, mask=c < num_chunks, other=0)
        tl.store(row + c, tl.cumsum(counts, axis=0) - counts + carry, mask=c < num_chunks)
        carry += tl.sum(counts, axis=0)
    if e < E:
        tl.store(expert_count_ptr + e, carry)
    pdl_launch_dependents(USE_PDL)


@triton.jit
def moe_align_scatter(ids_ptr, N, E, max_blocks, num_chunks, chunk_prefix_ptr, expert_count_ptr, expert_start_ptr,
                      sorted_ids_ptr, block_expert_ptr, ready_ptr,
                      BLOCK_M: tl.constexpr, E_P2: tl.constexpr, CHUNK: tl.constexpr, NB_CHUNK: tl.constexpr,
                      USE_PDL: tl.constexpr, ZERO_READY: tl.constexpr = False):
    """Every program derives the experts' padded starts from the totals (E_P2 values); program 0
    stores them, each places its chunk and writes its share of block_expert (and ready).  With no
    entries the grid is one program and no chunk."""
    pid = tl.program_id(0)
    pdl_wait(USE_PDL)
    experts = tl.arange(0, E_P2)
    counts = tl.load(expert_count_ptr + experts, mask=experts < E, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    start = tl.cumsum(padded, axis=0) - padded
    if pid == 0:
        tl.store(expert_start_ptr + experts, start, mask=experts < E)
    has_chunk = experts * 0 + pid < num_chunks  # no entries: one program, no chunk
    base = start + tl.load(chunk_prefix_ptr + experts * num_chunks + pid, mask=has_chunk, other=0)
    _scatter_chunk(ids_ptr, sorted_ids_ptr, pid * CHUNK, N, E, base, CHUNK, E_P2)
    _write_block_experts(start, padded, pid, tl.num_programs(0), max_blocks, block_expert_ptr, ready_ptr, BLOCK_M,
                         E_P2, NB_CHUNK, ZERO_READY)
    pdl_launch_dependents(USE_PDL)


# ------------------------------------------------------------------------------ host side

class AlignedBlocks:
    """The align kernels' outputs for one call, as views of one int32 ``scratch`` laid out
    expert_count [E] | expert_start [E] | sorted_ids [max_blocks * block_m] | block_expert [max_blocks]
    | ready [n_ready] (| per-chunk counts, expert-major): kernels that take the whole layout get ``scratch``."""

    def __init__(self, scratch: torch.Tensor, E: int, block_m: int, max_blocks: int, n_ready: int):
        self.scratch, self.max_blocks = scratch, max_blocks
        ids_end = 2 * E + max_blocks * block_m
        self.expert_count, self.expert_start = scratch[:E], scratch[E:2 * E]
        self.sorted_ids = scratch[2 * E:ids_end]
        self.block_expert = scratch[ids_end:ids_end + max_blocks]
        self.ready = scratch[ids_end + max_blocks:ids_end + max_blocks + n_ready]
        self.chunk_counts = scratch[ids_end + max_blocks + n_ready:]


def _fused_tiles(n_entries: int) -> tuple:
    """(entries per program, entries counted per step, warps) of ``moe_align_fused``: H100, graph
    medians at E = 32-256 (benchmarks/NOTES.md, "align"): 128 / 1024 / 4 up to 1024 entries (3-4 µs),
    256 / 2048 / 8 above (8192 entries: 11 µs against 15 for the small tiles)."""
    return (128, 1024, 4) if n_entries <= 1024 else (256, 2048, 8)


def align_blocks(ids, E: int, block_m: int, *, one_launch: bool, chunk: int, use_pdl: bool,
                 zero_ready: bool = False, launch=None) -> AlignedBlocks:
    """Launch the align kernels on ``ids`` ([T, k] expert ids, contiguous) for ``block_m``-pair
    blocks: ``moe_align_fused`` (one launch) or count -> offsets -> scatter (one program per
    ``chunk`` entries).  ``zero_ready``: also zero one counter per block (the persistent kernel's).
    ``launch(site, kernel, grid, args, kwargs)``: a call plan's launcher (lowering/launch.py)."""
    N = ids.numel()
    max_blocks = (N + min(E, N) * (block_m - 1)) // block_m
    e_p2 = max(16, 1 << (E - 1).bit_length())
    num_chunks = -(-N // chunk)
    n_ready = max_blocks if zero_ready else 0
    chunk_counts = 0 if one_launch else num_chunks * e_p2
    scratch = torch.empty(2 * E + max_blocks * block_m + max_blocks + n_ready + chunk_counts, dtype=torch.int32,
                          device=ids.device)
    out = AlignedBlocks(scratch, E, block_m, max_blocks, n_ready)
    ready = dict(ready_ptr=out.ready if zero_ready else out.block_expert, ZERO_READY=zero_ready)
    pdl = {"launch_pdl": True} if use_pdl else {}
    nb_chunk = max(16, 8192 // e_p2)
    if launch is None:
        from ..lowering.launch import jit_launch as launch
    if one_launch:
        fused_chunk, scan, warps = _fused_tiles(N)
        launch("align", moe_align_fused, (max(1, -(-N // fused_chunk)),), (
            ids, N, E, max_blocks, out.expert_count, out.expert_start, out.sorted_ids, out.block_expert), dict(
            BLOCK_M=block_m, E_P2=e_p2, CHUNK=fused_chunk, LOG_CHUNK=fused_chunk.bit_length() - 1, SCAN=scan,
            NB_CHUNK=nb_chunk, USE_PDL=use_pdl, num_warps=warps, **ready, **pdl))
    else:
        launch("align_count", moe_align_count, (num_chunks,), (ids, N, E, out.chunk_counts, num_chunks),
               dict(E_P2=e_p2, CHUNK=chunk, USE_PDL=use_pdl, num_warps=4, **pdl))
        launch("align_prefix", moe_align_prefix, (e_p2,), (out.chunk_counts, num_chunks, E, out.expert_count),
               dict(BLOCK_C=min(1024, max(16, 1 << (num_chunks - 1).bit_length())), USE_PDL=use_pdl, num_warps=4,
                    **pdl))
        launch("align_scatter", moe_align_scatter, (max(1, num_chunks),), (  # no entries: one program still writes
            ids, N, E, max_blocks, num_chunks, out.chunk_counts, out.expert_count, out.expert_start,  # starts, blocks
            out.sorted_ids, out.block_expert), dict(BLOCK_M=block_m, E_P2=e_p2, CHUNK=chunk, NB_CHUNK=nb_chunk,
                                                    USE_PDL=use_pdl, num_warps=4, **ready, **pdl))
    return out
