"""Blackwell readiness without a Blackwell GPU: the FP4 templates compile (to PTX only: no GPU,
no ptxas) for sm_100a with tcgen05 block-scaled MMA, and for sm_90a with wgmma."""

import pytest

triton = pytest.importorskip("triton")

from inductor_moe import isa  # noqa: E402
from inductor_moe.templates.block_scaled_gemm import ISA_SPECS  # noqa: E402


def _marked():
    return [s for s in ISA_SPECS if s[4].get("expect_sm100") == "block_scale"]


def test_registry_finds_the_fp4_templates():
    specs, _ = isa.discover_specs()
    labels = [label for _, (label, *_rest) in specs]
    assert all(spec[0] in labels for spec in ISA_SPECS)
    assert len(_marked()) >= 2


@pytest.mark.parametrize("spec", _marked(), ids=lambda s: s[0])
def test_fp4_template_uses_tcgen05_block_scaled_mma_on_sm100(spec):
    label, kernel, signature, constexprs, options = spec
    options = {k: v for k, v in options.items() if k != "expect_sm100"}
    ptx = isa.compile_to_ptx(kernel, signature, constexprs, 100, options)
    kinds = isa.mma_kinds(ptx)
    assert any(k.startswith("tcgen05.mma kind::mx") and k.endswith(".block_scale") for k in kinds), kinds


def test_dequant_template_uses_wgmma_on_sm90():
    label, kernel, signature, constexprs, options = next(s for s in ISA_SPECS if "dequant" in s[0])
    ptx = isa.compile_to_ptx(kernel, signature, constexprs, 90, options)
    assert any(k.startswith("wgmma") for k in isa.mma_kinds(ptx))


def test_mma_kind_parser():
    ptx = """
    @%p1 tcgen05.mma.cta_group::1.kind::mxf4.block_scale.scale_vec::2X [%r1], %rd2, %rd3, %r4, [%r5], [%r6], %p7;
    wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f1}, %rd1, %rd2, 1, 1, 1, 0, 1;
    """
    assert isa.mma_kinds(ptx) == ("tcgen05.mma kind::mxf4.block_scale", "wgmma f32.bf16.bf16")


def test_every_template_compiles_for_hopper_and_blackwell():
    """The listing covers every template exactly as it is launched; a stale spec is an error."""
    results = isa.compile_all()
    errors = [r.line() for r in results if r.error]
    assert not errors, "\n".join(errors)
    moe = [r for r in results if r.label.startswith("moe_gemm") and r.arch == 90 and not r.not_built]
    assert moe and all(any(k.startswith("wgmma") for k in r.mma_kinds) for r in moe)
    # NVFP4 experts with bf16 activations: the swapped tiles on sm_90a, the unswapped ones on sm_100a
    by_label = {(r.label, r.arch): r for r in results}
    for name in ("moe_gemm1", "moe_gemm2"):
        assert by_label[f"{name}[bf16 x nvfp4]", 100].not_built, by_label[f"{name}[bf16 x nvfp4]", 100].line()
        assert by_label[f"{name}[bf16 x nvfp4, unswapped]", 90].not_built
        unswapped = by_label[f"{name}[bf16 x nvfp4, unswapped]", 100]
        assert any(k.startswith("tcgen05.mma") for k in unswapped.mma_kinds), unswapped.line()
    # the warp-specialised Gluon GEMMs are listed too: built for sm_90a, marked not built for sm_100a
    ws = {(r.label.split("[")[0], r.arch): r for r in results if "_ws" in r.label}
    from inductor_moe.templates.moe_gemm2_ws import HAS_GLUON
    if HAS_GLUON:
        for name in ("moe_gemm1_ws", "moe_gemm2_ws", "moe_gemm2_ws_dense"):
            assert any(k.startswith("wgmma") for k in ws[name, 90].mma_kinds), ws[name, 90].line()
            assert ws[name, 100].not_built and not ws[name, 100].mma_kinds, ws[name, 100].line()


def _ptxas():
    import os
    import shutil
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return bundled if os.path.exists(bundled) else shutil.which("ptxas")


LAYERS = {"qwen3": (128, 8, 2048, 768), "gpt-oss": (128, 4, 2880, 2880)}  # E, k, H, I


def _moe_gemms_ptx(act: str, fmt: str, tokens: int, layer: str = "qwen3", **config_fields) -> dict:
    """{label: sm_90a PTX} of L1 and L2 exactly as the launcher builds them for a qwen3-30b-a3b call
    (E=128, k=8, H=2048, I=768; or gpt-oss-120b's, with its SwiGLU) with ``tokens`` tokens, with the
    JIT's specialisations of such a call: unit K strides of the weights and their scales, pointers,
    strides and sizes divisible by 16 -- but NVFP4 scale rows as stored (gpt-oss: 180 bytes, not
    divisible, and then loaded a K step ahead: moe_plan.fp4_scales_ahead)."""
    from inductor_moe.lowering.moe import gemm1_constexprs, gemm2_constexprs, isa_specs, split_launch_options
    from inductor_moe.lowering.moe_plan import choose_moe_config, fp4_scales_ahead, mxfp4_dot_scaled
    from inductor_moe.spec import MoESpec

    dense_act = act == "dense"
    E, k, H, I = LAYERS[layer]  # noqa: E741
    cfg = choose_moe_config(tokens, k, E, H, I, fmt, 132, **({} if dense_act else {"act_format": act}))
    cfg = cfg.replace(**config_fields)
    spec = MoESpec(**({} if dense_act else {"act_format": act}),
                   **(dict(gate_up="interleaved", limit=7.0) if layer == "gpt-oss" else {}))
    prefix = "bf16" if dense_act else act
    specs = {label: spec for name, group in isa_specs().items() for (label, *spec) in group}
    # fp8_mx32 activations on the swapped tiles run the bf16-activation kernels, the intermediate
    # rounded in L1 (lowering/moe.py: plan.round_mx32)
    round_mx32 = act == "fp8_mx32" and cfg.swap_ab
    gemm_spec = MoESpec(**{**spec.__dict__, "act_format": "dense"}) if round_mx32 else spec
    found = {}
    for label, build, k_dim in ((f"moe_gemm1[{prefix} x {fmt}]", gemm1_constexprs, H),
                                (f"moe_gemm2[{prefix} x {fmt}]", gemm2_constexprs, I)):
        dot_scaled = cfg.fp4_dot_scaled and fmt == "mxfp4" and mxfp4_dot_scaled("auto", 9)
        swap = cfg.swap_ab and (dense_act or round_mx32) and not dot_scaled
        scale_row = k_dim // 16 if fmt == "nvfp4" else 16  # MXFP4's: padded to 16 bytes
        const = build(gemm_spec, cfg, fmt, dot_scaled, False, k_dim, True, swap,
                      scales_ahead=fp4_scales_ahead(fmt, scale_row),
                      **({"round_inter_mx32": True} if round_mx32 and build is gemm1_constexprs else {}))
        options = split_launch_options(const)
        if round_mx32:  # the bf16-activation kernels' signature
            kernel, signature = specs[label.replace(f"[{prefix} x", "[bf16 x")][:2]
        elif label in specs:
            kernel, signature = specs[label][:2]
        else:  # a pair not in the ISA listing: same signature but for the weight pointers
            kernel, signature = specs[label.split("[")[0] + "[fp8_mx32 x mxfp4]"][:2]
            w, ws = {"dense": ("*bf16", "*bf16"), "fp8_block128": ("*fp8e4nv", "*fp32"), "mxfp4": ("*u8", "*u8"),
                     "nvfp4": ("*u8", "*fp8e4nv")}[fmt]
            signature = {**signature, "w_ptr": w, "w_scale_ptr": ws}
        signature = {**signature, "stride_wk": "constexpr", "stride_sk": "constexpr"}
        const = {**const, "stride_wk": 1, "stride_sk": 1}
        divisible = tuple(a for a, t in signature.items()
                          if t != "constexpr" and (t.startswith("*") or a.startswith("stride") or a in ("H", "I"))
                          and not (a == "stride_sn" and scale_row % 16))
        found[label] = isa.compile_to_ptx(kernel, signature, const, 90, options, divisible)
    return found


def _ptxas_report(ptx_text: str, tmp_path) -> str:
    import subprocess

    ptx = tmp_path / "k.ptx"
    ptx.write_text(ptx_text)
    out = subprocess.run([_ptxas(), "-arch=sm_90a", "-v", str(ptx), "-o", str(tmp_path / "k.cubin")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stderr


def _moe_gemms_spill_bytes(act: str, fmt: str, tokens: int, tmp_path, layer: str = "qwen3") -> dict:
    """{label: ptxas -v report} of ``_moe_gemms_ptx``."""
    return {label: _ptxas_report(ptx, tmp_path) for label, ptx in _moe_gemms_ptx(act, fmt, tokens, layer).items()}


def _gemm_swapped_ptx(fmt: str, m: int, n: int, k: int, prefetch_scales: bool = False):
    """(config, sm_90a PTX) of the FP4 GEMM's swapped tile as ``choose_gemm_config`` picks it (or
    with its scales in the step and the next step's prefetched), with the JIT's unit-stride and
    divisibility specialisations."""
    from dataclasses import replace

    import torch

    from inductor_moe.spec import GemmSpec
    from inductor_moe.lowering.moe_plan import fp4_scales_ahead
    from inductor_moe.templates.block_scaled_gemm import _isa_spec, choose_gemm_config

    cfg = choose_gemm_config(m, n, k, GemmSpec(b_format=fmt), torch.bfloat16, 132)
    assert cfg.swap_ab
    if prefetch_scales:
        cfg = replace(cfg, scales_ahead=False, prefetch_scales=True)
    _, kernel, sig, const, _ = _isa_spec("swapped", "dense", fmt, False, m=cfg.block_m, swap_ab=True)
    units = ("stride_ak", "stride_bk", "stride_bsk", "stride_on")
    const = {**const, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "SPLIT_K": cfg.split_k,
             "EVEN_K": k % cfg.block_k == 0, "SCALES_AHEAD": cfg.scales_ahead if cfg.scales_ahead is not None
             else fp4_scales_ahead(fmt, k // 16),  # NVFP4 scale rows as stored; MXFP4's are padded to 16 B
             "PREFETCH_SCALES": cfg.prefetch_scales, "K_ALIGNED": cfg.k_aligned, **{u: 1 for u in units}}
    sig = {**sig, **{u: "constexpr" for u in units}}
    divisible = tuple(a for a, t in sig.items() if t != "constexpr" and (
        t.startswith("*") or a.startswith("stride") or a in ("N", "K", "K_PER_SPLIT")))
    return cfg, isa.compile_to_ptx(kernel, sig, const, 90, {"num_warps": cfg.num_warps,
                                                            "num_stages": cfg.num_stages}, divisible)


needs_ptxas = pytest.mark.skipif(_ptxas() is None, reason="needs ptxas (bundled with triton's NVIDIA backend)")


@needs_ptxas
@pytest.mark.parametrize("act,fmt,tokens,layer", [(*case, "qwen3") for case in [
    # NVFP4 weights decode in registers: spilling tiles ran 25x slower on H100 (7.2 ms at qwen3 T=16)
    ("dense", "nvfp4", 1), ("dense", "nvfp4", 16), ("dense", "nvfp4", 128),
    # MXFP4 through the packed in-register decode (the sm_90 decode/mid path)
    ("dense", "mxfp4", 1), ("dense", "mxfp4", 16),
    # mid sizes: 32-row blocks (28 rows per expert), 64-row blocks (64)
    ("dense", "mxfp4", 448), ("dense", "nvfp4", 448), ("dense", "mxfp4", 1024), ("dense", "nvfp4", 1024),
    # prefill; above 16 rows per expert FP4 runs the swapped tiles (lowering/moe_plan.py: with_swap_ab)
    ("dense", "mxfp4", 4096), ("dense", "nvfp4", 4096),
    # (not bf16 x fp8_block128 at mid sizes: with triton 3.9 L1 spills 84 / 412 / 28 bytes here at
    # 32 rows, 64 rows with 128-deep steps, 64 rows with 64-deep steps; the 128-deep 64-row tiles ran
    # 4-19% faster on H100 (triton 3.6) than the 64-deep ones at 32-40 rows per expert)
    # fp8 activations, decode and prefill
    # (not fp8_block128 x fp8_block128: its 128-deep tiles spill ~1.9 KB in L1 with triton 3.6 and
    # still ran 1.2-2x faster on H100 than the spill-free 32-deep ones, lowering/moe_plan.py)
    ("fp8_block128", "dense", 16), ("fp8_mx32", "mxfp4", 16), ("fp8_block128", "nvfp4", 16), ("fp8_mx32", "nvfp4", 16),
    ("fp8_mx32", "dense", 16), ("fp8_mx32", "mxfp4", 4096), ("fp8_mx32", "nvfp4", 4096)]] + [
    # gpt-oss's K = 2880: 128-deep steps ending in a 64-deep one, and shorter tiles for an expert's
    # last block, both in the swapped tiles (32 rows: register-capped, lowering/moe_plan.py)
    ("dense", "mxfp4", 512, "gpt-oss"), ("dense", "nvfp4", 512, "gpt-oss")])
def test_moe_gemm_tiles_do_not_spill_nor_serialise_wgmma(act, fmt, tokens, layer, tmp_path):
    """A few bytes are tolerated (the 64-row swapped NVFP4 L2, capped at 168 registers, spills 20 with
    triton 3.9 and ran 4% faster on H100 than uncapped); spilling tiles spill kilobytes (the swapped
    FP4 tiles spill 0.4-3 KB without the JIT's unit-stride and divisibility specialisations, none
    with them).  And ptxas
    must not serialise the wgmmas (C7515: a wait after every MMA; it did so in every swapped tile
    while the K loop had a zero-trip path: templates/moe_common.py, k_loop_steps)."""
    import re

    for label, report in _moe_gemms_spill_bytes(act, fmt, tokens, tmp_path, layer).items():
        spilled = re.search(r"(\d+) bytes spill stores", report)
        assert spilled is not None and int(spilled.group(1)) <= 32, (label, report[-600:])
        assert "C7515" not in report, (label, report[-600:])


@pytest.mark.parametrize("name", ["moe_gemm1", "moe_gemm2"])
def test_fp8_mx32_moe_uses_tcgen05_block_scaled_mma_on_sm100(name):
    """FP8 x FP4 (DeepSeek Mega MoE) expert GEMMs: e4m3 x e2m1 tl.dot_scaled must lower to the
    block-scaled tcgen05 MMA on sm_100a (Triton 3.9 does so only for 128-row tiles; 64 gives kind::f16)."""
    from inductor_moe.lowering.moe import isa_specs

    (label, kernel, signature, constexprs, options), = [
        s for s in isa_specs()[name] if s[0] == f"{name}[fp8_mx32 x mxfp4]"]
    assert options.get("expect_sm100") == "block_scale"
    options = {k: v for k, v in options.items() if k != "expect_sm100"}
    kinds = isa.mma_kinds(isa.compile_to_ptx(kernel, signature, constexprs, 100, options))
    assert "tcgen05.mma kind::mxf8f6f4.block_scale" in kinds, kinds


@needs_ptxas
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("m,n,k", [(32, 4096, 4096), (64, 4096, 4096), (128, 14336, 4096), (256, 14336, 4096),
                                   (200, 8192, 8192), (512, 8192, 8192), (64, 2880, 2880)])
def test_fp4_gemm_swapped_tiles_do_not_spill_nor_serialise_wgmma(fmt, m, n, k, tmp_path):
    """The FP4 GEMM's swapped tiles as ``choose_gemm_config`` picks them (sm_90a, with the JIT's
    unit-stride and divisibility specialisations; from 129 rows the two-warpgroup tile of 256
    tokens, and the one-warpgroup 128-token tile at 200 rows of N = 8192): no spills beyond a few bytes, and asynchronous wgmma (no C7515: the K loop has no
    zero-trip path, templates/moe_common.py k_loop_steps)."""
    import re

    cfg, ptx = _gemm_swapped_ptx(fmt, m, n, k)
    report = _ptxas_report(ptx, tmp_path)
    spilled = re.search(r"(\d+) bytes spill stores", report)
    assert spilled is not None and int(spilled.group(1)) <= 64, (cfg, report[-600:])
    assert "C7515" not in report, (cfg, report[-600:])


def test_mma_loops_summarise_innermost_loops_only():
    """``isa.mma_loops`` reads an innermost loop from its label to the branch back to it, counts a
    register tile stored to shared memory (vector stores, stmatrix), and skips loops without MMAs
    and loops that hold another loop."""
    ptx = "\n".join([
        "$L__BB0_1:",  # outer loop: holds the inner one
        "\tst.shared.v4.b32 [%r1], {%r2, %r3, %r4, %r5};",
        "$L__BB0_2:",  # inner MMA loop
        "\tcp.async.cg.shared.global [%r6], [%rd1], 16;",
        "\tld.global.b8 {%rs1}, [%rd2];",
        "\tprefetch.global.L1 [%rd2];",
        "\tshfl.sync.idx.b32 %r7, %r8, %r9, 31, -1;",
        "\tstmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%r10], {%r11, %r12, %r13, %r14};",
        "\tbar.sync 0;",
        "\tst.shared.b8 [%r15], %rs1;",
        "\tst.shared.v2.b8 [%r15], {%rs1, %rs2};",  # scale bytes: not a register tile
        "\twgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%r16}, {%r17}, %rd3, 1, 1, 1, 1;",
        "\t@%p1 bra $L__BB0_2;",
        "\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%r1}, {%r2}, {%r3}, {%r4};",
        "\t@%p2 bra $L__BB0_1;",
        "$L__BB0_3:",  # a loop without MMAs
        "\tld.global.b32 %r20, [%rd4];",
        "\tbra.uni $L__BB0_3;",
    ])
    loops = isa.mma_loops(ptx)
    assert loops == [isa.LoopStats("$L__BB0_2", mma=1, barriers=1, shared_vector_stores=1, global_loads=1,
                                   async_copies=1, shuffles=1, prefetches=1)]
    assert isa.mma_loops(ptx.replace("\tstmatrix", "\t// stmatrix"))[0].shared_vector_stores == 0


@pytest.mark.parametrize("kind,fmt,size", [
    ("moe qwen3", "mxfp4", 4096), ("moe qwen3", "mxfp4", 16384), ("moe qwen3", "nvfp4", 4096),
    ("moe qwen3", "nvfp4", 512), ("moe gpt-oss", "mxfp4", 4096), ("moe gpt-oss", "nvfp4", 512),
    ("gemm", "mxfp4", (64, 4096, 4096)), ("gemm", "mxfp4", (200, 8192, 8192)), ("gemm", "mxfp4", (256, 14336, 4096)),
    ("gemm", "nvfp4", (64, 4096, 4096)), ("gemm", "nvfp4", (200, 8192, 8192)), ("gemm", "nvfp4", (256, 14336, 4096)),
    ("gemm prefetch", "nvfp4", (256, 14336, 4096)), ("gemm prefetch", "nvfp4", (200, 8192, 8192)),
    ("moe qwen3 prefetch", "mxfp4", 16384), ("moe qwen3 prefetch", "nvfp4", 512)])
def test_swapped_fp4_tiles_keep_the_decoded_weight_in_registers(kind, fmt, size):
    """The swapped FP4 tiles decode each weight tile straight into wgmma's register operand: their
    K loops (sm_90a, as the launchers build them) store no register tile to shared memory and
    synchronise the CTA at most 4 times a step (the cp.async ring's 2-3, one for NVFP4's scale bytes).
    A layout conversion of the decoded tile shows as vector shared stores and 2 more barriers a
    step: the GEMM's NVFP4 tiles had one until the kernel stated its K range's alignment
    (K_ALIGNED; benchmarks/NOTES_fp4.md, "The K range's alignment").  "gemm prefetch" and "moe ...
    prefetch": the opt-in candidates with the scales in the step and the next step's prefetched to
    L1 (GemmKernelConfig.prefetch_scales, MoEKernelConfig.fp4_prefetch_scales; timed slower): their
    programs must hold the prefetch."""
    prefetch = kind.endswith("prefetch")
    if kind.startswith("gemm"):
        _, ptx = _gemm_swapped_ptx(fmt, *size, prefetch_scales=prefetch)
        programs = {kind: ptx}
    else:
        programs = _moe_gemms_ptx("dense", fmt, size, kind.split()[1], fp4_prefetch_scales=prefetch)
    for label, ptx in programs.items():
        loops = isa.mma_loops(ptx)
        assert loops, label  # the K loop is found (its wgmmas make it an MMA loop)
        for loop in loops:
            assert loop.shared_vector_stores == 0 and loop.barriers <= 4, (label, loop)
            # the prefetch sits in every K loop (not hoisted out), and nowhere unless asked for
            assert (loop.prefetches >= 1) == prefetch, (label, loop)
