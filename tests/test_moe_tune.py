"""Autotuned MoE tiles (lowering/moe_tune.py, lowering/moe_tune_cache.py).

CPU: bucket keys, the candidate space against the kernels' static constraints and register
budgets, the tuner with a fake timer, the JSON tables, their lookup order, corrupt files, no
tuning while a CUDA graph is captured, and one interpreted run (TRITON_INTERPRET=1, in a
subprocess: this file run as a script, as in tests/test_moe_kernels.py) of the fused kernels with
tuned tiles taken from the table.  GPU (marked ``gpu``): tune a tiny layer for real.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch

LAYERS = [(128, 8, 2048, 768), (256, 6, 4096, 2048), (128, 4, 2880, 2880), (8, 2, 64, 32)]  # E, k, H, I
TOKENS = (1, 3, 16, 128, 600, 1024, 4096, 16384)


@pytest.fixture
def tables(tmp_path, monkeypatch):
    """An empty user cache and shipped dir under tmp_path; this process's tuning forgotten."""
    from inductor_moe.lowering import moe_tune_cache as cache

    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "user" / "moe_tuned.json"))
    monkeypatch.setattr(cache, "SHIPPED_DIR", tmp_path / "shipped")
    cache.clear()
    yield tmp_path
    cache.clear()


def _key(**kw):
    from inductor_moe.lowering.moe_tune_cache import TuneKey, triton_minor

    fields = dict(device="cpu", triton=triton_minor(), weight_format="dense", act_format="dense", dtype="bf16",
                  E=128, k=8, H=2048, I=768, tokens=16384)
    return TuneKey(**{**fields, **kw})


def _tiles(bm, g1, g2, one_dot=True):
    from inductor_moe.lowering.moe_plan import GemmTiles
    from inductor_moe.lowering.moe_tune_cache import TunedTiles

    return TunedTiles(bm, GemmTiles(*g1), GemmTiles(*g2), one_dot)


# ----------------------------------------------------------------------------- keys

def test_token_buckets_and_keys():
    from inductor_moe.lowering.moe_tune_cache import TuneKey, device_slug, token_bucket

    got = [token_bucket(t) for t in (1, 2, 4, 5, 16, 17, 32, 33, 128, 129, 4096, 4097, 16384)]
    assert got == [1, 4, 4, 16, 16, 32, 32, 64, 128, 256, 4096, 8192, 16384]
    cpu = torch.device("cpu")
    k65 = TuneKey.for_call(cpu, torch.float16, 65, 128, 8, 2048, 768, "mxfp4", "fp8_mx32")
    assert k65 == TuneKey.for_call(cpu, torch.float16, 128, 128, 8, 2048, 768, "mxfp4", "fp8_mx32")
    assert k65 != TuneKey.for_call(cpu, torch.float16, 129, 128, 8, 2048, 768, "mxfp4", "fp8_mx32")
    assert k65 != TuneKey.for_call(cpu, torch.bfloat16, 65, 128, 8, 2048, 768, "mxfp4", "fp8_mx32")
    assert (k65.device, k65.dtype, k65.tokens, k65.weight_format, k65.act_format) == ("cpu", "fp16", 128, "mxfp4",
                                                                                     "fp8_mx32")
    assert re.fullmatch(r"\d+\.\d+", k65.triton)
    assert device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    with pytest.raises(ValueError, match="positive int"):
        _key(E="128")


# ----------------------------------------------------------------------------- candidates

def _pairs():
    from inductor_moe.lowering.moe_tune import ACT_WEIGHT_PAIRS

    return [(w, a) for a, ws in ACT_WEIGHT_PAIRS.items() for w in ws]


def _per_warp(block_m, t):
    return (block_m * t.block_n / t.num_warps, t.block_n * t.block_k / t.num_warps,
            block_m * t.block_k / t.num_warps, t.num_stages)


@pytest.mark.parametrize("fmt,act", _pairs(), ids=[f"{w}-{a}" for w, a in _pairs()])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_candidates_are_valid_and_within_budget(fmt, act, dtype):
    from inductor_moe.lowering import moe_tune as mt
    from inductor_moe.lowering.moe_plan import choose_moe_config
    from inductor_moe.lowering.moe_tune_cache import TuneKey, kernel_constraint_violation

    for E, k, H, I in LAYERS:
        for T in TOKENS:
            base = choose_moe_config(T, k, E, H, I, fmt, 132, act_format=act)
            key = TuneKey.for_call(torch.device("cpu"), dtype, T, E, k, H, I, fmt, act)
            budgeted = fmt == "nvfp4" or act != "dense" or (
                fmt == "mxfp4" and (dtype == torch.float16 or base.regime != "prefill"))
            assert mt.register_budgeted(key, base.regime) == budgeted
            bms = mt.block_m_candidates(key, base)
            assert bms[0] == base.block_m and len(set(bms)) == len(bms) <= 3
            for bm in bms:
                l1 = mt.gemm1_candidates(key, base, bm)
                l2 = mt.gemm_candidates("gemm2", key, base, bm)
                assert l1[0] == (base.gemm1, base.gate_up_one_dot) and l2[0] == base.gemm2
                assert len(l1) <= mt.MAX_PER_GEMM and len(l2) <= mt.MAX_PER_GEMM
                assert len(set(l1)) == len(l1) and len(set(l2)) == len(l2)
                for g1, one_dot in l1:
                    for g2 in l2:
                        why = kernel_constraint_violation(bm, g1, g2, fmt, act)
                        assert why is None, f"{fmt} {act} T={T} {E, k, H, I}: {why}"
                        cfg = base.replace(block_m=bm, gemm1=g1, gemm2=g2, gate_up_one_dot=one_dot, source="tuned")
                        assert cfg.gemm1 == g1  # MoEKernelConfig / GemmTiles validation ran
                    if fmt in ("mxfp4", "nvfp4"):
                        assert g1.block_k >= min(64, base.gemm1.block_k)
                    if budgeted:  # never more registers per warp than the ptxas-checked heuristic tile
                        assert all(a <= b for a, b in zip(_per_warp(bm, g1), _per_warp(base.block_m, base.gemm1))), (
                            fmt, act, T, bm, g1, base.gemm1)
                for g2 in l2:
                    if budgeted:
                        assert all(a <= b for a, b in zip(_per_warp(bm, g2), _per_warp(base.block_m, base.gemm2)))
                    if fmt in ("mxfp4", "nvfp4"):
                        assert g2.block_k >= min(64, base.gemm2.block_k)


def test_candidates_explore_more_than_the_heuristic():
    from inductor_moe.lowering import moe_tune as mt
    from inductor_moe.lowering.moe_plan import choose_moe_config

    for T, n in ((1, 6), (1024, 6), (16384, 6)):
        base = choose_moe_config(T, 8, 128, 2048, 768)
        key = _key(tokens=T)
        assert len(mt.gemm1_candidates(key, base, base.block_m)) >= n
        assert len(mt.gemm_candidates("gemm2", key, base, base.block_m)) >= n
    prefill = choose_moe_config(16384, 8, 128, 2048, 768)
    assert mt.block_m_candidates(_key(), prefill) == [128, 64]
    nv = choose_moe_config(16384, 8, 128, 2048, 768, "nvfp4", allow_swap_ab=False)  # register-budgeted:
    assert all(t.block_n * t.block_k <= 64 * 64 * t.num_warps / nv.gemm1.num_warps  # never 128 x 128 at prefill
               for t, _ in mt.gemm1_candidates(_key(weight_format="nvfp4"), nv, 128))
    swapped = choose_moe_config(16384, 8, 128, 2048, 768, "mxfp4")  # the swapped tiles' own constraints
    assert swapped.swap_ab
    g1s = [t for t, _ in mt.gemm1_candidates(_key(weight_format="mxfp4"), swapped, 128)]
    g2s = mt.gemm_candidates("gemm2", _key(weight_format="mxfp4"), swapped, 128)
    assert len(g1s) >= 2 and len(g2s) >= 2
    assert all(t.block_n % 64 == 0 and t.block_k % 64 == 0 for t in g1s) and all(t.block_k % 64 == 0 for t in g2s)


def test_constraint_check_mirrors_the_kernels_static_asserts():
    """Every static_assert of the expert GEMMs has its rule in kernel_constraint_violation: a new
    one fails here until the tuner knows about it."""
    from inductor_moe.lowering.moe_plan import GemmTiles
    from inductor_moe.lowering.moe_tune_cache import kernel_constraint_violation as why

    root = os.path.join(os.path.dirname(__file__), "..", "templates")
    known = {"tl.dot needs tiles of at least 16", "fp8 block-128 scales need BLOCK_K | 128",
             "fp4 scales need 32 | BLOCK_K", "fp8 block-128 activations need BLOCK_K | 128",
             "fp8 mx32 activations need 32 | BLOCK_K", "swapped tiles write whole 64-column K-order groups"}
    # not tile constraints: which calls may pass TMA descriptors, decided per call by
    # lowering/moe_tma.py: weight_tma_reason (test_moe_tma.py checks its refusals)
    known |= {"TMA weight tiles: dense one-dot L1 with dense activations only",
              "TMA weight tiles: dense weights with dense activations only"}
    # nor this: set by the plan for fp8_mx32 activations on the swapped tiles only (lowering/moe.py:
    # round_mx32), whose 64-column groups the swapped-tile rule above already requires
    known |= {"ROUND_INTER_MX32: dense activations, whole groups of 32 intermediate columns"}
    for name in ("moe_gemm1.py", "moe_gemm2.py"):
        with open(os.path.join(root, name)) as f:
            msgs = set(re.findall(r'tl\.static_assert\(.*?,\s*"([^"]+)"\)', f.read()))
        assert msgs and msgs <= known, f"{name}: new static_assert(s) {msgs - known}"
    g = GemmTiles
    ok = g(64, 64, 4, 3)
    assert why(16, ok, ok, "dense", "dense") is None
    assert "128" in why(16, g(64, 256, 4, 3), ok, "fp8_block128", "dense")
    assert "fp4" in why(16, ok, g(64, 16, 4, 3), "nvfp4", "dense")
    assert "64-column" in why(32, g(32, 128, 4, 3), ok, "mxfp4", "dense", swap_ab=True)
    assert "64-deep" in why(32, ok, g(128, 32, 4, 3), "nvfp4", "dense", swap_ab=True)
    assert why(32, g(32, 128, 4, 3), ok, "mxfp4", "dense") is None
    assert "activations" in why(16, ok, g(64, 256, 4, 3), "dense", "fp8_block128")
    assert "mx32" in why(16, ok, g(64, 16, 4, 3), "dense", "fp8_mx32")
    assert "straddle" in why(16, ok, ok, "dense", "fp8_block128")
    assert why(16, g(128, 64, 4, 3), ok, "dense", "fp8_block128") is None


# ----------------------------------------------------------------------------- tuner

G1_BEST, G2_BEST, G1_BROKEN = (64, 64, 8, 4), (128, 64, 8, 4), (128, 128, 8, 2)


def _fake_measure(calls):
    """µs: 100, -10 for block_m 64, -20 for L1 G1_BEST, -10 for L2 G2_BEST; G1_BROKEN 'does not compile'."""
    def measure(cfg):
        calls.append(cfg)
        g1 = dataclasses.astuple(cfg.gemm1)
        if g1 == G1_BROKEN:
            raise RuntimeError("does not compile\nsecond line")
        return (100.0 - 10 * (cfg.block_m == 64) - 20 * (g1 == G1_BEST)
                - 10 * (dataclasses.astuple(cfg.gemm2) == G2_BEST))
    return measure


def test_tuner_picks_the_fastest_and_records_failures():
    from inductor_moe.lowering import moe_tune as mt
    from inductor_moe.lowering.moe_plan import choose_moe_config

    base = choose_moe_config(16384, 8, 128, 2048, 768)
    calls = []
    out = mt.tune(_key(), base, _fake_measure(calls))
    assert out.heuristic_us == 100.0 and out.us == 60.0
    assert out.best == _tiles(64, G1_BEST, G2_BEST)
    assert out.us == min(us for _, us in out.timed)
    assert len(calls) == len(out.timed) + len(out.skipped) and calls[0] == base.replace(source="tuned")
    assert [(str(t.gemm1), r) for t, r in out.skipped] == [(str(mt.GemmTiles(*G1_BROKEN)),
                                                           "RuntimeError: does not compile")]
    assert not out.out_of_time and out.entry().tiles == out.best
    # coordinate descent: L1 with the heuristic's L2, then L2 with the best L1 and block_m
    assert all(c.gemm2 == base.gemm2 for c in calls if c.gemm1 != base.gemm1 and c.block_m == 64
               and dataclasses.astuple(c.gemm1) != G1_BEST)
    assert all(c.gemm1 == mt.GemmTiles(*G1_BEST) and c.block_m == 64 for c in calls if c.gemm2 != base.gemm2)


def test_tuner_stops_at_the_deadline():
    from inductor_moe.lowering import moe_tune as mt
    from inductor_moe.lowering.moe_plan import choose_moe_config

    base = choose_moe_config(16384, 8, 128, 2048, 768)
    clock = [0.0]

    def measure(cfg):
        clock[0] += 1.0
        return 50.0

    out = mt.tune(_key(), base, measure, deadline=3.5, clock=lambda: clock[0])
    assert out.out_of_time and len(out.timed) == 4 and out.best == mt.TunedTiles.of(base)
    out = mt.tune(_key(), base, measure, deadline=-1.0, clock=lambda: clock[0])
    assert out.out_of_time and out.best is None and out.entry() is None and out.heuristic_us is None


def test_wrong_outputs_never_win():
    """checked_measure: a candidate whose output differs from the heuristic's by more than CHECK_TOL,
    or whose two runs differ in a bit, is skipped, however fast."""
    from inductor_moe.lowering import moe_tune as mt
    from inductor_moe.lowering.moe_plan import GemmTiles, choose_moe_config

    base = choose_moe_config(16384, 8, 128, 2048, 768)
    good = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    g2_racy, g2_off, g2_close = GemmTiles(128, 64, 8, 4), GemmTiles(128, 64, 4, 4), GemmTiles(128, 128, 8, 3)
    fast, calls = {}, [0]

    def run(cfg):  # fast: L1 G1_BEST (wrong), block_m 64 (NaN), L2 g2_racy (racy) and g2_off (2e-2 off)
        calls[0] += 1
        fast["now"] = (dataclasses.astuple(cfg.gemm1) == G1_BEST or cfg.block_m == 64
                       or cfg.gemm2 in (g2_racy, g2_off))
        if dataclasses.astuple(cfg.gemm1) == G1_BEST:
            return good * 1.5
        if cfg.block_m == 64:
            return good * float("nan")
        if cfg.gemm2 == g2_racy:  # within 1e-6 of the heuristic, but not the same twice
            return good * (1 + 1e-6 * calls[0])
        if cfg.gemm2 == g2_off:  # the error of a miscompiled tile (benchmarks/NOTES.md), once under the old 5e-2
            return good * (1 + 2e-2)
        return good * (1 + 1e-3 * (cfg.gemm2 == g2_close))  # right: kept, slower

    def timer(fn):
        fn()
        return 10.0 if fast["now"] else 50.0

    out = mt.tune(_key(), base, mt.checked_measure(run, timer))
    assert out.best == mt.TunedTiles.of(base) and out.us == 50.0
    assert any(t.gemm2 == g2_close for t, _ in out.timed)
    reasons = {str(t): r for t, r in out.skipped}
    heuristic = mt.TunedTiles.of(base)
    assert set(reasons) == {str(dataclasses.replace(heuristic, block_m=64)),
                            str(dataclasses.replace(heuristic, gemm1=GemmTiles(*G1_BEST))),
                            str(dataclasses.replace(heuristic, gemm2=g2_racy)),
                            str(dataclasses.replace(heuristic, gemm2=g2_off))}, reasons
    assert "nan" in reasons[str(dataclasses.replace(heuristic, block_m=64))]
    assert reasons[str(dataclasses.replace(heuristic, gemm2=g2_racy))].startswith("ValueError: two runs")
    assert reasons[str(dataclasses.replace(heuristic, gemm2=g2_off))].startswith("ValueError: output differs")


def test_same_bits_counts_nan_as_equal():
    from inductor_moe.lowering.moe_tune import same_bits

    a = torch.tensor([1.0, float("nan"), -0.0])
    assert same_bits(a, a.clone()) and not torch.equal(a, a.clone())
    assert not same_bits(a, torch.tensor([1.0, 2.0, -0.0])) and not same_bits(a, torch.tensor([1.0, float("nan"), 1e-30]))


def _call_config(T=16384, E=128, k=8, H=2048, I=768, fmt="dense", act="dense", run=None):
    from inductor_moe.lowering import moe_tune as mt

    x = torch.empty(T, H, dtype=torch.bfloat16)
    return mt.config_for_call(x, k, E, H, I, fmt, act, 132, run=run or (lambda cfg: None))


def test_autotune_tunes_once_and_caches(tables, monkeypatch):
    from inductor_moe import config
    from inductor_moe.lowering import moe_tune as mt
    from inductor_moe.lowering import moe_tune_cache as cache

    calls = []
    monkeypatch.setattr(mt, "_measure_for", lambda device, run: _fake_measure(calls))
    monkeypatch.setattr(mt, "RUNTIME_MAX_PER_GEMM", mt.MAX_PER_GEMM)
    with config.patch(autotune=False):
        assert _call_config().source == "heuristic" and not calls
    with config.patch(autotune=True):
        cfg = _call_config()
        n = len(calls)
        assert n > 3 and cfg.source == "tuned"
        assert mt.TunedTiles.of(cfg) == _tiles(64, G1_BEST, G2_BEST)
        assert _call_config(T=9000) == cfg and len(calls) == n  # same bucket: no second tuning
        assert _call_config(T=8192).source == "tuned" and len(calls) > n  # another bucket
    saved = cache.read_table(os.environ[cache.CACHE_ENV])
    assert saved[_key()].tiles == _tiles(64, G1_BEST, G2_BEST)
    assert saved[_key()].us == 60.0 and saved[_key()].heuristic_us == 100.0
    cache.clear()  # a new process: the user cache file answers, nothing is tuned
    with config.patch(autotune=True):
        cfg2 = _call_config()
    assert cfg2.source == "tuned-cache" and mt.TunedTiles.of(cfg2) == mt.TunedTiles.of(cfg)
    assert cfg2.align_chunk == cfg.align_chunk and cfg2.regime == cfg.regime  # T-dependent fields: heuristic's


def test_no_tuning_while_capturing(tables, monkeypatch):
    from inductor_moe import config
    from inductor_moe.lowering import moe_tune as mt
    from inductor_moe.lowering import moe_tune_cache as cache

    calls = []
    monkeypatch.setattr(mt, "_measure_for", lambda device, run: _fake_measure(calls))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with config.patch(autotune=True):
        cfg = _call_config()
    assert cfg.source == "heuristic" and not calls and not os.path.exists(os.environ[cache.CACHE_ENV])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    with config.patch(autotune=True):
        assert _call_config().source == "tuned" and calls


def test_nothing_timed_falls_back_to_the_heuristic_once(tables, monkeypatch):
    from inductor_moe import config
    from inductor_moe.lowering import moe_tune as mt
    from inductor_moe.lowering import moe_tune_cache as cache

    calls = []

    def broken(cfg):
        calls.append(cfg)
        raise RuntimeError("no kernel builds here")

    monkeypatch.setattr(mt, "_measure_for", lambda device, run: broken)
    with config.patch(autotune=True):
        assert _call_config().source == "heuristic"
        n = len(calls)
        assert n > 1 and _call_config().source == "heuristic" and len(calls) == n  # not retried
    assert not os.path.exists(os.environ[cache.CACHE_ENV])


# ----------------------------------------------------------------------------- tables

def _entry(tiles, us=10.0):
    from inductor_moe.lowering.moe_tune_cache import TuneEntry

    return TuneEntry(tiles, us, None if us is None else 2 * us)


def test_json_roundtrip(tmp_path):
    from inductor_moe.lowering import moe_tune_cache as cache

    table = {_key(): _entry(_tiles(64, G1_BEST, G2_BEST, one_dot=False)),
             _key(tokens=16, weight_format="fp8_block128"): _entry(_tiles(16, (32, 128, 4, 4), (64, 128, 4, 6))),
             _key(tokens=1, act_format="fp8_mx32", weight_format="mxfp4", dtype="fp16"):
                 _entry(_tiles(16, (32, 64, 4, 4), (32, 64, 4, 4)), us=None)}
    path = tmp_path / "t.json"
    cache.write_table(path, table, {"device": "cpu"})
    assert cache.read_table(path) == table
    data = json.loads(path.read_text())
    assert data["format"] == cache.FILE_FORMAT and data["meta"] == {"device": "cpu"} and len(data["entries"]) == 3
    for tiles in (e.tiles for e in table.values()):
        assert cache.TunedTiles.from_json(json.loads(json.dumps(tiles.to_json()))) == tiles
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_lookup_order(tables):
    from inductor_moe.lowering import moe_tune as mt
    from inductor_moe.lowering import moe_tune_cache as cache

    key = _key()
    shipped, user, here = (_tiles(128, (64, 64, 4, 4), G2_BEST), _tiles(64, G1_BEST, (64, 64, 4, 4)),
                           _tiles(32, (32, 64, 4, 4), (64, 64, 4, 4)))
    assert cache.lookup(key) is None and _call_config().source == "heuristic"
    cache.write_table(cache.shipped_path("cpu"), {key: _entry(shipped)})
    assert tables / "shipped" / "cpu.json" == cache.shipped_path("cpu")
    assert cache.lookup(key) == (shipped, "tuned-shipped")
    cfg = _call_config()
    assert cfg.source == "tuned-shipped" and mt.TunedTiles.of(cfg) == shipped
    cache.write_table(cache.user_cache_path(), {key: _entry(user)})
    assert cache.lookup(key) == (user, "tuned-cache")
    cache.remember(key, _entry(here), persist=False)
    assert cache.lookup(key) == (here, "tuned")
    assert _call_config().source == "tuned" and _call_config(T=1).source == "heuristic"  # other bucket
    assert cache.lookup(_key(device="NVIDIA H100 80GB HBM3")) is None  # other device, other shipped file


def test_corrupt_files_are_ignored(tables, caplog):
    from inductor_moe.lowering import moe_tune_cache as cache

    good = _tiles(64, G1_BEST, G2_BEST)
    entries = [_entry(good).to_json(_key()),
               {"key": {**dataclasses.asdict(_key(tokens=1))}, "tiles": {**good.to_json(), "block_m": 48}},
               {"key": {"device": "cpu"}, "tiles": good.to_json()},
               {"key": dataclasses.asdict(_key(tokens=2, weight_format="fp8_block128")),
                "tiles": _tiles(64, (64, 256, 4, 3), G2_BEST).to_json()},  # fp8: block_k 256 never compiles
               {"key": dataclasses.asdict(_key(tokens=4)), "tiles": {**good.to_json(), "gemm1": [64, 64, 4, 3]}},
               "not an entry"]
    path = tables / "mixed.json"
    path.write_text(json.dumps({"format": cache.FILE_FORMAT, "entries": entries}))
    with caplog.at_level("DEBUG", logger="inductor_moe.tune"):
        assert cache.read_table(path) == {_key(): _entry(good)}
    assert len([r for r in caplog.records if "ignoring entry" in r.getMessage()]) == 5
    user = cache.user_cache_path()
    os.makedirs(os.path.dirname(user))
    for text in ("{not json", json.dumps({"format": 99, "entries": entries}), json.dumps([1, 2]), "\x00\xff"):
        with open(user, "w") as f:
            f.write(text)
        cache.clear()
        assert cache.read_table(user) == {} and cache.lookup(_key()) is None
        assert _call_config().source == "heuristic"


def test_unwritable_user_cache_costs_nothing(tables, monkeypatch):
    from inductor_moe.lowering import moe_tune_cache as cache

    monkeypatch.setenv(cache.CACHE_ENV, str(tables))  # a directory: neither readable nor writable as a file
    cache.remember(_key(), _entry(_tiles(64, G1_BEST, G2_BEST)))
    assert cache.lookup(_key())[1] == "tuned"
    assert not [p for p in tables.iterdir() if p.name.endswith(".tmp")]


def test_config_key_defaults_off():
    from inductor_moe import config

    assert config.autotune is False


def test_package_data_ships_the_tables():
    """pyproject installs lowering/tuned/*.json beside inductor_moe.lowering (read via SHIPPED_DIR)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    from inductor_moe.lowering import moe_tune_cache as cache

    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
        tool = tomllib.load(f)["tool"]["setuptools"]
    assert tool["package-dir"]["inductor_moe.lowering"] == "lowering"
    assert "tuned/*.json" in tool["package-data"]["inductor_moe.lowering"]
    assert cache.SHIPPED_DIR.name == "tuned" and cache.SHIPPED_DIR.parent.name == "lowering"
    for p in cache.SHIPPED_DIR.glob("*.json"):  # every shipped table parses, every entry valid
        data = json.loads(p.read_text())
        assert len(cache.read_table(p)) == len(data["entries"]), p
        assert all(e["key"]["device"] and cache.device_slug(e["key"]["device"]) == p.stem for e in data["entries"])


def test_shipped_fp4_entries_not_unswapped_where_the_rule_swaps():
    """Shipped tuned tiles for FP4 weights with bf16 activations may override the rule's swapped
    tiles with unswapped ones only at decode (T <= 4); such entries from before the swapped tiles ran
    1.26-1.88x slower at T = 16 and 128 (benchmarks/NOTES.md, "Stale tuned FP4 tiles")."""
    from inductor_moe.lowering import moe_tune_cache as cache
    from inductor_moe.lowering.moe_plan import choose_moe_config

    assert any(cache.SHIPPED_DIR.glob("*.json"))
    for p in cache.SHIPPED_DIR.glob("*.json"):
        for key, entry in cache.read_table(p).items():
            if key.weight_format not in ("mxfp4", "nvfp4") or key.act_format != "dense" or key.tokens <= 4:
                continue
            rule = choose_moe_config(key.tokens, key.k, key.E, key.H, key.I, key.weight_format, 132)
            assert entry.tiles.swap_ab or not rule.swap_ab, (p.name, key)


def test_cli_sweep_writes_resumes_and_stops(tmp_path):
    """The CLI's loop on CPU with a fake timer: one table entry per bucket, written as it goes;
    a second run keeps them; a spent budget starts nothing."""
    import time
    import types

    from benchmarks import moe as bench_moe
    from inductor_moe.lowering import moe_tune as mt
    from inductor_moe.lowering import moe_tune_cache as cache

    gen = torch.Generator().manual_seed(0)
    bench = types.SimpleNamespace(
        LAYERS={"tiny": (8, 2, 64, 32)}, quantize_chunked=bench_moe.quantize_chunked,
        sweep_inputs=lambda T, E, k, H, I: (None, None, None, torch.randn(E, 2 * I, H, generator=gen).bfloat16(),
                                            torch.randn(E, H, I, generator=gen).bfloat16()))
    calls = []
    fake = lambda device, run: _fake_measure(calls)  # noqa: E731
    work = [(64, "tiny", "dense", "dense"), (64, "tiny", "mxfp4", "dense"), (4, "tiny", "dense", "dense")]
    out, said = tmp_path / "t.json", []
    far = time.monotonic() + 600
    rows = mt.sweep(work, out, {"device": "cpu"}, bench, torch.device("cpu"), deadline=far, measure_for=fake,
                    say=said.append)
    table = cache.read_table(out)
    assert len(table) == 3 and calls and len(rows) == 5 and all("| tiny T=" in r for r in rows[2:])
    assert {k.tokens for k in table} == {64, 4} and {k.weight_format for k in table} == {"dense", "mxfp4"}
    n = len(calls)
    rows = mt.sweep(work, out, {}, bench, torch.device("cpu"), deadline=far, measure_for=fake, say=said.append)
    assert len(calls) == n and all("(kept)" in r for r in rows[2:])
    mt.sweep(work, out, {}, bench, torch.device("cpu"), deadline=time.monotonic() - 1, retune=True,
             measure_for=fake, say=said.append)
    assert len(calls) == n and said[-1].startswith("budget spent: 3 bucket(s)") and cache.read_table(out) == table


# ----------------------------------------------------------------------------- interpreted kernels

CASE = dict(T=33, E=8, k=2, H=64, I=48)
TUNED = dict(block_m=32, gemm1=(16, 32, 4, 1), gemm2=(32, 32, 2, 1), one_dot=False)


def _interpreted_case() -> dict:
    """Subprocess side: a tuned entry for this call's bucket, the fused call without a config."""
    from inductor_moe.lowering import moe_tune as mt
    from inductor_moe.lowering import moe_tune_cache as cache
    from inductor_moe.lowering.moe import fused_moe_experts
    from inductor_moe.ops.moe_experts import moe_experts_reference
    from inductor_moe.spec import MoESpec

    T, E, k, H, I = (CASE[n] for n in ("T", "E", "k", "H", "I"))
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(T, H, generator=gen).bfloat16()
    ids = torch.rand(T, E, generator=gen).topk(k, dim=1).indices.int()
    tw = torch.softmax(torch.randn(T, k, generator=gen), 1)
    w13 = (torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5).bfloat16()
    w2 = (torch.randn(E, H, I, generator=gen) / I ** 0.5).bfloat16()
    key = cache.TuneKey.for_call(x.device, x.dtype, T, E, k, H, I, "dense", "dense")
    cache.remember(key, cache.TuneEntry(_tiles(TUNED["block_m"], TUNED["gemm1"], TUNED["gemm2"], TUNED["one_dot"])),
                   persist=False)
    used = []
    inner = mt.config_for_call
    mt.config_for_call = lambda *a, **kw: used.append(inner(*a, **kw)) or used[-1]
    out = fused_moe_experts(x, ids, tw, w13, w2, MoESpec(), use_pdl=False)
    ref = moe_experts_reference(x.double(), ids, tw.double(), w13.double(), w2.double(), "")
    cfg = used[0]
    return dict(err=((out.double() - ref).norm() / ref.norm()).item(), nan=bool(out.isnan().any()),
                source=cfg.source, block_m=cfg.block_m, gemm1=list(dataclasses.astuple(cfg.gemm1)),
                gemm2=list(dataclasses.astuple(cfg.gemm2)), one_dot=cfg.gate_up_one_dot, calls=len(used))


def test_interpreted_fused_call_runs_tuned_tiles(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1",
               INDUCTOR_MOE_TUNE_CACHE=str(tmp_path / "none.json"))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--interpret"], env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"interpreted run produced nothing (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    r = json.loads(lines[-1][len("RESULT "):])
    assert "error" not in r, r["error"]
    assert r["source"] == "tuned" and r["calls"] == 1
    assert (r["block_m"], tuple(r["gemm1"]), tuple(r["gemm2"]), r["one_dot"]) == (
        TUNED["block_m"], TUNED["gemm1"], TUNED["gemm2"], TUNED["one_dot"])
    assert not r["nan"] and r["err"] <= 1e-2, r


# ----------------------------------------------------------------------------- GPU

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
def test_gpu_autotune_tiny_layer(tables, monkeypatch):
    """Tune one small layer for real at its first call, then: the user cache holds it, the op's
    output matches the reference, and a CUDA graph capture of a new bucket does not tune."""
    from inductor_moe import config
    from inductor_moe.lowering import moe, moe_tune as mt
    from inductor_moe.lowering import moe_tune_cache as cache
    from inductor_moe.ops.moe_experts import moe_experts_reference

    monkeypatch.setattr(mt, "RUNTIME_MAX_PER_GEMM", 3)
    moe.register()
    E, k, H, I = 8, 2, 256, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(64, H, device="cuda", generator=g).bfloat16()
    ids = torch.rand(64, E, device="cuda", generator=g).topk(k, dim=1).indices.int()
    tw = torch.softmax(torch.randn(64, k, device="cuda", generator=g), 1)
    w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) / H ** 0.5).bfloat16()
    w2 = (torch.randn(E, H, I, device="cuda", generator=g) / I ** 0.5).bfloat16()
    op = torch.ops.inductor_moe.moe_experts
    with config.patch(autotune=True):
        out = op(x, ids, tw, w13, w2, "")
    ref = moe_experts_reference(x.double(), ids, tw.double(), w13.double(), w2.double(), "")
    assert ((out.double() - ref).norm() / ref.norm()).item() <= 1e-2
    key = cache.TuneKey.for_call(x.device, x.dtype, 64, E, k, H, I, "dense", "dense")
    entry = cache.read_table(cache.user_cache_path())[key]
    assert 0 < entry.us <= entry.heuristic_us
    assert mt.config_for_call(x, k, E, H, I, "dense", "dense", 132, run=None).source == "tuned"

    x5, ids5, tw5 = x[:5].clone(), ids[:5].clone(), tw[:5].clone()  # bucket 16: not tuned yet
    op(x5, ids5, tw5, w13, w2, "")  # autotune off: compiles the heuristic's kernels
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with config.patch(autotune=True), torch.cuda.graph(graph):
        out5 = op(x5, ids5, tw5, w13, w2, "")
    graph.replay()
    torch.cuda.synchronize()
    key5 = cache.TuneKey.for_call(x.device, x.dtype, 5, E, k, H, I, "dense", "dense")
    assert key5 not in cache._here and key5 not in cache.read_table(cache.user_cache_path())
    torch.testing.assert_close(out5, op(x5, ids5, tw5, w13, w2, ""))


if __name__ == "__main__" and "--interpret" in sys.argv:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    torch.set_num_threads(1)
    try:
        result = _interpreted_case()
    except Exception as e:  # noqa: BLE001 - reported to the parent test
        result = dict(error=f"{type(e).__name__}: {e}")
    print("RESULT " + json.dumps(result), flush=True)


def test_tuned_tiles_carry_swap_ab():
    """A tuned entry says whether its tiles ran swapped; entries written before the field read as
    unswapped, and unswapped entries are written without it."""
    from inductor_moe.lowering.moe_plan import GemmTiles, choose_moe_config
    from inductor_moe.lowering.moe_tune_cache import TunedTiles

    swapped = TunedTiles(32, GemmTiles(64, 128, 4, 3), GemmTiles(128, 128, 4, 3), True, True)
    assert TunedTiles.from_json(swapped.to_json()) == swapped and "swap" in str(swapped)
    plain = dataclasses.replace(swapped, swap_ab=False)
    assert "swap_ab" not in plain.to_json() and TunedTiles.from_json(plain.to_json()) == plain
    base = choose_moe_config(1024, 8, 128, 2048, 768, "mxfp4")
    assert base.swap_ab and not plain.apply(base, "tuned-shipped").swap_ab
    with pytest.raises(ValueError, match="swap_ab"):
        TunedTiles.from_json({**plain.to_json(), "swap_ab": "yes"})
