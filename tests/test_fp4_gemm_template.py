"""The block-scaled GEMM template against the float64 reference op.

CPU: under TRITON_INTERPRET=1 in a subprocess (the variable must be set before triton is
imported), small shapes, every operand format, both MMA paths, split-K, the fused epilogue.
GPU (when CUDA is present): the registered CUDA kernel of ``inductor_moe::block_scaled_mm``.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from inductor_moe import formats
from inductor_moe.spec import GemmSpec
from inductor_moe.templates.block_scaled_gemm import GemmKernelConfig, choose_gemm_config

TOL = 2e-2


def make_operands(fmt_a, fmt_b, m, n, k, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g)
    gs = None
    if fmt_b == "mxfp4":
        q, s = formats.quantize_mxfp4(w)
    else:
        q, s, gs = formats.quantize_nvfp4(w)
        gs = gs.reshape(1).float()
    if fmt_a == "dense":
        a, a_s = x.bfloat16(), None
    elif fmt_a == "fp8_mx32":
        a, a_s = formats.quantize_fp8_mx32(x)
    elif fmt_a == "mxfp4":
        a, a_s = formats.quantize_mxfp4(x)
    else:
        a, a_s, _ = formats.quantize_nvfp4(x, torch.ones(()))
    bias = torch.randn(n, generator=g).bfloat16()
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(a), to(a_s), to(q), to(s), to(gs), to(bias)


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


_INTERPRETED = textwrap.dedent("""
    import itertools, sys
    import torch
    from inductor_moe.ops.block_scaled_mm import block_scaled_mm_reference
    from inductor_moe.spec import GemmSpec
    from inductor_moe.templates.block_scaled_gemm import GemmKernelConfig, block_scaled_gemm
    sys.path.insert(0, "tests")
    from test_fp4_gemm_template import make_operands, rel_err
    worst = 0.0
    cases = [("dense", "mxfp4", None, False, 1), ("dense", "mxfp4", "silu", True, 3),
             ("fp8_mx32", "mxfp4", "gelu", True, 1), ("mxfp4", "mxfp4", None, False, 2),
             ("dense", "nvfp4", "relu", False, 2), ("nvfp4", "nvfp4", "gelu_tanh", False, 1),
             ("fp8_mx32", "nvfp4", None, False, 1)]
    for i, (fa, fb, act, ds, sk) in enumerate(cases):
        a, a_s, q, s, gs, bias = make_operands(fa, fb, 5, 40, 96, seed=i)
        spec = GemmSpec(a_format=fa, b_format=fb, activation=act)
        a_ref = a.double() if fa == "dense" else a
        ref = block_scaled_mm_reference(a_ref, q, s, spec, a_s, gs, bias)
        cfg = GemmKernelConfig(16, 16, 32, split_k=sk, dot_scaled=ds, prefetch=i % 2 == 1)
        out = block_scaled_gemm(a, q, s, spec, a_s, gs, bias, config=cfg)
        assert out.dtype == torch.bfloat16 and out.shape == (5, 40)
        err = rel_err(out, ref)
        assert err <= 2e-2, (fa, fb, act, ds, sk, err)
        worst = max(worst, err)
    # 3-D activations and fp32 output, no bias
    a, _, q, s, _, _ = make_operands("dense", "mxfp4", 6, 32, 64)
    a3 = a.reshape(2, 3, 64).float()
    spec = GemmSpec(out_dtype="float32")
    out = block_scaled_gemm(a3, q, s, spec, config=GemmKernelConfig(16, 16, 32, split_k=1, prefetch=True))
    ref = block_scaled_mm_reference(a3.double(), q, s, spec)
    assert out.shape == (2, 3, 32) and rel_err(out, ref) <= 2e-2
    # split-K is deterministic: same inputs, bitwise same output
    a, _, q, s, _, _ = make_operands("dense", "mxfp4", 3, 16, 128)
    cfg = GemmKernelConfig(16, 16, 32, split_k=4, prefetch=True)
    assert torch.equal(block_scaled_gemm(a, q, s, GemmSpec(), config=cfg), block_scaled_gemm(a, q, s, GemmSpec(), config=cfg))
    # the large-M strategy: weight rows decoded chunk by chunk (3 chunks here), then cuBLAS / torch.mm
    from inductor_moe.templates.block_scaled_gemm import dequant_chunks_gemm
    for i, fb in enumerate(("mxfp4", "nvfp4")):
        a, _, q, s, gs, bias = make_operands("dense", fb, 5, 300, 96, seed=10 + i)
        spec = GemmSpec(b_format=fb, activation="silu" if i else None)
        out = dequant_chunks_gemm(a, q, s, spec, gs, bias, chunk_bytes=128 * 96 * 2)
        assert rel_err(out, block_scaled_mm_reference(a.double(), q, s, spec, None, gs, bias)) <= 2e-2
    # the decode GEMV (no tl.dot): M = 1..16 rows in one program, split-K with a K tail, both decodes
    from inductor_moe.templates.block_scaled_gemm import GemvConfig
    gemv_cases = [("mxfp4", None, 1, 1, 64, False), ("nvfp4", "silu", 5, 2, 64, True), ("mxfp4", "gelu", 16, 4, 32, True),
                  ("mxfp4", None, 3, 3, 64, False), ("nvfp4", "relu", 2, 1, 128, False)]
    for i, (fb, act, m, sk, bk, words) in enumerate(gemv_cases):
        a, _, q, s, gs, bias = make_operands("dense", fb, m, 40, 160, seed=20 + i)
        spec = GemmSpec(b_format=fb, activation=act)
        ref = block_scaled_mm_reference(a.double(), q, s, spec, None, gs, bias)
        cfg = GemvConfig(16, bk, sk, words=words)
        out = block_scaled_gemm(a, q, s, spec, None, gs, bias, config=cfg)
        assert out.shape == (m, 40)
        err = rel_err(out, ref)
        assert err <= 2e-2, ("gemv", fb, act, m, sk, words, err)
        worst = max(worst, err)
        if sk > 1:
            assert torch.equal(out, block_scaled_gemm(a, q, s, spec, None, gs, bias, config=cfg))
    # swapped tiles (acc^T = W @ X^T, A permuted to the MMA's K order first): a K tail inside the
    # last step, N tail, split-K, both formats, bias + activation; each case must run swapped
    from inductor_moe.testing import counting_kperm_launches
    with counting_kperm_launches() as kperm_calls:
        # (the last two: the two-warpgroup tile of 129..512 rows, 256 tokens by 128 weight rows)
        swap_cases = [("mxfp4", "silu", 1, 2, 64, 192), ("nvfp4", None, 5, 1, 128, 320),
                      ("mxfp4", "gelu", 17, 3, 64, 320), ("nvfp4", "relu", 33, 2, 128, 256),
                      ("mxfp4", "silu", 150, 1, 64, 192), ("nvfp4", None, 130, 1, 64, 128)]
        for i, (fb, act, m, sk, bk, k) in enumerate(swap_cases):
            a, _, q, s, gs, bias = make_operands("dense", fb, m, 80, k, seed=40 + i)
            spec = GemmSpec(b_format=fb, activation=act)
            ref = block_scaled_mm_reference(a.double(), q, s, spec, None, gs, bias)
            if m > 128:  # NVFP4: scales in the step with the next step's prefetched (a no-op interpreted)
                cfg = GemmKernelConfig(256, 128, bk, num_warps=8, swap_ab=True, scales_ahead=fb == "mxfp4",
                                       prefetch_scales=fb == "nvfp4")
            else:
                cfg = GemmKernelConfig(16 if m <= 16 else 64, 64, bk, split_k=sk, swap_ab=True, scales_ahead=i < 2)
            calls = len(kperm_calls)
            out = block_scaled_gemm(a, q, s, spec, None, gs, bias, config=cfg)
            err = rel_err(out, ref)
            assert out.shape == (m, 80) and err <= 2e-2, ("swap_ab", fb, act, m, sk, err)
            assert len(kperm_calls) == calls + 1, ("swap_ab did not run swapped", fb, m)
            worst = max(worst, err)
        # NVFP4's 33..64-row default: 64 x 128 x 256 tiles (8 warps), K_ALIGNED, K split in 2
        a, _, q, s, gs, bias = make_operands("dense", "nvfp4", 40, 80, 512, seed=47)
        spec = GemmSpec(b_format="nvfp4", activation="silu")
        cfg = GemmKernelConfig(64, 128, 256, split_k=2, num_warps=8, swap_ab=True)
        out = block_scaled_gemm(a, q, s, spec, None, gs, bias, config=cfg)
        err = rel_err(out, block_scaled_mm_reference(a.double(), q, s, spec, None, gs, bias))
        assert err <= 2e-2, ("swap_ab 64x128x256", err)
        worst = max(worst, err)
        # what the swapped tile cannot take runs unswapped, still right: K not in whole 64s, and MXFP4
        # scales above 2 (e8m0 bytes 129..254: they do not fit the decode's multiply)
        a, _, q, s, _, bias = make_operands("dense", "mxfp4", 17, 80, 160, seed=50)
        big = s  # K = 160: not whole 64s
        a2, _, q2, _, _, _ = make_operands("dense", "mxfp4", 17, 80, 192, seed=51)
        s2 = make_operands("dense", "mxfp4", 17, 80, 192, seed=51)[3]
        big2 = (s2.view(torch.uint8).int() + 10).clamp(max=254).to(torch.uint8)
        assert int(big2.max()) > 128, "scales above 2 needed"
        for (x, qq, ss) in ((a, q, big), (a2, q2, big2.view(s2.dtype))):
            calls = len(kperm_calls)
            ref = block_scaled_mm_reference(x.double(), qq, ss, GemmSpec(), None, None, bias)
            out = block_scaled_gemm(x, qq, ss, GemmSpec(), None, None, bias,
                                    config=GemmKernelConfig(32, 64, 64, swap_ab=True))
            assert rel_err(out, ref) <= 2e-2 and len(kperm_calls) == calls, "unswapped fallback"
    # default strategy at decode M is the GEMV
    a, _, q, s, _, _ = make_operands("dense", "mxfp4", 4, 64, 256, seed=30)
    out = block_scaled_gemm(a, q, s, GemmSpec())
    assert rel_err(out, block_scaled_mm_reference(a.double(), q, s, GemmSpec())) <= 2e-2
    print("worst", worst)
""")


def test_template_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, cwd=root, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "worst" in r.stdout


def test_config_choice_is_pure_and_sane():
    spec = GemmSpec()
    decode = choose_gemm_config(1, 4096, 4096, spec, torch.bfloat16, num_sms=132)
    assert decode.block_m == 16 and decode.split_k >= 1
    tiles = -(-4096 // decode.block_n) * decode.split_k
    assert tiles >= 132, "decode must put every SM on the weight stream"
    prefill = choose_gemm_config(4096, 4096, 4096, spec, torch.bfloat16, num_sms=132)
    assert prefill.block_m >= 64 and prefill.split_k == 1
    with pytest.raises(ValueError):
        GemmKernelConfig(16, 16, 48)
    with pytest.raises(ValueError):
        GemmKernelConfig(16, 64, 64, swap_ab=True, dot_scaled=True)
    # swapped tiles for 17..128 rows (256 where N >= 8192) on sm_90 with bf16 activations only
    mid = choose_gemm_config(64, 4096, 4096, spec, torch.bfloat16, num_sms=132)
    assert mid.swap_ab and mid.block_n == 64 and mid.block_m == 64 and not mid.dot_scaled
    assert choose_gemm_config(17, 4096, 4096, spec, torch.bfloat16, num_sms=132).block_m == 32
    at128 = choose_gemm_config(128, 4096, 4096, spec, torch.bfloat16, num_sms=132)
    assert at128.swap_ab and at128.block_m == 64 and at128.block_k % 64 == 0
    # 65..128 rows where the one-warpgroup 128-token tile's grid, split in 2, fills the SMs: that
    # tile decodes each weight once, the 64-row tiles twice (H100, 128 x 8192^2: 66.0 -> 57.6 us)
    for m in (65, 128):
        one_wg = choose_gemm_config(m, 8192, 8192, spec, torch.bfloat16, num_sms=132)
        assert one_wg.swap_ab and (one_wg.block_m, one_wg.block_n, one_wg.num_warps, one_wg.split_k) == (128, 128, 4, 2)
    assert choose_gemm_config(64, 8192, 8192, spec, torch.bfloat16, num_sms=132).block_m == 64
    # 33..64 rows: K split only as far as one round of programs (2 of 4 warps per SM; 8192 x 4096:
    # 128 tiles, 2 splits, where rounding up gave 3), NVFP4 on the 8-warp 64 x 128 x 256 tile with
    # K_ALIGNED (one program per SM); 17..32 rows keep rounding up
    mx48 = choose_gemm_config(48, 8192, 4096, spec, torch.bfloat16, num_sms=132)
    assert (mx48.block_n, mx48.num_warps, mx48.split_k, mx48.k_aligned) == (64, 4, 2, True)
    assert choose_gemm_config(32, 8192, 4096, spec, torch.bfloat16, num_sms=132).split_k == 3
    nv_spec = GemmSpec(b_format="nvfp4")
    nv64 = choose_gemm_config(64, 14336, 4096, nv_spec, torch.bfloat16, num_sms=132)
    assert (nv64.block_m, nv64.block_n, nv64.block_k, nv64.num_warps, nv64.split_k, nv64.k_aligned) == \
        (64, 128, 256, 8, 1, True)
    assert choose_gemm_config(64, 8192, 8192, nv_spec, torch.bfloat16, num_sms=132).split_k == 2
    nv32 = choose_gemm_config(32, 14336, 4096, nv_spec, torch.bfloat16, num_sms=132)
    assert (nv32.block_n, nv32.num_warps, nv32.k_aligned) == (64, 4, False)
    # 129..512 rows: the swapped tile choose_swapped_tile estimates fastest.  Two warpgroups (8
    # warps) of 64 weight rows sharing 256 tokens, scales a step ahead, where their tiles fill a wave
    wide = choose_gemm_config(256, 14336, 4096, spec, torch.bfloat16, num_sms=132)
    assert wide.swap_ab and (wide.block_m, wide.block_n, wide.num_warps, wide.split_k) == (256, 128, 8, 1)
    assert wide.scales_ahead
    # one warpgroup on 128 tokens where fewer, or where 2 waves of them would be 1 wave of pairs
    # (384 x 8704: 136 two-warpgroup tiles on 132 SMs; H100 121 us, one warpgroup 79)
    narrow = choose_gemm_config(256, 8192, 8192, spec, torch.bfloat16, num_sms=132)  # 64 tiles of 256 rows
    assert narrow.swap_ab and (narrow.block_m, narrow.num_warps) == (128, 4)
    assert narrow.split_k == 2  # 2 x 64 tiles x 2 splits: one wave of 2 programs per SM
    assert narrow.scales_ahead  # MXFP4's scales a step ahead; NVFP4's in the step
    nv_narrow = choose_gemm_config(256, 8192, 8192, GemmSpec(b_format="nvfp4"), torch.bfloat16, num_sms=132)
    assert (nv_narrow.block_m, nv_narrow.num_warps, nv_narrow.scales_ahead, nv_narrow.split_k) == (128, 4, None, 2)
    assert choose_gemm_config(384, 8704, 4096, spec, torch.bfloat16, num_sms=132).block_m == 128
    assert choose_gemm_config(192, 10240, 4096, spec, torch.bfloat16, num_sms=132).block_m == 256
    assert choose_gemm_config(512, 8192, 8192, spec, torch.bfloat16, num_sms=132).block_m == 256
    # "fused" at these rows always runs a swapped tile (the strategy decides against dequant_chunks)
    assert choose_gemm_config(256, 4096, 4096, spec, torch.bfloat16, num_sms=132).swap_ab
    assert not choose_gemm_config(1024, 14336, 4096, spec, torch.bfloat16, num_sms=132).swap_ab
    nv = choose_gemm_config(64, 2880, 2880, GemmSpec(b_format="nvfp4"), torch.bfloat16, num_sms=132)
    assert nv.swap_ab and nv.block_k == 64  # NVFP4 with K not in 256s: 64-deep steps
    assert not decode.swap_ab  # <= 16 rows: the 16-row mma.sync tiles (as fast, measured)
    assert not choose_gemm_config(64, 4096, 4096, spec, torch.bfloat16, num_sms=132, arch=100).swap_ab
    assert not choose_gemm_config(64, 4096, 4096, spec, torch.float16, num_sms=132).swap_ab
    assert not choose_gemm_config(64, 4096, 4096, GemmSpec(a_format="mxfp4"), torch.uint8, num_sms=132).swap_ab
    assert not choose_gemm_config(64, 4096, 4096, spec, torch.bfloat16, num_sms=132, swap_allowed=False).swap_ab
    assert not choose_gemm_config(64, 4096, 4000, spec, torch.bfloat16, num_sms=132).swap_ab  # K not in 64s
    with pytest.raises(ValueError):
        GemmKernelConfig(64, 64, 32, swap_ab=True)  # the swapped tile steps K in whole 64s
    with pytest.raises(ValueError):  # the L1 prefetch of scales: swapped tiles with scales in the step only
        GemmKernelConfig(64, 64, 64, prefetch_scales=True)
    with pytest.raises(ValueError):
        GemmKernelConfig(64, 64, 64, swap_ab=True, scales_ahead=True, prefetch_scales=True)
    from inductor_moe.templates.block_scaled_gemm import choose_gemv_config

    for (m, n, k) in ((1, 4096, 4096), (16, 8192, 8192), (1, 2880, 2880)):
        g = choose_gemv_config(m, n, k, 132)
        assert -(-n // g.block_n) * g.split_k >= 4 * 132, "decode must put several programs on every SM"
        assert g.split_k * g.block_k <= -(-k // g.block_k) * g.block_k


def test_strategy_choice():
    from inductor_moe.templates.block_scaled_gemm import choose_strategy

    spec = GemmSpec()
    assert choose_strategy(1, 4096, 4096, spec, torch.bfloat16, 90) == "gemv"  # decode: stream fp4 bytes
    assert choose_strategy(1, 4096, 4096, spec, torch.bfloat16, 100) == "gemv"
    assert choose_strategy(16, 4096, 4096, spec, torch.bfloat16, 90) == "fused"  # GEMV work grows with M
    assert choose_strategy(16, 4096, 4096, GemmSpec(a_format="mxfp4"), torch.uint8, 90) == "fused"
    assert choose_strategy(4096, 4096, 4096, spec, torch.bfloat16, 90) == "dequant_chunks"  # no fp4 MMA
    # the swapped tile up to 128 rows where it takes the operands, to 512 where choose_swapped_tile
    # estimates one faster than dequant_chunks (MXFP4 512 x 8704: 2 two-warpgroup waves, 272
    # one-warpgroup tiles; H100 120 / 128 us, chunks 115), else chunks from 128
    assert choose_strategy(128, 4096, 4096, spec, torch.bfloat16, 90, swapped_tile=True) == "fused"
    assert choose_strategy(128, 4096, 4096, spec, torch.bfloat16, 90) == "dequant_chunks"
    assert choose_strategy(512, 8704, 4096, spec, torch.bfloat16, 90, swapped_tile=True) == "dequant_chunks"
    assert choose_strategy(512, 14336, 4096, spec, torch.bfloat16, 90, swapped_tile=True) == "fused"
    assert choose_strategy(512, 14336, 4096, spec, torch.bfloat16, 90) == "dequant_chunks"
    assert choose_strategy(300, 8192, 8192, spec, torch.bfloat16, 90, swapped_tile=True) == "fused"
    nv_spec = GemmSpec(b_format="nvfp4")
    assert choose_strategy(512, 8704, 4096, nv_spec, torch.bfloat16, 90, swapped_tile=True) == "dequant_chunks"
    nv_f32 = GemmSpec(b_format="nvfp4", out_dtype="float32")  # dequant_chunks writes bf16 only
    assert choose_strategy(512, 8704, 4096, nv_f32, torch.bfloat16, 90, swapped_tile=True) == "fused"
    assert choose_strategy(200, 8192, 8192, spec, torch.bfloat16, 90, swapped_tile=True, num_sms=200) == "fused"
    assert choose_strategy(513, 14336, 4096, spec, torch.bfloat16, 90, swapped_tile=True) == "dequant_chunks"
    assert choose_strategy(4096, 4096, 4096, spec, torch.bfloat16, 100) == "fused"  # native block-scaled MMA
    assert choose_strategy(4096, 4096, 4096, GemmSpec(a_format="mxfp4"), torch.uint8, 90) == "fused"


def test_default_plan_takes_the_swapped_tile_only_where_it_fits():
    """At 128 rows the default is the swapped tile; where it cannot take the operands (K not in
    whole 64s, MXFP4 scales above 2) the same call goes to "dequant_chunks", never a wrong tile."""
    from inductor_moe.templates.block_scaled_gemm import default_plan

    a, _, q, s, _, _ = make_operands("dense", "mxfp4", 128, 80, 192)
    strategy, cfg = default_plan(a, q, s, GemmSpec())
    assert strategy == "fused" and cfg.swap_ab
    big = (s.view(torch.uint8).int() + 10).to(torch.uint8).view(s.dtype)  # bytes 135..137: scales above 2
    assert default_plan(a, q, big, GemmSpec()) == ("dequant_chunks", None)
    a, _, q, s, _, _ = make_operands("dense", "nvfp4", 128, 80, 160)
    assert default_plan(a, q, s, GemmSpec(b_format="nvfp4")) == ("dequant_chunks", None)
    a, _, q, s, _, _ = make_operands("dense", "nvfp4", 40, 80, 160)  # below 128 rows: unswapped Triton tiles
    strategy, cfg = default_plan(a, q, s, GemmSpec(b_format="nvfp4"))
    assert strategy == "fused" and not cfg.swap_ab


_skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda(fn):
    return pytest.mark.gpu(_skip(fn))


@cuda
@pytest.mark.parametrize("fa,fb", [("dense", "mxfp4"), ("dense", "nvfp4"), ("fp8_mx32", "mxfp4"),
                                   ("mxfp4", "mxfp4"), ("nvfp4", "nvfp4")])
@pytest.mark.parametrize("m", [1, 16, 200])
def test_cuda_kernel_matches_reference(fa, fb, m):
    from inductor_moe.lowering import register
    from inductor_moe.ops.block_scaled_mm import block_scaled_mm_reference

    register()
    a, a_s, q, s, gs, bias = make_operands(fa, fb, m, 512, 1024, device="cuda")
    spec = GemmSpec(a_format=fa, b_format=fb, activation="silu").to_str()
    out = torch.ops.inductor_moe.block_scaled_mm(a, q, s, spec, a_scale=a_s, global_scale=gs, bias=bias)
    a_ref = a.double() if fa == "dense" else a
    ref = block_scaled_mm_reference(a_ref, q, s, spec, a_s, gs, bias)
    assert rel_err(out, ref) <= TOL


@cuda
def test_cuda_dot_scaled_path_and_graph_capture():
    from dataclasses import replace

    from inductor_moe.ops.block_scaled_mm import block_scaled_mm_reference
    from inductor_moe.templates.block_scaled_gemm import block_scaled_gemm

    a, _, q, s, _, _ = make_operands("dense", "mxfp4", 16, 4096, 4096, device="cuda")
    spec = GemmSpec()
    ref = block_scaled_mm_reference(a.double(), q, s, spec)
    cfg = choose_gemm_config(16, 4096, 4096, spec, a.dtype, 132)
    for c in (cfg, replace(cfg, swap_ab=True), replace(cfg, dot_scaled=True), replace(cfg, split_k=1)):
        assert rel_err(block_scaled_gemm(a, q, s, spec, config=c), ref) <= TOL
    out = block_scaled_gemm(a, q, s, spec, use_pdl=True)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = block_scaled_gemm(a, q, s, spec, use_pdl=True)
    g.replay()
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, out)


@cuda
@pytest.mark.parametrize("fb", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("m", [1, 7, 16, 64, 128, 200])
def test_cuda_swapped_tiles_match_reference_and_are_deterministic(fb, m):
    """Swapped decode tiles (the MoE's: decoded weight rows as wgmma's register operand) at an odd
    N and a K in 64s but not in 128s, both scale schedules, split-K, the default tiles too."""
    from dataclasses import replace

    from inductor_moe.ops.block_scaled_mm import block_scaled_mm_reference
    from inductor_moe.templates.block_scaled_gemm import block_scaled_gemm

    n, k = 2880 + 64 + 16, 2880 + 64
    a, _, q, s, gs, bias = make_operands("dense", fb, m, n, k, device="cuda", seed=m)
    spec = GemmSpec(b_format=fb, activation="silu")
    ref = block_scaled_mm_reference(a.double(), q, s, spec, None, gs, bias)
    bm = 16 if m <= 16 else 64 if m <= 64 else 128
    chosen = choose_gemm_config(min(max(m, 17), 128), n, k, spec, a.dtype, torch.cuda.get_device_properties(0).multi_processor_count)
    assert chosen.swap_ab
    for cfg in (GemmKernelConfig(bm, 64, 256, 8, num_stages=3, swap_ab=True),
                GemmKernelConfig(bm, 128, 128, 4, num_warps=8, num_stages=4, swap_ab=True, scales_ahead=True),
                GemmKernelConfig(bm, 64, 512, 1, num_stages=1, swap_ab=True), replace(chosen, block_m=bm)):
        out = block_scaled_gemm(a, q, s, spec, None, gs, bias, config=cfg)
        assert rel_err(out, ref) <= TOL, cfg
        assert torch.equal(out, block_scaled_gemm(a, q, s, spec, None, gs, bias, config=cfg))


@cuda
@pytest.mark.parametrize("fb", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("m", [40, 64])
def test_cuda_33_to_64_row_defaults_match_reference(fb, m):
    """33..64 rows at K in 256s: the default splits K in 3 here (N = 4096 + 16, K = 3072: one round
    of programs), NVFP4 on the 8-warp 64 x 128 x 256 tile with K_ALIGNED; it matches the reference
    and is deterministic."""
    from inductor_moe.ops.block_scaled_mm import block_scaled_mm_reference
    from inductor_moe.templates.block_scaled_gemm import block_scaled_gemm, default_plan

    n, k = 4096 + 16, 3072
    a, _, q, s, gs, bias = make_operands("dense", fb, m, n, k, device="cuda", seed=m)
    spec = GemmSpec(b_format=fb, activation="silu")
    ref = block_scaled_mm_reference(a.double(), q, s, spec, None, gs, bias)
    strategy, chosen = default_plan(a, q, s, spec, bias)
    assert strategy == "fused" and chosen.swap_ab and chosen.k_aligned and chosen.split_k == 3
    assert (chosen.block_n, chosen.num_warps) == ((64, 4) if fb == "mxfp4" else (128, 8))
    out = block_scaled_gemm(a, q, s, spec, None, gs, bias)
    assert rel_err(out, ref) <= TOL
    assert all(torch.equal(out, block_scaled_gemm(a, q, s, spec, None, gs, bias)) for _ in range(4))


@cuda
@pytest.mark.parametrize("fb", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("m", [200, 256, 512])
def test_cuda_two_warpgroup_swapped_tiles_are_the_default_and_match_reference(fb, m):
    """129..512 rows with whole waves of two-warpgroup tiles (N = 128 per SM, less a tail): the
    default plan is that swapped tile (256 tokens, block scales a step ahead), at a K in 64s but
    not 128s; it matches the reference and is deterministic."""
    from dataclasses import replace

    from inductor_moe.ops.block_scaled_mm import block_scaled_mm_reference
    from inductor_moe.templates.block_scaled_gemm import block_scaled_gemm, default_plan
    from inductor_moe.templates.swapped_tile_choice import choose_swapped_tile

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n, k = 128 * sms - 16, 1024 + 64
    assert choose_swapped_tile(m, n, k, fb, sms).tile == "two_warpgroups"
    a, _, q, s, gs, bias = make_operands("dense", fb, m, n, k, device="cuda", seed=m)
    spec = GemmSpec(b_format=fb, activation="silu")
    ref = block_scaled_mm_reference(a.double(), q, s, spec, None, gs, bias)
    strategy, chosen = default_plan(a, q, s, spec, bias)
    assert strategy == "fused" and chosen.swap_ab and (chosen.block_m, chosen.num_warps) == (256, 8)
    # MXFP4's scales a step ahead without K_ALIGNED; NVFP4's in the step with it
    assert (chosen.scales_ahead, chosen.k_aligned) == ((True, False) if fb == "mxfp4" else (None, True))
    out = block_scaled_gemm(a, q, s, spec, None, gs, bias)
    assert rel_err(out, ref) <= TOL
    # bitwise equal run to run (the same two warpgroups on 128 tokens were not, with Triton 3.6)
    assert all(torch.equal(out, block_scaled_gemm(a, q, s, spec, None, gs, bias)) for _ in range(6))
    # the candidate with the scales in the step and the next step's prefetched to L1: the same MMAs
    # in the same order, so the same bits
    pfs = replace(chosen, scales_ahead=False, prefetch_scales=True)
    assert torch.equal(out, block_scaled_gemm(a, q, s, spec, None, gs, bias, config=pfs))


@cuda
@pytest.mark.parametrize("fb", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("m", [100, 140, 256])
def test_cuda_one_warpgroup_128_token_default_matches_reference(fb, m):
    """65..256 rows where two-warpgroup tiles would fill half a wave (N = 8192 + 16): the default
    plan is the one-warpgroup 128-token swapped tile (at 100 rows, 28 of its tokens masked),
    MXFP4's scales a step ahead; it and its split-K form match the reference and are deterministic."""
    from dataclasses import replace

    from inductor_moe.ops.block_scaled_mm import block_scaled_mm_reference
    from inductor_moe.templates.block_scaled_gemm import block_scaled_gemm, default_plan
    from inductor_moe.templates.swapped_tile_choice import choose_swapped_tile

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n, k = 8192 + 16, 1024 + 64
    a, _, q, s, gs, bias = make_operands("dense", fb, m, n, k, device="cuda", seed=m)
    spec = GemmSpec(b_format=fb, activation="silu")
    ref = block_scaled_mm_reference(a.double(), q, s, spec, None, gs, bias)
    strategy, chosen = default_plan(a, q, s, spec, bias)
    assert strategy == "fused" and chosen.swap_ab and (chosen.block_m, chosen.num_warps) == (128, 4)
    assert chosen.split_k == choose_swapped_tile(m, n, k, fb, sms).split_k
    assert chosen.scales_ahead == (True if fb == "mxfp4" else None)
    for cfg in (chosen, replace(chosen, split_k=3 - chosen.split_k)):
        out = block_scaled_gemm(a, q, s, spec, None, gs, bias, config=cfg)
        assert rel_err(out, ref) <= TOL, cfg
        assert all(torch.equal(out, block_scaled_gemm(a, q, s, spec, None, gs, bias, config=cfg)) for _ in range(4))


@cuda
@pytest.mark.parametrize("fb", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("m", [1, 7, 16])
def test_cuda_gemv_matches_reference_and_is_deterministic(fb, m):
    from inductor_moe.ops.block_scaled_mm import block_scaled_mm_reference
    from inductor_moe.templates.block_scaled_gemm import GemvConfig, block_scaled_gemm, choose_gemv_config

    a, _, q, s, gs, bias = make_operands("dense", fb, m, 2880, 2880, device="cuda", seed=m)
    spec = GemmSpec(b_format=fb, activation="gelu")
    ref = block_scaled_mm_reference(a.double(), q, s, spec, None, gs, bias)
    for cfg in (choose_gemv_config(m, 2880, 2880, 132), GemvConfig(32, 512, 8, words=True), GemvConfig(16, 256, 16)):
        out = block_scaled_gemm(a, q, s, spec, None, gs, bias, config=cfg)
        assert rel_err(out, ref) <= TOL, cfg
        assert torch.equal(out, block_scaled_gemm(a, q, s, spec, None, gs, bias, config=cfg))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = block_scaled_gemm(a, q, s, spec, None, gs, bias, use_pdl=True)
    g.replay()
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(captured, ref) <= TOL


def test_cuda_decode_fit_checks():
    """The CUDA decode GEMM's operand checks (metadata only, so they run on the CPU)."""
    from inductor_moe.cuda.fp4_decode import choose_decode_mma_config, decode_mma_fits
    from inductor_moe.templates.block_scaled_gemm import choose_strategy

    a, _, q, s, gs, bias = make_operands("dense", "nvfp4", 4, 64, 256)
    spec = GemmSpec(b_format="nvfp4")
    assert decode_mma_fits(a, q, s, spec, bias) is None
    assert "bf16" in decode_mma_fits(a.half(), q, s, spec, bias)
    assert "M=17" in decode_mma_fits(torch.zeros(17, 256, dtype=torch.bfloat16), q, s, spec, bias)
    wide = torch.zeros(4, 264, dtype=torch.bfloat16)
    assert "aligned" in decode_mma_fits(wide[:, 4:260], q, s, spec, bias)  # rows 8 bytes off 16
    assert "aligned" in decode_mma_fits(a, torch.zeros(64 * 128 + 1, dtype=torch.uint8)[1:].view(64, 128), s, spec, bias)
    assert "bias" in decode_mma_fits(a, q, s, spec, bias.double())
    assert decode_mma_fits(a, q, s, GemmSpec(a_format="fp8_mx32"), None) is not None
    # the strategy: the CUDA decode GEMM at M <= 16 where it fits, else the Triton paths
    for m in (1, 16):
        assert choose_strategy(m, 4096, 4096, spec, torch.bfloat16, 90, cuda_decode=True) == "cuda_decode"
    assert choose_strategy(17, 4096, 4096, spec, torch.bfloat16, 90, cuda_decode=True) == "fused"
    assert choose_strategy(1, 4096, 4096, spec, torch.float16, 90, cuda_decode=True) == "gemv"
    assert choose_strategy(1, 4096, 4096, spec, torch.bfloat16, 90, cuda_decode=False) == "gemv"
    with pytest.raises(ValueError):
        type(choose_decode_mma_config(1, 4096, 4096, 132))(row_groups=3)
    # 9-16 tokens: MXFP4 from N = 8192 shares the activation fragments across two row groups
    assert choose_decode_mma_config(16, 14336, 4096, 132, "mxfp4").row_groups == 2
    assert choose_decode_mma_config(16, 14336, 4096, 132, "nvfp4").row_groups == 1
    assert choose_decode_mma_config(16, 4096, 14336, 132, "mxfp4").row_groups == 1
    assert choose_decode_mma_config(8, 14336, 4096, 132, "mxfp4").row_groups == 1
    # NVFP4 at 9-16 tokens: capped at 64 registers per thread (4 CTAs of 8 warps per SM)
    assert choose_decode_mma_config(9, 4096, 4096, 132, "nvfp4").max_registers == 64
    assert choose_decode_mma_config(16, 14336, 4096, 132, "mxfp4").max_registers == 0
    assert choose_decode_mma_config(16, 4096, 4096, 132, "mxfp4").max_registers == 0
    assert choose_decode_mma_config(8, 4096, 4096, 132, "nvfp4").max_registers == 0


@cuda
def test_cuda_decode_builds_and_is_the_decode_default():
    """NVRTC builds the kernel on this GPU (a build failure would otherwise fall back silently)."""
    from inductor_moe.templates.block_scaled_gemm import _cuda_decode_reason, choose_strategy

    a, _, q, s, gs, bias = make_operands("dense", "mxfp4", 3, 256, 512, device="cuda")
    spec = GemmSpec(b_format="mxfp4")
    assert _cuda_decode_reason(a, q, s, spec, bias) is None
    arch = torch.cuda.get_device_capability()[0] * 10 + torch.cuda.get_device_capability()[1]
    assert choose_strategy(3, 256, 512, spec, a.dtype, arch, cuda_decode=True) == "cuda_decode"


@cuda
def test_cuda_decode_register_cap_reaches_the_kernel():
    """A config's ``max_registers`` is what the built kernel uses at most (the driver's count)."""
    import ctypes

    from torch.cuda._utils import _get_gpu_runtime_library

    from inductor_moe.cuda import fp4_decode, nvrtc

    spec = GemmSpec(b_format="nvfp4")
    for cap in (0, 64):
        cfg = fp4_decode.DecodeMmaConfig(1, 8, 2, max_registers=cap)
        kernel = nvrtc.build(torch.cuda.current_device(), "fp4_decode_mma.cu", "fp4_decode_mma",
                             fp4_decode._defines(spec, 16, cfg, None, None, torch.bfloat16))
        regs = ctypes.c_int()
        _get_gpu_runtime_library().cuFuncGetAttribute(ctypes.byref(regs), 4, kernel.func)  # NUM_REGS
        assert 0 < regs.value and (cap == 0 or regs.value <= cap), (cap, regs.value)


@cuda
@pytest.mark.parametrize("fb", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("m", [1, 5, 8, 9, 16])
def test_cuda_decode_matches_reference_and_is_deterministic(fb, m):
    """Row tail (N % 16 != 0), K tail inside a step, both token tiles, every epilogue."""
    for k in (2880 + 32, 2880 + 64):  # K % 128 == 96; K % 256 == 128 with K % 64 == 0 (two loads per step)
        _check_cuda_decode(fb, m, 2880 + 8, k)


def _check_cuda_decode(fb, m, n, k):
    from inductor_moe.cuda.fp4_decode import DecodeMmaConfig
    from inductor_moe.ops.block_scaled_mm import block_scaled_mm_reference
    from inductor_moe.templates.block_scaled_gemm import block_scaled_gemm

    a, _, q, s, gs, bias = make_operands("dense", fb, m, n, k, device="cuda", seed=m)
    cases = [(None, None, "bfloat16"), ("silu", bias, "bfloat16"), ("gelu", bias.float(), "float32"),
             ("gelu_tanh", bias.half(), "float16"), ("relu", None, "bfloat16")]
    for act, b_, out_dtype in cases:
        spec = GemmSpec(b_format=fb, activation=act, out_dtype=out_dtype)
        ref = block_scaled_mm_reference(a.double(), q, s, spec, None, gs, b_)
        for cfg in (None, DecodeMmaConfig(2, 4, 2), DecodeMmaConfig(2, 8, 1), DecodeMmaConfig(1, 8, 1, 2), DecodeMmaConfig(1, 8, 2),
                    DecodeMmaConfig(1, 4, 2, pipe=True), DecodeMmaConfig(1, 8, 1, 2, pipe=True),
                    DecodeMmaConfig(1, 8, 2, max_registers=64)):
            kw = {"strategy": "cuda_decode"} if cfg is None else {"config": cfg}
            out = block_scaled_gemm(a, q, s, spec, None, gs, b_, **kw)
            assert out.dtype == getattr(torch, out_dtype)
            assert rel_err(out, ref) <= 5e-3, (act, out_dtype, cfg, rel_err(out, ref))
            out.fill_(float("nan"))  # poisoned: the next run must write every element
            again = block_scaled_gemm(a, q, s, spec, None, gs, b_, **kw)
            assert torch.equal(again, block_scaled_gemm(a, q, s, spec, None, gs, b_, **kw))
            assert not again.isnan().any()


@cuda
def test_cuda_decode_large_and_nan_scales():
    """MXFP4 scales >= 4 take the two-multiply decode (the one-multiply one would overflow); a NaN
    scale (e8m0 255, e4m3 0x7f) makes its rows NaN, as in the reference."""
    from inductor_moe.ops.block_scaled_mm import block_scaled_mm_reference
    from inductor_moe.templates.block_scaled_gemm import block_scaled_gemm

    a, _, q, s, _, _ = make_operands("dense", "mxfp4", 4, 256, 1024, device="cuda", seed=3)
    spec = GemmSpec(b_format="mxfp4")
    s = s.clone()
    s.view(torch.uint8)[:64] += 20  # 2^20 larger blocks in the first 64 rows (s up to ~147)
    ref = block_scaled_mm_reference(a.double(), q, s, spec)
    out = block_scaled_gemm(a, q, s, spec, strategy="cuda_decode")
    assert rel_err(out, ref) <= 5e-3
    assert rel_err(out[:, 64:], ref[:, 64:]) <= 5e-3  # the other rows are unchanged by the slow path
    s.view(torch.uint8)[7, 3] = 255
    out = block_scaled_gemm(a, q, s, spec, strategy="cuda_decode")
    assert out[:, 7].isnan().all() and not out[:, 8:].isnan().any()

    a, _, q, s, gs, _ = make_operands("dense", "nvfp4", 4, 256, 1024, device="cuda", seed=4)
    s = s.clone()
    s.view(torch.uint8)[9, 5] = 0x7F
    out = block_scaled_gemm(a, q, s, GemmSpec(b_format="nvfp4"), None, gs, strategy="cuda_decode")
    assert out[:, 9].isnan().all() and not out[:, 10:].isnan().any()
    a[2, 17] = float("nan")  # a NaN activation reaches its token's row only
    out = block_scaled_gemm(a, q, s, GemmSpec(b_format="nvfp4"), None, gs, strategy="cuda_decode")
    assert out[2].isnan().all() and not out[3, 10:].isnan().any()


@cuda
def test_cuda_decode_graph_capture_and_unaligned_fallback():
    from inductor_moe.ops.block_scaled_mm import block_scaled_mm_reference
    from inductor_moe.templates.block_scaled_gemm import block_scaled_gemm

    a, _, q, s, gs, bias = make_operands("dense", "nvfp4", 2, 1024, 2048, device="cuda", seed=5)
    spec = GemmSpec(b_format="nvfp4", activation="silu")
    ref = block_scaled_mm_reference(a.double(), q, s, spec, None, gs, bias)
    plain = block_scaled_gemm(a, q, s, spec, None, gs, bias)  # build outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = block_scaled_gemm(a, q, s, spec, None, gs, bias, use_pdl=True)  # chained after a kernel
        again = block_scaled_gemm(a, q, s, spec, None, gs, bias, use_pdl=True)
    captured.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(captured, ref) <= 5e-3
    assert torch.equal(captured, plain) and torch.equal(again, plain)  # PDL launch: bitwise the plain one
    # activation rows 8 bytes off 16-byte alignment: the Triton path runs instead, same result
    wide = torch.zeros(2, 2048 + 4, dtype=torch.bfloat16, device="cuda")
    wide[:, 4:] = a
    out = torch.ops.inductor_moe.block_scaled_mm(wide[:, 4:], q, s, spec.to_str(), None, gs, bias)
    assert rel_err(out, ref) <= TOL
