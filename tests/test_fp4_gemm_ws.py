"""The large-M FP4 GEMM with the weight decoded into wgmma's registers (templates/fp4_gemm_ws.py).

CPU: the weight re-layout against wgmma's A-fragment map (PTX ISA, "Register fragments for
matrix A", bf16: lane l of warp w holds rows 16 w + l // 4 and + 8, k pairs 2 (l % 4) + {0, 1}
and + 8 of each k16 chunk) and the decode's byte -> register order; the strategy choice.
GPU (sm_90): the kernel against the float64 reference, tails in M, N and K, both formats, the
epilogue, NaN scales, determinism, CUDA-graph capture, the fallbacks.
"""

import pytest
import torch

from inductor_moe.spec import GemmSpec
from inductor_moe.templates.fp4_gemm_ws import BLOCK_K, SCALE_BYTES, TOKENS, W_ROWS, fp4_ws_weight_layout

from test_fp4_gemm_template import TOL, make_operands, rel_err


def _codes(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return codes, packed


def _fragment_map(tiles, steps, w_rows):
    """(row, k) of every nibble the kernel reads, in the re-laid-out weight's byte order: tile,
    step, m64 tile i, thread t, byte b = 4 q + 2 half + t2 of the thread's four 32-bit words, low
    nibble then high.  The decode (fp_codes: $0 = the low nibbles of bytes 0, 1; $1 of bytes 2, 3;
    $2, $3 the high nibbles) fills the fragment's registers a0..a3 of chunk q: a0 = (R0, 2c + {0,1}),
    a1 = (R0 + 8, ...), a2 = (R0, 2c + 8 + {0,1}), a3 = (R0 + 8, ...)."""
    tile, step, i, t, b, h = torch.meshgrid(torch.arange(tiles), torch.arange(steps), torch.arange(w_rows // 64),
                                            torch.arange(128), torch.arange(16), torch.arange(2), indexing="ij")
    w, lane = t // 32, t % 32
    q, half, t2 = b // 4, (b // 2) % 2, b % 2
    row = tile * w_rows + 64 * i + 16 * w + lane // 4 + 8 * half
    k = step * BLOCK_K + 16 * q + 8 * h + 2 * (lane % 4) + t2
    return row, k


@pytest.mark.parametrize("w_rows", [128, 256])
@pytest.mark.parametrize("n,k", [(300, 160), (256, 64), (17, 96)])
def test_weight_layout_is_the_fragment_map(n, k, w_rows):
    codes, packed = _codes(n, k, seed=n + k)
    scale = torch.randint(0, 255, (n, k // 32), dtype=torch.uint8)
    w, s = fp4_ws_weight_layout(packed, scale, nv=False, w_rows=w_rows)
    tiles, steps = -(-n // w_rows), -(-k // BLOCK_K)
    assert w.shape == (tiles * steps * w_rows // 4, 128) and w.dtype == torch.uint8
    nibbles = torch.stack((w.reshape(-1) & 15, w.reshape(-1) >> 4), dim=1).reshape(-1)
    row, kk = (x.reshape(-1) for x in _fragment_map(tiles, steps, w_rows))
    inside = (row < n) & (kk < k)
    assert torch.equal(nibbles[inside], codes[row[inside], kk[inside]])
    assert not nibbles[~inside].any(), "padding must decode to +0"
    # every weight code appears exactly once
    assert int(inside.sum()) == n * k


@pytest.mark.parametrize("w_rows", [128, 256])
@pytest.mark.parametrize("nv", [False, True])
def test_scale_layout_follows_the_threads_rows(nv, w_rows):
    n, k = 300, 192
    group = 16 if nv else 32
    g = torch.Generator().manual_seed(1)
    scale = torch.randint(0, 120, (n, k // group), generator=g, dtype=torch.uint8)
    _, packed = _codes(n, k, seed=2)
    _, s = fp4_ws_weight_layout(packed, scale, nv=nv, w_rows=w_rows)
    tiles, steps, per = -(-n // w_rows), -(-k // BLOCK_K), SCALE_BYTES[nv]
    blocks = BLOCK_K // group
    tile, step, i, t, sb = torch.meshgrid(torch.arange(tiles), torch.arange(steps), torch.arange(w_rows // 64),
                                          torch.arange(128), torch.arange(per), indexing="ij")
    half, blk = sb // blocks, sb % blocks  # MXFP4: (row half, 32-block); NVFP4: (row half, k16 chunk q)
    row = tile * w_rows + 64 * i + 16 * (t // 32) + (t % 32) // 4 + 8 * half
    col = step * blocks + blk
    got = s.reshape(-1)
    row, col = row.reshape(-1), col.reshape(-1)
    inside = row < n
    assert s.shape == (tiles * steps * w_rows // 64 * per, 128)
    assert torch.equal(got[inside], scale[row[inside], col[inside]])


def test_strategy_choice_takes_ws_from_its_rows_on_sm90():
    from inductor_moe.templates.block_scaled_gemm import WS_MAX_M, WS_MIN_M, choose_strategy

    spec = GemmSpec()
    assert choose_strategy(WS_MIN_M, 4096, 4096, spec, torch.bfloat16, 90, ws=True) == "ws"
    assert choose_strategy(WS_MAX_M - 1, 4096, 4096, spec, torch.bfloat16, 90, ws=True) == "ws"
    assert choose_strategy(WS_MAX_M, 4096, 4096, spec, torch.bfloat16, 90, ws=True) == "dequant_chunks"
    assert choose_strategy(WS_MIN_M, 4096, 4096, spec, torch.bfloat16, 90) == "dequant_chunks"
    assert choose_strategy(WS_MIN_M - 1, 4096, 4096, spec, torch.bfloat16, 90, ws=True) != "ws"
    assert choose_strategy(WS_MIN_M, 4096, 4096, spec, torch.bfloat16, 100, ws=True) == "fused"
    # a grid of few tiles leaves SMs idle where cuBLAS fills them: 40 tiles on 132 SMs
    assert choose_strategy(1024, 1280, 4096, spec, torch.bfloat16, 90, ws=True) == "dequant_chunks"
    assert choose_strategy(1024, 2880, 2880, spec, torch.bfloat16, 90, ws=True) == "ws"  # 92 tiles


def test_tail_split_fills_the_last_wave():
    from inductor_moe.templates.fp4_gemm_ws import MAX_SPLIT, MIN_PART_STEPS, tail_split

    assert tail_split(448, 64, 132) == (396, 2)  # 14336 x 4096 at 1024 rows: 3 full waves + 52 tiles in halves
    assert tail_split(184, 45, 132) == (132, 2)  # 2880^2 at 2048 rows
    assert tail_split(128, 64, 132) == (128, 1)  # one wave that nearly fills the SMs: nothing to split
    assert tail_split(264, 64, 132) == (264, 1)  # whole waves
    assert tail_split(20, 64, 132) == (0, MAX_SPLIT)  # a small grid: as many parts as allowed
    assert tail_split(20, 2 * MIN_PART_STEPS, 132) == (0, 2)  # parts of at least MIN_PART_STEPS steps
    assert tail_split(20, MIN_PART_STEPS, 132) == (20, 1)


def test_ws_refuses_what_it_cannot_take_on_cpu():
    from inductor_moe.templates.block_scaled_gemm import _ws_reason, block_scaled_gemm, default_plan
    from inductor_moe.templates.fp4_gemm_ws import ws_operands_reason

    a, _, q, s, _, _ = make_operands("dense", "mxfp4", 8, 64, 64)
    assert _ws_reason(a, q, s, GemmSpec()) == "sm_90 only"
    assert ws_operands_reason(GemmSpec(), torch.float16) == "bf16 activations only"
    assert ws_operands_reason(GemmSpec(a_format="fp8_mx32"), torch.uint8) == "bf16 activations only"
    assert default_plan(a, q, s, GemmSpec())[0] != "ws"
    with pytest.raises(ValueError, match="ws strategy cannot take"):
        block_scaled_gemm(a, q, s, GemmSpec(), strategy="ws")


_skip = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                           reason="needs an sm_90 GPU")


def sm90(fn):
    return pytest.mark.gpu(_skip(fn))


TILES = [(W_ROWS, TOKENS), (256, 128)]  # (weight rows, tokens): the default and the other the kernel builds


def _run(a, q, s, spec, gs, bias, tile=TILES[0], num_sms=0):
    from inductor_moe.templates.block_scaled_gemm import ACTIVATION_CODES
    from inductor_moe.templates.fp4_gemm_ws import cached_weight_layout, launch_fp4_gemm_ws

    out = torch.full((a.shape[0], q.shape[0]), float("nan"), dtype=getattr(torch, spec.out_dtype), device=a.device)
    nv = spec.b_format == "nvfp4"
    return launch_fp4_gemm_ws(a, cached_weight_layout(q, s, nv, tile[0]), nv, gs, bias, out,
                              ACTIVATION_CODES[spec.activation], use_pdl=False, tokens=tile[1], num_sms=num_sms)


@sm90
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("fb", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("m,n,k,act", [(1024, 4096, 4096, None), (1000, 2880 + 16, 2880 + 32, "silu"),
                                       (130, 300, 96, "gelu"), (2048, 512, 1024, "relu")])
def test_cuda_ws_matches_reference_and_is_deterministic(fb, m, n, k, act, tile):
    from inductor_moe.ops.block_scaled_mm import block_scaled_mm_reference

    a, _, q, s, gs, bias = make_operands("dense", fb, m, n, k, device="cuda", seed=m + n)
    spec = GemmSpec(b_format=fb, activation=act)
    ref = block_scaled_mm_reference(a.double(), q, s, spec, None, gs, bias)
    out = _run(a, q, s, spec, gs, bias, tile)  # written over NaN: every element must be stored
    assert not out.isnan().any()
    assert rel_err(out, ref) <= TOL
    assert torch.equal(out, _run(a, q, s, spec, gs, bias, tile))
    no_bias = _run(a, q, s, GemmSpec(b_format=fb, out_dtype="float32"), gs, None, tile)
    assert rel_err(no_bias, block_scaled_mm_reference(a.double(), q, s, GemmSpec(b_format=fb), None, gs)) <= TOL


@sm90
@pytest.mark.parametrize("fb", ["mxfp4", "nvfp4"])
def test_cuda_ws_split_tail_matches_reference(fb):
    """The last wave split in K (a pretend 8-SM GPU: 10 tiles, 8 whole, 2 in parts) -- partials summed
    in part order by the reduce kernel: the reference's values, the same bits twice."""
    from inductor_moe.ops.block_scaled_mm import block_scaled_mm_reference
    from inductor_moe.templates.fp4_gemm_ws import tail_split

    m, n, k = 300, 5 * W_ROWS - 16, 40 * 64 + 32
    assert tail_split(-(-m // TOKENS) * -(-n // W_ROWS), -(-k // 64), 8) == (8, 4)
    a, _, q, s, gs, bias = make_operands("dense", fb, m, n, k, device="cuda", seed=7)
    spec = GemmSpec(b_format=fb, activation="silu")
    ref = block_scaled_mm_reference(a.double(), q, s, spec, None, gs, bias)
    out = _run(a, q, s, spec, gs, bias, num_sms=8)
    assert not out.isnan().any()
    assert rel_err(out, ref) <= TOL
    assert torch.equal(out, _run(a, q, s, spec, gs, bias, num_sms=8))
    whole = _run(a, q, s, spec, gs, bias, num_sms=1000)  # nothing split
    assert rel_err(out, whole) <= 1e-2


@sm90
def test_cuda_ws_is_the_large_m_default_and_captures():
    from inductor_moe.templates.block_scaled_gemm import WS_MIN_M, block_scaled_gemm, default_plan

    n = 23 * W_ROWS  # 92 tiles: enough to fill the SMs' WS_MIN_FILL
    a, _, q, s, gs, bias = make_operands("dense", "nvfp4", WS_MIN_M, n, 256, device="cuda", seed=3)
    spec = GemmSpec(b_format="nvfp4", activation="gelu_tanh")
    assert default_plan(a, q, s, spec, bias) == ("ws", None)
    from inductor_moe import config

    with config.patch(warp_specialized=False):  # off: no re-laid-out copy, the chunked decode runs
        assert default_plan(a, q, s, spec, bias) == ("dequant_chunks", None)
    eager = block_scaled_gemm(a, q, s, spec, None, gs, bias)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            captured = block_scaled_gemm(a, q, s, spec, None, gs, bias)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    # a weight first seen during capture cannot be re-laid-out there: the call falls back
    a2, _, q2, s2, gs2, _ = make_operands("dense", "nvfp4", WS_MIN_M, n, 256, device="cuda", seed=4)
    with torch.cuda.stream(stream):
        graph2 = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph2, stream=stream):
            assert default_plan(a2, q2, s2, spec)[0] == "dequant_chunks"


@sm90
def test_cuda_ws_nan_and_large_scales():
    """An e8m0 NaN scale (255) makes its weight row's outputs NaN; scales above 2 (which the decode's
    bf16 multiply cannot hold) send the default to dequant_chunks, never a wrong result."""
    from inductor_moe.ops.block_scaled_mm import block_scaled_mm_reference
    from inductor_moe.templates.block_scaled_gemm import WS_MIN_M, default_plan

    a, _, q, s, _, _ = make_operands("dense", "mxfp4", WS_MIN_M, 384, 128, device="cuda", seed=5)
    s_nan = s.view(torch.uint8).clone()
    s_nan[300, 1] = 255
    s_nan = s_nan.view(s.dtype)
    out = _run(a, q, s_nan, GemmSpec(), None, None)
    assert out[:, 300].isnan().all() and not out[:, :300].isnan().any() and not out[:, 301:].isnan().any()
    ref = block_scaled_mm_reference(a.double(), q, s_nan, GemmSpec())
    keep = torch.ones(384, dtype=torch.bool, device="cuda")
    keep[300] = False
    assert rel_err(out[:, keep], ref[:, keep]) <= TOL
    big = (s.view(torch.uint8).int() + 10).clamp(max=254).to(torch.uint8).view(s.dtype)
    assert default_plan(a, q, big, GemmSpec())[0] == "dequant_chunks"
