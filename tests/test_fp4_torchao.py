"""torchao's MX / NVFP4 weight tensor subclasses (``torchao.prototype.mx_formats``) through the
backend on the CPU.  Optional dependency: the whole module skips without torchao.

What each config's ``linear`` flattens to under torch.compile (torchao 0.18, torch 2.13):

* ``NVFP4WeightOnlyConfig``: ``NVFP4Tensor.dequantize`` (unpack nibbles, e2m1, un-swizzle the
  128x4-blocked e4m3 scales with ``from_blocked``, times the fp32 per-tensor scale) then
  ``F.linear`` -> ``fp4_dequant_matmul`` (swizzled-scale form).  Numerics vs torchao eager.
* ``MXDynamicActivationMXWeightConfig`` (fp4, ``KernelPreference.EMULATED``): the activation is
  fake-quantised to MXFP4 in the graph, the weight ``MXTensor.dequantize``d (e8m0 scales,
  swizzled) then ``mm`` / ``addmm`` -> ``fp4_dequant_matmul``.  Numerics vs torchao eager.
* ``NVFP4DynamicActivationNVFP4WeightConfig``: ``torch._scaled_mm`` with ``float4_e2m1fn_x2``
  operands and swizzled e4m3 scales, times the per-tensor scales, plus bias -> ``fp4_scaled_mm``.
  Its dynamic mode (``step=None``) asserts sm100 at quantisation time, so the tests use the
  static ``prepare`` / ``convert`` flow.  torchao eager cannot run on the CPU (``_scaled_mm``
  rejects FP4 there), so the reference is torchao's own ``dequantize()`` of both operands.
  With bf16 activations the graph also quantises the activation, and Inductor's CPU codegen
  rejects that part (e4m3 type promotion); with activations passed already as ``NVFP4Tensor``
  the whole graph compiles and runs.
* 3-D MoE expert stacks: torchao 0.18's ``quantize_`` has no 3-D FP4 path (``NVFP4*Config``
  rejects 3-D weights or has no parameter-level form; the MX configs give swizzled scales no MoE
  path can run on the CPU), so stacks are built with ``MXTensor.to_mx`` / ``NVFP4Tensor.to_nvfp4``
  and dequantised in forward, then gathered ``bmm`` or ``grouped_mm`` -> one ``moe_experts`` call
  on the packed bytes and scales (``weight_format`` mxfp4 / nvfp4).  The subclasses' own
  ``bmm`` / ``w[e]`` paths graph-break or are missing in torchao and are not covered.
* ``MXDynamicActivationMXWeightConfig`` (fp4, ``KernelPreference.AUTO``): ``F.scaled_mm``
  (``_scaled_mm_v2``) BlockWise1x32 with ``SWIZZLE_32_4_4`` -> ``fp4_scaled_mm``.  The rewrite
  happens, but the graph still builds the activation's swizzled e8m0 scales (``full`` +
  ``slice_scatter`` in ``float8_e8m0fnu``) and Inductor's CPU codegen has no C++ type for e8m0
  (``KeyError: torch.float8_e8m0fnu``); torchao eager fails too ("CPU does not support
  swizzle").  On the CPU only the match is checked.  See benchmarks/NOTES_fp4.md.
"""

import warnings

import pytest

torchao = pytest.importorskip("torchao")
mx_formats = pytest.importorskip("torchao.prototype.mx_formats")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from expecttest import TestCase  # noqa: E402
from torchao.prototype.mx_formats.inference_workflow import (  # noqa: E402
    MXDynamicActivationMXWeightConfig,
    NVFP4DynamicActivationNVFP4WeightConfig,
    NVFP4WeightOnlyConfig,
)
from torchao.prototype.mx_formats.mx_tensor import MXTensor  # noqa: E402
from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor  # noqa: E402
from torchao.quantization import quantize_  # noqa: E402
from torchao.quantization.quantize_.common.kernel_preference import KernelPreference  # noqa: E402

import inductor_moe  # noqa: E402
from inductor_moe.testing import compile_and_capture  # noqa: E402
from torchao.prototype.mx_formats.nvfp4_tensor import per_tensor_amax_to_scale  # noqa: E402

import models_zoo as Z  # noqa: E402

FP4 = torch.float4_e2m1fn_x2


def rel(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def two_linears():
    torch.manual_seed(0)  # N=256 > 128 rows, N=64 < 128: both pad the 128x4 scale tiles
    return nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64)).to(torch.bfloat16)


def compile_report(model, x, expect_cpu_codegen_error=None):
    """(output or None, rewritten graphs, report); a known Inductor CPU codegen error in the
    parts of the graph we do not own is tolerated when named."""
    with inductor_moe.report() as r, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out, graphs = compile_and_capture(model, x)
        except Exception as e:  # noqa: BLE001
            if expect_cpu_codegen_error is None or expect_cpu_codegen_error not in str(e):
                raise
            return None, "", r
    return out, "\n".join(graphs), r


def mxfp4_config(kernel):
    return MXDynamicActivationMXWeightConfig(activation_dtype=FP4, weight_dtype=FP4, kernel_preference=kernel)


def nvfp4_static(model, x):
    quantize_(model, NVFP4DynamicActivationNVFP4WeightConfig(use_triton_kernel=False, step="prepare"))
    with torch.no_grad():
        model(x)  # calibration: the activation amax
    quantize_(model, NVFP4DynamicActivationNVFP4WeightConfig(use_triton_kernel=False, step="convert"))
    return model


class TestTorchaoFP4(TestCase):
    def test_nvfp4_weight_only(self):
        m = two_linears()
        quantize_(m, NVFP4WeightOnlyConfig())
        x = torch.randn(2, 3, 128, dtype=torch.bfloat16)
        with torch.no_grad():
            ref = m(x)
        out, graph, r = compile_report(m, x)
        self.assertEqual([(t.kind, t.pattern) for t in r.matches], [("fp4_gemm", "fp4_dequant_matmul")] * 2)
        self.assertExpectedInline(graph, """\
block_scaled_mm_relayout(a=bfloat16[6,128], b=uint8[256,64], b_scale=float8_e4m3fn[64,32], spec='b_format=nvfp4,activation=relu', layout='b_scale_swizzled', global_scale=float32[], bias=bfloat16[256])
block_scaled_mm_relayout(a=bfloat16[6,256], b=uint8[64,128], b_scale=float8_e4m3fn[32,64], spec='b_format=nvfp4', layout='b_scale_swizzled', global_scale=float32[], bias=bfloat16[64])""")  # noqa: B950
        self.assertLessEqual(rel(out, ref), 2e-2)

    def test_mxfp4_emulated_dynamic_activation(self):
        m = two_linears()
        quantize_(m, mxfp4_config(KernelPreference.EMULATED))
        x = torch.randn(2, 3, 128, dtype=torch.bfloat16)
        with torch.no_grad():
            ref = m(x)
        out, graph, r = compile_report(m, x)
        self.assertEqual([(t.kind, t.pattern) for t in r.matches], [("fp4_gemm", "fp4_dequant_matmul")] * 2)
        self.assertIn("layout='b_scale_swizzled'", graph)
        self.assertLessEqual(rel(out, ref), 2e-2)

    def test_nvfp4_dynamic_activation_prequantised_input(self):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(128, 64)).to(torch.bfloat16)
        x = torch.randn(6, 128, dtype=torch.bfloat16)
        nvfp4_static(m, x)
        w = m[0].weight
        xq = NVFP4Tensor.to_nvfp4(x, per_tensor_scale=w.act_per_tensor_scale, is_swizzled_scales=True)
        ref = xq.dequantize(torch.float32) @ w.dequantize(torch.float32).t() + m[0].bias.float()
        out, graph, r = compile_report(m, xq)
        self.assertEqual([(t.kind, t.pattern) for t in r.matches], [("fp4_gemm", "fp4_scaled_mm")])
        self.assertIn("layout='a_scale_swizzled,b_scale_swizzled'", graph)
        self.assertLessEqual(rel(out, ref), 2e-2)

    def test_nvfp4_dynamic_activation_bf16_input_matches(self):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(128, 64)).to(torch.bfloat16)
        x = torch.randn(6, 128, dtype=torch.bfloat16)
        nvfp4_static(m, x)
        out, _, r = compile_report(m, x, expect_cpu_codegen_error="Promotion for Float8 Types")
        self.assertEqual([(t.kind, t.pattern) for t in r.matches], [("fp4_gemm", "fp4_scaled_mm")])
        if out is not None:  # a torch whose CPU codegen handles the activation quantisation
            w = m[0].weight
            xq = NVFP4Tensor.to_nvfp4(x, per_tensor_scale=w.act_per_tensor_scale, is_swizzled_scales=True)
            ref = xq.dequantize(torch.float32) @ w.dequantize(torch.float32).t() + m[0].bias.float()
            self.assertLessEqual(rel(out, ref), 2e-2)

    def test_mxfp4_scaled_mm_auto_matches(self):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(128, 64)).to(torch.bfloat16)
        quantize_(m, mxfp4_config(KernelPreference.AUTO))
        x = torch.randn(6, 128, dtype=torch.bfloat16)
        out, _, r = compile_report(m, x, expect_cpu_codegen_error="float8_e8m0fnu")
        self.assertEqual([(t.kind, t.pattern) for t in r.matches], [("fp4_gemm", "fp4_scaled_mm")])
        self.assertIn("a_format=mxfp4", r.matches[0].detail)
        self.assertIn("a_scale_swizzled,b_scale_swizzled", r.matches[0].detail)
        if out is not None:  # a torch whose CPU codegen handles e8m0
            w, k = m[0].weight, m[0].weight.act_quant_kwargs
            xq = MXTensor.to_mx(x, k.elem_dtype, k.block_size, k.scaling_mode, k.kernel_preference,
                                k.is_swizzled_scales)
            ref = xq.dequantize(torch.float32) @ w.dequantize(torch.float32).t() + m[0].bias.float()
            self.assertLessEqual(rel(out, ref), 2e-2)


class TorchaoFP4StackedMoE(Z.StackedMoE):
    """``models_zoo.StackedMoE`` whose w13 [E, 2I, H] / w2 [E, H, I] are 3-D torchao FP4 tensors
    (MXFP4 e8m0 per 32; NVFP4 e4m3 per 16 with one fp32 global scale per expert), plain
    (unswizzled) scales, dequantised in forward."""

    def __init__(self, fmt, dtype, **kwargs):
        super().__init__(**kwargs)
        self.to(dtype).eval()
        for name in ("w13", "w2"):
            w = self._parameters.pop(name).detach()
            if fmt == "mxfp4":
                q = MXTensor.to_mx(w.contiguous(), FP4, 32, kernel_preference=KernelPreference.EMULATED)
            else:
                g = per_tensor_amax_to_scale(w.float().abs().amax(dim=(1, 2))).view(-1, 1, 1)
                q = NVFP4Tensor.to_nvfp4(w.contiguous(), per_tensor_scale=g)
            setattr(self, f"{name}_fp4", nn.Parameter(q, requires_grad=False))

    w13 = property(lambda self: self.w13_fp4.dequantize(self.router.proj.weight.dtype))
    w2 = property(lambda self: self.w2_fp4.dequantize(self.router.proj.weight.dtype))


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("via,dtype", [("bmm", torch.float32), ("grouped_mm", torch.bfloat16)])
def test_3d_expert_stacks_are_fused(fmt, via, dtype):
    """3-D torchao FP4 expert stacks dequantised in forward: the whole block is one ``moe_experts``
    call on torchao's packed bytes and scales (no dequantised copy), numerically torchao's own
    ``dequantize()`` run through the experts."""
    torch.manual_seed(0)
    model = TorchaoFP4StackedMoE(fmt, dtype, via=via)
    x = torch.randn(12, Z.H, dtype=dtype)
    with torch.no_grad():
        ref = model(x)
    out, graph, r = compile_report(model, x)
    moe = Z.moe_matches(r)
    assert len(moe) == 1 and f"weight_format={fmt}" in moe[0].detail, r.summary()
    assert graph.count("moe_experts(") == 1 and f"w13=uint8[{Z.E},{2 * Z.I},{Z.H // 2}]" in graph, graph
    assert ("w13_global_scale=float32[8]" in graph) == (fmt == "nvfp4"), graph
    assert rel(out, ref) <= (1e-5 if dtype == torch.float32 else 2e-2)
