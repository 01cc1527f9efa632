"""FX snapshots: one model of each form, the rewritten graph printed by
``inductor_moe.testing.format_rewrites`` (canonical calls and what flows into them; no node
names, no symbol numbering).  Regenerate with ``EXPECTTEST_ACCEPT=1 pytest <this file>``."""

import torch
from expecttest import TestCase

from inductor_moe.testing import compile_and_capture

import models_zoo as Z


def _hf(family, impl, dtype):
    model = Z.hf_model(family, impl, dtype, layers=1)
    with torch.no_grad():
        out, graphs = compile_and_capture(model, Z.token_ids(batch=1, seq=6))
    return "\n".join(g for g in graphs if g)


def _plain(model, dtype=torch.float32):
    torch.manual_seed(0)
    model = model.to(dtype).eval()
    with torch.no_grad():
        out, graphs = compile_and_capture(model, torch.randn(6, Z.H, dtype=dtype))
    return "\n".join(g for g in graphs if g)


class HFSnapshots(TestCase):
    def test_mixtral_grouped_mm_bf16(self):
        self.assertExpectedInline(_hf("mixtral", "grouped_mm", torch.bfloat16), """moe_experts(x=bfloat16[6,64], topk_ids=int64[6,2], topk_weights=float32[6,2], w13=bfloat16[8,64,64], w2=bfloat16[8,64,32], spec='')""")

    def test_mixtral_grouped_mm_fallback_op_fp32(self):
        self.assertExpectedInline(_hf("mixtral", "grouped_mm", torch.float32), """moe_experts(x=float32[6,64], topk_ids=int64[6,2], topk_weights=float32[6,2], w13=float32[8,64,64], w2=float32[8,64,32], spec='')""")

    def test_gpt_oss_grouped_mm_bf16(self):
        self.assertExpectedInline(_hf("gpt_oss", "grouped_mm", torch.bfloat16), """moe_experts(x=bfloat16[6,64], topk_ids=int64[6,2], topk_weights=bfloat16[6,2], w13=bfloat16[8,64,64], w2=bfloat16[8,32,64], spec='alpha=1.702,limit=7.0,up_offset=1.0,gate_up=interleaved,transposed=True', b13=bfloat16[8,64], b2=bfloat16[8,64])""")

    def test_qwen3_moe_batched_mm_fp32(self):
        self.assertExpectedInline(_hf("qwen3_moe", "batched_mm", torch.float32), """moe_experts(x=float32[6,64], topk_ids=int64[6,4], topk_weights=float32[6,4], w13=float32[8,64,64], w2=float32[8,64,32], spec='')""")

    def test_deepseek_v4_hash_layer_grouped_mm_bf16(self):
        self.assertExpectedInline(_hf("deepseek_v4", "grouped_mm", torch.bfloat16), """moe_experts(x=bfloat16[6,64], topk_ids=int64[6,2], topk_weights=bfloat16[6,2], w13=bfloat16[8,64,64], w2=bfloat16[8,64,32], spec='limit=10.0')""")


class PlainSnapshots(TestCase):
    def test_einsum_top1(self):
        self.assertExpectedInline(_plain(Z.StackedMoE(via="einsum", top_k=1)), """moe_experts(x=float32[6,64], topk_ids=int64[6,1], topk_weights=float32[6,1], w13=float32[8,64,64], w2=float32[8,64,32], spec='')""")

    def test_grouped_mm_bf16(self):
        self.assertExpectedInline(_plain(Z.StackedMoE(via="grouped_mm"), torch.bfloat16), """moe_experts(x=bfloat16[6,64], topk_ids=int64[6,2], topk_weights=bfloat16[6,2], w13=bfloat16[8,64,64], w2=bfloat16[8,64,32], spec='')""")

    def test_modulelist_one_hot_with_bias(self):
        self.assertExpectedInline(_plain(Z.LoopMoE(num_experts=4, select="one_hot", bias=True)), """moe_experts_unstacked(x=float32[6,64], topk_ids=int64[6,2], topk_weights=float32[6,2], gate=4 x float32[32,64], up=4 x float32[32,64], down=4 x float32[64,32], biases=8 x float32[32] + 4 x float32[64], scales=[], global_scales=[], spec='')""")
