"""The 129..512-row swapped tile choice (pure; no GPU): the picks the H100 sweep measured fastest."""
import pytest

from inductor_moe.templates.swapped_tile_choice import WIDE_SWAPPED_MAX_M, choose_swapped_tile

SMS = 132  # H100


@pytest.mark.parametrize("fmt,m,n,k,tile,split", [
    # whole waves of two-warpgroup tiles (H100: 60-62 us at 256 rows, 120-124 at 512)
    ("mxfp4", 256, 14336, 4096, "two_warpgroups", 1),
    ("mxfp4", 512, 12288, 4096, "two_warpgroups", 1),
    ("nvfp4", 256, 10240, 4096, "two_warpgroups", 1),
    # 136 two-warpgroup tiles would take 2 waves; 204 one-warpgroup tiles one paired wave (121 -> 79 us)
    ("mxfp4", 384, 8704, 4096, "one_warpgroup", 1),
    # few tiles: one warpgroup, all programs alone on their SMs (4096^2 at 256 rows: 36 us, chunks 40)
    ("mxfp4", 256, 4096, 4096, "one_warpgroup", 2),
    ("nvfp4", 256, 4096, 4096, "one_warpgroup", 2),
    # 2 x 64 tiles: split in 2 for one wave of pairs (8192^2, NVFP4 at 256 rows: 86 us, 1 split 100)
    ("nvfp4", 256, 8192, 8192, "one_warpgroup", 2),
    ("mxfp4", 256, 8192, 8192, "one_warpgroup", 2),  # 81 us, 1 split 99
    # neither tile fills its last wave: dequant_chunks (MXFP4 512 x 8704: 115 us, two warpgroups 120,
    # one warpgroup 128)
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


@pytest.mark.parametrize("m", [128, WIDE_SWAPPED_MAX_M + 1])
def test_rows_outside_the_range_are_refused(m):
    with pytest.raises(ValueError, match="129"):
        choose_swapped_tile(m, 4096, 4096, "mxfp4", SMS)
