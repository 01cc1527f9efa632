"""The warp-specialised GEMMs (fp8 x fp8: templates/moe_gemm1_ws.py, moe_gemm2_ws.py; bf16 / fp16:
moe_gemm2_ws_dense.py; lowering/moe_ws.py): where they run, that they build for sm_90 without a GPU,
and on a GPU that they write the Triton kernels' intermediate and rows bit for bit."""

import os

import pytest
import torch

from inductor_moe.lowering.moe_ws import ws_l1_reason, ws_l2_reason

FIT = dict(fmt="fp8_block128", act_format="fp8_block128", dtypes=(torch.bfloat16, torch.float8_e4m3fn), block_m=128,
           hidden=2048, intermediate=768,
           w2_strides=(2048 * 768, 768, 1), w2_address=1 << 20, arch_major=9, interpreting=False, setting=True)


def test_ws_l2_takes_deepseek_format_on_sm90_only():
    assert ws_l2_reason(**FIT) is None
    # gpt-oss-120b: H = I = 2880 ends in half a K step and half an N tile
    assert ws_l2_reason(**{**FIT, "hidden": 2880, "intermediate": 2880, "w2_strides": (2880 * 2880, 2880, 1)}) is None
    misses = [
        ("setting", False, "config.warp_specialized"),
        ("fmt", "mxfp4", "fp8 block-128 weights"),
        ("act_format", "dense", "fp8 block-128 weights"),
        ("fmt", "dense", "fp8 block-128 weights"),  # dense weights with fp8 activations
        ("arch_major", 10, "sm_90"),
        ("interpreting", True, "sm_90"),
        ("block_m", 64, "128-row"),
        ("hidden", 2880 + 32, "multiples of 64"),
        ("intermediate", 2880 + 32, "multiples of 64"),
        ("w2_strides", (2048 * 768, 1, 2048), "K contiguous"),
        ("w2_strides", (2048 * 768 + 16, 768, 1), "back to back"),
        ("w2_strides", (2048 * 776, 776, 1), "16-byte aligned"),
        ("w2_address", (1 << 20) + 8, "16-byte aligned"),
    ]
    for key, value, why in misses:
        reason = ws_l2_reason(**{**FIT, key: value})
        assert reason is not None and why in reason, (key, reason)


def test_ws_l1_takes_concatenated_silu_gate_up_only():
    fit = dict(FIT, w13_strides=(1536 * 2048, 2048, 1), w13_address=1 << 20, gate_up="concat", activation="silu")
    del fit["w2_strides"], fit["w2_address"]
    assert ws_l1_reason(**fit) is None
    # gpt-oss-120b: I = 2880, so every up tile (rows I + n) straddles two 128-row scale blocks
    assert ws_l1_reason(**{**fit, "hidden": 2880, "intermediate": 2880,
                           "w13_strides": (5760 * 2880, 2880, 1)}) is None
    misses = [
        ("setting", False, "config.warp_specialized"),
        ("act_format", "fp8_mx32", "fp8 block-128 weights"),
        ("arch_major", 10, "sm_90"),
        ("block_m", 64, "128-row"),
        ("hidden", 2880 + 32, "multiples of 64"),
        ("intermediate", 768 + 64 + 32, "multiples of 64"),
        ("w13_strides", (1536 * 2048, 1, 1536), "w13 with K contiguous"),
        ("w13_strides", (1536 * 2048 + 16, 2048, 1), "back to back"),
        ("w13_address", (1 << 20) + 4, "w13 rows 16-byte aligned"),
        ("gate_up", "interleaved", "not interleaved"),
        ("activation", "gelu", "silu"),
    ]
    for key, value, why in misses:
        reason = ws_l1_reason(**{**fit, key: value})
        assert reason is not None and why in reason, (key, reason)


def test_report_names_the_ws_gemms_where_their_rules_take_the_kind_of_call():
    """The op's lowering label (describe_moe_lowering) says which warp-specialised GEMMs prefill
    calls of a layer run, and names none where the rules send them to the Triton kernels."""
    from inductor_moe.lowering.moe import ws_description
    from inductor_moe.spec import MoESpec

    fp8 = "weight_format=fp8_block128,act_format=fp8_block128"

    def note(spec, H, I, arch=9, setting=True):
        return ws_description(MoESpec.from_str(spec), torch.bfloat16, H, I, arch, False, setting)

    assert note(fp8, 2048, 768).endswith("warp-specialised L1 + L2 on 128-row blocks (prefill)")
    assert "L1 + L2" in note(fp8, 2880, 2880)  # gpt-oss
    assert "L1" not in note(fp8 + ",gate_up=interleaved", 2048, 768) and "L2" in note(fp8, 2048, 768)
    assert note("", 2048, 768).endswith("warp-specialised L2 on 128-row blocks (prefill)")  # bf16, short I
    assert note("transposed=True", 2048, 768) == ""  # [E, K, N] weights: K not contiguous
    for quiet in (note("", 2880, 2880), note("weight_format=mxfp4", 2048, 768), note(fp8, 2048, 768, arch=10),
                  note(fp8, 2048, 768, setting=False)):
        assert quiet == ""


def test_ws_dense_l2_takes_16_bit_experts_with_short_k():
    """bf16 / fp16 experts in the activations' dtype: the WS L2 where I (its K) is at most
    DENSE_L2_MAX_I, in whole 64-element steps (its N tiles may end short: gpt-oss's H = 2880); never
    the WS L1 (the Triton L1 measured faster)."""
    from inductor_moe.lowering.moe_ws import DENSE_L2_MAX_I

    dense = dict(FIT, fmt="dense", act_format="dense", dtypes=(torch.bfloat16, torch.bfloat16), hidden=2880,
                 intermediate=768, w2_strides=(2880 * 768, 768, 1))
    assert ws_l2_reason(**dense) is None
    assert ws_l2_reason(**{**dense, "dtypes": (torch.float16, torch.float16)}) is None
    assert ws_l2_reason(**{**dense, "intermediate": DENSE_L2_MAX_I, "w2_strides": (2880 * 1024, 1024, 1)}) is None
    misses = [
        ("dtypes", (torch.float32, torch.float32), "bf16 or fp16"),
        ("dtypes", (torch.bfloat16, torch.float16), "activations' dtype"),
        ("intermediate", 768 + 32, "multiples of 64"),
        ("intermediate", 2048, f"I <= {DENSE_L2_MAX_I}"),
        ("block_m", 64, "128-row"),
        ("arch_major", 10, "sm_90"),
        ("w2_strides", (2880 * 768, 1, 2880), "K contiguous"),
    ]
    for key, value, why in misses:
        reason = ws_l2_reason(**{**dense, key: value})
        assert reason is not None and why in reason, (key, reason)
    l1 = dict(dense, w13_strides=(1536 * 2880, 2880, 1), w13_address=1 << 20, gate_up="concat", activation="silu")
    del l1["w2_strides"], l1["w2_address"]
    assert "Triton L1 measured faster" in ws_l1_reason(**l1)


def _ws_ptx(label_prefix, **constexprs):
    """sm_90a PTX of the warp-specialised kernel the ISA listing labels ``label_prefix...``
    (lowering/moe_ws.ws_isa_specs: the launcher's constexprs and the JIT's 16-divisibility), with
    ``constexprs`` changed."""
    from inductor_moe.isa import compile_to_ptx
    from inductor_moe.lowering.moe_ws import ws_isa_specs

    label, kernel, signature, const, options = next(
        spec for group in ws_isa_specs().values() for spec in group if spec[0].startswith(label_prefix))
    options = dict(options)
    divisible = options.pop("divisible_by_16")
    options = {k: v for k, v in options.items() if k not in ("only_arch", "why_only")}
    return compile_to_ptx(kernel, signature, {**const, **constexprs}, 90, options, divisible)


@pytest.mark.parametrize("block_n", [128, 256])
def test_ws_l2_compiles_for_sm90_warp_specialised(block_n):
    """CI has no GPU: the Gluon kernel builds for sm_90a with fp8 wgmma (a 256-column tile: two
    128-column MMAs per K step), per-role register budgets, cp.async completions on mbarriers and the
    PDL wait."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("templates are interpreted in this process")
    from inductor_moe.templates.moe_gemm2_ws import HAS_GLUON

    if not HAS_GLUON:
        pytest.skip("this triton has no Gluon")
    try:
        ptx = _ws_ptx(f"moe_gemm2_ws[fp8_block128 x fp8_block128, {block_n} columns]", HAS_BIAS=True)
    except ImportError as e:  # a triton without the NVIDIA backend
        pytest.skip(str(e))
    assert ptx.count("wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3") == 2 * 4 * block_n // 128, \
        "per K step of 128: 4 k32 wgmmas per 128 columns, in each of the two consumer warpgroups"
    assert "setmaxnreg.dec" in ptx and "setmaxnreg.inc" in ptx, "no per-partition register budgets"
    assert "cp.async.mbarrier.arrive.noinc" in ptx
    assert "cp.async.bulk.tensor.2d" in ptx and "mbarrier.arrive.expect_tx" in ptx, "weights not through TMA"
    assert "griddepcontrol.wait" in ptx


def test_ws_fp8_tails_compile_for_sm90():
    """gpt-oss's H = I = 2880 and every block's pad rows: the producers copy the gathered rows only
    with cp.async's zero-fill form (a source size operand: no reads for pad rows or the columns past
    K), in both fp8 GEMMs and the dense L2; L1's per-column up scales are chosen per register, and
    L2 runs 256-column tiles at 2880 (fp8_l2_block_n), the last a quarter full."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("templates are interpreted in this process")
    from inductor_moe.templates.moe_gemm2_ws import HAS_GLUON

    if not HAS_GLUON:
        pytest.skip("this triton has no Gluon")
    import re

    zero_fill = re.compile(r"cp\.async\.cg\.shared\.global \[[^]]+\], \[[^]]+\], 0x10, %r\d+;")
    plain = re.compile(r"cp\.async\.cg\.shared\.global \[[^]]+\], \[[^]]+\], 0x10;")
    try:
        whole = {"l1": _ws_ptx("moe_gemm1_ws[fp8_block128 x fp8_block128]"),
                 "l2": _ws_ptx("moe_gemm2_ws[fp8_block128 x fp8_block128, 256 columns]")}
        tails = {"l1": _ws_ptx("moe_gemm1_ws[fp8_block128 x fp8_block128, H = I = 2880]"),
                 "l2": _ws_ptx("moe_gemm2_ws[fp8_block128 x fp8_block128, 256 columns, H = I = 2880]")}
        dense = _ws_ptx("moe_gemm2_ws_dense[bf16 x")
    except ImportError as e:  # a triton without the NVIDIA backend
        pytest.skip(str(e))
    for gemm in ("l1", "l2"):
        for ptx in (whole[gemm], tails[gemm]):
            assert len(zero_fill.findall(ptx)) == 8 and not plain.search(ptx), gemm  # 128 rows x 128 B / 128
        assert tails[gemm].count("wgmma.mma_async") == whole[gemm].count("wgmma.mma_async"), gemm
    assert zero_fill.search(dense) and not plain.search(dense)
    # the up tile's two scales are chosen per register, not per element
    assert tails["l1"].count("selp.f32") == whole["l1"].count("selp.f32")
    from inductor_moe.lowering.moe_ws import fp8_l2_block_n

    assert [fp8_l2_block_n(h) for h in (2048, 2880, 384, 320)] == [256, 256, 128, 128]


def test_ws_l1_compiles_for_sm90_warp_specialised():
    """The L1 likewise, with its SwiGLU and fp8 quantising epilogue: two fp8 wgmmas per K step
    (gate, up), e4m3 stores of the intermediate."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("templates are interpreted in this process")
    from inductor_moe.templates.moe_gemm2_ws import HAS_GLUON

    if not HAS_GLUON:
        pytest.skip("this triton has no Gluon")
    try:
        ptx = _ws_ptx("moe_gemm1_ws[", HAS_BIAS=True, HAS_LIMIT=True, WEIGHT_BEFORE_DOWN=True)
    except ImportError as e:  # a triton without the NVIDIA backend
        pytest.skip(str(e))
    assert ptx.count("wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3") == 16, \
        "per K step of 128: 4 k32 wgmmas for gate, 4 for up, in each of the two consumer warpgroups"
    assert "setmaxnreg.dec" in ptx and "setmaxnreg.inc" in ptx, "no per-partition register budgets"
    assert "cp.async.mbarrier.arrive.noinc" in ptx
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx, "no e4m3 quantisation of the intermediate"
    assert "cp.async.bulk.tensor.2d" in ptx and "mbarrier.arrive.expect_tx" in ptx, "weights not through TMA"
    assert "griddepcontrol.wait" in ptx


@pytest.mark.parametrize("dtype,ptx_type", [("bf16", "bf16"), ("fp16", "f16")])
def test_ws_dense_l2_compiles_for_sm90_warp_specialised(dtype, ptx_type):
    """The dense L2 builds for sm_90a: per 64-deep K step 4 n = 256 k16 wgmmas in each of two
    consumer warpgroups, accumulating in place with the step before still in flight, TMA weights,
    per-role register budgets."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("templates are interpreted in this process")
    from inductor_moe.templates.moe_gemm2_ws import HAS_GLUON

    if not HAS_GLUON:
        pytest.skip("this triton has no Gluon")
    try:
        ptx = _ws_ptx(f"moe_gemm2_ws_dense[{dtype} x", HAS_BIAS=True)
    except ImportError as e:  # a triton without the NVIDIA backend
        pytest.skip(str(e))
    assert ptx.count(f"wgmma.mma_async.sync.aligned.m64n256k16.f32.{ptx_type}.{ptx_type}") == 8
    assert "wgmma.wait_group.sync.aligned 1;" in ptx, "no MMA kept in flight"
    assert "setmaxnreg.dec" in ptx and "setmaxnreg.inc" in ptx, "no per-partition register budgets"
    assert "cp.async.mbarrier.arrive.noinc" in ptx
    assert "cp.async.bulk.tensor.2d" in ptx and "mbarrier.arrive.expect_tx" in ptx, "weights not through TMA"
    assert "griddepcontrol.wait" in ptx


# ----------------------------------------------------------------------------- GPU

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _layer(T, E, H, I, k, bias, seed, bad_ids, fmt="fp8_block128", dtype=torch.bfloat16):
    from inductor_moe.ops import weights as W

    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, H, device="cuda", generator=g).to(dtype)
    ids = torch.rand(T, E, device="cuda", generator=g).topk(k, dim=1).indices.int()
    if bad_ids and T > 1:
        ids[0, 0] = -1
        ids[1, k - 1] = E
    tw = torch.softmax(torch.randn(T, k, device="cuda", generator=g), 1)
    w13 = torch.randn(E, 2 * I, H, device="cuda", generator=g) / H ** 0.5
    w2 = torch.randn(E, H, I, device="cuda", generator=g) / I ** 0.5
    if fmt == "dense":
        w13, w2, kw = w13.to(dtype), w2.to(dtype), {}
    else:
        (w13, s13, _), (w2, s2, _) = W.quantize_weight(fmt, w13), W.quantize_weight(fmt, w2)
        kw = dict(w13_scale=s13, w2_scale=s2)
    if bias:
        kw["b13"] = (torch.randn(E, 2 * I, device="cuda", generator=g) * 0.1).to(dtype)
        kw["b2"] = (torch.randn(E, H, device="cuda", generator=g) * 0.1).to(dtype)
    return x, ids, tw, w13, w2, kw


def _compare_with_triton_kernels(spec, layer, T, E, H, I, k, tol, monkeypatch, l1_ws=True):
    """The WS L1 alone (its intermediate feeds the Triton L2), the WS L2 alone (its tiles from the
    counter's first ticket), then both (L2 counting on from L1's last ticket; without ``l1_ws``: the
    WS L2 after the Triton L1 that the rules keep), each bitwise equal to the Triton kernels' output,
    outputs poisoned, twice; within ``tol`` of the float64 reference."""
    from test_moe_kernels import _Poison

    from inductor_moe import config
    from inductor_moe.lowering import moe as moe_lowering
    from inductor_moe.lowering.moe import fused_moe_experts
    from inductor_moe.lowering.moe_plan import choose_moe_config
    from inductor_moe.ops.moe_experts import moe_experts_reference
    from inductor_moe.testing import counting_ws_launches

    x, ids, tw, w13, w2, kw = layer
    cfg = choose_moe_config(T, k, E, H, I, spec.weight_format, 132, act_format=spec.act_format,
                            overrides={"block_m": 128})

    def run(ws, l1=True, l2=True):
        with _Poison(), config.patch(warp_specialized=ws, mega_kernel=False), counting_ws_launches() as launched:
            with monkeypatch.context() as m:
                if not l1:
                    m.setattr(moe_lowering, "ws_l1_reason", lambda *a: "the Triton L1 for this comparison")
                if not l2:
                    m.setattr(moe_lowering, "ws_l2_reason", lambda *a: "the Triton L2 for this comparison")
                out = fused_moe_experts(x, ids, tw, w13, w2, spec, kernel_config=cfg, **kw)
        assert (bool(launched["l1"]), bool(launched["l2"])) == (ws and l1 and l1_ws, ws and l2), launched
        return out

    triton_out = run(False)
    if l1_ws:
        l1_only = run(True, l2=False)
        assert torch.equal(l1_only, triton_out), (l1_only.float() - triton_out.float()).abs().max()
    l2_only = run(True, l1=False)
    ws_out, ws_again = run(True), run(True)
    torch.cuda.synchronize()
    assert not ws_out.isnan().any()
    assert torch.equal(l2_only, triton_out), (l2_only.float() - triton_out.float()).abs().max()
    assert torch.equal(ws_out, ws_again), "two runs differ bitwise"
    assert torch.equal(ws_out, triton_out), (ws_out.float() - triton_out.float()).abs().max()
    f64 = {n: (v.double() if v.dtype in (torch.bfloat16, torch.float16) else v) for n, v in kw.items()}
    w13_ref, w2_ref = (w13.double(), w2.double()) if spec.weight_format == "dense" else (w13, w2)
    ref = moe_experts_reference(x.double(), ids, tw.double(), w13_ref, w2_ref, spec, **f64)
    err = ((ws_out.double() - ref).norm() / ref.norm()).item()
    assert err <= tol, err


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("T,E,H,I,k,spec_extra,bias", [
    (4096, 128, 2048, 768, 8, "", False),  # qwen3-30b-a3b, the rules' 128-row blocks
    (300, 8, 256, 384, 6, "weight_position=before_down", True),  # few blocks, biases, weight before down
    (40, 16, 512, 256, 2, "", False),  # most experts empty or one short block
    (500, 16, 384, 256, 4, "alpha=1.702,limit=7.0,up_offset=1.0", True),  # gpt-oss's clamped SwiGLU
    # H, I = 128n + 64: half-full last K steps and N tiles, L1's up tiles across two scale blocks
    (600, 8, 320, 448, 4, "alpha=1.702,limit=7.0,up_offset=1.0", True),
    (2048, 16, 2880, 2880, 4, "alpha=1.702,limit=7.0,up_offset=1.0", True),  # gpt-oss-120b's dims
    (40, 16, 192, 192, 2, "weight_position=before_down", False),  # one N tile, half of it past I
])
def test_gpu_ws_gemms_write_the_triton_kernels_bits(T, E, H, I, k, spec_extra, bias, monkeypatch):
    """fp8 x fp8: same output bit for bit as the Triton L1 and L2 (same MMA shape, same promotion and
    epilogue expressions) on 128-row blocks, with out-of-range ids."""
    from test_moe_kernels import TOL

    from inductor_moe.spec import MoESpec

    spec = MoESpec.from_str(",".join(p for p in ("weight_format=fp8_block128,act_format=fp8_block128", spec_extra)
                                     if p))
    layer = _layer(T, E, H, I, k, bias, seed=T + 1, bad_ids=True)
    _compare_with_triton_kernels(spec, layer, T, E, H, I, k, TOL["fp8_block128"], monkeypatch)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("T,E,H,I,k,spec_extra,bias,dtype", [
    (4096, 128, 2048, 768, 8, "", False, torch.bfloat16),  # qwen3-30b-a3b
    (1500, 16, 2880, 768, 4, "alpha=1.702,limit=7.0,up_offset=1.0", True, torch.bfloat16),  # H = 2880: a short N tile
    (300, 8, 320, 448, 6, "weight_position=before_down", True, torch.bfloat16),  # a short N tile, few blocks
    (40, 16, 512, 256, 2, "", False, torch.float16),  # fp16; most experts empty or one short block
])
def test_gpu_ws_dense_l2_writes_the_triton_kernels_bits(T, E, H, I, k, spec_extra, bias, dtype, monkeypatch):
    """bf16 / fp16 experts: the WS L2 writes the Triton L2's bits (same k16 MMA order along K, same
    epilogue expressions) on 128-row blocks, with out-of-range ids, N tiles past H stored masked;
    the L1 stays the Triton kernel."""
    from test_moe_kernels import TOL

    from inductor_moe.spec import MoESpec

    spec = MoESpec.from_str(spec_extra)
    layer = _layer(T, E, H, I, k, bias, seed=T + 2, bad_ids=True, fmt="dense", dtype=dtype)
    _compare_with_triton_kernels(spec, layer, T, E, H, I, k, TOL["dense"], monkeypatch, l1_ws=False)
