"""Bad input to the FP4 canonical ops gives clear errors (the reference op validates)."""

import pytest
import torch

from inductor_moe import formats
from inductor_moe.ops.block_scaled_mm import block_scaled_mm_reference

op = torch.ops.inductor_moe


def operands(n=32, k=64):
    q, s = formats.quantize_mxfp4(torch.randn(n, k))
    return torch.randn(4, k, dtype=torch.bfloat16), q, s


def test_k_not_a_multiple_of_the_block():
    x, q, s = operands()
    q48 = q[:, :24].contiguous()  # K = 48
    with pytest.raises(ValueError, match="not a multiple of the mxfp4 block 32"):
        op.block_scaled_mm(x[:, :48], q48, s[:, :1].contiguous(), "")


def test_wrong_scale_shape_and_dtype():
    x, q, s = operands()
    with pytest.raises(ValueError, match=r"b_scale must be \(32, 2\)"):
        op.block_scaled_mm(x, q, s[:, :1].contiguous(), "")
    with pytest.raises(ValueError, match="b_scale for mxfp4 must be"):
        op.block_scaled_mm(x, q, s.float(), "")
    with pytest.raises(ValueError, match="b_scale for nvfp4 must be"):
        op.block_scaled_mm(x, q, s, "b_format=nvfp4")


def test_non_contiguous_packed_weight():
    x, q, s = operands()
    with pytest.raises(ValueError, match="must be contiguous"):
        op.block_scaled_mm(x, q.t().contiguous().t(), s, "")


def test_relayout_and_linear_quantized_errors():
    x, q, s = operands()
    with pytest.raises(ValueError, match="unknown layout items"):
        op.block_scaled_mm_relayout(x, q, s, "", "b_scale_sideways")
    with pytest.raises(ValueError, match="must hold"):
        op.block_scaled_mm_relayout(x, q, s, "", "b_scale_swizzled")
    with pytest.raises(ValueError, match="not a multiple of the mxfp4 block"):
        op.linear_quantized(torch.randn(2, 48), torch.randn(8, 48), None, "")


def test_relayout_matches_reference():
    x, q, s = operands()
    swapped = (q << 4) | (q >> 4)
    out = op.block_scaled_mm_relayout(x, swapped, s.reshape(-1), "", "b_high_nibble_first")
    assert torch.equal(out, block_scaled_mm_reference(x, q, s, ""))
