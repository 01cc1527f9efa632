"""The 65..512-row swapped tile choice (pure; no GPU): the picks the H100 sweep measured fastest."""
import pytest

from inductor_moe.templates.swapped_tile_choice import (ONE_WARPGROUP_MIN_M, WIDE_SWAPPED_MAX_M, choose_swapped_tile,
                                                        takes_rows)

SMS = 132  # H100


@pytest.mark.parametrize("fmt,m,n,k,tile,split", [
    # H100 sweeps after K_ALIGNED (benchmarks/NOTES_fp4.md, "The 129-512-row tile recalibrated";
    # graph medians, us).  Whole waves of two-warpgroup tiles: 59-62 at 256 rows, 123-131 at 384-512
    ("mxfp4", 256, 12288, 4096, "two_warpgroups", 1),  # 61.5; one warpgroup 68.0
    ("mxfp4", 192, 8704, 4096, "two_warpgroups", 1),
    ("nvfp4", 256, 10240, 4096, "two_warpgroups", 1),  # 64.8; one warpgroup 73.4
    # 2 two-warpgroup waves against a paired round of one-warpgroup programs and a round alone
    ("mxfp4", 512, 12288, 4096, "one_warpgroup", 1),  # 119.2 against 123.4
    ("nvfp4", 512, 12288, 4096, "one_warpgroup", 1),  # 118.4 against 130.4
    ("mxfp4", 384, 10240, 4096, "one_warpgroup", 1),  # 71.2 against 123.3
    # few tiles: one warpgroup, all programs alone on their SMs, split in 2
    ("mxfp4", 256, 4096, 4096, "one_warpgroup", 2),  # 35.0; 1 split 49.2
    ("nvfp4", 256, 4096, 4096, "one_warpgroup", 2),
    ("nvfp4", 256, 8192, 8192, "one_warpgroup", 2),  # 86.4; 1 split 98.0
    ("mxfp4", 128, 8192, 8192, "one_warpgroup", 2),  # 57.6; 1 split 95.0
    ("mxfp4", 128, 14336, 4096, "one_warpgroup", 2),  # 48.8; 1 split 50.1
    # neither tile fills its last wave: dequant_chunks (MXFP4 512 x 8704: 116.0, one warpgroup 119.0,
    # two warpgroups 119.5)
    ("mxfp4", 512, 8704, 4096, "dequant_chunks", 1),
])
def test_picks_the_measured_fastest(fmt, m, n, k, tile, split):
    choice = choose_swapped_tile(m, n, k, fmt, SMS)
    assert (choice.tile, choice.split_k) == (tile, split)


def test_without_dequant_chunks_a_swapped_tile_and_splits_stay_in_one_wave():
    for fmt in ("mxfp4", "nvfp4"):
        for m in (129, 200, 256, 384, 512):
            for n in (2880, 4096, 8192, 10240, 14336, 30000):
                choice = choose_swapped_tile(m, n, 4096, fmt, SMS, chunks_fit=False)
                assert choice.tile in ("two_warpgroups", "one_warpgroup") and choice.estimate_us > 0
                if choice.split_k > 1:
                    assert choice.tile == "one_warpgroup"
                    assert -(-m // 128) * -(-n // 128) * choice.split_k <= 2 * SMS


def test_more_sms_never_slower():
    """The estimate follows waves: the same call on more SMs is estimated no slower."""
    for m in (200, 300, 512):
        for n in (5120, 8704, 14336):
            assert choose_swapped_tile(m, n, 4096, "mxfp4", 2 * SMS).estimate_us <= \
                choose_swapped_tile(m, n, 4096, "mxfp4", SMS).estimate_us


@pytest.mark.parametrize("m", [ONE_WARPGROUP_MIN_M - 1, WIDE_SWAPPED_MAX_M + 1])
def test_rows_outside_the_range_are_refused(m):
    with pytest.raises(ValueError, match="65"):
        choose_swapped_tile(m, 4096, 4096, "mxfp4", SMS)


def test_takes_65_to_128_rows_only_where_the_one_warpgroup_grid_fills_the_sms():
    """129..512 rows always; 65..128 where 2 splits of the one-warpgroup tile give 3/4 of the SMs a
    program (8192 and 14336 rows of weight: 128 and 224 programs; 4096: 64, where the 64-row tiles
    measured faster)."""
    for m in (129, 300, 512):
        assert takes_rows(m, 4096, SMS)
    for m in (65, 96, 128):
        assert takes_rows(m, 8192, SMS) and takes_rows(m, 14336, SMS)
        assert not takes_rows(m, 4096, SMS) and not takes_rows(m, 5120, SMS)
        assert takes_rows(m, 4096, 64)  # a GPU of 64 SMs: the same 64 programs fill it
    for m in (16, 64, 513):
        assert not takes_rows(m, 14336, SMS)
