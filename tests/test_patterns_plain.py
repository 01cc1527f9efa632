"""Plain-PyTorch MoE blocks (tests/models_zoo.py): an ``nn.ModuleList`` loop (``torch.where`` or
Mixtral's one_hot selection, with and without bias) and 3-D expert parameters through
``torch.bmm``, ``torch.einsum`` and ``torch._grouped_mm``; any top-k, both router orders, shared
experts beside the routed ones; dynamic token counts; no extra graph breaks."""

import copy

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


def _run(model, x):
    with torch.no_grad(), inductor_moe.report() as r:
        out = torch.compile(model, backend="inductor_moe")(x)
        ref = model(x)
    return out, ref, r


def _check(model, pattern, dtype=torch.float32, T=24, golden=None):
    model = model.to(dtype).eval()
    x = torch.randn(T, Z.H, generator=torch.Generator().manual_seed(7)).to(dtype)
    out, ref, r = _run(model, x)
    assert [m.pattern for m in Z.moe_matches(r)] == [pattern], r.summary()
    if dtype == torch.float32:
        assert Z.rel_err(out, ref) < 1e-5
    else:  # against a float64 golden of the same bf16 weights, and no worse than twice eager
        golden = copy.deepcopy(golden or model).double()
        with torch.no_grad():
            gold = golden(x.double())
        assert Z.rel_err(out, gold) <= max(1e-2, 2 * Z.rel_err(ref, gold)), (Z.rel_err(out, gold), Z.rel_err(ref, gold))
    return r


# ------------------------------------------------------------------------------ ModuleList loop

@pytest.mark.parametrize("select", ["where", "one_hot"])
@pytest.mark.parametrize("bias", [False, True])
def test_loop_selection_and_bias(select, bias):
    _check(Z.LoopMoE(select=select, bias=bias), "modulelist_loop")


@pytest.mark.parametrize("top_k,router", [(1, "topk_softmax"), (4, "softmax_topk"), (6, "topk_softmax"),
                                          (8, "softmax_topk")])
def test_loop_top_k_and_router(top_k, router):
    _check(Z.LoopMoE(top_k=top_k, router=router, num_experts=8 if top_k < 8 else 12), "modulelist_loop")


def test_loop_bf16_with_shared_expert():
    """The shared expert stays outside the fused op (the match covers the routed experts only)."""
    r = _check(Z.LoopMoE(shared=True, select="one_hot"), "modulelist_loop", dtype=torch.bfloat16)
    assert "E=8 k=2" in Z.moe_matches(r)[0].detail


# ------------------------------------------------------------------------ 3-D expert parameters

@pytest.mark.parametrize("via", ["bmm", "einsum"])
@pytest.mark.parametrize("top_k", [1, 2, 4, 6, 8])
def test_stacked_gathered_any_top_k(via, top_k):
    router = "topk_softmax" if top_k % 4 == 2 else "softmax_topk"
    _check(Z.StackedMoE(via=via, top_k=top_k, num_experts=max(8, top_k + 2), router=router), "hf_batched_mm")


def test_stacked_einsum_bf16_shared_expert():
    _check(Z.StackedMoE(via="einsum", shared=True), "hf_batched_mm", dtype=torch.bfloat16)


@pytest.mark.parametrize("top_k,router", [(2, "softmax_topk"), (6, "topk_softmax")])
def test_stacked_grouped_mm(top_k, router):
    """``torch._grouped_mm`` is bf16-only; the golden runs the same weights through bmm."""
    model = Z.StackedMoE(via="grouped_mm", top_k=top_k, router=router, shared=top_k == 2)
    golden = copy.deepcopy(model)
    golden.via = "bmm"
    _check(model, "hf_grouped_mm", dtype=torch.bfloat16, golden=golden.to(torch.bfloat16))


@pytest.mark.parametrize("via,dtype", [("einsum", torch.float32), ("grouped_mm", torch.bfloat16)])
def test_stacked_weights_before_down_top1(via, dtype):
    """Routing weights scaling the activation (before the down projection), top-1."""
    model = Z.StackedMoE(via=via, top_k=1, router="topk_softmax", weigh="before_down")
    golden = copy.deepcopy(model)
    golden.via = "bmm"
    r = _check(model, "hf_batched_mm" if via == "einsum" else "hf_grouped_mm", dtype=dtype,
               golden=golden.to(dtype))
    assert "weight_position=before_down" in Z.moe_matches(r)[0].detail


# ------------------------------------------------------------------------ dynamic token count

DYNAMIC = {
    "loop": lambda: Z.LoopMoE(),
    "bmm": lambda: Z.StackedMoE(via="bmm"),
    "grouped_mm": lambda: Z.StackedMoE(via="grouped_mm").to(torch.bfloat16),
}


@pytest.mark.parametrize("form", list(DYNAMIC))
def test_dynamic_tokens_one_graph(form):
    """mark_dynamic: one graph for several T.  T = 1 and T = 0 need an unbacked size
    (``mark_unbacked``): Dynamo specialises backed sizes 0 and 1 (plain Inductor as well)."""
    torch.manual_seed(0)
    model = DYNAMIC[form]().eval()
    dtype = next(model.parameters()).dtype
    compiled, graphs = Z.compile_counted(model)
    with torch.no_grad(), inductor_moe.report() as r:
        for T in (16, 5, 33):
            x = torch.randn(T, Z.H, dtype=dtype)
            torch._dynamo.mark_dynamic(x, 0)
            assert Z.rel_err(compiled(x), model(x)) < (1e-5 if dtype == torch.float32 else 2e-2)
        assert len(graphs) == 1
        torch._dynamo.reset()
        compiled, graphs = Z.compile_counted(model)
        for T in (16, 1, 0, 7):
            x = torch.randn(T, Z.H, dtype=dtype)
            torch._dynamo.decorators.mark_unbacked(x, 0)
            out = compiled(x)
            assert out.shape == (T, Z.H)
            if T:
                assert Z.rel_err(out, model(x)) < (1e-5 if dtype == torch.float32 else 2e-2)
        assert len(graphs) == 1
    assert len(Z.moe_matches(r)) == 2, r.summary()


def test_no_graph_breaks_beyond_plain_inductor():
    """The loop form needs nonzero in the graph: with the backend's capture settings there are
    fewer breaks than with Dynamo's defaults, never more."""
    model = Z.LoopMoE().eval()
    x = torch.randn(16, Z.H)
    with torch.no_grad():
        ours = torch._dynamo.explain(model)(x)
        torch._dynamo.reset()
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=False, capture_scalar_outputs=False):
            plain = torch._dynamo.explain(model)(x)
    assert ours.graph_break_count <= plain.graph_break_count
    assert ours.graph_break_count == 0


def test_tolist_loop_is_reported_as_split():
    """A loop over ``.tolist()`` counts cannot be one graph: nothing fused, the report says why."""
    model = Z.TolistLoopMoE().eval()
    x = torch.randn(16, Z.H)
    out, ref, r = _run(model, x)
    assert not Z.moe_matches(r)
    assert any(s.pattern == "split_block" and "tolist" in s.reason for s in r.skipped), r.summary()
    assert Z.rel_err(out, ref) < 1e-5
