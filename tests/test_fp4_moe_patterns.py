"""MoE blocks whose expert weights are dequantised from FP4 inside the graph (issues #4, #5):
the block becomes one ``moe_experts`` call on the packed bytes and scales (``weight_format``
mxfp4 / nvfp4), with no dequantised copy left in the graph.

Models: Hugging Face gpt-oss with its experts' MXFP4 checkpoint tensors (``*_blocks`` uint8
[E, N, K/32, 16], ``*_scales`` uint8 [E, N, K/32]) dequantised in forward the way transformers'
Mxfp4 integration writes it, and a plain-PyTorch stacked MoE with NVFP4 expert stacks
(compressed-tensors / ModelOpt layout) dequantised through a 16-entry table.  For each: the
match count in ``inductor_moe.report()``, numerics (fp32 whole model vs eager; each experts block
vs a float64 golden of the same quantised weights), snapshots, and cases that must not fire.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from expecttest import TestCase

import inductor_moe
from inductor_moe import formats
from inductor_moe.patterns import fp4_recognise
from inductor_moe.testing import compile_and_capture

import models_zoo as Z
from examples.moe_model import NVFP4Linear

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
GPT_OSS_SPEC = "alpha=1.702,limit=7.0,up_offset=1.0,gate_up=interleaved,weight_format=mxfp4"

needs_gpt_oss = pytest.mark.skipif(not Z.hf_available("gpt_oss"), reason="needs transformers v5 with gpt-oss")


@pytest.fixture(autouse=True)
def _silent_fallback():
    """Skips are asserted through the report (``warn`` would hide repeated reasons)."""
    fp4_recognise._cache.clear()  # each test proves its own subgraphs
    with inductor_moe.config.patch(fallback="silent"):
        yield


# ------------------------------------------------------------------------------ models


def dequantize_mxfp4_blocks(blocks, scales, dtype, rows_per_chunk=1 << 25, high_first=False):
    """gpt-oss checkpoint tensors -> dense [E, N, K], written as transformers' Mxfp4 integration
    writes it: the blocks flattened to rows of 16 bytes, low / high nibbles looked up in a
    16-entry table and scattered into the even / odd columns of an empty buffer, one chunk of
    rows at a time, then ``ldexp`` by the e8m0 exponent."""
    exp = scales.to(torch.int32) - 127
    lut = torch.tensor(E2M1, dtype=dtype, device=blocks.device)
    *prefix, groups, nbytes = blocks.shape
    rows = math.prod(prefix) * groups
    blocks, exp = blocks.reshape(rows, nbytes), exp.reshape(rows, 1)
    out = torch.empty(rows, 2 * nbytes, dtype=dtype, device=blocks.device)
    for r0 in range(0, rows, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, rows)
        blk, sub = blocks[r0:r1], out[r0:r1]
        lo, hi = (blk & 0x0F).long(), (blk >> 4).long()
        if high_first:
            lo, hi = hi, lo
        sub[:, 0::2] = lut[lo]
        sub[:, 1::2] = lut[hi]
        torch.ldexp(sub, exp[r0:r1], out=sub)
    return out.reshape(*prefix, groups * 2 * nbytes)


def _mxfp4_gpt_oss_experts_class():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    class MXFP4GptOssExperts(GptOssExperts):
        """HF's gpt-oss experts (``@use_experts_implementation``: grouped_mm / batched_mm) reading
        ``gate_up_proj`` / ``down_proj`` [E, K, N] dequantised from MXFP4 on every call."""

        rows_per_chunk = 1 << 25
        high_first = False

        def _dequant(self, name):
            w = dequantize_mxfp4_blocks(getattr(self, f"{name}_blocks"), getattr(self, f"{name}_scales"),
                                        getattr(self, f"{name}_bias").dtype, self.rows_per_chunk, self.high_first)
            return w.transpose(1, 2).contiguous()

        @property
        def gate_up_proj(self):
            return self._dequant("gate_up_proj")

        @property
        def down_proj(self):
            return self._dequant("down_proj")

    return MXFP4GptOssExperts


def gpt_oss_mxfp4(impl="grouped_mm", dtype=torch.float32, layers=None, **experts_attrs):
    """A tiny gpt-oss ``ForCausalLM`` whose experts hold MXFP4 checkpoint tensors (quantised from
    its random weights) instead of dense stacks."""
    model = Z.hf_model("gpt_oss", impl, dtype, layers=layers)
    cls = _mxfp4_gpt_oss_experts_class()
    for m in model.modules():
        if type(m).__name__ != "GptOssExperts":
            continue
        for name in ("gate_up_proj", "down_proj"):
            w = m._parameters.pop(name).detach().transpose(1, 2).float()  # [E, N, K]
            q, s = formats.quantize_mxfp4(w)
            if experts_attrs.get("high_first"):
                q = (q << 4) | (q >> 4)
            E, N, K = w.shape
            m.register_buffer(f"{name}_blocks", q.reshape(E, N, K // 32, 16).contiguous())
            m.register_buffer(f"{name}_scales", s.view(torch.uint8).contiguous())
        m.__class__ = cls
        for key, value in experts_attrs.items():
            setattr(m, key, value)
    return model


def gpt_oss_experts(model):
    return next(m for m in model.modules() if type(m).__name__ == "MXFP4GptOssExperts")


class NVFP4StackedMoE(Z.StackedMoE):
    """``models_zoo.StackedMoE`` (grouped_mm / bmm / einsum over 3-D expert stacks) with each
    stack stored as NVFP4 -- ``{w}_packed`` uint8 [E, N, K/2], ``{w}_scale`` e4m3 [E, N, K/16],
    ``{w}_global_scale`` fp32 per expert [E] (``glob="expert"``), one for all (``"one"``) or none
    -- and dequantised through a 16-entry table on every call.  ``scale_block=32`` keeps one e4m3
    scale per 32 values (not a format we know); ``w2_dense`` leaves the down stack dense."""

    def __init__(self, glob="expert", scale_block=16, w2_dense=False, dtype=torch.float32, **kwargs):
        super().__init__(**kwargs)
        self.to(dtype).eval()  # before quantising: Module.to(dtype) would also cast e4m3 scales
        self.glob, self.scale_block = glob, scale_block
        for name in ("w13",) if w2_dense else ("w13", "w2"):
            w = self._parameters.pop(name).detach().float()
            k = w.shape[-1]
            padded = F.pad(w, (0, -k % 16))  # K not a multiple of 16: quantised padded, bytes cut back
            one = {"expert": None, "one": w.abs().amax() / (448 * 6), None: torch.tensor(1.0)}[glob]
            q, s, g = formats.quantize_nvfp4(padded, one)
            if scale_block != 16:
                s = s[..., ::scale_block // 16].contiguous()
            self.register_buffer(f"{name}_packed", q[..., :k // 2].contiguous())
            self.register_buffer(f"{name}_scale", s)
            if glob is not None:
                self.register_buffer(f"{name}_global_scale", g.reshape(-1).float())

    def dequant(self, name):
        p, s = getattr(self, f"{name}_packed"), getattr(self, f"{name}_scale")
        lut = torch.tensor(E2M1, device=p.device)
        v = lut[torch.stack((p & 0x0F, p >> 4), dim=-1).long()].reshape(*p.shape[:-1], -1)
        v = v * s.float().repeat_interleave(self.scale_block, dim=-1)[..., :v.shape[-1]]
        if self.glob is not None:
            g = getattr(self, f"{name}_global_scale")
            v = v * (g.view(-1, 1, 1) if self.glob == "expert" else g)
        return v.to(self.router.proj.weight.dtype)

    def _stack(self, name):
        if f"{name}_packed" in self._buffers:
            return self.dequant(name)
        if name not in self._parameters:
            raise AttributeError(name)
        return self._parameters[name]

    w13 = property(lambda self: self._stack("w13"))
    w2 = property(lambda self: self._stack("w2"))


def _x(T=24, dtype=torch.float32, seed=7):
    return torch.randn(T, Z.H, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _run(model, *inputs):
    with torch.no_grad(), inductor_moe.report() as r:
        out, graphs = compile_and_capture(model, *inputs)
        ref = model(*inputs)
    return out, ref, r, "\n".join(g for g in graphs if g)


def _moe(r):
    return Z.moe_matches(r)


# ------------------------------------------------------------------------------ gpt-oss MXFP4


@needs_gpt_oss
@pytest.mark.parametrize("impl,dtype,pattern", [("grouped_mm", torch.float32, "hf_grouped_mm"),
                                                ("grouped_mm", torch.bfloat16, "hf_grouped_mm"),
                                                ("batched_mm", torch.float32, "hf_batched_mm")],
                         ids=["grouped_mm-fp32", "grouped_mm-bf16", "batched_mm-fp32"])
def test_gpt_oss_mxfp4_whole_model(impl, dtype, pattern):
    model = gpt_oss_mxfp4(impl, dtype)
    tokens = Z.token_ids()
    out, ref, r, graph = _run(model, tokens)
    moe = _moe(r)
    assert [m.pattern for m in moe] == [pattern] * 2, r.summary()
    assert all(m.detail.endswith(GPT_OSS_SPEC) for m in moe), r.summary()
    assert not r.skipped and not [m for m in r.matches if m.kind != "moe"], r.summary()
    assert graph.count("moe_experts(") == 2 and "w13=uint8[8,64,32]" in graph and "w13_scale=uint8[8,64,2]" in graph
    err = Z.rel_err(out.logits, ref.logits)
    if dtype == torch.float32:
        assert err < 1e-5, err
    else:  # bf16 router ties make whole models only loosely comparable (test_patterns_hf.py)
        assert torch.isfinite(out.logits).all() and err < 0.3, err


@needs_gpt_oss
@pytest.mark.parametrize("impl,dtype", [("grouped_mm", torch.bfloat16), ("batched_mm", torch.float32),
                                        ("batched_mm", torch.bfloat16)])
def test_gpt_oss_mxfp4_experts_block_numerics(impl, dtype):
    """The experts module alone with fixed routing, compiled vs a float64 golden of the same
    MXFP4 weights (dequantised exactly in float64)."""
    experts = gpt_oss_experts(gpt_oss_mxfp4(impl, dtype, layers=1))
    gold, eager, out, r = Z.experts_golden_eager_compiled(experts, 2, dtype)
    assert len(_moe(r)) == 1 and "weight_format=mxfp4" in _moe(r)[0].detail, r.summary()
    err, eager_err = Z.rel_err(out, gold), Z.rel_err(eager, gold)
    bound = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert err <= bound and err <= max(bound, 2 * eager_err), (err, eager_err)


# ------------------------------------------------------------------------------ plain NVFP4 + LUT


@pytest.mark.parametrize("via,dtype,glob,pattern", [
    ("grouped_mm", torch.bfloat16, "expert", "hf_grouped_mm"),
    ("bmm", torch.float32, "one", "hf_batched_mm"),
    ("einsum", torch.bfloat16, None, "hf_batched_mm"),
])
def test_nvfp4_lut_stacked_moe(via, dtype, glob, pattern):
    torch.manual_seed(0)
    model = NVFP4StackedMoE(glob=glob, via=via, shared=via == "einsum", dtype=dtype)
    x = _x(dtype=dtype)
    out, ref, r, graph = _run(model, x)
    moe = _moe(r)
    assert [m.pattern for m in moe] == [pattern] and "weight_format=nvfp4" in moe[0].detail, r.summary()
    assert not r.skipped, r.summary()
    assert "w13_global_scale=float32[8]" in graph and "w2_scale=float8_e4m3fn[8,64,2]" in graph, graph
    golden = copy.deepcopy(model).double()
    golden.via = "bmm" if via == "grouped_mm" else via  # the same block; grouped_mm has no float64
    with torch.no_grad():
        gold = golden(x.double())
    err, eager_err = Z.rel_err(out, gold), Z.rel_err(ref, gold)
    if dtype == torch.float32:
        assert err < 1e-5, err
    else:
        assert err <= 2e-2 and err <= max(1e-2, 2 * eager_err), (err, eager_err)


def test_nvfp4_compiled_model_reads_the_buffers_not_a_copy():
    """Updating the packed weights in place (a new checkpoint) changes the compiled output:
    the op reads the graph inputs on every call, nothing was baked in at compile time."""
    torch.manual_seed(0)
    model = NVFP4StackedMoE(via="bmm")
    x = _x()
    with torch.no_grad():
        compiled = torch.compile(model, backend="inductor_moe")
        compiled(x)
        model.w13_packed.copy_(torch.flip(model.w13_packed, dims=[0]))
        assert Z.rel_err(compiled(x), model(x)) < 1e-5


# ------------------------------------------------------------------------------ must not fire


def _left_to_inductor(model, x, reason, tol=1e-5):
    out, ref, r, graph = _run(model, x)
    assert not _moe(r) and "moe_experts" not in graph, r.summary()
    assert any(reason in s.reason for s in r.skipped), r.summary()
    assert any(s.pattern == "fp4_experts" for s in r.skipped), r.summary()  # the unfused GEMMs, named
    assert Z.rel_err(getattr(out, "logits", out), getattr(ref, "logits", ref)) < tol
    return r


def test_scale_of_the_wrong_block_is_not_rewritten():
    """e4m3 scales per 32 values (neither NVFP4's 16 nor MXFP4's e8m0 per 32)."""
    torch.manual_seed(0)
    _left_to_inductor(NVFP4StackedMoE(scale_block=32, via="bmm"), _x(),
                      "no block-scale input of the expected size")


def test_k_not_a_multiple_of_the_block_is_not_rewritten():
    """Hidden size 40: the gate/up stack's K is not a multiple of any FP4 scale block (the
    last block's scale is cut back to the 8 values it covers in forward)."""
    torch.manual_seed(0)
    model = NVFP4StackedMoE(hidden=40, via="bmm")
    _left_to_inductor(model, torch.randn(12, 40), "w13: K=40 is not a multiple of the FP4 scale block")


def test_only_one_fp4_stack_is_not_rewritten():
    torch.manual_seed(0)
    _left_to_inductor(NVFP4StackedMoE(w2_dense=True, via="bmm"), _x(),
                      "only the gate/up expert weights are dequantised from FP4")


@needs_gpt_oss
def test_high_nibble_first_experts_are_not_rewritten():
    model = gpt_oss_mxfp4("grouped_mm", torch.float32, layers=1, high_first=True)
    _left_to_inductor(model, Z.token_ids(), "packed high nibble first")


def test_lone_grouped_mm_over_fp4_experts_is_reported():
    """A grouped GEMM over dequantised FP4 experts with no MoE block around it: reported by the
    MoE pass (``fp4_experts``), or by the FP4 pass when MoE rewriting is off."""
    torch.manual_seed(0)
    stacks = NVFP4StackedMoE(via="grouped_mm", dtype=torch.bfloat16)

    def f(x, offs):
        return torch._grouped_mm(x, stacks.dequant("w13").transpose(1, 2), offs=offs)

    x = torch.randn(16, Z.H, dtype=torch.bfloat16)
    offs = torch.tensor([2, 4, 6, 8, 10, 12, 14, 16], dtype=torch.int32)
    for moe_rewrite, kind, pattern in ((True, "moe", "fp4_experts"), (False, "fp4_gemm", "fp4_dequant_matmul")):
        torch._dynamo.reset()
        with inductor_moe.config.patch(moe_rewrite=moe_rewrite):
            out, ref, r, graph = _run(f, x, offs)
        assert graph == "" and not r.matches, r.summary()
        assert [(s.kind, s.pattern) for s in r.skipped] == [(kind, pattern)], r.summary()
        assert "grouped_mm over dequantised FP4 expert weights" in r.skipped[0].reason
        assert Z.rel_err(out, ref) < 1e-2


def fp4_loop_moe(fmt, dtype=torch.float32, num_experts=4, bias=False, high_first=False):
    """``Z.LoopMoE`` whose gate / up / down linears hold FP4 weights dequantised in forward."""
    torch.manual_seed(0)
    model = Z.LoopMoE(num_experts=num_experts, bias=bias).to(dtype).eval()
    wrap = {"mxfp4": lambda lin: _MXFP4Linear(lin, high_first), "nvfp4": NVFP4Linear}[fmt]
    for expert in model.experts:
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(expert, name, wrap(getattr(expert, name)))
    return model


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("dtype,bias", [(torch.float32, False), (torch.bfloat16, True)])
def test_modulelist_of_fp4_experts_is_fused(fmt, dtype, bias):
    """``nn.ModuleList`` experts whose linears dequantise FP4 weights: the FP4 pass makes each a
    ``block_scaled_mm``, then the loop becomes one ``moe_experts_unstacked`` call on the packed
    weights, their scales and (NVFP4) each linear's own global scale; no GEMM is left alone."""
    model = fp4_loop_moe(fmt, dtype, bias=bias)
    x = _x(12, dtype)
    out, ref, r, graph = _run(model, x)
    moe = _moe(r)
    assert [m.pattern for m in moe] == ["modulelist_loop"] and f"weight_format={fmt}" in moe[0].detail, r.summary()
    assert r.matches == moe and "fuses its 12 expert FP4 GEMMs" in moe[0].detail, r.summary()  # what runs
    assert graph.count("moe_experts_unstacked(") == 1 and "block_scaled_mm" not in graph, graph
    assert ("global_scales=12 x float32[1]" in graph) == (fmt == "nvfp4"), graph
    assert Z.rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_modulelist_of_fp4_experts_matches_float64_golden():
    """The fused op's numerics: the compiled block vs the same model in float64 (same quantised weights)."""
    model = fp4_loop_moe("nvfp4", torch.bfloat16)
    gold = copy.deepcopy(model).double()
    x = _x(12, torch.bfloat16)
    out, _, r, _ = _run(model, x)
    assert len(_moe(r)) == 1, r.summary()
    with torch.no_grad():
        assert Z.rel_err(out, gold(x.double())) < 2e-2


def test_modulelist_of_fp4_experts_needing_relayout_is_reported():
    """Packed high nibble first: each linear needs a re-layout (``block_scaled_mm_relayout``), so the
    loop is not fused; the skip says why, and every linear still runs as an FP4 GEMM."""
    model = fp4_loop_moe("mxfp4", torch.bfloat16, high_first=True)
    out, ref, r, graph = _run(model, _x(12, torch.bfloat16))
    assert not _moe(r) and [m.kind for m in r.matches] == ["fp4_gemm"] * 12, r.summary()
    assert any(s.pattern == "modulelist_loop" and "re-layout" in s.reason for s in r.skipped), r.summary()
    assert Z.rel_err(out, ref) < 2e-2


def test_modulelist_mixing_fp4_and_dense_experts_is_reported():
    model = fp4_loop_moe("mxfp4", torch.float32)
    model.experts[2].down_proj = torch.nn.Linear(Z.I, Z.H, bias=False)
    out, ref, r, graph = _run(model, _x(12))
    assert not _moe(r), r.summary()
    assert any(s.pattern == "modulelist_loop" and "mix weight formats" in s.reason for s in r.skipped), r.summary()
    assert Z.rel_err(out, ref) < 1e-5


class _MXFP4Linear(torch.nn.Module):
    """An ``nn.Linear`` stored as gpt-oss-layout MXFP4, dequantised in forward."""

    def __init__(self, linear, high_first=False):
        super().__init__()
        n, k = linear.weight.shape
        q, s = formats.quantize_mxfp4(linear.weight.detach().float())
        if high_first:
            q = (q << 4) | (q >> 4)
        self.register_buffer("blocks", q.reshape(n, k // 32, 16).contiguous())
        self.register_buffer("scales", s.view(torch.uint8).contiguous())
        self.bias = linear.bias
        self.high_first = high_first

    def forward(self, x):
        w = dequantize_mxfp4_blocks(self.blocks, self.scales, x.dtype, high_first=self.high_first)
        return F.linear(x, w, self.bias)


# ------------------------------------------------------------------------------ probing cost


@needs_gpt_oss
def test_large_stacks_are_probed_on_two_experts_once_per_structure(monkeypatch):
    """Stacks too large to evaluate whole are probed on 2 experts; every layer with the same
    dequantisation structure reuses the first layer's result."""
    monkeypatch.setattr(fp4_recognise, "MAX_PROBE_ELEMENTS", 1)
    evaluated = []
    real = fp4_recognise.evaluate
    monkeypatch.setattr(fp4_recognise, "evaluate", lambda *a, **kw: evaluated.append(a[1]) or real(*a, **kw))
    model = gpt_oss_mxfp4("grouped_mm", torch.float32, layers=2)
    out, ref, r, graph = _run(model, Z.token_ids())
    assert len(_moe(r)) == 2, r.summary()
    assert len(evaluated) == 2  # w13 and w2 of layer 0; layer 1 hits the cache
    assert all(next(iter(inputs.values())).shape[0] == fp4_recognise.PROBE_EXPERTS for inputs in evaluated)
    assert Z.rel_err(out.logits, ref.logits) < 1e-5


@pytest.mark.parametrize("glob", ["expert", "one", None])
def test_nvfp4_stacks_are_probed_on_two_experts(monkeypatch, glob):
    monkeypatch.setattr(fp4_recognise, "MAX_PROBE_ELEMENTS", 1)
    torch.manual_seed(0)
    out, ref, r, graph = _run(NVFP4StackedMoE(glob=glob, via="bmm"), _x())
    assert len(_moe(r)) == 1 and not r.skipped, r.summary()
    assert Z.rel_err(out, ref) < 1e-5


@needs_gpt_oss
def test_chunks_across_experts_are_probed_whole_or_rejected(monkeypatch):
    """Row chunks that cut through experts (transformers' ``rows_per_chunk``) cannot be probed on
    a few experts: the whole stack is probed, or, above the size limit, left with the reason."""
    model = gpt_oss_mxfp4("grouped_mm", torch.float32, layers=1, rows_per_chunk=200)
    out, ref, r, graph = _run(model, Z.token_ids())
    assert len(_moe(r)) == 1 and not r.skipped, r.summary()
    torch._dynamo.reset()
    fp4_recognise._cache.clear()
    monkeypatch.setattr(fp4_recognise, "MAX_PROBE_ELEMENTS", 1)
    out, ref, r, graph = _run(model, Z.token_ids())
    assert not _moe(r), r.summary()
    assert any("too large to verify" in s.reason for s in r.skipped), r.summary()
    assert Z.rel_err(out.logits, ref.logits) < 1e-5


# ------------------------------------------------------------------------------ snapshots


class FP4MoESnapshots(TestCase):
    @needs_gpt_oss
    def test_gpt_oss_mxfp4_grouped_mm_bf16(self):
        model = gpt_oss_mxfp4("grouped_mm", torch.bfloat16, layers=1)
        with torch.no_grad():
            _, graphs = compile_and_capture(model, Z.token_ids(batch=1, seq=6))
        self.assertExpectedInline("\n".join(g for g in graphs if g), """moe_experts(x=bfloat16[6,64], topk_ids=int64[6,2], topk_weights=bfloat16[6,2], w13=uint8[8,64,32], w2=uint8[8,64,16], spec='alpha=1.702,limit=7.0,up_offset=1.0,gate_up=interleaved,weight_format=mxfp4', w13_scale=uint8[8,64,2], w2_scale=uint8[8,64,1], b13=bfloat16[8,64], b2=bfloat16[8,64])""")

    def test_nvfp4_bmm_one_global_scale_fp32(self):
        torch.manual_seed(0)
        model = NVFP4StackedMoE(glob="one", via="bmm")
        with torch.no_grad():
            _, graphs = compile_and_capture(model, _x(6))
        self.assertExpectedInline("\n".join(g for g in graphs if g), """moe_experts(x=float32[6,64], topk_ids=int64[6,2], topk_weights=float32[6,2], w13=uint8[8,64,32], w2=uint8[8,64,16], spec='weight_format=nvfp4', w13_scale=float8_e4m3fn[8,64,4], w2_scale=float8_e4m3fn[8,64,2], w13_global_scale=float32[8], w2_global_scale=float32[8])""")


# ------------------------------------------------------------------------------ fused kernels, interpreted


def _routing(T=24, k=2, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, Z.H, generator=g)
    ids = torch.stack([torch.randperm(Z.E, generator=g)[:k] for _ in range(T)])
    return x, ids, torch.rand(T, k, generator=g)


def _interpreted_blocks():
    """Each experts block with fixed routing, compiled with the Triton kernels interpreted on the
    CPU (the lowering the report names), vs a float64 golden of the same quantised weights."""
    def nvfp4_block(model):
        def block(x, ids, w):
            return (model.experts(x, ids).view(*ids.shape, -1) * w.unsqueeze(-1)).sum(1)
        return block

    torch.manual_seed(0)
    nv = NVFP4StackedMoE(via="bmm", dtype=torch.bfloat16)
    nv_gold = copy.deepcopy(nv).double()
    cases = [("nvfp4_bmm", nvfp4_block(nv), nvfp4_block(nv_gold))]
    if Z.hf_available("gpt_oss"):
        for impl in ("grouped_mm", "batched_mm"):
            experts = gpt_oss_experts(gpt_oss_mxfp4(impl, torch.bfloat16, layers=1))
            gold = copy.deepcopy(experts).double()
            gold.config = copy.deepcopy(experts.config)
            gold.config._experts_implementation = "eager"
            cases.append((f"gpt_oss_mxfp4_{impl}", experts, gold))
    for fmt in ("mxfp4", "nvfp4"):  # nn.ModuleList experts: stacked once, then the same kernels
        loop = fp4_loop_moe(fmt, torch.bfloat16)
        loop_gold = copy.deepcopy(loop).double()
        cases.append((f"modulelist_{fmt}", lambda x, ids, w, m=loop: m(x), lambda x, ids, w, m=loop_gold: m(x)))
    x, ids, w = _routing()
    for name, block, gold in cases:
        torch._dynamo.reset()
        with torch.no_grad(), inductor_moe.report() as r:
            out = torch.compile(block, backend="inductor_moe")(x.bfloat16(), ids, w.bfloat16())
            ref = gold(x.double(), ids, w.double())
        print("RESULT " + json.dumps(dict(name=name, lowerings=[m.lowering for m in _moe(r)],
                                          runtime_fallbacks=[s.reason for s in r.skipped if s.pattern == "lowering"],
                                          err=Z.rel_err(out, ref), nan=bool(torch.isnan(out).any()))), flush=True)


@pytest.fixture(scope="module")
def interpreted():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # for ``examples``
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--interpret"], env=env,
                          capture_output=True, text=True, timeout=900)
    results = {r["name"]: r for r in (json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines()
                                      if line.startswith("RESULT "))}
    if not results:
        pytest.fail(f"interpreted run produced nothing (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return results


@pytest.mark.parametrize("name,fmt", [("nvfp4_bmm", "nvfp4"), ("gpt_oss_mxfp4_grouped_mm", "mxfp4"),
                                      ("gpt_oss_mxfp4_batched_mm", "mxfp4"), ("modulelist_mxfp4", "mxfp4"),
                                      ("modulelist_nvfp4", "nvfp4")])
def test_fused_kernels_read_the_packed_experts(interpreted, name, fmt):
    """The fused Triton kernels (interpreted) consume the packed weights and scales the pattern
    hands them: bf16 activations, FP4 weights, within the FP4 tolerance of the float64 golden."""
    if name.startswith("gpt_oss") and not Z.hf_available("gpt_oss"):
        pytest.skip("needs transformers v5 with gpt-oss")
    r = interpreted[name]
    assert r["lowerings"] == [f"triton_fused[{fmt}]"] and not r["runtime_fallbacks"], r
    assert not r["nan"] and r["err"] <= 2e-2, r


# ------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@needs_gpt_oss
def test_gpt_oss_mxfp4_runs_the_fused_kernels_on_cuda():
    """gpt-oss with MXFP4 experts dequantised in forward: on CUDA the block runs on the fused
    Triton kernels straight from the packed weights, and the logits match eager."""
    model = gpt_oss_mxfp4("grouped_mm", torch.bfloat16).cuda()
    tokens = Z.token_ids().cuda()
    with torch.no_grad():
        eager = model(tokens).logits.float()
        torch._dynamo.reset()
        plain = torch.compile(model, backend="inductor")(tokens).logits.float()
        torch._dynamo.reset()
        with inductor_moe.report() as r:
            ours = torch.compile(model, backend="inductor_moe")(tokens).logits.float()
    moe = _moe(r)
    assert len(moe) == 2, r.summary()
    assert all(m.lowering.startswith("triton_fused") and "mxfp4" in m.lowering for m in moe), r.summary()
    assert all("weight_format=mxfp4" in m.detail for m in moe), r.summary()
    assert not [s for s in r.skipped if s.pattern == "lowering"], r.summary()  # no runtime fallback
    assert torch.isfinite(ours).all()
    ours_err, plain_err = Z.rel_err(ours, eager), Z.rel_err(plain, eager)
    assert ours_err <= max(1e-2, 2 * plain_err), (ours_err, plain_err)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_modulelist_of_fp4_experts_runs_the_fused_kernels_on_cuda(fmt):
    """nn.ModuleList FP4 experts on CUDA: one fused MoE call (stacked once), no runtime fallback,
    within the FP4 tolerance of the float64 model on the same quantised weights."""
    model = fp4_loop_moe(fmt, torch.bfloat16, num_experts=8, bias=True).cuda()
    gold = copy.deepcopy(model).double()
    x = _x(40, torch.bfloat16).cuda()
    with torch.no_grad(), inductor_moe.report() as r:
        compiled = torch.compile(model, backend="inductor_moe")
        out, again = compiled(x), compiled(x)
        ref = gold(x.double())
    moe = _moe(r)
    assert len(moe) == 1 and moe[0].lowering.startswith("triton_fused") and fmt in moe[0].lowering, r.summary()
    assert not [s for s in r.skipped if s.pattern == "lowering"], r.summary()
    assert torch.equal(out, again) and not out.isnan().any()
    assert Z.rel_err(out, ref) < 2e-2


if __name__ == "__main__" and sys.argv[1:] == ["--interpret"]:
    _interpreted_blocks()
