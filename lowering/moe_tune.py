"""Autotuned tiles for the fused MoE kernels, one entry per shape bucket (issue #4).

# T: tokens, k: experts per token, E: experts, H: hidden, I: expert intermediate size
# L1 = templates/moe_gemm1.py (x @ w13, SwiGLU), L2 = templates/moe_gemm2.py (h @ w2)
choose_moe_config (moe_plan.py) picks tiles by rule; here a few candidates around it are timed on
the GPU and the fastest is kept per bucket (moe_tune_cache.py: key, tables, lookup order).

Candidates (per regime, <= MAX_PER_GEMM per GEMM, the heuristic's first): a regime list of tiles
plus single-step neighbours of the heuristic's, legalised to what the kernels assert (fp8 block-128:
block_k | 128; fp4: 32 | block_k, block_k >= 64 unless the heuristic goes lower; fp8 activations:
L1 block_n holds whole scale groups).  Where the heuristic's tiles are set by a register budget
(NVFP4 weights and fp8 activations: moe_plan._fp4_decode_register_budget / _fp8_act_tiles; MXFP4
where e2m1 may be decoded in registers), a candidate may not hold more per warp than the heuristic does
(accumulator, weight tile, activation tile, pipeline stages), so no candidate spills where the
heuristic, checked with ptxas, does not.

Tuning is coordinate descent, each step timing the whole fused call (align, L1, L2, combine) with
``kernel_config=``: block_m (heuristic tiles), then L1 candidates (L2 fixed), then L2 candidates with
the best L1.  A candidate that fails to build or run, whose output differs from the heuristic's, or
whose two runs differ in a bit, is skipped with its reason.  Timing: CUDA events
around back-to-back calls queued behind a GPU sleep, so the time is the kernels', not Python's.

CLI (on a GPU, from the repository root: the layer shapes and weights come from benchmarks/moe.py):
    python -m inductor_moe.lowering.moe_tune --layers qwen3-30b-a3b,gpt-oss-120b,dsv4-flash \\
        --tokens 128,1024,4096,16384 --formats dense,mxfp4,fp8_block128 --out lowering/tuned/ --budget-s 480
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .. import config as moe_config
from . import moe_tune_cache as cache
from .moe_plan import GemmTiles, MoEKernelConfig, choose_moe_config
from .moe_tune_cache import TuneEntry, TuneKey, TunedTiles, kernel_constraint_violation

log = logging.getLogger("inductor_moe.tune")

MAX_PER_GEMM = 10  # candidates per GEMM (the heuristic's included)
MIN_GAIN = 0.01  # a candidate replaces the best only when this much faster (timing noise)
CHECK_TOL = 1e-2  # a candidate's output may differ this much (relative norm) from the heuristic's
RUNTIME_BUDGET_S = 30.0  # config.autotune: seconds of tuning per bucket at its first call
RUNTIME_MAX_PER_GEMM = 6  # config.autotune: fewer candidates (each one is a Triton compile)

# (block_n, block_k, num_warps, num_stages) tried per regime besides the heuristic's; L1's block_n
# counts gate (and up) columns.  Seeded from the variants of benchmarks/moe.py --sweep (SWEEP_BIG /
# SWEEP_SMALL, results in benchmarks/NOTES.md), widened by hand; untimed as a set.
REGIME_TILES = {
    "decode": {"gemm1": [(16, 128, 4, 4), (32, 128, 4, 4), (64, 128, 4, 4), (16, 256, 4, 4), (32, 256, 4, 4),
                         (32, 128, 4, 6), (32, 64, 4, 4)],
               "gemm2": [(32, 128, 4, 4), (64, 128, 4, 4), (128, 128, 4, 4), (32, 256, 4, 4), (64, 256, 4, 4),
                         (64, 128, 4, 6), (128, 64, 4, 4)]},
    "mid": {"gemm1": [(32, 128, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 8, 3), (32, 64, 4, 4),
                      (64, 64, 8, 4)],
            "gemm2": [(64, 128, 4, 3), (128, 64, 4, 4), (128, 128, 8, 3), (256, 64, 8, 3), (64, 64, 4, 4),
                      (128, 64, 8, 4)]},
    "prefill": {"gemm1": [(128, 64, 8, 3), (64, 64, 8, 4), (64, 64, 4, 4), (128, 64, 8, 4), (64, 128, 8, 3),
                          (128, 32, 8, 4), (128, 128, 8, 2), (64, 64, 4, 3)],
                "gemm2": [(256, 64, 8, 3), (128, 64, 8, 4), (128, 64, 4, 4), (128, 128, 8, 3), (256, 64, 8, 4),
                          (256, 32, 8, 4), (64, 64, 4, 4), (128, 128, 4, 3)]},
}


# ----------------------------------------------------------------------------- candidates

def register_budgeted(key: TuneKey, regime: str) -> bool:
    """Whether the heuristic's tiles are sized to a register budget (weights or activations decoded
    in registers: NVFP4, fp8 activations, MXFP4 with fp16 activations or outside prefill, where
    sm_90 may decode e2m1 in registers): candidates then stay within the heuristic's footprint."""
    return (key.weight_format == "nvfp4" or key.act_format != "dense"
            or (key.weight_format == "mxfp4" and (key.dtype != "bf16" or regime != "prefill")))


def _footprint(block_m: int, t: GemmTiles) -> tuple:
    """Per-warp register proxies: accumulator, weight tile, activation tile; and pipeline depth."""
    return (block_m * t.block_n / t.num_warps, t.block_n * t.block_k / t.num_warps,
            block_m * t.block_k / t.num_warps, t.num_stages)


def _fits(block_m: int, t: GemmTiles, base_m: int, base: GemmTiles) -> bool:
    return all(a <= b for a, b in zip(_footprint(block_m, t), _footprint(base_m, base)))


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _legalize(t: GemmTiles, which: str, key: TuneKey, base: GemmTiles) -> GemmTiles:
    """Clamp a candidate to the kernels' constraints and to the problem (no tile past the GEMM)."""
    n_out, k_dim = (key.I, key.H) if which == "gemm1" else (key.H, key.I)
    bn = min(t.block_n, max(16, _pow2_at_least(n_out)))
    bk = min(t.block_k, max(16, _pow2_at_least(k_dim)))
    if "fp8_block128" in (key.weight_format, key.act_format):
        bk = min(bk, 128)
    if key.weight_format in ("mxfp4", "nvfp4"):  # 32 | bk; >= 64 moves as many bytes per step as bf16 does
        bk = max(bk, min(64, base.block_k))
    if key.act_format == "fp8_mx32":
        bk = max(bk, 32)
    if which == "gemm1" and key.act_format != "dense":  # L1's epilogue quantises whole groups of h
        bn = max(bn, 128 if key.act_format == "fp8_block128" else 32)
    return GemmTiles(bn, bk, t.num_warps, t.num_stages)


def _neighbours(t: GemmTiles) -> list[GemmTiles]:
    steps = [dict(block_n=t.block_n // 2), dict(num_stages=t.num_stages + 1), dict(block_k=t.block_k // 2),
             dict(block_n=t.block_n * 2, num_warps=t.num_warps * 2), dict(num_warps=t.num_warps * 2),
             dict(num_stages=t.num_stages - 1), dict(block_k=t.block_k * 2)]
    out = []
    for step in steps:
        if step.get("num_warps", 0) > 8:  # 16 warps: outside the swept space; bounds compile time
            continue
        try:
            out.append(dataclasses.replace(t, **step))
        except ValueError:  # past GemmTiles' limits
            pass
    return out


def gemm_candidates(which: str, key: TuneKey, base: MoEKernelConfig, block_m: int,
                    limit: int = MAX_PER_GEMM) -> list[GemmTiles]:
    """Tiles to time for L1 (``which="gemm1"``) or L2 at ``block_m``: the heuristic's first."""
    base_t = getattr(base, which)
    raw = [GemmTiles(*v) for v in REGIME_TILES[base.regime][which]] + _neighbours(base_t)
    out = [base_t]
    for t in raw:
        t = _legalize(t, which, key, base_t)
        if t in out or (register_budgeted(key, base.regime) and not _fits(block_m, t, base.block_m, base_t)):
            continue
        pair = (t, base.gemm2) if which == "gemm1" else (base.gemm1, t)
        if kernel_constraint_violation(block_m, *pair, key.weight_format, key.act_format, base.swap_ab):
            continue
        out.append(t)
    return out[:limit]


def gemm1_candidates(key: TuneKey, base: MoEKernelConfig, block_m: int,
                     limit: int = MAX_PER_GEMM) -> list[tuple[GemmTiles, bool]]:
    """L1 (tiles, gate_up_one_dot) to time: the heuristic's, its tiles with the other gate/up
    layout, then gemm_candidates."""
    pairs = [(t, base.gate_up_one_dot) for t in gemm_candidates("gemm1", key, base, block_m, limit)]
    pairs.insert(1, (base.gemm1, not base.gate_up_one_dot))
    return pairs[:limit]


def block_m_candidates(key: TuneKey, base: MoEKernelConfig) -> list[int]:
    """The heuristic's block_m, half and double it (16..128); decode keeps 16 (rows per expert
    already fit), budgeted formats never grow the accumulator."""
    out = [base.block_m]
    for bm in (base.block_m // 2, base.block_m * 2):
        if not 16 <= bm <= 128 or (base.regime == "decode" and bm > base.block_m):
            continue
        if register_budgeted(key, base.regime) and not (_fits(bm, base.gemm1, base.block_m, base.gemm1)
                                           and _fits(bm, base.gemm2, base.block_m, base.gemm2)):
            continue
        out.append(bm)
    return out


# ----------------------------------------------------------------------------- tuner

@dataclass
class TuneOutcome:
    key: TuneKey
    best: Optional[TunedTiles] = None
    us: float = math.inf  # best's time
    heuristic_us: Optional[float] = None
    timed: list = field(default_factory=list)  # (TunedTiles, µs) in the order timed
    skipped: list = field(default_factory=list)  # (TunedTiles, "ErrorType: first line")
    out_of_time: bool = False  # the deadline stopped it before every candidate ran

    def entry(self) -> Optional[TuneEntry]:
        return TuneEntry(self.best, self.us, self.heuristic_us) if self.best else None


class _OutOfTime(Exception):
    pass


def tune(key: TuneKey, base: MoEKernelConfig, measure: Callable[[MoEKernelConfig], float], *,
         deadline: Optional[float] = None, max_per_gemm: int = MAX_PER_GEMM,
         clock: Callable[[], float] = time.monotonic) -> TuneOutcome:
    """Coordinate descent over block_m, then L1, then L2 tiles; ``measure(cfg)`` returns µs per call
    (or raises: the candidate is skipped).  No candidate starts once ``clock() >= deadline``."""
    out = TuneOutcome(key)
    seen: dict[TunedTiles, Optional[float]] = {}

    def consider(tiles: TunedTiles) -> None:
        if tiles in seen:
            return
        if deadline is not None and clock() >= deadline:
            out.out_of_time = True
            raise _OutOfTime
        try:
            us = float(measure(tiles.apply(base, "tuned")))
        except Exception as e:  # noqa: BLE001 - a candidate that does not build or run is skipped
            lines = str(e).strip().splitlines()
            reason = f"{type(e).__name__}: {lines[0][:200] if lines else ''}"
            log.debug("moe tune %s: skipped %s (%s)", key, tiles, reason)
            out.skipped.append((tiles, reason))
            seen[tiles] = None
            return
        seen[tiles] = us
        out.timed.append((tiles, us))
        if out.best is None or us < out.us * (1 - MIN_GAIN):
            out.best, out.us = tiles, us

    heuristic = TunedTiles.of(base)
    try:
        consider(heuristic)
        out.heuristic_us = seen[heuristic]
        for bm in block_m_candidates(key, base)[1:]:
            consider(dataclasses.replace(heuristic, block_m=bm))
        cur = out.best or heuristic
        for g1, one_dot in gemm1_candidates(key, base, cur.block_m, max_per_gemm):
            consider(dataclasses.replace(cur, gemm1=g1, gate_up_one_dot=one_dot))
        cur = out.best or cur
        for g2 in gemm_candidates("gemm2", key, base, cur.block_m, max_per_gemm):
            consider(dataclasses.replace(cur, gemm2=g2))
    except _OutOfTime:
        pass
    return out


def _hold_gpu(seconds: float) -> None:
    """Keep the GPU busy while the host queues the timed calls, so the events time the kernels
    back to back rather than Python's launch overhead (a decode call is a few µs of GPU work)."""
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is not None and seconds > 0:
        sleep(int(min(seconds, 0.2) * 2e9))  # cycles; at <= 2 GHz this lasts at least `seconds`


def cuda_time_us(fn: Callable[[], object], reps: int = 5, max_inner: int = 10, target_us: float = 2000.0) -> float:
    """Median GPU µs per call of ``fn`` over ``reps`` groups of back-to-back calls (after a warm-up
    call, which compiles; its errors propagate)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    fn()
    end.record()
    host_s = time.perf_counter() - t0
    end.synchronize()
    inner = max(1, min(max_inner, int(target_us / max(start.elapsed_time(end) * 1e3, 1.0))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    _hold_gpu(1.5 * host_s * reps * inner)
    for s, e in events:
        s.record()
        for _ in range(inner):
            fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 / inner for s, e in events)


# ----------------------------------------------------------------------------- the fused call's hook

def _capturing() -> bool:
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except Exception:  # noqa: BLE001 - a CPU-only torch has no CUDA runtime to ask
        return False


def checked_measure(run: Callable[[MoEKernelConfig], torch.Tensor],
                    timer: Callable[[Callable[[], object]], float]) -> Callable[[MoEKernelConfig], float]:
    """``measure(cfg)``: ``timer`` over ``run(cfg)``, once the candidate has run twice with the same
    bits and its output is within CHECK_TOL of the first output kept (the heuristic's: tune times it
    first), so a fast but wrong or racy tile never wins.  Tiles only reorder fp32 sums (the fp8
    paths then re-round the intermediate the same way), so correct candidates agree far closer than
    their error against the float64 reference; a miscompiled tile seen on the H100 (benchmarks/NOTES.md,
    "The intermediate in expert order") was off by 0.03, and NOTES_fp4.md's racing tile differed
    between runs while staying within 5e-3 of the reference."""
    ref: list = []

    def measure(cfg: MoEKernelConfig) -> float:
        first, second = run(cfg), run(cfg)
        if not same_bits(first, second):
            raise ValueError("two runs of the candidate differ bitwise (a race in its code)")
        out = first.float()
        if ref:
            rel = ((out - ref[0]).norm() / ref[0].norm().clamp_min(1e-30)).item()
            if not rel <= CHECK_TOL:  # NaN included
                raise ValueError(f"output differs from the first candidate's by {rel:.3g}")
        else:
            ref.append(out)
        return timer(lambda: run(cfg))
    return measure


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal element for element, NaN where the other has NaN (torch.equal says NaN != NaN)."""
    return torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)


def _measure_for(device: torch.device, run: Callable[[MoEKernelConfig], torch.Tensor]):
    """How to time a candidate of this call, or None where nothing can be timed (no GPU)."""
    if device.type != "cuda":
        return None

    def timer(fn) -> float:
        with torch.cuda.device(device):
            return cuda_time_us(fn)
    return checked_measure(run, timer)


@functools.lru_cache(maxsize=4096)
def _heuristic(T: int, k: int, E: int, H: int, I: int, weight_format: str, num_sms: int,  # noqa: E741
               act_format: str, gate_up_interleaved: bool = False) -> MoEKernelConfig:
    """choose_moe_config is a pure function: once per call shape, not once per call."""
    return choose_moe_config(T, k, E, H, I, weight_format, num_sms, act_format=act_format,
                             gate_up_interleaved=gate_up_interleaved)


@functools.lru_cache(maxsize=4096)
def _applied(tiles: TunedTiles, base: MoEKernelConfig, source: str) -> MoEKernelConfig:
    return tiles.apply(base, source)


def config_for_call(x: torch.Tensor, k: int, E: int, H: int, I: int, weight_format: str,  # noqa: E741
                    act_format: str, num_sms: int, run: Callable[[MoEKernelConfig], object],
                    gate_up_interleaved: bool = False) -> MoEKernelConfig:
    """Tiles for one fused call: the bucket's tuned entry where a table has one (moe_tune_cache
    lookup order); else, with config.autotune on and no CUDA graph being captured, tune the bucket
    now by timing ``run(cfg)`` on this call's inputs; else the heuristic."""
    T = x.shape[0]
    base = _heuristic(T, k, E, H, I, weight_format, num_sms, act_format, gate_up_interleaved)
    key = TuneKey.for_call(x.device, x.dtype, T, E, k, H, I, weight_format, act_format)
    hit = cache.lookup(key)
    if hit is not None:
        tiles, source = hit
        return base if tiles is None else _applied(tiles, base, source)
    if not moe_config.autotune or _capturing():
        return base
    measure = _measure_for(x.device, run)
    if measure is None:
        return base
    t0 = time.monotonic()
    outcome = tune(key, base, measure, deadline=t0 + RUNTIME_BUDGET_S, max_per_gemm=RUNTIME_MAX_PER_GEMM)
    log.info("moe tune %s: %s in %.1fs (%d timed, %d skipped): %.1f us vs heuristic %s us", key, outcome.best,
             time.monotonic() - t0, len(outcome.timed), len(outcome.skipped), outcome.us, outcome.heuristic_us)
    cache.remember(key, outcome.entry())
    return outcome.best.apply(base, "tuned") if outcome.best else base


# ----------------------------------------------------------------------------- CLI

ACT_WEIGHT_PAIRS = {"dense": ("dense", "fp8_block128", "mxfp4", "nvfp4"),
                    "fp8_block128": ("dense", "fp8_block128", "mxfp4"), "fp8_mx32": ("dense", "fp8_block128", "mxfp4")}


def _commit() -> str:
    import os
    import subprocess

    if os.environ.get("INDUCTOR_MOE_COMMIT"):
        return os.environ["INDUCTOR_MOE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def _row(label: str, entry: Optional[TuneEntry], note: str = "") -> str:
    if entry is None:
        return f"| {label} | - | - | - | heuristic: nothing ran {note}|"
    h, t = entry.heuristic_us, entry.us
    cells = [f"{v:.1f}" if v is not None else "-" for v in (h, t)]
    gain = f"{h / t:.2f}x" if h and t else "-"
    return f"| {label} | {cells[0]} | {cells[1]} | {gain} | {entry.tiles} {note}|"


def sweep(work, out_path, meta: dict, bench, device: torch.device, *, deadline: float,
          max_per_gemm: int = MAX_PER_GEMM, retune: bool = False, measure_for=_measure_for, say=print) -> list[str]:
    """Tune each (T, layer, weight format, act format) of ``work`` in order, writing the table at
    ``out_path`` after every bucket (so a run cut short keeps what it has); buckets already in the
    file are kept unless ``retune``.  ``bench`` gives LAYERS, sweep_inputs and quantize_chunked
    (benchmarks/moe.py).  Returns the table rows (markdown)."""
    from ..spec import MoESpec
    from .moe import _num_sms, fused_moe_experts

    table = cache.read_table(out_path)
    weights: dict = {}

    def weights_for(layer: str, fmt: str):
        if (layer, "dense") not in weights:
            _, _, _, w13, w2 = bench.sweep_inputs(1, *bench.LAYERS[layer])
            weights[layer, "dense"] = (w13, w2, {})
        if (layer, fmt) not in weights:
            w13, w2, _ = weights[layer, "dense"]
            (q13, e13), (q2, e2) = bench.quantize_chunked(fmt, w13), bench.quantize_chunked(fmt, w2)
            kw = {f"w13_{n}": v for n, v in e13.items()} | {f"w2_{n}": v for n, v in e2.items()}
            weights[layer, fmt] = (q13, q2, kw)
        return weights[layer, fmt]

    rows = ["| bucket | heuristic us | tuned us | gain | chosen |", "|---|---|---|---|---|"]
    for i, (T, layer, fmt, act) in enumerate(work):
        E, k, H, I = bench.LAYERS[layer]  # noqa: E741
        key = TuneKey.for_call(device, torch.bfloat16, T, E, k, H, I, fmt, act)
        label = f"{layer} T={T} {fmt}" + ("" if act == "dense" else f" act={act}")
        if key in table and not retune:
            rows.append(_row(label, table[key], "(kept)"))
            continue
        if time.monotonic() >= deadline:
            say(f"budget spent: {len(work) - i} bucket(s) not tuned, from {label} on")
            break
        w13, w2, kw = weights_for(layer, fmt)
        g = torch.Generator(device=device).manual_seed(T)
        x = torch.randn(T, H, device=device, generator=g).bfloat16()
        tw, ids = torch.randn(T, E, device=device, generator=g).softmax(-1).topk(k, dim=-1)
        ids = ids.int()
        spec = MoESpec(weight_format=fmt, act_format=act)
        run = lambda cfg: fused_moe_experts(x, ids, tw, w13, w2, spec, kernel_config=cfg, **kw)  # noqa: E731
        base = choose_moe_config(T, k, E, H, I, fmt, _num_sms(device), act_format=act)
        t0 = time.monotonic()
        outcome = tune(key, base, measure_for(device, run), deadline=deadline, max_per_gemm=max_per_gemm)
        if outcome.best is not None:
            table[key] = outcome.entry()
            cache.write_table(out_path, table, meta)
        note = (f"({len(outcome.timed)} timed, {len(outcome.skipped)} skipped, {time.monotonic() - t0:.0f}s"
                f"{', out of time' if outcome.out_of_time else ''})")
        rows.append(_row(label, outcome.entry(), note))
        say(rows[-1])
        for tiles, reason in outcome.skipped:
            say(f"    skipped {tiles}: {reason}")
    return rows


def main(argv=None) -> None:
    from pathlib import Path

    p = argparse.ArgumentParser(description="Tune the fused MoE kernels' tiles per shape bucket on this GPU "
                                            "and write the table (run from the repository root).")
    p.add_argument("--layers", default="qwen3-30b-a3b,gpt-oss-120b,dsv4-flash",
                   help="names in benchmarks/moe.py LAYERS")
    p.add_argument("--tokens", default="128,1024,4096,16384")
    p.add_argument("--formats", default="dense,mxfp4,fp8_block128", help="weight formats")
    p.add_argument("--act-formats", default="dense")
    p.add_argument("--out", default=str(cache.SHIPPED_DIR) + "/",
                   help="JSON file, or a directory (ends with /) for <device-slug>.json; entries already "
                        "there are kept and their buckets skipped (unless --retune)")
    p.add_argument("--budget-s", type=float, default=480.0, help="start no candidate after this many seconds")
    p.add_argument("--max-per-gemm", type=int, default=MAX_PER_GEMM)
    p.add_argument("--retune", action="store_true")
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    try:
        from benchmarks import moe as bench
    except ImportError as e:
        raise SystemExit(f"run from the repository root: layer shapes and weights come from benchmarks/moe.py "
                         f"({e})")
    import triton

    device = torch.device("cuda", torch.cuda.current_device())
    name = cache.device_name(device)
    out = Path(args.out)
    out_path = out / f"{cache.device_slug(name)}.json" if args.out.endswith("/") or out.is_dir() else out
    meta = {"device": name, "torch": torch.__version__, "triton": triton.__version__, "commit": _commit()}
    print(f"device: {name} | torch {torch.__version__} | triton {triton.__version__} | commit {meta['commit']} "
          f"| out {out_path}", flush=True)
    tokens = sorted((int(t) for t in args.tokens.split(",")), reverse=True)  # prefill first: it gains most
    work = [(T, layer, fmt, act) for T in tokens for layer in args.layers.split(",")
            for fmt in args.formats.split(",") for act in args.act_formats.split(",") if fmt in ACT_WEIGHT_PAIRS[act]]
    rows = sweep(work, out_path, meta, bench, device, deadline=deadline, max_per_gemm=args.max_per_gemm,
                 retune=args.retune, say=lambda m: print(m, flush=True))
    print("\n" + "\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
