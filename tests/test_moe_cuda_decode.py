"""CUDA MoE decode kernels for FP4 experts (cuda/fp4_moe_decode.cu via cuda/fp4_moe.py).

CPU: the fit checks and the tile rule (decode: CTAs scan the ids; mid sizes: the align kernel's blocks).  GPU (marked ``gpu``): the kernels forced on
(``use_cuda_decode=True`` raises instead of falling back) against the float64 reference of the same
quantised weights, every buffer the call allocates NaN-poisoned first, two runs bitwise equal;
experts shared by many tokens (the per-expert token loop), duplicate and out-of-range ids, NaN
activations, CUDA-graph capture, and that the default path takes these kernels at decode.
"""

from __future__ import annotations

import pytest
import torch

from test_moe_kernels import TOL, _gpu_inputs, _Poison

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _meta_call(T=1, k=8, E=16, H=256, I=128, fmt="mxfp4", x_dtype=torch.bfloat16, spec_extra=""):
    """CPU tensors with the shapes and dtypes of an FP4 call (the fit check reads metadata only)."""
    from inductor_moe.spec import MoESpec

    spec = MoESpec.from_str(",".join(p for p in (f"weight_format={fmt}", spec_extra) if p))
    block = 32 if fmt == "mxfp4" else 16
    sdt = torch.uint8 if fmt == "mxfp4" else torch.float8_e4m3fn
    return dict(x=torch.zeros(T, H, dtype=x_dtype), topk_ids=torch.zeros(T, k, dtype=torch.int32),
                topk_weights=torch.zeros(T, k), w13=torch.zeros(E, 2 * I, H // 2, dtype=torch.uint8),
                w2=torch.zeros(E, H, I // 2, dtype=torch.uint8), spec=spec,
                w13_scale=torch.zeros(E, 2 * I, H // block, dtype=sdt), w2_scale=torch.zeros(E, H, I // block, dtype=sdt),
                b13=None, b2=None)


def _why_on_cpu(why, shape) -> str:
    """The fit check's answer short of its last step (NVRTC and a device, absent on the CPU)."""
    try:
        return why(shape) or ""
    except (AssertionError, RuntimeError) as e:  # reached the device check: every shape check passed
        return f"device check: {e}"


def test_fit_check_reasons():
    from inductor_moe.cuda.fp4_moe import moe_decode_fits

    def why(shape=None, **tensors):
        call = _meta_call(**(shape or {}))
        call.update(tensors)
        return moe_decode_fits(**call)

    assert "more than 5 per expert" in why(dict(T=11, k=8))  # 88 pairs over 16 experts
    # both formats up to 5 pairs per expert (above, the swapped Triton tiles are as fast or faster)
    assert "per expert" not in _why_on_cpu(why, dict(T=10, k=8, fmt="nvfp4"))
    assert "per expert" not in _why_on_cpu(why, dict(T=10, k=8))
    assert "more than 5 per expert" in why(dict(T=11, k=8, fmt="nvfp4"))
    assert "not bf16" in why(dict(x_dtype=torch.float16))
    assert "not bf16" in why(dict(spec_extra="act_format=fp8_block128"))
    assert "not bf16" not in _why_on_cpu(why, dict(spec_extra="act_format=fp8_mx32"))  # taken rounded in bf16
    assert "not a multiple of 32" in why(dict(fmt="nvfp4", I=144))
    base = _meta_call()
    assert "16-byte aligned" in why(x=torch.zeros(1, 260, dtype=torch.bfloat16)[:, 4:])
    assert "weight rows" in why(w13=base["w13"].transpose(1, 2).contiguous().transpose(1, 2))
    assert "topk_weights" in why(topk_weights=torch.zeros(1, 8, dtype=torch.float64))
    assert "bias" in why(b13=torch.zeros(16, 256, dtype=torch.float64))
    dense = _meta_call()
    dense.update(spec=dense["spec"].__class__(), w13=torch.zeros(16, 256, 256, dtype=torch.bfloat16))
    assert "dense weights" in moe_decode_fits(**dense)


def test_tile_rule():
    """4 warps (2 in MXFP4's gate_up on the align-block path where H % 512 == 0 and T*k >= 64) and
    one K step per warp (two for NVFP4 there where H >= 4096); up to 4 tokens the CTAs scan the ids,
    above the align kernel's 8-pair blocks route them, with two L2 row groups (16-pair blocks of two
    token tiles only by an explicit config)."""
    from inductor_moe.cuda.fp4_moe import choose_moe_decode_config

    qwen3 = choose_moe_decode_config(1, 8, 128, 2048, 768)
    assert (qwen3.gate_up_warps, qwen3.down_warps, qwen3.unroll, qwen3.down_row_groups, qwen3.token_tiles) == (
        4, 4, 1, 1, 1)
    assert choose_moe_decode_config(16, 8, 128, 2048, 768).down_row_groups == 2
    assert choose_moe_decode_config(16, 8, 128, 2048, 768).token_tiles == 1
    assert choose_moe_decode_config(10, 2, 4, 4096, 14336).token_tiles == 1  # 5 pairs per expert
    # gate_up's pipelined K loop: MXFP4, scanning kernels (<= 4 tokens), >= 8 K steps per warp (dsv4's H = 4096)
    assert choose_moe_decode_config(1, 6, 256, 4096, 2048, "mxfp4").gate_up_pipe
    assert not choose_moe_decode_config(1, 6, 256, 4096, 2048, "nvfp4").gate_up_pipe
    assert not choose_moe_decode_config(16, 6, 256, 4096, 2048, "mxfp4").gate_up_pipe
    assert not choose_moe_decode_config(4, 1, 8, 512, 256).gate_up_pipe  # 1 K step per warp
    # ... and for MXFP4 at one token whatever K (qwen3's H = 2048: 4 steps per warp)
    assert qwen3.gate_up_pipe and not qwen3.down_pipe
    assert not choose_moe_decode_config(2, 8, 128, 2048, 768).gate_up_pipe
    assert not choose_moe_decode_config(1, 8, 128, 2048, 768, "nvfp4").gate_up_pipe
    assert qwen3.block_m == 0 and choose_moe_decode_config(4, 8, 128, 2048, 768).block_m == 0  # CTAs scan ids
    assert choose_moe_decode_config(5, 8, 128, 2048, 768).block_m == 8
    # above 4 tokens the align kernel's blocks route the CTAs: 8 pairs per block
    gpt_oss = choose_moe_decode_config(128, 4, 128, 2880, 2880)
    assert (gpt_oss.block_m, gpt_oss.token_tiles, gpt_oss.down_row_groups) == (8, 1, 2)
    qwen3_mid = choose_moe_decode_config(80, 8, 128, 2048, 768)
    assert (qwen3_mid.block_m, qwen3_mid.token_tiles, qwen3_mid.down_row_groups) == (8, 1, 2)
    # down's warps split K: 2 where 4 would get under 4 steps of 128 each (I = 768), else 4
    assert (qwen3_mid.down_warps, gpt_oss.down_warps, choose_moe_decode_config(128, 6, 256, 4096, 2048).down_warps) == (
        2, 4, 4)
    # gate_up's two 16-column groups per CTA go with 16-pair blocks: never by the rule
    assert (qwen3_mid.gate_up_col_groups, gpt_oss.gate_up_col_groups, qwen3.gate_up_col_groups) == (1, 1, 1)
    # gate_up's warps on the align-block path: 2 for MXFP4 where H % 512 == 0 and T*k >= 64, else 4
    assert (qwen3_mid.gate_up_warps, gpt_oss.gate_up_warps, qwen3.gate_up_warps) == (2, 4, 4)
    assert choose_moe_decode_config(128, 6, 256, 4096, 2048).gate_up_warps == 2
    assert choose_moe_decode_config(80, 8, 128, 2048, 768, "nvfp4").gate_up_warps == 4
    assert (choose_moe_decode_config(8, 8, 128, 2048, 768).gate_up_warps,
            choose_moe_decode_config(5, 8, 128, 2048, 768).gate_up_warps) == (2, 4)  # 64 / 40 pairs
    # two K steps in flight per warp: NVFP4 on the align-block path where H >= 4096
    assert choose_moe_decode_config(16, 6, 256, 4096, 2048, "nvfp4").unroll == 2
    assert (choose_moe_decode_config(16, 6, 256, 4096, 2048, "mxfp4").unroll,
            choose_moe_decode_config(16, 4, 128, 2880, 2880, "nvfp4").unroll,
            choose_moe_decode_config(4, 6, 256, 4096, 2048, "nvfp4").unroll) == (1, 1, 1)


def test_register_caps():
    """NVFP4 kernels capped at 80 registers; the scanning down kernel at 64 where its grid (16-row
    tiles x pairs) does not fit one wave of 80-register CTAs (6 per SM); MXFP4's gate_up never.  A
    cap is __launch_bounds__' minimum of resident CTAs per SM (64 K registers each)."""
    from inductor_moe.cuda.fp4_moe import choose_moe_decode_config
    from inductor_moe.cuda.nvrtc import min_ctas

    def caps(*shape, fmt="mxfp4", sms=132):
        cfg = choose_moe_decode_config(*shape, fmt, sms)
        return cfg.gate_up_max_registers, cfg.down_max_registers

    assert caps(1, 8, 128, 2048, 768) == (0, 64)  # qwen3: 128 tiles x 8 pairs = 1024 CTAs > 132 x 6
    assert caps(1, 8, 128, 2048, 768, fmt="nvfp4") == (80, 64)
    assert caps(1, 4, 128, 2880, 2880) == (0, 0)  # gpt-oss: 180 x 4 = 720 CTAs fit one wave at 80
    assert caps(1, 4, 128, 2880, 2880, fmt="nvfp4") == (80, 80)
    assert caps(1, 4, 128, 2880, 2880, sms=100) == (0, 64)  # ... but not on 100 SMs
    assert caps(4, 4, 128, 2880, 2880) == (0, 64)
    assert caps(16, 8, 128, 2048, 768) == (0, 0)  # align blocks: NVFP4 only
    assert caps(16, 8, 128, 2048, 768, fmt="nvfp4") == (80, 80)
    assert (min_ctas(64, 4), min_ctas(80, 4), min_ctas(80, 2), min_ctas(0, 4)) == (8, 6, 12, 1)


# ------------------------------------------------------------------------------ GPU


def _reference(x, ids, tw, w13, w2, spec, kw):
    from inductor_moe.ops.moe_experts import moe_experts_reference

    f64 = {n: (v.double() if v.dtype in (torch.bfloat16, torch.float16) else v) for n, v in kw.items()}
    return moe_experts_reference(x.double(), ids, tw.double(), w13, w2, spec, **f64)


def _run_cuda(x, ids, tw, w13, w2, spec, kw, **extra):
    from inductor_moe.lowering.moe import fused_moe_experts
    from inductor_moe.spec import MoESpec

    s = MoESpec.from_str(spec)
    return fused_moe_experts(x, ids, tw, w13, w2, s, kw.get("w13_scale"), kw.get("w2_scale"), kw.get("b13"),
                             kw.get("b2"), kw.get("w13_global_scale"), kw.get("w2_global_scale"),
                             use_cuda_decode=True, **extra)


def _check(x, ids, tw, w13, w2, spec, kw, fmt, label):
    with _Poison():
        out = _run_cuda(x, ids, tw, w13, w2, spec, kw)
        again = _run_cuda(x, ids, tw, w13, w2, spec, kw)
    ref = _reference(x, ids, tw, w13, w2, spec, kw)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert not out.isnan().any(), label
    assert torch.equal(out, again), f"two runs differ bitwise: {label}"
    assert err <= TOL[fmt], f"rel err {err:.3g}: {label}"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("T", [1, 5, 16])
def test_gpu_fp8_mx32_activations(fmt, T):
    """fp8_mx32 activations: x and the intermediate rounded to fp8_mx32 in bf16 around the kernels,
    against the reference's quantised activations at 5e-3 (an unrounded x or intermediate reads
    2.7e-2 and more: test_moe_kernels.py's mx32 cases), a gpt-oss-like layer with bad ids too."""
    spec, x, ids, tw, w13, w2, kw = _gpu_inputs(T, 128, 2048, 768, 8, fmt, seed=T, spec_extra="act_format=fp8_mx32")
    with _Poison():
        out = _run_cuda(x, ids, tw, w13, w2, spec, kw)
    ref = _reference(x, ids, tw, w13, w2, spec, kw)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert not out.isnan().any() and err <= 5e-3, err
    spec, x, ids, tw, w13, w2, kw = _gpu_inputs(3, 32, 2880, 2880, 4, fmt, seed=T, bad_ids=True, bias=True,
                                               spec_extra="act_format=fp8_mx32,gate_up=interleaved,limit=7.0")
    _check(x, ids, tw, w13, w2, spec, kw, fmt, f"{fmt} T=3 gpt-oss-like fp8_mx32")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("T", [1, 5, 16])
def test_gpu_qwen3_decode(fmt, T):
    spec, x, ids, tw, w13, w2, kw = _gpu_inputs(T, 128, 2048, 768, 8, fmt, seed=T)
    _check(x, ids, tw, w13, w2, spec, kw, fmt, f"qwen3 {fmt} T={T}")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("variant", [
    dict(spec_extra="gate_up=interleaved,alpha=1.702,limit=7.0,up_offset=1.0", bias=True),  # gpt-oss
    dict(spec_extra="activation=gelu", bias=False),
    dict(spec_extra="activation=gelu_tanh,limit=10.0,weight_position=before_down", bias=True),
    dict(spec_extra="weight_position=before_down", bias=False, gate_up_gscales=True)])
def test_gpu_layer_variants(fmt, variant):
    """Every GLU and layout variant, biases, the routing weight before or after down, NVFP4 gate/up
    global scales; K with a tail step (2880 = 22.5 x 128), out-of-range ids, int64 ids and bf16
    routing weights on the last."""
    if variant.get("gate_up_gscales") and fmt != "nvfp4":
        pytest.skip("gate/up global scales are NVFP4's")
    for T, (E, H, I, k) in ((3, (32, 2880, 2880, 4)), (9, (16, 512, 384, 6))):
        spec, x, ids, tw, w13, w2, kw = _gpu_inputs(T, E, H, I, k, fmt, seed=T, bad_ids=True, **variant)
        if T == 9:
            ids, tw = ids.long(), tw.bfloat16()
        _check(x, ids, tw, w13, w2, spec, kw, fmt, f"{fmt} T={T} E={E} H={H} I={I} k={k} {variant}")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("token_tiles", [1, 2])
def test_gpu_experts_shared_by_many_tokens(fmt, token_tiles, monkeypatch):
    """16 tokens all routed to experts 0 and 1 (16 pairs per expert: two passes of 8 tokens, or one
    of 16), a token routing twice to the same expert, and ids outside [0, E)."""
    from inductor_moe.cuda.fp4_moe import MoEDecodeConfig

    spec, x, ids, tw, w13, w2, kw = _gpu_inputs(16, 8, 512, 256, 2, fmt, seed=11)
    ids[:, 0], ids[:, 1] = 0, 1
    ids[3] = 5  # both slots of token 3 on expert 5
    ids[7, 1] = -1
    ids[8, 0] = 8
    from inductor_moe.cuda import fp4_moe

    cfg = MoEDecodeConfig(gate_up_warps=8, down_warps=2, token_tiles=token_tiles, unroll=2, down_row_groups=2)
    monkeypatch.setattr(fp4_moe, "choose_moe_decode_config", lambda *a: cfg)
    _check(x, ids, tw, w13, w2, spec, kw, fmt, f"shared experts {fmt} token_tiles={token_tiles}")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("pipe_cfg", [dict(unroll=1), dict(unroll=2, gate_up_warps=8, down_warps=2)])
def test_gpu_pipelined_k_loop(fmt, pipe_cfg, monkeypatch):
    """Both kernels with the next steps' loads issued before the current math (PIPE), on the
    gpt-oss variant with a K tail step (2880 = 22.5 x 128) and scales >= 4 in some MXFP4 blocks
    (the two-multiply decode)."""
    from inductor_moe.cuda import fp4_moe
    from inductor_moe.cuda.fp4_moe import MoEDecodeConfig

    spec, x, ids, tw, w13, w2, kw = _gpu_inputs(3, 32, 2880, 2880, 4, fmt, seed=21, bad_ids=True, bias=True,
                                                spec_extra="gate_up=interleaved,alpha=1.702,limit=7.0,up_offset=1.0")
    if fmt == "mxfp4":
        kw["w13_scale"] = kw["w13_scale"].clone()
        kw["w13_scale"].view(torch.uint8)[:, :64] += 8  # 2^8 larger blocks: scale bytes above 128
    cfg = MoEDecodeConfig(gate_up_pipe=True, down_pipe=True, **pipe_cfg)
    monkeypatch.setattr(fp4_moe, "choose_moe_decode_config", lambda *a: cfg)
    _check(x, ids, tw, w13, w2, spec, kw, fmt, f"pipelined {fmt} {pipe_cfg}")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("case", ["qwen3_like", "gpt_oss_like", "skewed", "many_pairs",
                                  "more_pairs_than_one_launch"])
def test_gpu_mid_sizes_routed_by_align_blocks(fmt, case, monkeypatch):
    """Above 4 tokens the CTAs take the align kernel's 8-pair blocks (experts with more pairs than a
    block span several), and, by an explicit config, 16-pair blocks with two token tiles (MXFP4's
    gate_up with two column groups); the gpt-oss variant with biases and a K tail step, in both;
    out-of-range ids; all pairs on three experts; several programs of the one-launch align; more
    pairs than it takes (the counts / place kernels)."""
    if case == "qwen3_like":
        spec, x, ids, tw, w13, w2, kw = _gpu_inputs(40, 64, 512, 256, 8, fmt, seed=3)  # 5 pairs per expert
    elif case == "many_pairs":
        spec, x, ids, tw, w13, w2, kw = _gpu_inputs(128, 256, 256, 128, 8, fmt, seed=7, bad_ids=True)  # 1024 pairs
    elif case == "more_pairs_than_one_launch":
        from inductor_moe.lowering.moe_plan import ALIGN_ONE_LAUNCH_MAX_ENTRIES

        spec, x, ids, tw, w13, w2, kw = _gpu_inputs(1040, 1664, 256, 128, 8, fmt, seed=8, bad_ids=True)  # 5 per expert
        assert ids.numel() > ALIGN_ONE_LAUNCH_MAX_ENTRIES
    elif case.startswith("gpt_oss"):
        spec, x, ids, tw, w13, w2, kw = _gpu_inputs(
            40, 32, 2880, 2880, 4, fmt, seed=4, bad_ids=True, bias=True,
            spec_extra="gate_up=interleaved,alpha=1.702,limit=7.0,up_offset=1.0")
    else:
        spec, x, ids, tw, w13, w2, kw = _gpu_inputs(20, 8, 256, 128, 2, fmt, seed=5)
        ids[:, 0] = 0
        ids[:, 1] = torch.arange(20, device="cuda") % 2 + 1  # 20 pairs on expert 0: blocks of 8, 8 and 4
    from dataclasses import replace

    from inductor_moe.cuda import fp4_moe

    T, k = ids.shape
    cfg = fp4_moe.choose_moe_decode_config(T, k, w13.shape[0], x.shape[1], w2.shape[2] * 2, fmt)
    assert (cfg.block_m, cfg.token_tiles, cfg.gate_up_col_groups) == (8, 1, 1)
    _check(x, ids, tw, w13, w2, spec, kw, fmt, f"mid {case} {fmt}")
    wide = replace(cfg, block_m=16, token_tiles=2, gate_up_col_groups=2 if fmt == "mxfp4" else 1)
    monkeypatch.setattr(fp4_moe, "choose_moe_decode_config", lambda *a: wide)
    _check(x, ids, tw, w13, w2, spec, kw, fmt, f"mid {case} {fmt}, 16-pair blocks")


@pytest.mark.gpu
@gpu
def test_gpu_up_to_5_pairs_per_expert():
    """Both FP4 formats take the CUDA kernels up to 5 pairs per expert on average (experts 0-3 in
    every token: 40 pairs each, five 8-pair blocks); above, the swapped Triton tiles run them, and
    forcing the CUDA kernels says why."""
    for fmt in ("nvfp4", "mxfp4"):
        spec, x, ids, tw, w13, w2, kw = _gpu_inputs(40, 64, 512, 256, 8, fmt, seed=9, bad_ids=True)  # 5 per expert
        ids[:, :4] = torch.arange(4, device="cuda", dtype=ids.dtype)
        ids[:, 4:] = torch.rand(40, 60, device="cuda").topk(4, dim=1).indices.to(ids.dtype) + 4
        ids[0, 5], ids[1, 6] = -1, 64  # ids out of range still skipped
        _check(x, ids, tw, w13, w2, spec, kw, fmt, f"{fmt} 5 pairs per expert")
        spec, x, ids, tw, w13, w2, kw = _gpu_inputs(41, 64, 512, 256, 8, fmt, seed=9)  # 5.1 per expert
        with pytest.raises(ValueError, match="more than 5 per expert"):
            _run_cuda(x, ids, tw, w13, w2, spec, kw)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_gpu_align_block_rules_at_h4096(fmt):
    """The rule's own align-block configs at H = 4096 (MXFP4: gate_up with 2 warps; NVFP4: two K
    steps in flight per warp under the 80-register cap) against the reference, with bad ids."""
    from inductor_moe.cuda.fp4_moe import choose_moe_decode_config

    T, E, H, I, k = 16, 16, 4096, 256, 4  # 64 pairs, 4 per expert
    cfg = choose_moe_decode_config(T, k, E, H, I, fmt)
    assert cfg.block_m and (cfg.gate_up_warps, cfg.unroll) == ((2, 1) if fmt == "mxfp4" else (4, 2))
    spec, x, ids, tw, w13, w2, kw = _gpu_inputs(T, E, H, I, k, fmt, seed=13, bad_ids=True)
    _check(x, ids, tw, w13, w2, spec, kw, fmt, f"align-block rules {fmt} H={H}")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_gpu_register_caps_reach_the_kernels(fmt, monkeypatch):
    """A config's register caps are what the built kernels use at most (the driver's count), and a
    capped call gives the same bits as an uncapped one."""
    import ctypes
    from dataclasses import replace

    from torch.cuda._utils import _get_gpu_runtime_library

    from inductor_moe.cuda import fp4_moe, nvrtc

    spec, x, ids, tw, w13, w2, kw = _gpu_inputs(2, 64, 512, 256, 8, fmt, seed=12, bad_ids=True)
    built = []
    build = nvrtc.build
    monkeypatch.setattr(nvrtc, "build", lambda *a: built.append(build(*a)) or built[-1])
    uncapped = fp4_moe.choose_moe_decode_config(2, 8, 64, 512, 256, fmt)
    monkeypatch.setattr(fp4_moe, "choose_moe_decode_config", lambda *a: replace(
        uncapped, gate_up_max_registers=0, down_max_registers=0))
    plain = _run_cuda(x, ids, tw, w13, w2, spec, kw)
    monkeypatch.setattr(fp4_moe, "choose_moe_decode_config", lambda *a: replace(
        uncapped, gate_up_max_registers=64, down_max_registers=64))
    built.clear()
    _check(x, ids, tw, w13, w2, spec, kw, fmt, f"capped {fmt}")
    assert torch.equal(plain, _run_cuda(x, ids, tw, w13, w2, spec, kw))
    assert len(built) >= 2  # gate_up and down
    for kernel in built:
        regs = ctypes.c_int()
        _get_gpu_runtime_library().cuFuncGetAttribute(ctypes.byref(regs), 4, kernel.func)  # NUM_REGS
        assert 0 < regs.value <= 64, regs.value


@pytest.mark.gpu
@gpu
def test_gpu_nan_activation_stays_in_its_token():
    spec, x, ids, tw, w13, w2, kw = _gpu_inputs(4, 8, 256, 128, 2, "mxfp4", seed=2)
    ids[:] = torch.tensor([0, 1], device="cuda")  # every token on the same two experts
    x[1, 5] = float("nan")
    out = _run_cuda(x, ids, tw, w13, w2, spec, kw)
    assert out[1].isnan().all()
    assert not out[[0, 2, 3]].isnan().any()


@pytest.mark.gpu
@gpu
def test_gpu_graph_capture_and_default_path():
    """Captured in a CUDA graph, replays on new inputs; launched with and without PDL, bitwise
    alike; the op's default at decode and mid sizes is this path (bitwise the forced call) and the report
    names it."""
    from inductor_moe.lowering import moe

    moe.register()
    spec, x, ids, tw, w13, w2, kw = _gpu_inputs(2, 128, 2048, 768, 8, "mxfp4", seed=5)
    forced = _run_cuda(x, ids, tw, w13, w2, spec, kw)
    default = torch.ops.inductor_moe.moe_experts(x, ids, tw, w13, w2, spec, **kw)
    assert torch.equal(forced, default)
    assert torch.equal(forced, _run_cuda(x, ids, tw, w13, w2, spec, kw, use_pdl=False))
    _run_cuda(x, ids, tw, w13, w2, spec, kw)  # built before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _run_cuda(x, ids, tw, w13, w2, spec, kw)
    x.copy_(torch.randn_like(x))
    ids.copy_(torch.rand(2, 128, device="cuda").topk(8, dim=1).indices.int())
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, _run_cuda(x, ids, tw, w13, w2, spec, kw))
    label = moe.describe_moe_lowering(spec, x.device, x.dtype, 128, 2048, 768, 8)
    assert "cuda_decode[mxfp4] for <= 5 pairs per expert" in label, label
    # the same at a mid size, where the align kernel routes the CTAs (one more launch in the graph)
    spec, x, ids, tw, w13, w2, kw = _gpu_inputs(64, 128, 2048, 768, 8, "mxfp4", seed=6)
    forced = _run_cuda(x, ids, tw, w13, w2, spec, kw)
    assert torch.equal(forced, torch.ops.inductor_moe.moe_experts(x, ids, tw, w13, w2, spec, **kw))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _run_cuda(x, ids, tw, w13, w2, spec, kw)
    ids.copy_(torch.rand(64, 128, device="cuda").topk(8, dim=1).indices.int())
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, _run_cuda(x, ids, tw, w13, w2, spec, kw))
