"""Dense expert weights through TMA descriptors (lowering/moe_tma.py).

CPU: when the descriptors may be used, and the views they take of every weight layout.  The
kernels themselves run interpreted in test_moe_kernels.py (the ``tma_*`` cases); on a GPU below,
the TMA path against the pointer loads (bitwise) and the float64 reference, every layout.
"""

from __future__ import annotations

import pytest
import torch

from inductor_moe.lowering.moe_plan import GemmTiles, choose_moe_config
from inductor_moe.lowering.moe_tma import TMA_MIN_BLOCK_M, _views, weight_tma_reason
from inductor_moe.spec import MoESpec

E, H, I = 4, 256, 192


def _weights(spec, dtype=torch.bfloat16):
    if spec.transposed:
        return torch.zeros(E, H, 2 * I, dtype=dtype), torch.zeros(E, I, H, dtype=dtype)
    return torch.zeros(E, 2 * I, H, dtype=dtype), torch.zeros(E, H, I, dtype=dtype)


def _prefill_config(**overrides):
    cfg = choose_moe_config(4096, 8, E, H, I, "dense", 132)
    assert cfg.block_m >= TMA_MIN_BLOCK_M and cfg.weight_tma is None
    return cfg.replace(**overrides)


def _reason(spec=None, cfg=None, fmt="dense", x_dtype=torch.bfloat16, w13=None, w2=None, arch_major=9,
            interpreting=False, use_mega=False):
    spec = spec or MoESpec()
    d13, d2 = _weights(spec)
    return weight_tma_reason(spec, fmt, x_dtype, d13 if w13 is None else w13, d2 if w2 is None else w2,
                             cfg or _prefill_config(), arch_major=arch_major, interpreting=interpreting,
                             use_mega=use_mega)


@pytest.mark.parametrize("spec", ["", "gate_up=interleaved", "transposed=True", "gate_up=interleaved,transposed=True"])
def test_prefill_calls_take_tma_in_every_layout(spec):
    assert _reason(MoESpec.from_str(spec)) is None


def test_tma_refusals_name_their_reason():
    assert "64" in _reason(cfg=_prefill_config(block_m=32))  # auto: measured slower below 64 rows
    assert _reason(cfg=_prefill_config(block_m=32, weight_tma=True)) is None  # forced on
    assert "off in the plan" in _reason(cfg=_prefill_config(weight_tma=False))
    assert "fp8_block128" in _reason(fmt="fp8_block128")
    assert "fp8_mx32" in _reason(spec=MoESpec(act_format="fp8_mx32"))
    assert "dtype" in _reason(x_dtype=torch.float16)
    assert "persistent" in _reason(use_mega=True)
    assert "two dots" in _reason(cfg=_prefill_config(gate_up_one_dot=False))
    assert "sm_90" in _reason(arch_major=8)
    assert _reason(arch_major=8, interpreting=True) is None
    w13, _ = _weights(MoESpec())
    strided = torch.zeros(E, H, 2 * I, dtype=torch.bfloat16).transpose(1, 2)  # [E, 2I, H], K not innermost
    assert "innermost" in _reason(w13=strided)
    assert "16-byte" in _reason(w13=torch.zeros(E * 2 * I * H + 1, dtype=torch.bfloat16)[1:].view(E, 2 * I, H))
    odd_rows = torch.zeros(E, 2 * I, H + 4, dtype=torch.bfloat16)[:, :, :H]  # row stride 520 bytes
    assert "16-byte" in _reason(w13=odd_rows)
    assert "box" in _reason(cfg=_prefill_config(gemm2=GemmTiles(512, 64, 8, 3)))


def test_views_put_gate_then_up_columns_in_one_box():
    """The non-interleaved w13 is seen as [E, 2, I, H] (or [E, H, 2, I]): a box of BN rows of each
    half; interleaved rows are one box of 2 BN rows; the shapes cover exactly the tensor."""
    bn1, bk1, bn2, bk2 = 64, 32, 128, 64
    for text, k_major in (("", True), ("transposed=True", False)):
        spec = MoESpec.from_str(text)
        w13, w2 = _weights(spec)
        (shape, strides, block), (shape2, strides2, block2), km = _views(spec, w13, w2, bn1, bk1, bn2, bk2)
        assert km == k_major
        view = torch.as_strided(w13, shape, strides)
        ref = w13.view(E, 2, I, H) if k_major else w13.view(E, H, 2, I)
        assert torch.equal(view, ref) and view.data_ptr() == w13.data_ptr()
        assert block == ([1, 2, bn1, bk1] if k_major else [1, bk1, 2, bn1])
        assert shape2 == list(w2.shape) and block2 == ([1, bn2, bk2] if k_major else [1, bk2, bn2])
    spec = MoESpec(gate_up="interleaved")
    w13, w2 = _weights(spec)
    (shape, _, block), _, _ = _views(spec, w13, w2, bn1, bk1, bn2, bk2)
    assert shape == [E, 2 * I, H] and block == [1, 2 * bn1, bk1]


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["", "gate_up=interleaved,alpha=1.702,limit=7.0,up_offset=1.0",
                                  "transposed=True", "gate_up=interleaved,transposed=True"])
def test_cuda_tma_weight_tiles_match_pointer_loads_and_reference(spec):
    from inductor_moe.lowering.moe import fused_moe_experts
    from inductor_moe.ops.moe_experts import moe_experts_reference
    from inductor_moe.testing import counting_weight_tma

    g = torch.Generator(device="cuda").manual_seed(3)
    s = MoESpec.from_str(spec)
    T, E_, k, H_, I_ = 2000, 8, 4, 2880 // 4, 720  # I not a multiple of the tiles, H = 720 = 11.25 x 64
    x = torch.randn(T, H_, device="cuda", generator=g).bfloat16()
    tw, ids = torch.randn(T, E_, device="cuda", generator=g).softmax(-1).topk(k, dim=-1)
    ids = ids.int()
    ids[0, 0] = E_  # out of range: contributes nothing
    shape13, shape2 = ((E_, H_, 2 * I_), (E_, I_, H_)) if s.transposed else ((E_, 2 * I_, H_), (E_, H_, I_))
    w13 = (torch.randn(*shape13, device="cuda", generator=g) / H_ ** 0.5).bfloat16()
    w2 = (torch.randn(*shape2, device="cuda", generator=g) / I_ ** 0.5).bfloat16()
    b13 = (torch.randn(E_, 2 * I_, device="cuda", generator=g) * 0.1).bfloat16()
    cfg = choose_moe_config(T, k, E_, H_, I_, "dense", torch.cuda.get_device_properties(0).multi_processor_count)
    assert cfg.block_m >= TMA_MIN_BLOCK_M
    with counting_weight_tma() as calls:
        tma = fused_moe_experts(x, ids, tw, w13, w2, s, b13=b13, kernel_config=cfg, use_mega=False)
    assert calls, "the call did not take the TMA weight tiles"
    ptr = fused_moe_experts(x, ids, tw, w13, w2, s, b13=b13, kernel_config=cfg.replace(weight_tma=False),
                            use_mega=False)
    assert not torch.isnan(tma).any()
    assert torch.equal(tma, ptr)  # same tiles, same MMA order: only the loads differ
    ref = moe_experts_reference(x.double(), ids, tw.double(), w13.double(), w2.double(), s, b13=b13.double())
    assert ((tma.double() - ref).norm() / ref.norm()).item() < 1e-2
