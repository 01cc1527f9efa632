"""FX snapshot of the seed pattern: what the rewritten region looks like, normalised."""

import torch
from expecttest import TestCase

from examples.moe_model import MoEBlock, TinyMoELM
from inductor_moe.testing import compile_and_capture


class ModuleListSnapshot(TestCase):
    def test_block_with_bias_and_top3(self):
        torch.manual_seed(0)
        m = MoEBlock(64, 32, num_experts=5, top_k=3, bias=True).eval()
        x = torch.randn(7, 64)
        with torch.no_grad():
            out, graphs = compile_and_capture(m, x)
            torch.testing.assert_close(out, m(x))
        self.assertExpectedInline("\n".join(graphs), """moe_experts_unstacked(x=float32[7,64], topk_ids=int64[7,3], topk_weights=float32[7,3], gate=5 x float32[32,64], up=5 x float32[32,64], down=5 x float32[64,32], biases=10 x float32[32] + 5 x float32[64], scales=[], global_scales=[], spec='')""")

    def test_language_model_one_call_per_layer(self):
        torch.manual_seed(0)
        m = TinyMoELM(vocab=50, hidden=32, intermediate=16, num_experts=4, top_k=2, layers=2).eval()
        tokens = torch.randint(0, 50, (2, 3))
        with torch.no_grad():
            out, graphs = compile_and_capture(m, tokens)
            torch.testing.assert_close(out, m(tokens))
        self.assertExpectedInline("\n".join(graphs), """\
moe_experts_unstacked(x=float32[6,32], topk_ids=int64[6,2], topk_weights=float32[6,2], gate=4 x float32[16,32], up=4 x float32[16,32], down=4 x float32[32,16], biases=[], scales=[], global_scales=[], spec='')
moe_experts_unstacked(x=float32[6,32], topk_ids=int64[6,2], topk_weights=float32[6,2], gate=4 x float32[16,32], up=4 x float32[16,32], down=4 x float32[32,16], biases=[], scales=[], global_scales=[], spec='')""")
