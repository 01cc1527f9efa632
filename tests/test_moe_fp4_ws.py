"""The MoE's warp-specialised FP4 GEMMs (templates/moe_fp4_ws.py, lowering/moe_fp4_ws.py).

CPU: the gate/up row order against the accumulator's row pairing, the per-expert re-layout against
the dense GEMM's, the copy's size, the rule and every refusal.  GPU (sm_90): the layer against the
float64 reference of the same quantised inputs over formats, GLU variants, biases, both M-block
sizes, H not a multiple of the tile, out-of-range ids; every buffer the call allocates
NaN-poisoned, two runs bitwise equal; NaN stays in its token; CUDA-graph capture; and the
fallbacks (config off, scales above 2, no memory for the copy, a weight first seen in capture).
"""

from __future__ import annotations

import pytest
import torch

from inductor_moe.lowering import moe_fp4_ws as rule
from inductor_moe.spec import MoESpec
from inductor_moe.templates.fp4_gemm_ws import W_ROWS, fp4_ws_weight_layout
from inductor_moe.templates.moe_fp4_ws import l1_row_order, layout_bytes, moe_fp4_ws_layout

sm90 = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9),
                          reason="needs an sm_90 GPU (wgmma)")


@pytest.mark.parametrize("interleaved", [False, True])
def test_l1_row_order_pairs_gate_and_up_in_one_thread(interleaved):
    """wgmma's accumulator gives a thread rows r and r + 8 of each 16: they must be the gate and up
    rows of one intermediate column, and tile j (128 rows) must hold columns [64 j, +64)."""
    I = 192
    order = l1_row_order(I, interleaved)
    assert sorted(order.tolist()) == list(range(2 * I))  # a permutation of w13's rows

    def column(row):
        return row // 2 if interleaved else row % I

    def is_up(row):
        return row % 2 == 1 if interleaved else row >= I

    for p in range(2 * I):
        row = int(order[p])
        if (p // 8) % 2 == 0:
            partner = int(order[p + 8])
            assert not is_up(row) and is_up(partner) and column(row) == column(partner)
        assert p // W_ROWS == column(row) // 64  # the tile's 64 columns
        # the epilogue's column of accumulator row r = p % 64 in warpgroup (p % 128) // 64
        r, wg = p % 64, (p % 128) // 64
        assert column(row) == (p // 128) * 64 + wg * 32 + (r // 16) * 8 + r % 8


@pytest.mark.parametrize("nv", [False, True])
def test_expert_stack_layout_is_each_experts_own(nv):
    """The stacked re-layout is the dense GEMM's re-layout of each expert, back to back, with N
    padded per expert (H = 160: not a multiple of the 128-row tile)."""
    g = torch.Generator().manual_seed(0)
    E, N, K = 3, 160, 128
    G = 16 if nv else 32
    w = torch.randint(0, 256, (E, N, K // 2), dtype=torch.uint8, generator=g)
    s = torch.randint(100, 130, (E, N, K // G), dtype=torch.uint8, generator=g)
    codes, scales = moe_fp4_ws_layout(w, s, nv, None)
    per = [fp4_ws_weight_layout(w[e], s[e], nv) for e in range(E)]
    assert torch.equal(codes, torch.cat([c for c, _ in per]))
    assert torch.equal(scales, torch.cat([sc for _, sc in per]))
    assert codes.numel() + scales.numel() == layout_bytes(w, s, nv)
    # w13: the rows in l1_row_order first
    w13 = torch.randint(0, 256, (E, 2 * 64, K // 2), dtype=torch.uint8, generator=g)
    s13 = torch.randint(100, 130, (E, 2 * 64, K // G), dtype=torch.uint8, generator=g)
    order = l1_row_order(64, True)
    codes, _ = moe_fp4_ws_layout(w13, s13, nv, "interleaved")
    assert torch.equal(codes, fp4_ws_weight_layout(w13[:, order], s13[:, order], nv)[0])


def _why(fmt="mxfp4", x_dtype=torch.bfloat16, pairs=128 * 8, E=8, H=256, I=128, fits=True, arch=9,
         interpreting=False, setting=True, spec="", opted_in=True):
    s = MoESpec.from_str(",".join(p for p in (spec, f"weight_format={fmt}") if p))
    return rule.fp4_ws_reason(s, fmt, x_dtype, pairs, E, H, I, fits, arch, interpreting, setting, opted_in)


def test_rule_and_refusals():
    assert _why() is None and _why("nvfp4", fits=None) is None
    assert "opt-in" in _why(opted_in=False)
    assert "warp_specialized" in _why(setting=False)
    assert "bf16 activations" in _why(x_dtype=torch.float16)
    assert "bf16 activations" in _why(spec="act_format=fp8_mx32")
    assert "bf16 activations" in _why("fp8_block128")
    assert "sm_90" in _why(arch=10) and "sm_90" in _why(interpreting=True)
    assert "scales" in _why(fits=False)
    assert "multiples of 64" in _why(H=2880 + 32) and "multiples of 64" in _why(I=96)
    assert "pairs per expert" in _why(pairs=127 * 8)
    assert rule.fp4_ws_tokens(511 * 8, 8) == 128 and rule.fp4_ws_tokens(512 * 8, 8) == 256


# ------------------------------------------------------------------------------ GPU

def _inputs(T, E, H, I, k, fmt, **kw):
    from test_moe_kernels import _gpu_inputs

    return _gpu_inputs(T, E, H, I, k, fmt, **kw)


def _run(x, ids, tw, w13, w2, spec, kw, **extra):
    from inductor_moe.lowering.moe import fused_moe_experts

    return fused_moe_experts(x, ids, tw, w13, w2, MoESpec.from_str(spec), kw.get("w13_scale"), kw.get("w2_scale"),
                             kw.get("b13"), kw.get("b2"), kw.get("w13_global_scale"), kw.get("w2_global_scale"),
                             **extra)


def _reference(x, ids, tw, w13, w2, spec, kw):
    from inductor_moe.ops.moe_experts import moe_experts_reference

    f64 = {n: (v.double() if v.dtype in (torch.bfloat16, torch.float16) else v) for n, v in kw.items()}
    return moe_experts_reference(x.double(), ids, tw.double(), w13, w2, spec, **f64)


@pytest.fixture
def ws_calls(monkeypatch):
    """The M-block rows of every warp-specialised FP4 launch the lowering makes (opted in)."""
    from inductor_moe import config
    from inductor_moe.lowering import moe

    monkeypatch.setattr(config, "moe_fp4_ws", True)
    calls = []
    real = moe.launch_fp4_ws

    def spy(*args, **kwargs):
        calls.append(args[8])  # tokens
        return real(*args, **kwargs)

    monkeypatch.setattr(moe, "launch_fp4_ws", spy)
    return calls


def _check(case, ws_calls, tokens, label):
    from test_moe_kernels import TOL, _Poison

    x, ids, tw, w13, w2, spec, kw, fmt = case
    with _Poison():
        out = _run(x, ids, tw, w13, w2, spec, kw)
        again = _run(x, ids, tw, w13, w2, spec, kw)
    assert ws_calls and set(ws_calls) == {tokens}, f"{label}: ran {ws_calls}"
    ref = _reference(x, ids, tw, w13, w2, spec, kw)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert not out.isnan().any(), label
    assert torch.equal(out, again), f"two runs differ bitwise: {label}"
    assert err <= TOL[fmt], f"rel err {err:.3g}: {label}"
    return out


VARIANTS = [
    dict(spec_extra="", bias=False),
    dict(spec_extra="gate_up=interleaved,alpha=1.702,limit=7.0,up_offset=1.0", bias=True),  # gpt-oss
    dict(spec_extra="activation=gelu,weight_position=before_down", bias=True),
    dict(spec_extra="activation=gelu_tanh,limit=10.0", bias=False, gate_up_gscales=True),
]


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_gpu_layer_matches_reference(fmt, variant, ws_calls):
    """128-row blocks at H = 2880 (L2's last tile half empty, 45 K steps) with out-of-range ids, and
    256-row blocks at I % 128 == 64 (L1's tiles are 64 columns)."""
    v = dict(VARIANTS[variant])
    if v.get("gate_up_gscales") and fmt != "nvfp4":
        v.pop("gate_up_gscales")
    for (T, E, H, I, k), tokens in (((520, 8, 2880, 320, 2), 128), ((2100, 8, 512, 192, 2), 256)):
        ws_calls.clear()
        spec, x, ids, tw, w13, w2, kw = _inputs(T, E, H, I, k, fmt, seed=T, bad_ids=True, **v)
        _check((x, ids, tw, w13, w2, spec, kw, fmt), ws_calls, tokens, f"{fmt} T={T} H={H} I={I} {v}")


@pytest.mark.gpu
@sm90
def test_gpu_nan_stays_in_its_token(ws_calls):
    spec, x, ids, tw, w13, w2, kw = _inputs(600, 8, 256, 128, 2, "mxfp4", seed=3)
    x[7, 5] = float("nan")
    out = _run(x, ids, tw, w13, w2, spec, kw)
    assert ws_calls
    assert out[7].isnan().all() and not out[torch.arange(600) != 7].isnan().any()


@pytest.mark.gpu
@sm90
def test_gpu_capture_replays_and_falls_back_for_new_weights(ws_calls):
    """Warm (the copies made) -> a graph replays the same bits; weights first seen during capture
    have no copy: that call runs the Triton tiles, still right."""
    from test_moe_kernels import TOL

    spec, x, ids, tw, w13, w2, kw = _inputs(600, 8, 256, 128, 2, "nvfp4", seed=4)
    eager = _run(x, ids, tw, w13, w2, spec, kw)
    n_eager = len(ws_calls)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = _run(x, ids, tw, w13, w2, spec, kw)
    g.replay()
    assert len(ws_calls) == n_eager + 1 and torch.equal(out, eager)

    _, _, _, _, w13b, w2b, kwb = _inputs(600, 8, 256, 128, 2, "nvfp4", seed=5)
    g2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g2):
        out2 = _run(x, ids, tw, w13b, w2b, spec, kwb)
    g2.replay()
    assert len(ws_calls) == n_eager + 1  # not the warp-specialised GEMMs
    ref = _reference(x, ids, tw, w13b, w2b, spec, kwb)
    assert ((out2.double() - ref).norm() / ref.norm()).item() <= TOL["nvfp4"]


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("why", ["not opted in", "config off", "scales above 2", "no memory for the copy",
                                 "few pairs per expert"])
def test_gpu_fallbacks_run_the_triton_tiles(why, ws_calls, monkeypatch):
    from inductor_moe import config
    from test_moe_kernels import TOL

    T = 100 if why == "few pairs per expert" else 600
    spec, x, ids, tw, w13, w2, kw = _inputs(T, 8, 256, 128, 2, "mxfp4", seed=6)
    if why == "not opted in":
        monkeypatch.setattr(config, "moe_fp4_ws", False)
    elif why == "config off":
        monkeypatch.setattr(config, "warp_specialized", False)
    elif why == "scales above 2":
        kw["w13_scale"] = kw["w13_scale"].clone()
        kw["w13_scale"].view(torch.uint8)[0, 0, 0] = 130  # one block scaled by 8: still a valid weight
    elif why == "no memory for the copy":
        monkeypatch.setattr(rule, "FREE_MEMORY_RESERVE", 1.0)
    out = _run(x, ids, tw, w13, w2, spec, kw)
    assert not ws_calls
    ref = _reference(x, ids, tw, w13, w2, spec, kw)
    assert ((out.double() - ref).norm() / ref.norm()).item() <= TOL["mxfp4"]
