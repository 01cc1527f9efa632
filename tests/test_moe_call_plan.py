"""The launcher's call plans (lowering/moe.py: _call_plan): made once per call signature, never
shared across what changes a decision, holding no tensors; and the persistent launch's argument
routing (lowering/moe_mega.py: MegaLaunch) against the kernel's full argument build."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_moe_kernels import _case, _inputs  # noqa: E402


def _plan(case, seed=0, **overrides):
    from inductor_moe.lowering import moe

    s, _, x, ids, tw, w13, w2, extra, b13, b2 = _inputs(case, torch.Generator().manual_seed(seed))
    args = dict(w13_scale=extra.get("w13_scale"), w2_scale=extra.get("w2_scale"), b13=b13, b2=b2,
                w13_global_scale=extra.get("w13_global_scale"), w2_global_scale=extra.get("w2_global_scale"),
                kernel_config=None, use_pdl=None, use_mega=None, use_cuda_decode=None)
    args.update(overrides)
    return moe._call_plan(x, ids, tw, w13, w2, s, **args)


@pytest.fixture
def plans():
    from inductor_moe.lowering import moe

    moe._PLANS.clear()
    yield moe._PLANS
    moe._PLANS.clear()


def test_one_plan_per_signature(plans):
    """Fresh inputs of the same shapes reuse the plan; another token count, dtype or setting
    makes its own; a call given its tiles (the tuner) is planned afresh and not kept."""
    from inductor_moe import config

    case = _case("plan", T=5, E=8, H=64, I=32, k=2)
    first = _plan(case, seed=0)
    assert len(plans) == 1 and _plan(case, seed=1) is first
    other_t = _plan(_case("plan_t", T=7, E=8, H=64, I=32, k=2))
    assert other_t is not first and len(plans) == 2
    assert _plan(_case("plan_fp16", T=5, E=8, H=64, I=32, k=2, dtype="float16")) is not first
    with config.patch(warp_specialized=False):
        patched = _plan(case)
    assert patched is not first and _plan(case) is first  # the setting back: the first plan again
    given = _plan(case, kernel_config=first.cfg)
    assert given is not first and given.cfg == first.cfg and len(plans) == 4


def test_plans_follow_the_tuned_tables(plans):
    """A tuning remembered or the tables forgotten can change the tiles: the plan is made again."""
    from inductor_moe.lowering import moe_tune_cache

    case = _case("plan_tables", T=5, E=8, H=64, I=32, k=2)
    first = _plan(case)
    stamp = moe_tune_cache.generation()
    moe_tune_cache.clear()
    assert moe_tune_cache.generation() != stamp
    again = _plan(case)
    assert again is not first and again.cfg == first.cfg


@pytest.mark.parametrize("fmt", ["dense", "fp8_block128", "mxfp4", "nvfp4"])
def test_plans_hold_no_tensors(plans, fmt):
    """A plan outlives its call: a tensor in it would keep freed activations or weights alive."""
    plan = _plan(_case(f"plan_{fmt}", T=5, E=8, H=128, I=64, k=2, weight_format=fmt, bias=True))

    def tensors(value):
        if isinstance(value, torch.Tensor):
            return 1
        if isinstance(value, dict):
            return sum(tensors(v) for v in value.values())
        if isinstance(value, (tuple, list)):
            return sum(tensors(v) for v in value)
        return 0

    assert plan.l1_kw["WEIGHT_FORMAT"] is not None
    assert sum(tensors(getattr(plan, name)) for name in type(plan).__slots__) == 0


def test_mxfp4_plans_know_each_weights_scales(plans):
    """Two MXFP4 layers of one shape: the swapped tiles fold the e8m0 scale into the decode only
    where every scale fits (mxfp4_scales_in_decode); a layer whose scales do not must get its own
    plan, unswapped, not the first layer's."""
    from inductor_moe.lowering import moe

    case = _case("plan_mx", T=5, E=8, H=128, I=64, k=2, weight_format="mxfp4")
    s, _, x, ids, tw, w13, w2, extra, _, _ = _inputs(case, torch.Generator().manual_seed(0))
    s13, s2 = extra["w13_scale"], extra["w2_scale"]
    s13.view(torch.uint8).clamp_(max=127)
    s2.view(torch.uint8).clamp_(max=127)
    big = s13.clone()
    big.view(torch.uint8)[0, 0, 0] = 200  # a scale of 2^73: not foldable
    kw = dict(b13=None, b2=None, w13_global_scale=None, w2_global_scale=None, kernel_config=None, use_pdl=None,
              use_mega=None, use_cuda_decode=None)
    fits = moe._call_plan(x, ids, tw, w13, w2, s, s13, s2, **kw)
    other = moe._call_plan(x, ids, tw, w13.clone(), w2, s, big, s2, **kw)
    assert fits.swap_ab and not other.swap_ab and other is not fits
    assert moe._call_plan(x, ids, tw, w13, w2, s, s13, s2, **kw) is fits  # each found again
    assert moe._call_plan(x, ids, tw, w13, w2, s, big, s2, **kw) is other


def test_mega_launch_routes_what_mega_arguments_builds(monkeypatch):
    """MegaLaunch works out once which L1 / L2 argument feeds each persistent-kernel argument;
    per call it must hand the kernel exactly what mega_arguments builds from that call's own
    arguments (new tensors, same signature)."""
    from inductor_moe.lowering import moe, moe_mega
    from inductor_moe.lowering.moe_plan import choose_moe_config
    from inductor_moe.spec import MoESpec
    from inductor_moe.templates import moe_mega as _compiled_kernels  # noqa: F401
    from inductor_moe.templates.moe_gemm1 import moe_gemm1_kernel
    from inductor_moe.templates.moe_gemm2 import moe_gemm2_kernel

    # the grid without compiling anything; the templates are imported first, else their kernels
    # would be made interpreted for the rest of the process (Triton reads the variable at decoration)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    spec = MoESpec()
    cfg = choose_moe_config(1, 8, 128, 2048, 768, "dense", 132)
    l1_kw = moe.gemm1_constexprs(spec, cfg, "dense", False, True, 2048, True, intermediate=768)
    l2_kw = moe.gemm2_constexprs(spec, cfg, "dense", False, True, 768, True)

    def call_args():
        t = lambda *shape: torch.empty(shape)  # noqa: E731
        shared = (t(8), t(8), t(8), t(8))  # sorted ids, block experts, starts, counts
        tw, inter, inter_s = t(1, 8), t(8, 768), t(1)
        l1 = (t(1, 2048), t(4), t(4), t(4), t(4), tw, inter, *shared, t(1), inter_s, 2048, 768, 8,
              2048, 1, 2, 3, 0, 0, 0, 1536, 0, 0, 1.0, 0.0, 0.0)
        l2 = (inter, t(4), t(4), t(4), t(4), tw, t(8, 2048), *shared, inter_s, 2048, 768,
              5, 6, 7, 0, 0, 0, 2048, 0)
        return l1, l2

    l1, l2 = call_args()
    launch = moe_mega.MegaLaunch(moe_gemm1_kernel, l1, l1_kw, moe_gemm2_kernel, l2, l2_kw, ready=torch.empty(8),
                                 max_blocks=8, num_sms=132, pdl={"launch_pdl": True})
    seen = {}

    class Recorder:
        def __getitem__(self, grid):
            return lambda **kwargs: seen.update(grid=grid, kwargs=kwargs)

    launch.kernel = Recorder()
    l1, l2 = call_args()
    ready = torch.empty(8)
    launch.launch(l1, l2, ready)
    expected = moe_mega.mega_arguments(moe_gemm1_kernel, l1, l1_kw, moe_gemm2_kernel, l2, l2_kw)
    expected.update(ready_ptr=ready, max_blocks=8, launch_pdl=True)
    assert seen["grid"] == (1,)
    assert seen["kwargs"].keys() == expected.keys()
    for name, value in expected.items():
        got = seen["kwargs"][name]
        assert got is value if isinstance(value, torch.Tensor) else got == value, name


def test_planned_launches_bind_the_full_signature(monkeypatch):
    """A plan's launch site goes through the JIT once, then through the compiled kernel it returned,
    with every parameter in signature order (positional, then keywords and defaults; launch
    options such as num_warps are not parameters); another kernel at the site goes through the
    JIT again; without a compiled kernel (the interpreter) every launch takes the JIT."""
    import inspect

    from inductor_moe.lowering import launch as L

    class Param:
        def __init__(self, name, default=inspect.Parameter.empty):
            self.name, self.default, self.has_default = name, default, default is not inspect.Parameter.empty

    calls = []

    class Compiled:
        def __getitem__(self, grid):
            return lambda *args: calls.append(("compiled", (grid[0], grid[1], grid[2]), args))  # as Triton's does

    class Kernel:
        def __init__(self, returns):
            self.params = [Param("a_ptr"), Param("n"), Param("BLOCK"), Param("USE_PDL", False)]
            self.arg_names = [p.name for p in self.params]
            self.returns = returns
            self.fn = self

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append(("jit", grid, args, kwargs)) or self.returns

    monkeypatch.setattr(L, "_is_compiled", lambda obj, kernel: isinstance(obj, Compiled))
    kernel, launches = Kernel(Compiled()), L.PlannedLaunches()
    launches.launch("site", kernel, (2,), ("x", 7), dict(BLOCK=64, num_warps=4))
    launches.launch("site", kernel, (3,), ("y", 7), dict(BLOCK=64, num_warps=4))
    launches.launch("site", kernel, (3,), (), dict(a_ptr="z", n=7, BLOCK=64, USE_PDL=True, launch_pdl=True))
    assert calls[0] == ("jit", (2,), ("x", 7), dict(BLOCK=64, num_warps=4))
    assert calls[1] == ("compiled", (3, 1, 1), ("y", 7, 64, False))  # the compiled launcher reads 3 dims
    assert calls[2][0] == "jit"  # bound otherwise: through the JIT, then kept so
    launches.launch("site", kernel, (3,), (), dict(a_ptr="z", n=7, BLOCK=64, USE_PDL=True, launch_pdl=True))
    assert calls[3] == ("compiled", (3, 1, 1), ("z", 7, 64, True))
    other = Kernel(Compiled())
    launches.launch("site", other, (1,), ("w", 7), dict(BLOCK=32))
    assert calls[4][0] == "jit"
    interpreted, calls[:] = Kernel(None), []
    for _ in range(2):
        launches.launch("interp", interpreted, (1,), ("v", 1), dict(BLOCK=16))
    assert [c[0] for c in calls] == ["jit", "jit"]


def test_fp8_plans_take_full_blocks_where_the_ws_gemms_run(plans, monkeypatch):
    """fp8 x fp8 at I = 128n + 64 (gpt-oss): the Triton L1's up tiles straddle two scale blocks, so
    its heuristic keeps 64-row blocks; above 80 rows per expert the plan takes 128-row blocks where
    both warp-specialised GEMMs then run (they promote per column), and not where they would not."""
    from inductor_moe import config
    from inductor_moe.lowering import moe
    from inductor_moe.templates.moe_gemm2_ws import HAS_GLUON

    if not HAS_GLUON:
        pytest.skip("this triton has no Gluon")
    monkeypatch.setattr(moe, "_interpreting", lambda: False)  # CPU tensors plan as sm_90 (_arch_major)
    fp8 = dict(E=4, H=192, I=192, k=2, weight_format="fp8_block128", act="fp8_block128")
    wide = _plan(_case("fp8_tail", T=256, **fp8))  # 128 rows per expert
    assert (wide.cfg.block_m, wide.ws_l1, wide.ws_l2) == (128, True, True)
    assert wide.cfg.gemm2.block_n == 64  # as _fp8_x_fp8_tiles' 128-row plan
    few = _plan(_case("fp8_tail_few", T=128, **fp8))  # 64 rows per expert: the Triton tiles' blocks
    assert few.cfg.block_m == 64 and not (few.ws_l1 or few.ws_l2)
    with config.patch(warp_specialized=False):
        off = _plan(_case("fp8_tail", T=256, **fp8))
    assert off.cfg.block_m == 64 and not (off.ws_l1 or off.ws_l2)
    interleaved = _plan(_case("fp8_tail_il", T=256, spec="gate_up=interleaved", **fp8))  # no WS L1
    assert interleaved.cfg.block_m == 64 and not interleaved.ws_l1
    plans.clear()  # a device's plans are made for its arch: another arch, another process
    monkeypatch.setattr(moe, "_arch_major", lambda device: 10)
    assert _plan(_case("fp8_tail_sm100", T=256, **fp8)).cfg.block_m == 64
