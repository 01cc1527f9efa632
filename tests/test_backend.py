"""The backend as a user meets it: by name, options, config, report, logs, cache, fallbacks."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import inductor_moe
from inductor_moe import config, report
from examples.moe_model import MoEBlock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": ROOT, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, cwd=ROOT, timeout=600)


def block_and_input(seed=0, T=6, dtype=torch.float32):
    torch.manual_seed(seed)
    return MoEBlock(64, 32, 4, 2).to(dtype).eval(), torch.randn(T, 64, dtype=dtype)


def test_backend_by_name_without_importing_us_and_cache_hit_in_fresh_process(tmp_path):
    code = """
        import torch
        from torch._dynamo.utils import counters
        from examples.moe_model import MoEBlock
        torch.manual_seed(0)
        m, x = MoEBlock(64, 32, 4, 2).eval(), torch.randn(5, 64)
        with torch.no_grad():
            out = torch.compile(m, backend="inductor_moe")(x)
            assert torch.allclose(out, m(x), rtol=1e-5, atol=1e-6)
        import sys
        calls = counters["inductor"]
        print("HIT", calls["fxgraph_cache_hit"], "MISS", calls["fxgraph_cache_miss"],
              "OURS", "inductor_moe.backend" in sys.modules)
    """
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
    first = run_python(code, **env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "HIT 0 MISS 1 OURS True" in first.stdout
    second = run_python(code, **env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "HIT 1 MISS 0" in second.stdout


def test_cache_key_changes_with_our_config():
    from inductor_moe.passes import InductorMoEPass
    a = InductorMoEPass(config.get_config_copy())
    with config.patch(moe_weight_format="mxfp4"):
        b = InductorMoEPass(config.get_config_copy())
    assert a.uuid() != b.uuid()
    assert a.uuid() == InductorMoEPass(config.get_config_copy()).uuid()


class DenseModel(nn.Module):
    """No MoE, no FP4: a SwiGLU MLP with a norm, which must be compiled exactly as Inductor does."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.gate, self.up, self.down = nn.Linear(64, 128), nn.Linear(64, 128), nn.Linear(128, 64)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def post_grad_graph(model, x, backend):
    import torch._inductor.config as ic
    seen = []
    torch._dynamo.reset()
    with ic.patch(post_grad_custom_post_pass=lambda g: seen.append(str(g)), fx_graph_cache=False):
        out = torch.compile(model, backend=backend)(x)
    return out, seen


def test_no_moe_model_same_graph_and_outputs_as_inductor():
    torch.manual_seed(0)
    model, x = DenseModel().eval(), torch.randn(8, 64)
    with torch.no_grad(), report() as r:
        ours, our_graphs = post_grad_graph(model, x, "inductor_moe")
        theirs, their_graphs = post_grad_graph(model, x, "inductor")
    assert our_graphs == their_graphs and len(our_graphs) == 1
    assert torch.equal(ours, theirs)
    assert r.matches == [] and r.skipped == []


def test_report_names_pattern_and_lowering():
    m, x = block_and_input()
    with torch.no_grad(), report() as r:
        out = torch.compile(m, backend="inductor_moe")(x)
    assert [(s.kind, s.pattern) for s in r.matches] == [("moe", "modulelist_loop")]
    assert r.matches[0].lowering  # e.g. "reference (cpu)" here, a Triton kernel on a GPU
    assert "modulelist_loop" in r.summary()
    torch.testing.assert_close(out, m(x))


def test_options_configure_us_and_pass_the_rest_to_inductor():
    m, x = block_and_input()
    with torch.no_grad(), report() as r:
        torch.compile(m, backend="inductor_moe", options={"moe_rewrite": False, "max_autotune": False})(x)
    assert r.matches == []
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(Exception, match="moe_weight_format='int3'"):
        torch.compile(m, backend="inductor_moe", options={"moe_weight_format": "int3"})(x)


def test_config_patch_and_environment_variable():
    m, x = block_and_input()
    with torch.no_grad(), report() as r, config.patch(moe_rewrite=False):
        torch.compile(m, backend="inductor_moe")(x)
    assert r.matches == []
    result = run_python("""
        import torch, inductor_moe
        from examples.moe_model import MoEBlock
        m, x = MoEBlock(64, 32, 4, 2).eval(), torch.randn(5, 64)
        with torch.no_grad(), inductor_moe.report() as r:
            torch.compile(m, backend="inductor_moe")(x)
        print("MATCHES", len(r.matches), inductor_moe.config.moe_rewrite)
    """, INDUCTOR_MOE_REWRITE="0")
    assert "MATCHES 0 False" in result.stdout, result.stderr[-2000:]


def test_moe_weight_format_opt_in_quantises_and_stays_close():
    m, x = block_and_input(T=16)
    with torch.no_grad(), report() as r:
        out = torch.compile(m, backend="inductor_moe", options={"moe_weight_format": "mxfp4"})(x)
        ref = m(x)
    assert "quantize_weights=mxfp4" in r.matches[0].detail
    err = ((out - ref).norm() / ref.norm()).item()
    assert 1e-4 < err < 0.3  # numerics change (only) because the user asked for mxfp4


def test_internal_pattern_error_is_recorded_and_graph_left_to_inductor(monkeypatch):
    from inductor_moe.patterns import modulelist_loop

    def broken(graph):
        raise KeyError("boom")

    monkeypatch.setattr(modulelist_loop, "find", broken)
    m, x = block_and_input()
    with torch.no_grad(), report() as r, config.patch(fallback="silent"):
        out = torch.compile(m, backend="inductor_moe")(x)
    assert r.matches == [] and "internal error in pattern: KeyError" in r.skipped[0].reason
    torch.testing.assert_close(out, m(x))
    torch._dynamo.reset()
    with torch.no_grad(), config.patch(fallback="raise"), pytest.raises(Exception, match="boom"):
        torch.compile(m, backend="inductor_moe")(x)


def test_fallback_warn_policy_warns_once_with_reason():
    m, x = block_and_input()
    for expert in m.experts:  # ReLU^2 experts: must not be treated as SwiGLU
        expert.forward = lambda h, e=expert: e.down_proj(F.relu(e.gate_proj(h)) ** 2 * e.up_proj(h))
    with torch.no_grad(), report() as r, config.patch(fallback="warn"), pytest.warns(UserWarning, match="activation"):
        out = torch.compile(m, backend="inductor_moe")(x)
    assert r.matches == [] and "activation" in r.skipped[0].reason
    torch.testing.assert_close(out, m(x))


def test_training_graph_is_left_alone_and_gradients_are_right():
    m, x = block_and_input()
    x.requires_grad_(True)
    with report() as r, config.patch(fallback="silent"):
        out = torch.compile(m, backend="inductor_moe")(x)
    out.sum().backward()
    grad = x.grad.clone()
    x.grad = None
    m(x).sum().backward()
    torch.testing.assert_close(grad, x.grad)
    assert r.matches == [] and any("used outside" in s.reason for s in r.skipped)


def test_torch_logs_shows_our_decisions():
    result = run_python("""
        import torch
        from examples.moe_model import MoEBlock
        m, x = MoEBlock(64, 32, 4, 2).eval(), torch.randn(5, 64)
        with torch.no_grad():
            torch.compile(m, backend="inductor_moe")(x)
    """, TORCH_LOGS="+inductor_moe", TORCHINDUCTOR_FX_GRAPH_CACHE="0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "moe: modulelist_loop ->" in result.stderr


def test_reduce_overhead_mode_is_accepted():
    m, x = block_and_input()
    with torch.no_grad(), report() as r:
        out = torch.compile(m, backend="inductor_moe", mode="reduce-overhead")(x)
    assert len(r.matches) == 1
    torch.testing.assert_close(out, m(x))
