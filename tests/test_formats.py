"""Bit-exact tests of inductor_moe.formats against hand-computed values.

Every expected byte below was worked out by hand (the comments show the arithmetic); the random
tests only bound the round-trip error. Runs on CPU, and on CUDA too when one is present.
"""

import math

import pytest
import torch

from inductor_moe import formats as F

NAN = float("nan")
INF = float("inf")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def u8(values, device="cpu"):
    return torch.tensor(values, dtype=torch.uint8, device=device)


def f32(values, device="cpu"):
    return torch.tensor(values, dtype=torch.float32, device=device)


def bits(t):
    """Bytes of a 1-byte tensor (uint8 / float8) on the CPU, as a list, for exact comparison."""
    return t.view(torch.uint8).cpu().flatten().tolist()


def assert_same_floats(actual, expected):
    """Bitwise equal float32 values (tells -0.0 from 0.0, NaN equals NaN)."""
    a = actual.detach().cpu().to(torch.float32)
    e = torch.as_tensor(expected, dtype=torch.float32).reshape(a.shape)
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), f"NaN positions differ: {a} vs {e}"
    assert torch.equal(a[~nan_a].view(torch.int32), e[~nan_e].view(torch.int32)), f"{a} != {e}"


# --- e2m1 ----------------------------------------------------------------------------------

E2M1_TABLE = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def test_e2m1_values_constant():
    assert F.E2M1_VALUES.dtype == torch.float32
    assert_same_floats(F.E2M1_VALUES, E2M1_TABLE)


def test_e2m1_every_code_round_trips(device):
    codes = torch.arange(16, dtype=torch.uint8, device=device)
    values = F.e2m1_to_float(codes)
    assert_same_floats(values, E2M1_TABLE)  # code 8 decodes to -0.0, not 0.0
    assert bits(F.float_to_e2m1(values)) == list(range(16))


def test_e2m1_bytes_above_15_decode_to_nan():
    assert torch.isnan(F.e2m1_to_float(u8([16, 0x80, 255]))).all()


# value -> code; ties go to the even magnitude index (even mantissa).
E2M1_ROUNDING = [
    (0.0, 0),
    (1e-30, 0),
    (0.25, 0),  # tie between 0 and 0.5 -> 0
    (0.26, 1),
    (0.74, 1),
    (0.75, 2),  # tie between 0.5 and 1.0 -> 1.0
    (1.25, 2),  # tie between 1.0 and 1.5 -> 1.0
    (1.26, 3),
    (1.75, 4),  # tie between 1.5 and 2.0 -> 2.0
    (2.5, 4),  # tie between 2 and 3 -> 2
    (2.51, 5),
    (3.49, 5),
    (3.5, 6),  # tie between 3 and 4 -> 4
    (5.0, 6),  # tie between 4 and 6 -> 4
    (5.01, 7),
    (7.0, 7),  # saturates to 6
    (100.0, 7),
    (INF, 7),
    (-0.0, 8),  # signed zero
    (-0.2, 8),  # rounds to negative zero
    (-0.25, 8),
    (-0.26, 9),
    (-5.0, 14),
    (-7.0, 15),
    (-INF, 15),
    (NAN, 0),  # no NaN in e2m1: bare NaN -> +0 (block scales carry NaN)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_float_to_e2m1_rounding_table(dtype, device):
    xs = [x for x, _ in E2M1_ROUNDING]
    want = [c for _, c in E2M1_ROUNDING]
    if dtype in (torch.float16, torch.bfloat16):
        # keep only the inputs the narrow dtype holds exactly (0.26, 1e-30, ... round there)
        keep = [i for i, x in enumerate(xs) if math.isnan(x) or float(torch.tensor(x, dtype=dtype)) == x]
        xs, want = [xs[i] for i in keep], [want[i] for i in keep]
        assert 0.25 in xs and 5.0 in xs and -0.0 in xs
    got = F.float_to_e2m1(torch.tensor(xs, dtype=dtype, device=device))
    assert got.dtype == torch.uint8
    assert bits(got) == want


def test_float_to_e2m1_negative_nan_is_plus_zero(device):
    x = torch.tensor([-0x00400000], dtype=torch.int32).view(torch.float32).to(device)  # bits 0xFFC00000
    assert torch.signbit(x).item()  # a NaN with its sign bit set must not become -0 (code 8)
    assert bits(F.float_to_e2m1(x)) == [0]


def test_float_to_e2m1_float64_is_not_double_rounded():
    # 0.25 + 1e-12 is above the tie: 0.5 (code 1). Rounded to fp32 first it would be 0.25 -> 0.
    x = torch.tensor([0.25 + 1e-12, 5.0 - 1e-12], dtype=torch.float64)
    assert bits(F.float_to_e2m1(x)) == [1, 6]


def test_float_to_e2m1_matches_brute_force_nearest():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * 4
    mags = F.E2M1_VALUES[:8]
    nearest = (x.abs().unsqueeze(-1) - mags).abs().argmin(dim=-1)  # random data has no exact ties
    expected = torch.where(x.abs() > 6, 7, nearest) | (torch.signbit(x).long() << 3)
    assert torch.equal(F.float_to_e2m1(x).long(), expected)


# --- pack / unpack -------------------------------------------------------------------------


def test_pack_fp4_low_nibble_first(device):
    packed = F.pack_fp4(u8([[1, 2, 0xF, 0x0, 0x7, 0x8], [8, 8, 0, 15, 3, 12]], device))
    assert packed.shape == (2, 3)
    assert bits(packed) == [0x21, 0x0F, 0x87, 0x88, 0xF0, 0xC3]


def test_unpack_fp4_explicit_bytes(device):
    codes = F.unpack_fp4(u8([[0x21, 0x0F], [0x87, 0xFF]], device))
    assert codes.shape == (2, 4)
    assert bits(codes) == [1, 2, 0xF, 0x0, 0x7, 0x8, 0xF, 0xF]


def test_pack_unpack_round_trip_all_pairs():
    codes = torch.cartesian_prod(torch.arange(16), torch.arange(16)).to(torch.uint8).reshape(4, 128)
    assert torch.equal(F.unpack_fp4(F.pack_fp4(codes)), codes)


def test_pack_fp4_errors():
    with pytest.raises(ValueError, match="even"):
        F.pack_fp4(u8([1, 2, 3]))
    with pytest.raises(TypeError, match="uint8"):
        F.pack_fp4(torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(TypeError, match="uint8"):
        F.unpack_fp4(torch.zeros(2))


# --- e8m0 ----------------------------------------------------------------------------------


def test_e8m0_to_float_exact_values(device):
    s = u8([0, 1, 126, 127, 128, 129, 254, 255], device)
    expected = [2.0**-127, 2.0**-126, 0.5, 1.0, 2.0, 4.0, 2.0**127, NAN]
    out = F.e8m0_to_float(s)
    assert out.dtype == torch.float32
    assert_same_floats(out, expected)
    assert out[0].cpu().view(torch.int32).item() == 0x00400000  # fp32 subnormal 2^-127
    assert_same_floats(F.e8m0_to_float(s.view(torch.float8_e8m0fnu)), expected)


def test_e8m0_to_float_matches_torch_for_all_bytes():
    s = torch.arange(256, dtype=torch.uint8)
    assert_same_floats(F.e8m0_to_float(s), s.view(torch.float8_e8m0fnu).float())


def test_e8m0_to_float_rejects_other_dtypes():
    with pytest.raises(TypeError, match="float8_e8m0fnu"):
        F.e8m0_to_float(torch.ones(3))


E8M0_CEIL = [
    (4.0, 129),  # exact power of two: 2^2
    (4.000001, 130),  # just above: next power up
    (float(torch.nextafter(torch.tensor(4.0), torch.tensor(INF))), 130),
    (1.0, 127),
    (1.0000001, 128),
    (0.75, 127),  # ceil(log2 0.75) = 0
    (0.5, 126),
    (3.0, 129),
    (2.0**127, 254),
    (3e38, 254),  # 2^128 does not exist: clamp
    (INF, 254),
    (2.0**-126, 1),
    (1.5 * 2.0**-127, 1),  # subnormal above 2^-127 -> 2^-126
    (2.0**-127, 0),  # subnormal, exactly byte 0
    (2.0**-130, 0),  # below the e8m0 range: clamp
    (0.0, 0),
    (-0.0, 0),
    (-1.0, 0),
    (-INF, 0),
    (NAN, 255),
]


def test_float_to_e8m0_ceil_table(device):
    xs = torch.tensor([x for x, _ in E8M0_CEIL], dtype=torch.float32, device=device)
    got = F.float_to_e8m0_ceil(xs)
    assert got.dtype == torch.uint8
    assert bits(got) == [s for _, s in E8M0_CEIL]


def test_float_to_e8m0_ceil_other_dtypes():
    # fp64 is read on its own bits: 4 + 1e-12 is above 4 (fp32 would round it to 4 -> 129)
    assert bits(F.float_to_e8m0_ceil(torch.tensor([4.0, 4.0 + 1e-12, 2.0**-200, 1e300], dtype=torch.float64))) == [
        129,
        130,
        0,
        254,
    ]
    assert bits(F.float_to_e8m0_ceil(torch.tensor([0.75, 6.0], dtype=torch.float16))) == [127, 130]
    assert bits(F.float_to_e8m0_ceil(torch.tensor([0.75, 6.0], dtype=torch.bfloat16))) == [127, 130]


# --- MXFP4 ---------------------------------------------------------------------------------


def test_quantize_mxfp4_hand_computed(device):
    w = torch.zeros(1, 128)
    # block 0: amax 12 -> 12/6 = 2 = 2^1 -> byte 128; quotients w/2 below
    w[0, :10] = torch.tensor([12, -12, 1, 0.5, 3, 5, 7, 10, -0.0, 0.4])
    #   /2:  6, -6, 0.5, 0.25(tie->0), 1.5, 2.5(tie->2), 3.5(tie->4), 5(tie->4), -0, 0.2
    #   codes 7, 15, 1, 0, 3, 4, 6, 6, 8, 0
    # block 1: amax 12.5 -> 12.5/6 = 2.083 -> ceil to 4 -> byte 129
    w[0, 32:35] = torch.tensor([12.5, -3, 1])  # /4: 3.125 -> 3 (5), -0.75 tie -> -1 (10), 0.25 -> 0
    # block 2: all +0 -> byte 0; block 3: all -0.0 -> byte 0, codes 8 (sign kept)
    w[0, 96:] = -0.0
    packed, scales = F.quantize_mxfp4(w.to(device))
    assert packed.shape == (1, 64) and packed.dtype == torch.uint8
    assert scales.shape == (1, 4) and scales.dtype == torch.float8_e8m0fnu
    assert bits(scales) == [128, 129, 0, 0]
    expected = [0xF7, 0x01, 0x43, 0x66, 0x08] + [0] * 11
    expected += [0xA5, 0x00] + [0] * 14
    expected += [0] * 16 + [0x88] * 16
    assert bits(packed) == expected

    out = F.dequantize_mxfp4(packed, scales)
    want = torch.zeros(128)
    want[:10] = torch.tensor([12, -12, 1, 0, 3, 4, 8, 8, -0.0, 0])
    want[32:35] = torch.tensor([12, -4, 0])
    want[96:] = -0.0
    assert_same_floats(out, want.reshape(1, 128))


def test_quantize_mxfp4_scale_ceil_at_power_of_two():
    w = torch.zeros(2, 32)
    w[0, 0] = 6.0  # amax/6 = 1 exactly -> byte 127, value 6 -> code 7
    w[1, 0] = 6.000001  # just above -> 2 -> byte 128; 3.0000005 -> 3 -> code 5
    packed, scales = F.quantize_mxfp4(w)
    assert bits(scales) == [127, 128]
    assert bits(packed[:, 0]) == [0x07, 0x05]


def test_mxfp4_round_trip_error_bound():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 16, 256, generator=g) * torch.logspace(-3, 3, 16).unsqueeze(-1)
    packed, scales = F.quantize_mxfp4(w.to(torch.bfloat16))
    out = F.dequantize_mxfp4(packed, scales)
    wb = w.to(torch.bfloat16).float()
    scale = F.e8m0_to_float(scales).repeat_interleave(32, dim=-1)
    err = (out - wb).abs()
    assert (err <= scale).all()  # half the widest e2m1 gap (4 -> 6) is one scale unit
    assert (wb.abs() <= 6 * scale).all()  # the ceil scale leaves nothing to saturate
    assert (err.norm() / wb.norm()).item() < 0.16
    assert F.dequantize_mxfp4(packed, scales, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_mxfp4_nan_and_inf():
    w = torch.ones(2, 64)
    w[0, 3] = NAN
    w[1, 40] = INF
    packed, scales = F.quantize_mxfp4(w)
    # amax 1: 1/6 -> ceil to 2^-2 (byte 125); the Inf block gets the largest scale, 2^127
    assert bits(scales) == [F.E8M0_NAN, 125, 125, 254]
    out = F.dequantize_mxfp4(packed, scales)
    assert torch.isnan(out[0, :32]).all()  # the whole NaN block
    assert torch.equal(out[0, 32:], torch.ones(32))  # 1 / 2^-2 = 4 exactly, code 6
    assert out[1, 40] == INF  # 6 * 2^127 overflows fp32 back to Inf
    assert torch.isfinite(out[1, :40]).all() and torch.isfinite(out[1, 41:]).all()


def test_dequantize_mxfp4_nan_scale_always_nan():
    packed = torch.zeros(1, 16, dtype=torch.uint8)  # all codes +0
    out = F.dequantize_mxfp4(packed, u8([[F.E8M0_NAN]]))  # uint8 scale bytes are accepted too
    assert torch.isnan(out).all()


def test_mxfp4_errors():
    with pytest.raises(ValueError, match="multiple of 32"):
        F.quantize_mxfp4(torch.ones(4, 48))
    with pytest.raises(TypeError, match="floating-point"):
        F.quantize_mxfp4(torch.ones(4, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match="scales"):
        F.dequantize_mxfp4(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="shape"):
        F.dequantize_mxfp4(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(3, 1, dtype=torch.uint8))
    with pytest.raises(TypeError, match="scales"):
        F.dequantize_mxfp4(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, 1))
    with pytest.raises(TypeError, match="dtype"):
        F.dequantize_mxfp4(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, 1, dtype=torch.uint8), torch.int32)


# --- NVFP4 ---------------------------------------------------------------------------------


def test_quantize_nvfp4_hand_computed(device):
    w = torch.zeros(2, 32)
    # global amax 2688 -> global scale 2688 / (448*6) = 1.0
    w[0, :3] = torch.tensor([2688, -1344, 448])  # block amax 2688 -> 448 (0x7E); /448: 6, -3, 1 -> 7, 13, 2
    w[0, 16:20] = torch.tensor([37.5, 9.0, -0.0, 0.75])  # 37.5/6 = 6.25: e4m3 tie 6.0|6.5 -> 6.0 (0x4C)
    #   /6: 6.25 -> 6 (7), 1.5 (3), -0 (8), 0.125 -> 0 (0)
    w[1, :2] = torch.tensor([60.0, 15.0])  # 60/6 = 10 = 1.25*2^3 -> 0x52; /10: 6 (7), 1.5 (3)
    w[1, 16:18] = torch.tensor([0.003, -0.003])  # 0.0005 < half the smallest e4m3 (2^-10): scale 0
    packed, scales, gs = F.quantize_nvfp4(w.to(device))
    assert gs.shape == () and gs.dtype == torch.float32 and gs.item() == 1.0
    assert scales.dtype == torch.float8_e4m3fn and scales.shape == (2, 2)
    assert bits(scales) == [0x7E, 0x4C, 0x52, 0x00]
    assert packed.shape == (2, 16)
    assert bits(packed[0]) == [0xD7, 0x02] + [0] * 6 + [0x37, 0x08] + [0] * 6
    assert bits(packed[1]) == [0x37] + [0] * 15  # a zero scale gives code 0, even for -0.003

    out = F.dequantize_nvfp4(packed, scales, gs)
    want = torch.zeros(2, 32)
    want[0, :3] = torch.tensor([2688, -1344, 448])
    want[0, 16:19] = torch.tensor([36.0, 9.0, -0.0])
    want[1, :2] = torch.tensor([60.0, 15.0])
    assert_same_floats(out, want)


def test_quantize_nvfp4_global_scale_per_matrix():
    w = torch.zeros(2, 1, 16)
    w[0, 0, :2] = torch.tensor([1344.0, -336.0])  # gs = 1344/2688 = 0.5; block 1344/6/0.5 = 448
    #   values /(448*0.5): 6 (7), -1.5 (11)
    packed, scales, gs = F.quantize_nvfp4(w)  # batch 1 is all zero: gs guarded to 1.0
    assert gs.shape == (2,)
    assert gs.tolist() == [0.5, 1.0]
    assert bits(scales) == [0x7E, 0x00]
    assert bits(packed[0, 0]) == [0xB7] + [0] * 7
    out = F.dequantize_nvfp4(packed, scales, gs)
    assert_same_floats(out[0, 0, :2], [1344.0, -336.0])


def test_quantize_nvfp4_given_global_scale_and_clamp():
    w = torch.zeros(2, 16)
    w[0, :2] = torch.tensor([3.0, 1.5])  # 3/6/0.25 = 2.0 (0x40); /(2*0.25): 6 (7), 3 (5)
    w[1, 0] = 6000.0  # 6000/6/0.25 = 4000 -> clamped to 448 (0x7E); 6000/112 saturates to 6
    gs_in = torch.tensor(0.25)
    packed, scales, gs = F.quantize_nvfp4(w, gs_in)
    assert gs.item() == 0.25
    assert bits(scales) == [0x40, 0x7E]
    assert bits(packed[:, 0]) == [0x57, 0x07]
    assert_same_floats(F.dequantize_nvfp4(packed, scales, gs)[1, 0], 6 * 448 * 0.25)


def test_nvfp4_round_trip_error_bound():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(3, 64, 128, generator=g) * torch.tensor([1e-3, 1.0, 1e3]).reshape(3, 1, 1)
    packed, scales, gs = F.quantize_nvfp4(w)
    out = F.dequantize_nvfp4(packed, scales, gs)
    unit = (scales.float() * gs.reshape(3, 1, 1)).repeat_interleave(16, dim=-1)
    err = (out - w).abs()
    # at most half the widest e2m1 gap (one unit); saturation from a rounded-down block scale
    # costs less (6 / (1 - 2^-4) - 6 = 0.4 units)
    assert (err <= unit * (1 + 1e-6)).all()
    assert (err.norm() / w.norm()).item() < 0.12


def test_nvfp4_nan_and_inf_blocks():
    w = torch.ones(2, 32)
    w[0, 5] = NAN
    w[1, 20] = -INF
    packed, scales, gs = F.quantize_nvfp4(w)
    assert gs.item() == (torch.tensor(1.0) / 2688).item()  # global amax over the finite elements: 1.0
    assert bits(scales)[0] == F.E4M3_NAN and bits(scales)[3] == F.E4M3_NAN
    out = F.dequantize_nvfp4(packed, scales, gs)
    assert torch.isnan(out[0, :16]).all() and torch.isnan(out[1, 16:]).all()
    assert torch.isfinite(out[0, 16:]).all() and torch.isfinite(out[1, :16]).all()
    assert torch.isnan(F.dequantize_nvfp4(packed, scales, torch.tensor(NAN))).all()


def test_nvfp4_errors():
    with pytest.raises(ValueError, match="multiple of 16"):
        F.quantize_nvfp4(torch.ones(4, 24))
    with pytest.raises(ValueError, match="at least 2"):
        F.quantize_nvfp4(torch.ones(32))
    with pytest.raises(ValueError, match="global_scale"):
        F.quantize_nvfp4(torch.ones(2, 4, 16), torch.ones(3))
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        F.dequantize_nvfp4(torch.zeros(2, 8, dtype=torch.uint8), torch.zeros(2, 1, dtype=torch.uint8), torch.tensor(1.0))
    with pytest.raises(ValueError, match="scales"):
        F.dequantize_nvfp4(
            torch.zeros(2, 8, dtype=torch.uint8), torch.zeros(2, 2, dtype=torch.float8_e4m3fn), torch.tensor(1.0)
        )


# --- FP8 block-128 (DeepSeek weights) ------------------------------------------------------


def test_quantize_fp8_block128_hand_computed(device):
    w = torch.zeros(130, 129)  # tiles: rows [0,128) [128,130), cols [0,128) [128,129)
    w[0, :4] = torch.tensor([896.0, 3.0, 2.125, 2.375])  # amax 896 -> scale 2
    #   /2: 448 (0x7E), 1.5 (0x3C), 1.0625 tie 1.0|1.125 -> 1.0 (0x38), 1.1875 tie -> 1.25 (0x3A)
    w[1, 0] = -896.0  # -448 (0xFE)
    w[128, 0] = 1.0  # tile (1,0): scale fp32(1/448), 1/scale rounds back to 448 (0x7E)
    w[129, 127] = 0.5  # 224 = 1.75 * 2^7 (0x76)
    w[129, 128] = -3.5  # tile (1,1): scale 3.5/448 = 2^-7; -448 (0xFE)
    q, scales = F.quantize_fp8_block128(w.to(device))
    assert q.shape == (130, 129) and q.dtype == torch.float8_e4m3fn
    assert scales.shape == (2, 2) and scales.dtype == torch.float32
    assert_same_floats(scales, [[2.0, 1.0], [(torch.tensor(1.0) / 448).item(), 2.0**-7]])  # tile (0,1) empty: 1.0
    assert bits(q[0, :4]) == [0x7E, 0x3C, 0x38, 0x3A]
    assert bits(q[1, :1]) == [0xFE]
    assert bits(q[128:, 0]) == [0x7E, 0x00]
    assert bits(q[129, 127:]) == [0x76, 0xFE]
    assert (q.view(torch.uint8) != 0).sum().item() == 8  # everything else is +0

    out = F.dequantize_fp8_block128(q, scales)
    assert out.shape == (130, 129)
    assert_same_floats(out[0, :4], [896.0, 3.0, 2.0, 2.5])
    assert_same_floats(out[129, 128], -3.5)
    torch.testing.assert_close(out[128:, :128].cpu(), w[128:, :128], rtol=1e-6, atol=0)


def test_fp8_block128_batched_matches_per_matrix():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 200, 130, generator=g)
    q, scales = F.quantize_fp8_block128(w)
    assert scales.shape == (3, 2, 2)
    for i in range(3):
        qi, si = F.quantize_fp8_block128(w[i])
        assert torch.equal(q[i].view(torch.uint8), qi.view(torch.uint8)) and torch.equal(scales[i], si)


def fp8_error_bound(w, scale):
    """e4m3 half-ulp: 2^-4 relative in the normal range, 2^-10 * scale absolute below it."""
    return w.abs() * 2.0**-4 * (1 + 1e-6) + scale * 2.0**-10


def test_fp8_block128_round_trip_error_bound():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(257, 300, generator=g) * torch.logspace(-4, 4, 300)
    q, scales = F.quantize_fp8_block128(w)
    out = F.dequantize_fp8_block128(q, scales)
    scale = scales.repeat_interleave(128, 0).repeat_interleave(128, 1)[:257, :300]
    assert ((out - w).abs() <= fp8_error_bound(w, scale)).all()


def test_fp8_block128_nan_and_inf():
    w = torch.ones(200, 200)
    w[3, 4] = NAN
    w[150, 150] = INF
    q, scales = F.quantize_fp8_block128(w)
    assert torch.isnan(scales[0, 0]) and scales[1, 1] == INF
    out = F.dequantize_fp8_block128(q, scales)
    assert torch.isnan(out[:128, :128]).all()
    assert torch.isnan(out[128:, 128:]).all()  # w / Inf = 0, 0 * Inf = NaN: Inf never passes as a number
    assert torch.equal(out[:128, 128:], torch.ones(128, 72))


def test_fp8_block128_errors():
    with pytest.raises(ValueError, match="at least 2"):
        F.quantize_fp8_block128(torch.ones(128))
    q = torch.zeros(130, 129, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"\(\.\.\., 2, 2\)"):
        F.dequantize_fp8_block128(q, torch.ones(1, 1))
    with pytest.raises(TypeError, match="float32"):
        F.dequantize_fp8_block128(q, torch.ones(2, 2, dtype=torch.float64))


# --- FP8 activations -----------------------------------------------------------------------


def test_quantize_fp8_per_token_hand_computed(device):
    x = torch.zeros(2, 130)  # groups [0,128) and [128,130)
    x[0, 0] = 448.0  # scale 1: 448 (0x7E)
    x[0, 1] = -1.0625  # tie -1.0|-1.125 -> -1.0 (0xB8)
    x[0, 128] = 0.875  # partial group: scale 0.875/448 = 2^-9; 448 (0x7E)
    x[0, 129] = 0.4375  # 224 (0x76)
    q, scales = F.quantize_fp8_per_token(x.to(device))
    assert q.shape == (2, 130) and q.dtype == torch.float8_e4m3fn
    assert_same_floats(scales, [[1.0, 2.0**-9], [1.0, 1.0]])  # all-zero row: 1.0
    assert bits(q[0, :2]) == [0x7E, 0xB8]
    assert bits(q[0, 128:]) == [0x7E, 0x76]
    assert (q.view(torch.uint8) != 0).sum().item() == 4
    out = F.dequantize_fp8_groups(q, scales, 128)
    assert_same_floats(out[0, [0, 1, 128, 129]], [448.0, -1.0, 0.875, 0.4375])


def test_quantize_fp8_per_token_other_group():
    x = torch.zeros(1, 40)
    x[0, 0], x[0, 32] = 896.0, 44.8  # group 32: scales 2 and 0.1
    q, scales = F.quantize_fp8_per_token(x, group=32)
    assert scales.shape == (1, 2)
    assert_same_floats(scales, [[2.0, (torch.tensor(44.8) / 448).item()]])
    assert bits(q[0, [0, 32]]) == [0x7E, 0x7E]


def test_quantize_fp8_mx32_hand_computed(device):
    x = torch.zeros(1, 96)
    x[0, 0] = 448.0  # amax/448 = 1 -> byte 127; 448 (0x7E)
    x[0, 32] = 449.0  # 449/448 > 1 -> 2 -> byte 128; 224.5 -> 224 (0x76) (step 16 there)
    x[0, 33] = -1.0  # -0.5 (0xB0)
    q, scales = F.quantize_fp8_mx32(x.to(device))  # group 2 is all zero: byte 0
    assert scales.dtype == torch.float8_e8m0fnu and bits(scales) == [127, 128, 0]
    assert bits(q[0, [0, 32, 33]]) == [0x7E, 0x76, 0xB0]
    assert (q.view(torch.uint8) != 0).sum().item() == 3
    out = F.dequantize_fp8_groups(q, scales, 32)
    assert_same_floats(out[0, [0, 32, 33]], [448.0, 448.0, -1.0])
    assert (out[0, 34:] == 0).all()


def test_fp8_activation_round_trip_error_bounds():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 256, generator=g) * torch.logspace(-3, 3, 64).unsqueeze(-1)
    q, s = F.quantize_fp8_per_token(x)
    out = F.dequantize_fp8_groups(q, s, 128)
    assert ((out - x).abs() <= fp8_error_bound(x, s.repeat_interleave(128, -1))).all()
    q, s = F.quantize_fp8_mx32(x)
    out = F.dequantize_fp8_groups(q, s, 32, dtype=torch.float64)
    assert out.dtype == torch.float64
    scale = F.e8m0_to_float(s).repeat_interleave(32, -1)
    assert (x.abs() <= 448 * scale).all()  # nothing clamps
    assert ((out - x).abs() <= fp8_error_bound(x, scale)).all()


def test_fp8_activation_nan():
    x = torch.ones(2, 64)
    x[0, 1] = NAN
    q, s = F.quantize_fp8_per_token(x, group=32)
    assert torch.isnan(s[0, 0]) and not torch.isnan(s[0, 1:]).any()
    out = F.dequantize_fp8_groups(q, s, 32)
    assert torch.isnan(out[0, :32]).all() and torch.isfinite(out[0, 32:]).all() and torch.isfinite(out[1]).all()

    q, s = F.quantize_fp8_mx32(x)
    assert bits(s) == [F.E8M0_NAN, 119, 119, 119]  # 1/448 = 1.14 * 2^-9 -> ceil to 2^-8 (byte 119)
    out = F.dequantize_fp8_groups(q, s, 32)
    assert torch.isnan(out[0, :32]).all() and torch.isfinite(out[0, 32:]).all()


def test_fp8_activation_errors():
    with pytest.raises(ValueError, match="multiple of 32"):
        F.quantize_fp8_mx32(torch.ones(2, 40))
    with pytest.raises(ValueError, match="positive int"):
        F.quantize_fp8_per_token(torch.ones(2, 40), group=0)
    q = torch.zeros(2, 130, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="needs 2 scales"):
        F.dequantize_fp8_groups(q, torch.ones(2, 1), 128)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        F.dequantize_fp8_groups(torch.zeros(2, 128), torch.ones(2, 1), 128)
    with pytest.raises(TypeError, match="scales"):
        F.dequantize_fp8_groups(q, torch.ones(2, 2, dtype=torch.uint8), 128)
