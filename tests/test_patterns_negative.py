"""Regions that must NOT become the MoE op: each asserts zero ``moe`` matches and that the
compiled output still equals eager."""

import pytest
import torch

import inductor_moe

import models_zoo as Z


@pytest.fixture(autouse=True)
def _silent_fallback():
    """Skips are asserted through the report; "warn" would also mark each reason as warned-once
    for the whole process and hide it from later tests."""
    with inductor_moe.config.patch(fallback="silent"):
        yield


def _no_match(model, T=16):
    model = model.eval()
    x = torch.randn(T, Z.H, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), inductor_moe.report() as r:
        out = torch.compile(model, backend="inductor_moe")(x)
        ref = model(x)
    assert not Z.moe_matches(r), r.summary()
    for o, e in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
        assert Z.rel_err(o, e) < 1e-5
    return r


def test_dense_swiglu_mlp():
    r = _no_match(Z.SwiGLU(Z.H, Z.I))
    assert not r.skipped


@pytest.mark.parametrize("form", ["loop", "stacked"])
def test_relu_squared_experts_are_not_swiglu(form):
    model = Z.LoopMoE(act="relu2") if form == "loop" else Z.StackedMoE(via="bmm", act="relu2")
    r = _no_match(model)
    assert any("activation" in s.reason for s in r.skipped), r.summary()


@pytest.mark.parametrize("combine", ["max", "unweighted"])
def test_combine_that_is_not_a_weighted_sum(combine):
    _no_match(Z.StackedMoE(via="bmm", combine=combine))


def test_intermediate_used_outside_the_region():
    """The model also returns the experts' per-row outputs: fusing would lose them."""
    r = _no_match(Z.StackedMoE(via="einsum", leak=True))
    assert any("used outside" in s.reason for s in r.skipped), r.summary()
