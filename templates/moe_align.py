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
chunk; 3-4 µs on an H100 up to 1024 entries) and ``moe_align_chunk_counts`` -> ``moe_align_place``
(one program per chunk counts it; then one per chunk sums the table of per-chunk counts -- 128 rows
at most up to 131K entries -- and places its chunk: 4.7 µs at 8192 entries against 11.9 for the one
launch, 12 at 131K against 43 for the count / prefix-per-expert / scatter launches it replaced;
benchmarks/NOTES.md, "align").  Both place a chunk by one sort of its (expert, entry) keys.
"""

import torch
import triton
import triton.language as tl

from .moe_common import pdl_launch_dependents, pdl_wait


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
def _valid_histogram(e, valid, E_P2: tl.constexpr):
    """Entries per expert among the valid ones (the invalid ones are counted in bin 0, then removed)."""
    counts = tl.histogram(tl.where(valid, e, 0), E_P2)
    return counts - tl.where(tl.arange(0, E_P2) == 0, tl.sum((~valid).to(tl.int32), axis=0), 0)


@triton.jit
def _chunk_ids(ids_ptr, chunk0, N, E, CHUNK: tl.constexpr):
    """The chunk's expert ids as int32 and which are in [0, E) (checked before the cast: an int64 id
    past 2^31 must not wrap into range)."""
    offs = chunk0 + tl.arange(0, CHUNK)
    e = tl.load(ids_ptr + offs, mask=offs < N, other=-1)
    valid = (e >= 0) & (e < E)
    return e.to(tl.int32), valid


@triton.jit
def _place_chunk(ids_ptr, sorted_ids_ptr, chunk0, N, E, first_row,
                 CHUNK: tl.constexpr, LOG_CHUNK: tl.constexpr, E_P2: tl.constexpr):
    """Write entries [chunk0, chunk0 + CHUNK) at their rows: expert e's first one at first_row[e]
    (its expert's start plus the entries of e before the chunk), the rest in flat order after it.
    One sort of (expert, entry) keys orders the chunk: the key at sorted position i is entry
    first_row[e] + i - (chunk entries of experts below e) of expert e."""
    local = tl.arange(0, CHUNK)
    e, valid = _chunk_ids(ids_ptr, chunk0, N, E, CHUNK)
    chunk_counts = _valid_histogram(e, valid, E_P2)
    keys = tl.sort((tl.where(valid, e, E_P2) << LOG_CHUNK) | local)
    key_expert = keys >> LOG_CHUNK
    base = first_row - (tl.cumsum(chunk_counts, axis=0) - chunk_counts)
    pos = tl.gather(base, tl.minimum(key_expert, E_P2 - 1), 0) + local
    tl.store(sorted_ids_ptr + pos, chunk0 + (keys & (CHUNK - 1)), mask=key_expert < E)


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
        counts = _valid_histogram(e, valid, E_P2)
        total += counts
        if s0 + SCAN <= chunk0:  # the whole step is before this chunk: the same counts
            before += counts
        elif s0 < chunk0:
            before += _valid_histogram(e, valid & (offs < chunk0), E_P2)
    experts = tl.arange(0, E_P2)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    start = tl.cumsum(padded, axis=0) - padded
    if pid == 0:
        tl.store(expert_count_ptr + experts, total, mask=experts < E)
        tl.store(expert_start_ptr + experts, start, mask=experts < E)

    _place_chunk(ids_ptr, sorted_ids_ptr, chunk0, N, E, start + before, CHUNK, LOG_CHUNK, E_P2)
    _write_block_experts(start, padded, pid, grid, max_blocks, block_expert_ptr, ready_ptr, BLOCK_M, E_P2, NB_CHUNK,
                         ZERO_READY)
    pdl_launch_dependents(USE_PDL)


@triton.jit
def moe_align_chunk_counts(ids_ptr, N, E, chunk_counts_ptr,
                           E_P2: tl.constexpr, CHUNK: tl.constexpr, USE_PDL: tl.constexpr):
    """chunk_counts[pid, e]: entries of expert e among entries [pid * CHUNK, (pid + 1) * CHUNK)."""
    pid = tl.program_id(0)
    pdl_wait(USE_PDL)
    e, valid = _chunk_ids(ids_ptr, pid * CHUNK, N, E, CHUNK)
    tl.store(chunk_counts_ptr + pid * E_P2 + tl.arange(0, E_P2), _valid_histogram(e, valid, E_P2))
    pdl_launch_dependents(USE_PDL)


@triton.jit
def moe_align_place(ids_ptr, N, E, max_blocks, num_chunks, chunk_counts_ptr, expert_count_ptr, expert_start_ptr,
                    sorted_ids_ptr, block_expert_ptr, ready_ptr,
                    BLOCK_M: tl.constexpr, E_P2: tl.constexpr, CHUNK: tl.constexpr, LOG_CHUNK: tl.constexpr,
                    TABLE_ROWS: tl.constexpr, NB_CHUNK: tl.constexpr, USE_PDL: tl.constexpr,
                    ZERO_READY: tl.constexpr = False):
    """Program p places chunk p as ``moe_align_fused`` does, its counts summed from the per-chunk
    table (all chunks: each expert's rows; chunks before p: the rank its entries start from), so
    no program reads every id.  Program 0 writes the counts and starts."""
    tl.static_assert(CHUNK == 1 << LOG_CHUNK, "CHUNK is 2 ** LOG_CHUNK")
    pid = tl.program_id(0)
    pdl_wait(USE_PDL)
    experts = tl.arange(0, E_P2)
    total = tl.zeros([E_P2], dtype=tl.int32)
    before = tl.zeros([E_P2], dtype=tl.int32)
    for c0 in range(0, num_chunks, TABLE_ROWS):
        c = c0 + tl.arange(0, TABLE_ROWS)
        rows = tl.load(chunk_counts_ptr + c[:, None] * E_P2 + experts[None, :], mask=c[:, None] < num_chunks,
                       other=0)
        total += tl.sum(rows, axis=0)
        before += tl.sum(tl.where(c[:, None] < pid, rows, 0), axis=0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    start = tl.cumsum(padded, axis=0) - padded
    if pid == 0:
        tl.store(expert_count_ptr + experts, total, mask=experts < E)
        tl.store(expert_start_ptr + experts, start, mask=experts < E)
    _place_chunk(ids_ptr, sorted_ids_ptr, pid * CHUNK, N, E, start + before, CHUNK, LOG_CHUNK, E_P2)
    _write_block_experts(start, padded, pid, tl.num_programs(0), max_blocks, block_expert_ptr, ready_ptr, BLOCK_M,
                         E_P2, NB_CHUNK, ZERO_READY)
    pdl_launch_dependents(USE_PDL)


# ------------------------------------------------------------------------------ host side

class AlignedBlocks:
    """The align kernels' outputs for one call, as views of one int32 ``scratch`` laid out
    expert_count [E] | expert_start [E] | sorted_ids [max_blocks * block_m] | block_expert [max_blocks]
    | ready [n_ready] (| per-chunk counts [chunks, E_P2]): kernels that take the whole layout get ``scratch``."""

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
    256 / 2048 / 8 above (where the plan takes it only by an override)."""
    return (128, 1024, 4) if n_entries <= 1024 else (256, 2048, 8)


def align_blocks(ids, E: int, block_m: int, *, one_launch: bool, chunk: int, use_pdl: bool,
                 zero_ready: bool = False, launch=None) -> AlignedBlocks:
    """Launch the align kernels on ``ids`` ([T, k] expert ids, contiguous) for ``block_m``-pair
    blocks: ``moe_align_fused`` (one launch) or counts -> place (one program per ``chunk`` entries,
    a power of two).  ``zero_ready``: also zero one counter per block (the persistent kernel's).
    ``launch(site, kernel, grid, args, kwargs)``: a call plan's launcher (lowering/launch.py)."""
    N = ids.numel()
    max_blocks = (N + min(E, N) * (block_m - 1)) // block_m
    e_p2 = max(16, 1 << (E - 1).bit_length())
    num_chunks = -(-N // chunk)
    n_ready = max_blocks if zero_ready else 0
    chunk_counts = 0 if one_launch else max(1, num_chunks) * e_p2
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
        rows = max(1, num_chunks)  # no entries: one program still writes the starts and blocks
        warps = 8 if chunk >= 1024 else 4
        launch("align_counts", moe_align_chunk_counts, (rows,), (ids, N, E, out.chunk_counts),
               dict(E_P2=e_p2, CHUNK=chunk, USE_PDL=use_pdl, num_warps=warps, **pdl))
        table_rows = max(1, min(triton.next_power_of_2(rows), 8192 // e_p2))  # a [rows, E_P2] load of <= 8K ints
        launch("align_place", moe_align_place, (rows,), (
            ids, N, E, max_blocks, rows, out.chunk_counts, out.expert_count, out.expert_start, out.sorted_ids,
            out.block_expert), dict(BLOCK_M=block_m, E_P2=e_p2, CHUNK=chunk, LOG_CHUNK=chunk.bit_length() - 1,
                                    TABLE_ROWS=table_rows, NB_CHUNK=nb_chunk, USE_PDL=use_pdl, num_warps=warps,
                                    **ready, **pdl))
    return out
