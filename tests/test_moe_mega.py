"""The persistent single-launch L1+L2 kernel (templates/moe_mega.py, lowering/moe_mega.py).

CPU: interpreted (TRITON_INTERPRET=1, in one subprocess like tests/test_moe_kernels.py; grid 1
there), every case forced through the mega path with all kernel-allocated buffers poisoned (NaN,
int scratch -7, so the readiness counters only work if align zeroes them), compared with the
float64 reference, two runs bitwise equal, and bitwise equal to the two-launch path (same tiles).
One mutation case runs align without zeroing the counters and must come out NaN: the poisoning
does catch a broken handshake.  Plus the selection rule, the occupancy bound, the argument
mapping, and a ptxas spill check of the decode tiles.  GPU tests are marked ``gpu``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_moe_kernels import (_Poison, _case, case_inputs_and_config, check_interpreted_case,  # noqa: E402
                              interpreted_results, report_cases)

N_TILES = {"gemm1.block_n": 16, "gemm2.block_n": 16}  # several L1 and L2 N-tiles per M-block

CASES = [
    _case("t1_k1", T=1, k=1),  # 7 of 8 experts get no token
    _case("t3_e16_k2_bad_ids", T=3, E=16, k=2, bad_ids=True),
    _case("t33_k6_four_l1_tiles", T=33, k=6, I=64, overrides=N_TILES),
    _case("t17_bm32_mid", T=17, k=2, I=64, overrides={"block_m": 32, **N_TILES}),
    _case("gpt_oss_two_dot", T=9, k=2, spec="alpha=1.702,limit=7.0,up_offset=1.0,gate_up=interleaved,transposed=True",
          bias=True, overrides={"gate_up_one_dot": False}),
    _case("gelu_tanh_limit", T=5, k=6, spec="activation=gelu_tanh,limit=10.0"),
    _case("before_down_bias_fp16", T=7, k=2, dtype="float16", spec="weight_position=before_down", bias=True),
    _case("chunked_align", T=33, k=6, bad_ids=True, overrides={"align_one_launch": False, "align_chunk": 16}),
    _case("fp8_block128", T=9, k=2, weight_format="fp8_block128", bad_ids=True),
    _case("mxfp4", T=9, k=2, I=64, weight_format="mxfp4"),
    _case("mxfp4_in_registers", T=5, k=2, I=64, weight_format="mxfp4", overrides={"fp4_dot_scaled": False}),
    _case("nvfp4_gpt_oss", T=5, k=2, I=32, weight_format="nvfp4",
          spec="alpha=1.702,limit=7.0,up_offset=1.0,gate_up=interleaved", bias=True),
    _case("a128_fp8w", T=5, k=2, I=160, H=128, act="fp8_block128", weight_format="fp8_block128", bad_ids=True),
    _case("mx32_mxfp4", T=5, k=6, I=64, act="fp8_mx32", weight_format="mxfp4"),
    _case("mx32_dense_bias", T=3, k=2, I=64, act="fp8_mx32", bias=True),
]
MUTANT = _case("unzeroed_counters_are_caught", T=5, k=2)


class _AlignWithoutZeroing:
    """moe_align_fused that never zeroes the readiness counters (the mutation case)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            return self.kernel[grid](*args, **{**kwargs, "ZERO_READY": False})
        return launch


# ----------------------------------------------------------------------------- subprocess side

def run_case(case) -> dict:
    from inductor_moe.lowering.moe import fused_moe_experts
    from inductor_moe.ops.moe_experts import moe_experts_reference

    (s, spec, x, ids, tw, w13, w2, extra, b13, b2), cfg = case_inputs_and_config(case)

    def run(mega):
        with _Poison():
            return fused_moe_experts(x, ids, tw, w13, w2, s, b13=b13, b2=b2, kernel_config=cfg, use_pdl=False,
                                     use_mega=mega, **extra)

    mega = [run(True), run(True)]
    split = run(False)
    f64 = lambda t: None if t is None else (t.double() if t.dtype in (torch.bfloat16, torch.float16) else t)  # noqa
    ref = moe_experts_reference(x.double(), ids, tw.double(), f64(w13), f64(w2), spec, b13=f64(b13), b2=f64(b2),
                                **extra)
    out = mega[0]
    err = (out.double() - ref).norm().item() / max(ref.norm().item(), 1e-30)
    from inductor_moe.ops import weights as W

    I, H = W.intermediate_size(s, w13, w2), case["H"]
    n1, n2 = -(-I // cfg.gemm1.block_n), -(-H // cfg.gemm2.block_n)
    return dict(name=case["name"], shape=list(out.shape), err=err, nan=bool(out.isnan().any()),
                deterministic=bool(torch.equal(mega[0], mega[1])), same_as_split=bool(torch.equal(out, split)),
                l1_tiles_per_block=n1, l2_tiles_per_block=n2, config=repr(cfg))


def run_mutant(case) -> dict:
    import inductor_moe.templates.moe_align as align

    original = align.moe_align_fused
    align.moe_align_fused = _AlignWithoutZeroing(original)
    try:
        r = run_case(case)
    finally:
        align.moe_align_fused = original
    return r


def _main():
    report_cases([(c, run_case) for c in CASES] + [(MUTANT, run_mutant)])


# ----------------------------------------------------------------------------- pytest side

@pytest.fixture(scope="module")
def interpreted():
    return interpreted_results(__file__)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_interpreted_mega_matches_reference_and_split(interpreted, case):
    r = interpreted.get(case["name"])
    check_interpreted_case(r, case)  # a NaN here: an L2 tile did not run
    assert r["same_as_split"], "the mega path must run exactly the two-launch path's tiles"


def test_interpreted_cases_cover_several_l1_tiles_per_block(interpreted):
    assert max(r.get("l1_tiles_per_block", 0) for r in interpreted.values()) >= 4
    assert max(r.get("l2_tiles_per_block", 0) for r in interpreted.values()) >= 4


def test_unzeroed_counters_show_as_nan(interpreted):
    """Without align's zeroing the poisoned counters (-7) never read complete: the L2 tiles are
    not run and the poisoned rows reach the output.  Proves the cases above can fail."""
    r = interpreted.get(MUTANT["name"])
    assert r is not None and "error" not in r, r
    assert r["nan"]


def _qwen3(T, sms=132, fmt="dense", **kw):
    from inductor_moe.lowering.moe_plan import choose_moe_config

    return choose_moe_config(T, 8, 128, 2048, 768, fmt, sms, **kw)


def test_selection_rule():
    from inductor_moe.lowering.moe_mega import (MEGA_MAX_TILES_PER_SM, choose_mega, max_m_blocks, mega_max_tokens,
                                                mega_tiles)

    cfg = _qwen3(1)
    n1, n2 = -(-768 // cfg.gemm1.block_n), -(-2048 // cfg.gemm2.block_n)
    assert mega_tiles(cfg, 1, 8, 128, 2048, 768) == max_m_blocks(8, 128, cfg.block_m) * (n1 + n2)
    assert choose_mega(cfg, 1, 8, 128, 2048, 768, 132)  # qwen3 decode, one token: a few waves of tiles
    assert not choose_mega(_qwen3(4096), 4096, 8, 128, 2048, 768, 132)  # prefill: never
    assert not choose_mega(_qwen3(1024), 1024, 8, 128, 2048, 768, 132)  # many tiles
    assert not choose_mega(cfg, 0, 8, 128, 2048, 768, 132)
    # the tile budget scales with the SM count, and the boundary is inclusive
    tiles = mega_tiles(cfg, 1, 8, 128, 2048, 768)
    sms = -(-tiles // MEGA_MAX_TILES_PER_SM)
    assert choose_mega(cfg, 1, 8, 128, 2048, 768, sms)
    assert choose_mega(cfg, 1, 8, 128, 2048, 768, sms - 1) == (tiles <= MEGA_MAX_TILES_PER_SM * (sms - 1))
    assert not choose_mega(cfg, 1, 8, 128, 2048, 768, 8)
    t_max = mega_max_tokens(_qwen3, 8, 128, 2048, 768, 132)
    assert 1 <= t_max < 64
    assert all(choose_mega(_qwen3(t), t, 8, 128, 2048, 768, 132) for t in range(1, t_max + 1))
    assert not choose_mega(_qwen3(t_max + 1), t_max + 1, 8, 128, 2048, 768, 132)


def test_programs_per_sm_is_conservative():
    from inductor_moe.lowering.moe_mega import programs_per_sm

    # H100 (64K regs, 2048 threads, 228 KiB shared per SM)
    assert programs_per_sm(168, 0, 4) == 3  # 168 x 32 = 5376 regs per warp: 3 warps per sub-partition
    assert programs_per_sm(128, 0, 4) == 4
    assert programs_per_sm(32, 0, 4) == 16  # threads bound
    assert programs_per_sm(64, 100_000, 4) == 2  # shared memory bound, 1 KiB reserved per CTA
    assert programs_per_sm(64, 115_712, 4) == 2 and programs_per_sm(64, 115_713, 4) == 1
    assert programs_per_sm(255, 200_000, 8) == 1  # never 0: a kernel that launches fits once


def test_mega_arguments_cover_the_kernel_exactly():
    """The L1/L2 arguments map one to one onto the persistent kernel's parameters."""
    from inductor_moe.lowering.moe_mega import PER_GEMM_ARGS, mega_arguments
    from inductor_moe.templates.moe_gemm1 import moe_gemm1_kernel
    from inductor_moe.templates.moe_gemm2 import moe_gemm2_kernel
    from inductor_moe.templates.moe_mega import moe_mega_kernel

    def args(kernel, tag):
        return {n: (f"{tag}:{n}" if n in PER_GEMM_ARGS else f"shared:{n}") for n in kernel.arg_names}

    l1, l2 = args(moe_gemm1_kernel, "l1"), args(moe_gemm2_kernel, "l2")
    l1["WEIGHT_BEFORE_DOWN"], l2["WEIGHT_AFTER_DOWN"] = False, True
    for a in (l1, l2):  # the persistent kernel has neither (whole K steps, whole blocks)
        a.update(K_HALF_TAIL=False, TAIL_BLOCK_M=0, SCALES_AHEAD=False, PREFETCH_SCALES=False, W_DESC_K_MAJOR=True,
                 w_desc=None)
    l1.update(num_warps=4, num_stages=4, ROUND_INTER_MX32=False)  # fp8_mx32 rounded in bf16: swapped tiles only
    l2.update(num_warps=8, num_stages=3)
    out = mega_arguments(moe_gemm1_kernel, (), l1, moe_gemm2_kernel, (), l2)
    assert (out.pop("num_warps"), out.pop("num_stages")) == (8, 3)
    assert set(out) | {"ready_ptr", "max_blocks"} == set(moe_mega_kernel.arg_names)
    assert out["l2_w_ptr"] == "l2:w_ptr" and out["L1_BLOCK_N"] == "l1:BLOCK_N" and out["H"] == "shared:H"
    with pytest.raises(ValueError, match="shared argument I"):
        mega_arguments(moe_gemm1_kernel, (), l1, moe_gemm2_kernel, (), {**l2, "I": "other"})
    with pytest.raises(ValueError, match="exactly once"):
        mega_arguments(moe_gemm1_kernel, (), l1, moe_gemm2_kernel, (), {**l2, "WEIGHT_AFTER_DOWN": False})
    with pytest.raises(ValueError, match="smaller tail blocks"):
        mega_arguments(moe_gemm1_kernel, (), {**l1, "TAIL_BLOCK_M": 16}, moe_gemm2_kernel, (), l2)
    with pytest.raises(ValueError, match="fp8_mx32"):
        mega_arguments(moe_gemm1_kernel, (), {**l1, "ROUND_INTER_MX32": True}, moe_gemm2_kernel, (), l2)
    with pytest.raises(ValueError, match="TMA descriptors"):
        mega_arguments(moe_gemm1_kernel, (), l1, moe_gemm2_kernel, (), {**l2, "w_desc": "a descriptor"})


def _ptxas():
    import shutil

    triton = pytest.importorskip("triton")
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return bundled if os.path.exists(bundled) else shutil.which("ptxas")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="templates are interpreted in this process")
def test_decode_tiles_compile_with_handshake_and_do_not_spill(tmp_path):
    """sm_90a: the persistent kernel as the ISA listing builds it (qwen3 T=1) has the PDL hooks,
    one release add and the acquire spin, and ptxas reports at most a few bytes of spills (NVFP4
    with the packed decoder: 4 B, whatever -maxrregcount; tiles that ran 25x slower spilled KBs)."""
    from inductor_moe import isa
    from inductor_moe.lowering.moe_mega import mega_isa_specs

    ptxas = _ptxas()
    for label, kernel, signature, constexprs, options in mega_isa_specs():
        try:
            ptx = isa.compile_to_ptx(kernel, signature, constexprs, 90, options)
        except ImportError as e:  # a triton without the NVIDIA backend
            pytest.skip(str(e))
        assert "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx, label
        assert ptx.count("red.global.gpu.release.add") + ptx.count("atom.global.gpu.release.add") == 1, label
        assert "acquire" in ptx, label
        if ptxas is None:
            continue
        (tmp_path / "k.ptx").write_text(ptx)
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(tmp_path / "k.ptx"), "-o", str(tmp_path / "k.cubin")],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        spilled = [int(m) for m in re.findall(r"(\d+) bytes spill stores", out.stderr)]
        assert spilled and max(spilled) <= 16, (label, out.stderr[-600:])


# ----------------------------------------------------------------------------- GPU

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gpu_case(seed):
    import random

    rng = random.Random(1000 + seed)
    E = rng.choice([8, 32, 128, 256])
    k = min(rng.choice([1, 2, 4, 6, 8]), E)
    H = rng.choice([256, 512, 1024, 2880])
    I = rng.choice([128, 384, 768, 2880])
    T = rng.choice([1, 2, 3, 7, 17, 64, 200, 999])
    while E * H * I > 2 ** 27 and E > 8:
        E //= 2
    k = min(k, E)
    fmt = rng.choice(["dense", "fp8_block128", "mxfp4", "nvfp4"])
    spec_extra = rng.choice(["", "activation=gelu", "gate_up=interleaved,alpha=1.702,limit=7.0,up_offset=1.0",
                             "weight_position=before_down"])
    return T, E, H, I, k, fmt, spec_extra, rng.random() < 0.5


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("seed", range(8))
def test_gpu_mega_vs_split_vs_reference(seed):
    """Random shapes (T up to 999: grids from one tile per program to many per program), mega
    forced on and off, both against the float64 reference; mega twice, bitwise equal."""
    from test_moe_kernels import TOL, _gpu_inputs

    from inductor_moe.lowering.moe import fused_moe_experts
    from inductor_moe.ops.moe_experts import moe_experts_reference
    from inductor_moe.spec import MoESpec

    T, E, H, I, k, fmt, spec_extra, bias = _gpu_case(seed)
    spec, x, ids, tw, w13, w2, kw = _gpu_inputs(T, E, H, I, k, fmt, spec_extra, bias, seed, bad_ids=True)
    s = MoESpec.from_str(spec)
    b13, b2 = kw.pop("b13", None), kw.pop("b2", None)
    with _Poison():
        mega = fused_moe_experts(x, ids, tw, w13, w2, s, b13=b13, b2=b2, use_mega=True, **kw)
        mega2 = fused_moe_experts(x, ids, tw, w13, w2, s, b13=b13, b2=b2, use_mega=True, **kw)
        split = fused_moe_experts(x, ids, tw, w13, w2, s, b13=b13, b2=b2, use_mega=False, **kw)
    f64 = {n: (v.double() if v.dtype == torch.bfloat16 else v) for n, v in kw.items()}
    ref = moe_experts_reference(x.double(), ids, tw.double(), w13.double() if fmt == "dense" else w13,
                                w2.double() if fmt == "dense" else w2, spec,
                                b13=None if b13 is None else b13.double(), b2=None if b2 is None else b2.double(),
                                **f64)
    # bad_ids can leave every slot out of range: then the reference is exactly 0 and so must the output be
    rel = lambda out: ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()  # noqa: E731
    case = f"T={T} E={E} H={H} I={I} k={k} {fmt} {spec_extra} bias={bias}"
    assert not mega.isnan().any(), case
    assert torch.equal(mega, mega2), f"two mega runs differ bitwise: {case}"
    assert rel(mega) <= TOL[fmt], f"mega rel err {rel(mega):.3g}: {case}"
    assert rel(split) <= TOL[fmt], f"split rel err {rel(split):.3g}: {case}"
    assert rel(mega) <= 2 * rel(split) + 1e-3, case


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fmt", ["dense", "nvfp4"])
def test_gpu_mega_graph_capture_and_default_choice(fmt):
    """The Triton path picks mega at qwen3 T=1 (with the op's label saying so); a captured graph
    replays with fresh inputs and the counters start from zero on every replay.  FP4 experts with
    bf16 activations run the CUDA decode kernels there by default (its label says so); the Triton
    path, mega included, is what runs with them switched off."""
    from test_moe_kernels import _gpu_inputs

    from inductor_moe import config
    from inductor_moe.lowering import moe

    moe.register()
    if fmt != "dense":
        label = moe.describe_moe_lowering(f"weight_format={fmt}", torch.device("cuda"), torch.bfloat16, 128, 2048, 768, 8)
        assert "cuda_decode" in label and "triton_mega" not in label, label
    with config.patch(cuda_decode=False):
        _check_mega_default_and_capture(fmt, _gpu_inputs)


def _check_mega_default_and_capture(fmt, _gpu_inputs):
    from inductor_moe import config
    from inductor_moe.lowering import moe
    from inductor_moe.lowering.moe_mega import choose_mega
    from inductor_moe.spec import MoESpec

    spec, x, ids, tw, w13, w2, kw = _gpu_inputs(1, 128, 2048, 768, 8, fmt)
    cfg = _qwen3(1, moe._num_sms(x.device), fmt)
    assert choose_mega(cfg, 1, 8, 128, 2048, 768, moe._num_sms(x.device))
    label = moe.describe_moe_lowering(spec, x.device, x.dtype, 128, 2048, 768, 8)
    assert label.startswith("triton_fused") and "triton_mega" in label, label
    s = MoESpec.from_str(spec)
    with config.patch(mega_kernel=False):
        split = torch.ops.inductor_moe.moe_experts(x, ids, tw, w13, w2, spec, **kw)
    eager = torch.ops.inductor_moe.moe_experts(x, ids, tw, w13, w2, spec, **kw)
    forced = moe.fused_moe_experts(x, ids, tw, w13, w2, s, use_mega=True, **kw)
    torch.testing.assert_close(eager, forced, rtol=0, atol=0)  # the default is the mega path here
    torch.testing.assert_close(eager.float(), split.float(), rtol=2e-2, atol=2e-2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.inductor_moe.moe_experts(x, ids, tw, w13, w2, spec, **kw)
    for _ in range(3):  # replays: the counters must be zeroed by each replay's align
        x.copy_(torch.randn_like(x))
        ids.copy_(torch.rand(1, 128, device="cuda").topk(8, dim=1).indices.int())
        graph.replay()
        fresh = torch.ops.inductor_moe.moe_experts(x, ids, tw, w13, w2, spec, **kw)
        torch.cuda.synchronize()
        assert torch.equal(captured, fresh)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--interpret":
    _main()
