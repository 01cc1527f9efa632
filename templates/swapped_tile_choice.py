"""Which swapped FP4 tile runs a 65..512-row GEMM on Hopper, or whether dequant_chunks does.

At these rows the choice is about waves, not tiles: the two-warpgroup tile (256 tokens x 128
weight rows, one CTA per SM) takes a whole wave per ``num_sms`` tiles, the one-warpgroup tile
(128 x 128, two CTAs fit on an SM) runs faster alone than paired, and a wave that is 3% full
costs as much as a full one (H100, 384 x 8704 x 4096, MXFP4: 136 two-warpgroup tiles, 121 us;
204 one-warpgroup tiles in one paired wave, 79 us).  So each candidate's time is estimated from
how many rounds its programs take and the measured time of one 64-deep K step per round, and
the cheapest runs.  The step times are H100 medians, measured again after K_ALIGNED
(benchmarks/NOTES_fp4.md, "The 129-512-row tile recalibrated"; the model itself: "Waves decide
the 129-512-row tile"): over 44 swept calls (N = 4096-14336, K = 4096 and 8192, 192-512 rows) the
pick was the fastest of these candidates in 42 and at most 7% behind.  Only the measured split
counts (1 and 2, the latter within one paired wave) are candidates; not among them: the
17..128-row tiles, which at 192 rows and N = 5120 were as fast as the best here.

From 65 rows the one-warpgroup tile decodes each weight once where the 64-row tiles of smaller
calls decode it twice, so 65..128 rows take these tiles too where the one-warpgroup grid split in
two fills 3/4 of the SMs (``takes_rows``).
"""
import functools
from dataclasses import dataclass

WIDE_SWAPPED_MAX_M = 512  # the swapped tiles' last row count (dequant_chunks above)
ONE_WARPGROUP_MIN_M = 65  # the first row count the one-warpgroup 128-token tile may take

# us per 64-deep K step of one round, H100, as ``choose_gemm_config`` runs the tiles (MXFP4's
# scales a step ahead, NVFP4's in the step with K_ALIGNED): the two-warpgroup tile ...
_TWO_WARPGROUPS_STEP_US = {"mxfp4": 0.95, "nvfp4": 1.04}
# ... the one-warpgroup tile alone on its SM and two sharing one
_ONE_WARPGROUP_ALONE_STEP_US = {"mxfp4": 0.79, "nvfp4": 0.79}
_ONE_WARPGROUP_PAIRED_STEP_US = {"mxfp4": 1.08, "nvfp4": 1.16}
_SPLIT_K_US = 12.0  # the split-K reduction and its last-arriver epilogue
# dequant_chunks (decode to bf16 in chunks, then cuBLAS): us per weight row and 64-deep K step
_CHUNKS_ROW_STEP_US = 1.45e-4
_CHUNKS_ROW_STEP_US_PER_TOKEN = 1.05e-7


@dataclass(frozen=True)
class SwappedTileChoice:
    """``tile``: "two_warpgroups", "one_warpgroup" or "dequant_chunks"; ``estimate_us``: the
    H100 estimate that chose it (for the report and tests, not a promise); ``k_aligned``: whether
    the kernel states its K range's alignment (GemmKernelConfig.k_aligned)."""

    tile: str
    split_k: int
    estimate_us: float
    k_aligned: bool = True


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _two_warpgroups_us(m: int, n: int, steps: int, b_format: str, num_sms: int) -> float:
    tiles = _ceil(m, 256) * _ceil(n, 128)
    return _ceil(tiles, num_sms) * steps * _TWO_WARPGROUPS_STEP_US[b_format]


def _one_warpgroup_programs(m: int, n: int, split: int) -> int:
    return _ceil(m, 128) * _ceil(n, 128) * split


def _one_warpgroup_us(m: int, n: int, steps: int, split: int, b_format: str, num_sms: int) -> float:
    """Programs run in rounds of two per SM; a last round of at most one per SM runs alone, also
    after full rounds (MXFP4 512 x 12288 x 4096: 384 programs, 119 us = 69 paired + 50 alone)."""
    programs = _one_warpgroup_programs(m, n, split)
    full, rest = divmod(programs, 2 * num_sms)
    split_steps = steps / split
    paired = split_steps * _ONE_WARPGROUP_PAIRED_STEP_US[b_format]
    alone = split_steps * _ONE_WARPGROUP_ALONE_STEP_US[b_format]
    last = paired if rest > num_sms else (alone if rest else 0.0)
    return full * paired + last + (_SPLIT_K_US if split > 1 else 0.0)


def _dequant_chunks_us(m: int, n: int, steps: int) -> float:
    return steps * n * (_CHUNKS_ROW_STEP_US + _CHUNKS_ROW_STEP_US_PER_TOKEN * m)


def takes_rows(m: int, n: int, num_sms: int) -> bool:
    """Whether a call of ``m`` rows goes to ``choose_swapped_tile`` rather than the 17..64-row
    tiles: 129..512 rows always, 65..128 where the one-warpgroup grid split in two fills 3/4 of the
    SMs.  H100 at 128 rows (benchmarks/NOTES_fp4.md, "The one-warpgroup tile from 65 rows"): 8192^2
    MXFP4 66.0 -> 57.6 us, NVFP4 74.4 -> 59.7; 14336 x 4096 59.9 -> 48.8, 67.6 -> 49.7; at 4096^2
    (64 programs) the 64-row tiles stay faster (24.6 against 32.3)."""
    if 128 < m <= WIDE_SWAPPED_MAX_M:
        return True
    return ONE_WARPGROUP_MIN_M <= m <= 128 and 4 * _one_warpgroup_programs(m, n, 2) >= 3 * num_sms


@functools.lru_cache(maxsize=4096)
def choose_swapped_tile(m: int, n: int, k: int, b_format: str, num_sms: int,
                        chunks_fit: bool = True) -> SwappedTileChoice:
    """The cheapest estimate for ``m`` in 65..512 rows (K in 64s, bf16 activations); dequant_chunks
    only where ``chunks_fit``.  Cached: a call's plan asks for it up to three times."""
    if not ONE_WARPGROUP_MIN_M <= m <= WIDE_SWAPPED_MAX_M:
        raise ValueError(f"choose_swapped_tile takes {ONE_WARPGROUP_MIN_M}..{WIDE_SWAPPED_MAX_M} rows, got {m}")
    steps = _ceil(k, 64)
    # MXFP4's two-warpgroup tile keeps its scales ahead without K_ALIGNED (16 shuffles a step with it)
    cands = [SwappedTileChoice("two_warpgroups", 1, _two_warpgroups_us(m, n, steps, b_format, num_sms),
                               k_aligned=b_format != "mxfp4"),
             SwappedTileChoice("one_warpgroup", 1, _one_warpgroup_us(m, n, steps, 1, b_format, num_sms))]
    if _one_warpgroup_programs(m, n, 2) <= 2 * num_sms and steps >= 8:
        cands.append(SwappedTileChoice("one_warpgroup", 2, _one_warpgroup_us(m, n, steps, 2, b_format, num_sms)))
    if chunks_fit:
        cands.append(SwappedTileChoice("dequant_chunks", 1, _dequant_chunks_us(m, n, steps)))
    return min(cands, key=lambda c: c.estimate_us)
