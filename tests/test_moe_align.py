"""The align kernels (templates/moe_align.py) against a plain-torch layout of the same ids, and the
order in which the expert GEMMs' programs take the blocks it makes (moe_common.expert_block_of_program).

Both forms -- one launch (``moe_align_fused``: every program counts all entries, then places its
own chunk) and per-chunk counts -> place -- must give every expert's entries in flat order from
its BLOCK_M-aligned start, each block's expert (-1 past the used ones), and zeroed readiness
counters when asked; ids outside [0, E) are dropped.  The kernels run under TRITON_INTERPRET=1 in
a subprocess (see test_moe_kernels.py for why); int scratch starts at -7.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_moe_kernels import interpreted_results, report_cases  # noqa: E402

from inductor_moe.templates.moe_common import expert_block_of_program  # noqa: E402


def _case(name, T, k, E, block_m, routing="random", one_launch=True, chunk=16):
    return dict(name=name, T=T, k=k, E=E, block_m=block_m, routing=routing, one_launch=one_launch, chunk=chunk)


CASES = [
    _case("decode_one_program", T=1, k=8, E=128, block_m=16),
    _case("bad_ids", T=37, k=4, E=8, block_m=4, routing="bad_ids"),
    _case("several_programs", T=75, k=4, E=33, block_m=8, routing="bad_ids"),  # 300 entries: 3 programs of 128
    _case("several_count_steps", T=650, k=4, E=16, block_m=16, routing="bad_ids"),  # 2600: 2 steps of 2048
    _case("skewed_many_blocks", T=300, k=2, E=8, block_m=8, routing="skewed"),
    _case("zero_tokens", T=0, k=2, E=8, block_m=16),
    _case("two_launches", T=75, k=4, E=33, block_m=8, routing="bad_ids", one_launch=False),
    _case("two_launches_skewed", T=300, k=2, E=8, block_m=8, routing="skewed", one_launch=False, chunk=64),
    _case("two_launches_zero_tokens", T=0, k=2, E=8, block_m=16, one_launch=False),
    # 1050 chunks: each program sums the table of per-chunk counts in three steps of 512 rows
    _case("two_launches_many_chunks", T=2100, k=8, E=16, block_m=16, routing="bad_ids", one_launch=False),
]


def _ids(case):
    g = torch.Generator().manual_seed(case["T"] * 31 + case["E"])
    T, k, E = case["T"], case["k"], case["E"]
    ids = torch.rand(T, E, generator=g).topk(k, dim=1).indices if T else torch.zeros(0, k, dtype=torch.int64)
    if case["routing"] == "bad_ids":
        flat = ids.view(-1)
        flat[::7] = E + 2
        flat[3::11] = -1
        flat[5::13] = 2**32 + 1  # an int64 id that wraps to 1 as int32
        return ids.contiguous()
    elif case["routing"] == "skewed":  # most entries on expert 3: it spans many blocks
        ids[: 3 * T // 4, 0] = 3
    return ids.int().contiguous()


def _reference_layout(ids, E, block_m):
    flat = ids.view(-1).long()
    valid = (flat >= 0) & (flat < E)
    counts = torch.bincount(flat[valid], minlength=E)
    padded = (counts + block_m - 1) // block_m * block_m
    start = torch.cumsum(padded, 0) - padded
    rows = {e: torch.nonzero(flat == e).view(-1).tolist() for e in range(E)}
    owners = [e for e in range(E) for _ in range(int(padded[e]) // block_m)]
    return counts, start, rows, owners


def run_case(case) -> dict:
    import inductor_moe.templates.moe_align as align

    ids = _ids(case)
    E, bm = case["E"], case["block_m"]
    empty = torch.empty
    align.torch.empty = lambda *a, **kw: empty(*a, **kw).fill_(-7)  # poisoned scratch
    try:
        out = align.align_blocks(ids, E, bm, one_launch=case["one_launch"], chunk=case["chunk"], use_pdl=False,
                                 zero_ready=True)
    finally:
        align.torch.empty = empty
    counts, start, rows, owners = _reference_layout(ids, E, bm)
    placed = all(out.sorted_ids[int(start[e]):int(start[e]) + len(rows[e])].tolist() == rows[e] for e in range(E))
    block_expert = out.block_expert.tolist()
    return dict(name=case["name"], counts=torch.equal(out.expert_count.long(), counts),
                starts=torch.equal(out.expert_start.long(), start), placed=placed,
                blocks=block_expert[:len(owners)] == owners and all(b == -1 for b in block_expert[len(owners):]),
                ready_zeroed=bool((out.ready == 0).all()), n_blocks=len(owners), max_blocks=out.max_blocks)


# The expert GEMMs' program order over align's blocks, with num_n N tiles per block: every
# (block, N tile) of a used block exactly once, and with EXPERT_MAJOR an expert's blocks side by side
ORDER_CASES = [
    dict(name="order_random", T=75, k=4, E=33, block_m=8, routing="random", num_n=3),
    dict(name="order_skewed", T=300, k=2, E=8, block_m=8, routing="skewed", num_n=5),  # expert 3: many blocks
    dict(name="order_bad_ids", T=37, k=4, E=8, block_m=4, routing="bad_ids", num_n=2),
]


@triton.jit
def _program_order_probe(block_expert_ptr, expert_start_ptr, expert_count_ptr, out_ptr, num_n,
                         BLOCK_M: tl.constexpr, EXPERT_MAJOR: tl.constexpr):
    pid_m, pid_n, e = expert_block_of_program(block_expert_ptr, expert_start_ptr, expert_count_ptr, num_n, BLOCK_M,
                                              EXPERT_MAJOR, False)
    p = tl.program_id(0)
    tl.store(out_ptr + 3 * p, pid_m)
    tl.store(out_ptr + 3 * p + 1, pid_n)
    tl.store(out_ptr + 3 * p + 2, e)


def _reference_order(owners, counts, num_n, block_m, expert_major):
    """(block, N tile) of each program over the used blocks: N tiles fastest, or inside each expert's
    programs its blocks fastest."""
    order, b = [], 0
    while b < len(owners):
        nb = -(-int(counts[owners[b]]) // block_m)
        tiles = range(nb * num_n)
        order += [(b + i % nb, i // nb) if expert_major else (b + i // num_n, i % num_n) for i in tiles]
        b += nb
    return order


def run_order_case(case) -> dict:
    import inductor_moe.templates.moe_align as align

    ids = _ids(case)
    E, bm, num_n = case["E"], case["block_m"], case["num_n"]
    out = align.align_blocks(ids, E, bm, one_launch=True, chunk=16, use_pdl=False)
    counts, _start, _rows, owners = _reference_layout(ids, E, bm)
    result = dict(name=case["name"], n_blocks=len(owners), max_experts_blocks=max(
        (owners.count(e) for e in set(owners)), default=0))
    for expert_major in (False, True):
        probe = torch.full((out.max_blocks * num_n, 3), -9, dtype=torch.int32)
        _program_order_probe[(out.max_blocks * num_n,)](out.block_expert, out.expert_start, out.expert_count, probe,
                                                        num_n, BLOCK_M=bm, EXPERT_MAJOR=expert_major)
        want = [(m, n, owners[m]) for m, n in _reference_order(owners, counts, num_n, bm, expert_major)]
        got = [tuple(r) for r in probe.tolist()]
        key = "expert_major" if expert_major else "n_fastest"
        result[key] = got[:len(want)] == want and all(r[2] == -1 for r in got[len(want):])
    return result


def _main():
    report_cases([(c, run_case) for c in CASES] + [(c, run_order_case) for c in ORDER_CASES])


# ----------------------------------------------------------------------------- pytest side

@pytest.fixture(scope="module")
def interpreted():
    return interpreted_results(__file__)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_align_layout_matches_torch(interpreted, case):
    r = interpreted[case["name"]]
    assert "error" not in r, r
    assert r["counts"] and r["starts"] and r["placed"] and r["blocks"] and r["ready_zeroed"], r
    if case["routing"] == "skewed":
        assert r["n_blocks"] > 20, r  # expert 3 spans many blocks


@pytest.mark.parametrize("case", ORDER_CASES, ids=[c["name"] for c in ORDER_CASES])
def test_expert_gemm_program_order(interpreted, case):
    """Each program of an expert GEMM grid gets the (block, N tile, expert) the order says, so every
    tile runs once; EXPERT_MAJOR puts an expert's blocks side by side, so they read each weight tile
    together (lowering/moe_plan.expert_major_order)."""
    r = interpreted[case["name"]]
    assert "error" not in r, r
    assert r["n_fastest"] and r["expert_major"], r
    assert r["max_experts_blocks"] >= 2, r  # some expert has several blocks: the orders differ


def test_align_form_and_chunk_follow_the_entries():
    """One align launch up to 1024 entries (decode and the CUDA kernels' small mid sizes), counts then
    place above; 256 entries a program until the table of per-chunk counts would pass 128 rows, at
    most 1024 (each program sorts its chunk)."""
    from inductor_moe.lowering.moe_plan import ALIGN_ONE_LAUNCH_MAX_ENTRIES, align_chunk, choose_moe_config

    assert ALIGN_ONE_LAUNCH_MAX_ENTRIES == 1024
    assert choose_moe_config(128, 8, 128, 2048, 768).align_one_launch
    assert not choose_moe_config(1024, 8, 128, 2048, 768).align_one_launch
    assert [align_chunk(n) for n in (1, 100, 1024, 32768, 65536, 131072, 1 << 20)] == [16, 128, 256, 256, 512, 1024,
                                                                                        1024]
    assert choose_moe_config(16384, 8, 128, 2048, 768).align_chunk == 1024


if __name__ == "__main__" and "--interpret" in sys.argv:
    _main()
