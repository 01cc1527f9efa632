"""MoE experts layer benchmark: ``python -m benchmarks.moe [--quick] [--layers qwen3,...] [--tokens 1,16]``.

# T: tokens, E: experts, k: experts per token, H: hidden, I: expert intermediate size, N = T*k
Times, as the median of CUDA-graph replays (each graph holds REPEAT back-to-back calls, each with
its own random routing, so small-T calls read their experts' weights from HBM as a real decode
step does, not from the L2 cache the previous call filled; --same-routing: one routing), our
fused op per weight format with PDL on and off, an HF-style grouped_mm layer (sort -> 2x
torch._grouped_mm with SwiGLU between -> unsort -> sum) eager and under torch.compile, the two
grouped_mm calls alone, OpenAI triton_kernels matmul_ogs bf16 and mxfp4 (benchmarks/tk_baseline.py;
"n/a" where it cannot run), and the floor max(FLOPs / 700e12, bytes / 3.0e12).  Prints one table,
and writes moe_bench.md and moe_bench.png under $OUT (or ./out).  ``--host``: without CUDA graphs
(eager, torch.compile's default mode), wall time per call of ours and HF's (moe_host.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from inductor_moe.cuda.fp4_moe import MAX_PAIRS_PER_EXPERT
from inductor_moe.lowering.moe_fp4_ws import MIN_ROWS_PER_EXPERT

from .timing import graph_time_us, interleaved_stream_times_us, kernel_times_by_name
from .tk_baseline import TKColumns
from .tk_baseline import version as tk_version

LAYERS = {  # name: (E, k, H, I)
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "dsv4-flash": (256, 6, 4096, 2048),
    "gpt-oss-120b": (128, 4, 2880, 2880),
}
TOKENS = (1, 16, 128, 1024, 4096, 16384)
QUICK = {"qwen3-30b-a3b": (1, 16, 128, 1024, 4096, 16384), "dsv4-flash": (1, 128, 4096),
         "gpt-oss-120b": (1, 128, 4096)}
MMA_RATE, BANDWIDTH = 700e12, 3.0e12
FP8_MMA_RATE = 1255e12  # TARGETS.md: the fp8 floor of fp8 weights with fp8 activations
# weight format [+ fp8 activations]: "+a128" = act_format fp8_block128, "+a32" = fp8_mx32
ACT_SUFFIXES = {"+a128": "fp8_block128", "+a32": "fp8_mx32"}


def split_format(fmt: str) -> tuple[str, str]:
    """'fp8_block128+a128' -> ('fp8_block128', 'fp8_block128'); 'mxfp4' -> ('mxfp4', 'dense')."""
    for suffix, act in ACT_SUFFIXES.items():
        if fmt.endswith(suffix):
            return fmt[:-len(suffix)], act
    return fmt, "dense"
REPEAT = 10  # calls per graph replay


def floor_us(T, E, k, H, I, bytes_per_weight, mma_rate=MMA_RATE):
    active = E * (1 - (1 - k / E) ** T)  # expected experts hit by random top-k routing
    flops = 6.0 * T * k * H * I
    nbytes = active * 3 * H * I * bytes_per_weight + 2 * T * H * 2
    return max(flops / mma_rate, nbytes / BANDWIDTH) * 1e6


# ----------------------------------------------------------------------------- contenders

def hf_grouped_mm(x, ids, tw, w13, w2):
    """What transformers v5's grouped_mm experts path does, in plain torch."""
    T, H = x.shape
    k = ids.shape[1]
    E = w13.shape[0]
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    xs = x[order // k]
    offs = torch.histc(flat.float(), bins=E, min=0, max=E - 1).cumsum(0).to(torch.int32)
    h13 = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)
    gate, up = h13.chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs)
    y = y * tw.reshape(-1)[order, None].to(y.dtype)
    unsorted = torch.empty_like(y)
    unsorted[order] = y
    return unsorted.view(T, k, H).sum(1)


def grouped_mm_only(xs, h, offs, w13, w2):
    torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)
    return torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)


def quantize_chunked(fmt, w, group=16):
    """W.quantize_weight over slices of experts (the quantisers work in fp32: bounded temporaries).
    Returns the keyword arguments of the op for one weight: (weight, {"scale": .., "global_scale": ..})."""
    from inductor_moe.ops import weights as W

    parts = [W.quantize_weight(fmt, w[i:i + group]) for i in range(0, w.shape[0], group)]
    q = torch.cat([p[0] for p in parts])
    sdt = parts[0][1].dtype
    scale = torch.cat([p[1].view(torch.uint8) if p[1].element_size() == 1 else p[1] for p in parts])
    scale = scale.view(sdt) if scale.dtype != sdt else scale
    extra = {"scale": scale}
    if parts[0][2] is not None:
        extra["global_scale"] = torch.cat([p[2] for p in parts])
    return q, extra


def round_robin(fns):
    """One function calling ``fns`` in turn: a graph of REPEAT calls captures each in order."""
    state = {"i": 0}

    def call():
        fn = fns[state["i"] % len(fns)]
        state["i"] += 1
        return fn()
    return call


def layer_weights(name, formats, generator):
    """The layer's random bf16 expert weights and, per weight format in ``formats``, the op's weight
    arguments: (w13, w2, {wfmt: (w13, w2, scale keyword arguments)}), "dense" the bf16 ones."""
    E, k, H, I = LAYERS[name]
    w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=generator) / H ** 0.5).bfloat16()
    w2 = (torch.randn(E, H, I, device="cuda", generator=generator) / I ** 0.5).bfloat16()
    weights = {"dense": (w13, w2, {})}
    for wfmt in {split_format(f)[0] for f in formats} - {"dense"}:
        (q13, e13), (q2, e2) = quantize_chunked(wfmt, w13), quantize_chunked(wfmt, w2)
        weights[wfmt] = (q13, q2, {f"w13_{key}": v for key, v in e13.items()} | {f"w2_{key}": v for key, v in e2.items()})
    return w13, w2, weights


def op_spec(fmt: str) -> str:
    """The op's spec string for a benchmark format (weight format [+ fp8 activations])."""
    wfmt, act = split_format(fmt)
    return ",".join(p for p in ("" if wfmt == "dense" else f"weight_format={wfmt}",
                                "" if act == "dense" else f"act_format={act}") if p)


def each_route(routes, f):
    """``f(ids, tw)`` -> one function taking ``routes`` in turn (each call routes anew)."""
    return round_robin([lambda i=i, w=w: f(i, w) for i, w in routes])


def routings(T, E, k, generator, count):
    """``count`` random softmax top-k routings (ids int32, renormalised fp32 weights) of T tokens."""
    out = []
    for _ in range(count):
        scores = torch.randn(T, E, device="cuda", generator=generator).softmax(-1)
        tw, ids = scores.topk(k, dim=-1)
        out.append((ids.int(), (tw / tw.sum(-1, keepdim=True)).float()))
    return out


def time_graph(fn, reps=15):
    """Median microseconds per call: graph of REPEAT calls, replayed ``reps`` times."""
    return graph_time_us(fn, reps=reps, inner=REPEAT)


def peak_mib(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


# ----------------------------------------------------------------------------- main

def header() -> str:
    import triton

    commit = os.environ.get("INDUCTOR_MOE_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    check=True).stdout.strip()
        except Exception:  # noqa: BLE001
            commit = "unknown"
    return (f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} "
            f"| commit {commit} | {tk_version()} | median of CUDA-graph replays, us per layer call")


def run(layers, tokens_for, formats, with_compile, log, with_tk=True, same_routing=False):
    """``same_routing``: every call of a graph routes the same way (its experts' weights stay in
    the L2 cache from call to call at small T); by default each of the REPEAT calls routes anew."""
    from inductor_moe import config
    from inductor_moe.lowering import moe

    moe.register()
    op = torch.ops.inductor_moe.moe_experts
    tk = TKColumns(log, enabled=with_tk)
    rows = []
    for name in layers:
        E, k, H, I = LAYERS[name]
        g = torch.Generator(device="cuda").manual_seed(0)
        w13, w2, quant = layer_weights(name, formats, g)
        tk.prepare(name, w13, w2, k)
        hf_compiled = torch.compile(hf_grouped_mm, dynamic=True) if with_compile else None
        for T in tokens_for[name]:
            x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
            routes = routings(T, E, k, g, 1 if same_routing else REPEAT)
            ids, tw = routes[0]
            routed = functools.partial(each_route, routes)
            r = dict(layer=name, T=T, floor=floor_us(T, E, k, H, I, 2.0),
                     floor_fp4=floor_us(T, E, k, H, I, 0.5 + 1 / 32),
                     floor_fp8=floor_us(T, E, k, H, I, 1.0, FP8_MMA_RATE))
            t0 = time.time()
            for fmt in formats:
                wfmt = split_format(fmt)[0]
                wa, wb, kw = quant[wfmt]
                spec = op_spec(fmt)
                variants = [("", {"pdl": True})]
                if fmt == "dense":
                    variants.append(("_nopdl", {"pdl": False}))
                if fmt == "mxfp4":  # tl.dot_scaled forced (auto picks the packed decode on sm_90)
                    variants.append(("_ds", {"mxfp4_mma": "dot_scaled", "cuda_decode": False}))
                if fmt in ("mxfp4", "nvfp4") and T * k <= MAX_PAIRS_PER_EXPERT[fmt] * E:  # what CUDA decode replaces
                    variants.append(("_triton", {"cuda_decode": False}))
                if fmt in ("mxfp4", "nvfp4") and T * k >= MIN_ROWS_PER_EXPERT * E:  # the opt-in warp-specialised GEMMs
                    variants.append(("_ws", {"moe_fp4_ws": True}))
                for suffix, patch in variants:
                    with config.patch(**patch):
                        fn = routed(lambda i, w: op(x, i, w, wa, wb, spec, **kw))  # noqa: B023
                        try:
                            r[f"{fmt}{suffix}"] = time_graph(fn)
                        except Exception as e:  # noqa: BLE001
                            log(f"  {name} T={T} {fmt}{suffix}: {type(e).__name__}: {e}")
            if "dense" in formats:  # the persistent L1+L2 kernel forced on / off (lowering/moe_mega.py)
                from inductor_moe.lowering.moe import fused_moe_experts
                from inductor_moe.spec import MoESpec

                for mega in (True, False):
                    try:
                        r["dense_mega" if mega else "dense_split"] = time_graph(routed(
                            lambda i, w: fused_moe_experts(x, i, w, w13, w2, MoESpec(), use_mega=mega)))  # noqa: B023
                    except Exception as e:  # noqa: BLE001
                        log(f"  {name} T={T} dense mega={mega}: {type(e).__name__}: {e}")
            r["mem"] = peak_mib(lambda: op(x, ids, tw, w13, w2, ""))
            r["hf"] = time_graph(routed(lambda i, w: hf_grouped_mm(x, i, w, w13, w2)))
            r["hf_mem"] = peak_mib(lambda: hf_grouped_mm(x, ids, tw, w13, w2))
            if hf_compiled is not None:
                try:
                    r["hf_compiled"] = time_graph(routed(lambda i, w: hf_compiled(x, i, w, w13, w2)))
                except Exception as e:  # noqa: BLE001
                    log(f"  {name} T={T} hf compiled: {type(e).__name__}: {e}")
            flat = ids.reshape(-1)
            order = flat.argsort(stable=True)
            xs = x[order // k]
            offs = torch.histc(flat.float(), bins=E, min=0, max=E - 1).cumsum(0).to(torch.int32)
            h = torch.randn(T * k, I, device="cuda", generator=g).bfloat16()
            r["grouped_mm"] = time_graph(lambda: grouped_mm_only(xs, h, offs, w13, w2))
            tk.time(r, x, routes, time_graph, round_robin)
            log(f"{name} T={T}: " + " ".join(f"{key}={v:.1f}" for key, v in r.items() if isinstance(v, float))
                + f" ({time.time() - t0:.0f}s)")
            rows.append(r)
        del w13, w2, quant
        tk.release()
        torch.cuda.empty_cache()
    return rows


DEFAULT_FORMATS = "dense,fp8_block128,fp8_block128+a128,mxfp4,mxfp4+a32,nvfp4"
HOST_TOKENS = (1, 16, 128, 1024, 4096)
HOST_FORMATS = ("dense", "fp8_block128+a128", "mxfp4", "nvfp4")


def run_host(layers, tokens_for, formats, log) -> str:
    """Without CUDA graphs (eager, ``torch.compile``'s default mode) a small call costs what its
    host side costs: wall µs per call of back-to-back calls (``timing.interleaved_stream_times_us``,
    the contenders' rounds in turn) of our op as a compiled graph calls it
    (``torch.ops.inductor_moe.moe_experts``), HF's grouped_mm layer eager and under ``torch.compile``
    default, and our GPU time from graph replays beside."""
    from inductor_moe.lowering import moe

    moe.register()
    op = torch.ops.inductor_moe.moe_experts
    lines = ["| layer | T | format | ours, no graph | ours, graph replay (GPU) | HF eager, no graph | "
             "HF compiled, no graph | ours / HF compiled |", "|---|---|---|---|---|---|---|---|"]
    for name in layers:
        E, k, H, I = LAYERS[name]
        g = torch.Generator(device="cuda").manual_seed(0)
        w13, w2, weights = layer_weights(name, formats, g)
        hf_compiled = torch.compile(hf_grouped_mm, dynamic=True)
        for T in tokens_for[name]:
            x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
            routed = functools.partial(each_route, routings(T, E, k, g, REPEAT))
            fns = {"hf": routed(lambda i, w: hf_grouped_mm(x, i, w, w13, w2)),  # noqa: B023
                   "hf_compiled": routed(lambda i, w: hf_compiled(x, i, w, w13, w2))}  # noqa: B023
            for fmt in formats:
                wa, wb, kw = weights[split_format(fmt)[0]]
                fns[fmt] = routed(lambda i, w, wa=wa, wb=wb, spec=op_spec(fmt), kw=kw: op(x, i, w, wa, wb, spec, **kw))  # noqa: B023
            wall = interleaved_stream_times_us(fns)
            for fmt in formats:
                gpu = time_graph(fns[fmt])
                log(f"host {name} T={T} {fmt}: ours {wall[fmt]:.1f} (GPU {gpu:.1f}) HF eager {wall['hf']:.1f} "
                    f"HF compiled {wall['hf_compiled']:.1f}")
                lines.append(f"| {name} | {T} | {fmt} | {wall[fmt]:.1f} | {gpu:.1f} | {wall['hf']:.1f} | "
                             f"{wall['hf_compiled']:.1f} | {wall[fmt] / wall['hf_compiled']:.2f} |")
        del weights
        del w13, w2
        torch.cuda.empty_cache()
    return "\n".join(lines)


COLUMNS = [("floor", "floor bf16"), ("dense", "ours bf16"), ("dense_nopdl", "ours bf16 no-PDL"),
           ("dense_mega", "ours bf16 mega"), ("dense_split", "ours bf16 split"),
           ("fp8_block128", "ours fp8"), ("fp8_block128+a128", "ours fp8 x fp8 act"), ("floor_fp8", "floor fp8"),
           ("mxfp4+a32", "ours mxfp4 x fp8-mx32 act"), ("mxfp4", "ours mxfp4"), ("mxfp4_triton", "ours mxfp4 triton"), ("mxfp4_ds", "ours mxfp4 dot_scaled"),
           ("mxfp4_ws", "ours mxfp4 ws (opt-in)"), ("nvfp4", "ours nvfp4"), ("nvfp4_triton", "ours nvfp4 triton"),
           ("nvfp4_ws", "ours nvfp4 ws (opt-in)"), ("floor_fp4", "floor fp4"),
           ("hf", "HF eager"), ("hf_compiled", "HF compiled"), ("grouped_mm", "grouped_mm x2"),
           ("tk_bf16", "TK bf16"), ("tk_mxfp4", "TK mxfp4")]


def table(rows) -> str:
    head = ["layer", "T"] + [c[1] for c in COLUMNS] + ["bf16 frac floor", "fp8 x fp8 act frac fp8 floor",
                                                      "best fp4 frac fp4 floor",
                                                      "vs HF compiled", "peak MiB ours / HF"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["layer"], str(r["T"])]
        cells += [f"{r[key]:.1f}" if isinstance(r.get(key), float) else r.get(key, "-") for key, _ in COLUMNS]
        cells.append(f"{r['floor'] / r['dense']:.2f}" if "dense" in r else "-")
        cells.append(f"{r['floor_fp8'] / r['fp8_block128+a128']:.2f}" if "fp8_block128+a128" in r else "-")
        fp4 = [r[f] for f in ("mxfp4", "nvfp4") if f in r]
        cells.append(f"{r['floor_fp4'] / min(fp4):.2f}" if fp4 else "-")
        cells.append(f"{r['hf_compiled'] / r['dense']:.2f}x" if "hf_compiled" in r and "dense" in r else "-")
        cells.append(f"{r['mem']:.0f} / {r['hf_mem']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({r["layer"] for r in rows}, key=list(LAYERS).index)
    fig, axes = plt.subplots(1, len(layers), figsize=(6 * len(layers), 4.5), squeeze=False)
    for ax, name in zip(axes[0], layers):
        sub = [r for r in rows if r["layer"] == name]
        for key, label in COLUMNS:
            pts = [(r["T"], r[key]) for r in sub if isinstance(r.get(key), float)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label, linestyle="--" if "floor" in key else "-")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("tokens T")
        ax.set_ylabel("us per layer call")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------- tile sweep

SWEEP_POINTS = [("qwen3-30b-a3b", 16384), ("qwen3-30b-a3b", 4096), ("gpt-oss-120b", 4096), ("dsv4-flash", 4096),
                ("qwen3-30b-a3b", 1024), ("qwen3-30b-a3b", 1), ("qwen3-30b-a3b", 16), ("dsv4-flash", 1)]
# (block_m or None, L1 (one_dot, block_n, block_k, warps, stages), L2 (block_n, block_k, warps, stages))
SWEEP_BIG = [(None, None, None),
             (None, (True, 64, 64, 8, 4), (128, 64, 4, 4)),
             (None, (True, 128, 64, 8, 3), (256, 64, 8, 3)),
             (None, (False, 64, 64, 4, 4), (128, 128, 8, 3)),
             (None, (True, 64, 128, 8, 3), (64, 64, 4, 4)),
             (64, (True, 64, 64, 4, 4), (128, 64, 4, 4))]
SWEEP_SMALL = [(None, None, None),
               (None, (True, 16, 128, 4, 4), (64, 128, 4, 4)),
               (None, (True, 32, 256, 4, 4), (32, 256, 4, 4)),
               (None, (True, 64, 128, 4, 6), (128, 128, 4, 6)),
               (None, (False, 32, 128, 4, 4), (32, 128, 4, 4))]


def kernel_times(fn, iters=5):
    """Mean device microseconds per call of each of our kernels (align, gemm1, gemm2, mega, combine;
    cuda_gate_up / cuda_down of the CUDA decode kernels)."""
    out = {}
    for name, us in kernel_times_by_name(fn, iters).items():
        if name.startswith("fp4_moe_"):
            short = name.replace("fp4_moe_", "cuda_")
            out[short] = out.get(short, 0.0) + us
        elif name.startswith("moe_"):
            short = "align" if name.startswith("moe_align") else name.split("_kernel")[0].replace("moe_", "")
            out[short] = out.get(short, 0.0) + us
    return out


FP4_SWEEP_POINTS = [("qwen3-30b-a3b", 1), ("qwen3-30b-a3b", 16), ("qwen3-30b-a3b", 128), ("qwen3-30b-a3b", 1024),
                    ("gpt-oss-120b", 1), ("gpt-oss-120b", 128)]


def sweep_inputs(T, E, k, H, I):
    """One layer's random bf16 inputs for the tile sweeps (softmax top-k routing)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) / H ** 0.5).bfloat16()
    w2 = (torch.randn(E, H, I, device="cuda", generator=g) / I ** 0.5).bfloat16()
    x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
    tw, ids = torch.randn(T, E, device="cuda", generator=g).softmax(-1).topk(k, dim=-1)
    return x, ids.int(), tw, w13, w2


def quantized_layer(fmt, w13, w2):
    """(w13, w2, op kwargs) of one layer's bf16 weights quantised to ``fmt`` (the sweeps' inputs)."""
    (q13, e13), (q2, e2) = quantize_chunked(fmt, w13), quantize_chunked(fmt, w2)
    return q13, q2, dict(w13_scale=e13["scale"], w2_scale=e2["scale"], w13_global_scale=e13.get("global_scale"),
                         w2_global_scale=e2.get("global_scale"))


def time_variant(log, tag, fn, patch=None) -> None:
    """Log one sweep variant's graph time and per-kernel split (or why it failed) after ``tag``."""
    from inductor_moe import config

    try:
        with config.patch(**(patch or {})):
            kt = kernel_times(fn)
            total = time_graph(fn, reps=5)
    except Exception as e:  # noqa: BLE001
        log(f"{tag}: {type(e).__name__}: {str(e)[:300]}")
        return
    log(f"{tag} total={total:.1f} " + " ".join(f"{a}={b:.1f}" for a, b in kt.items()))


def sweep_fp4(log):
    """FP4 decode variants per kernel: the default tiles (tuned table or heuristic) with the
    swapped tiles on / off (config.fp4_swap_ab), and mxfp4 through tl.dot_scaled."""
    from inductor_moe.lowering.moe import _num_sms, fused_moe_experts
    from inductor_moe.lowering.moe_tune import config_for_call
    from inductor_moe.spec import MoESpec

    for name, T in FP4_SWEEP_POINTS:
        E, k, H, I = LAYERS[name]
        x, ids, tw, w13, w2 = sweep_inputs(T, E, k, H, I)
        for fmt in ("mxfp4", "nvfp4"):
            q13, q2, kw = quantized_layer(fmt, w13, w2)
            base = config_for_call(x, k, E, H, I, fmt, "dense", _num_sms(x.device), run=None)  # tuned or heuristic
            variants = [("swap", base, {"fp4_swap_ab": "on"}), ("noswap", base, {"fp4_swap_ab": "off"})]
            if fmt == "mxfp4":
                variants.append(("dot_scaled", base, {"mxfp4_mma": "dot_scaled"}))
            if base.regime != "prefill":  # wider swapped tiles: 64-row wgmma per gate/up, 128-row L2
                wide = base.replace(gemm1=dataclasses.replace(base.gemm1, block_n=64),
                                    gemm2=dataclasses.replace(base.gemm2, block_n=128))
                variants.append(("swap-wide", wide, {"fp4_swap_ab": "on"}))
                variants.append(("swap-bk256", base.replace(gemm1=dataclasses.replace(base.gemm1, block_k=256),
                                                            gemm2=dataclasses.replace(base.gemm2, block_k=256)),
                                 {"fp4_swap_ab": "on"}))
            for label, cfg, patch in variants:
                spec = MoESpec(weight_format=fmt)
                fn = lambda: fused_moe_experts(x, ids, tw, q13, q2, spec, kernel_config=cfg, **kw)  # noqa: E731
                time_variant(log, f"sweep-fp4 {name} T={T} {fmt} {label} ({cfg.source} bm={cfg.block_m} "
                             f"g1={tuple(cfg.gemm1.__dict__.values())} g2={tuple(cfg.gemm2.__dict__.values())})",
                             fn, patch)
            del q13, q2, kw
        del w13, w2
        torch.cuda.empty_cache()


def _tiles(bm, one_dot, g1, g2):
    """Override dict: block_m, L1 gate/up layout, L1 and L2 (block_n, block_k, warps, stages)."""
    ov = {"block_m": bm, "gate_up_one_dot": one_dot}
    for which, t in (("gemm1", g1), ("gemm2", g2)):
        ov.update({f"{which}.{f}": v for f, v in zip(("block_n", "block_k", "num_warps", "num_stages"), t)})
    return ov


PREFILL_SWEEP = {  # prefill variants per format (None: the tuned or heuristic config)
    "fp8_block128+a128": [None, _tiles(64, True, (128, 32, 8, 3), (64, 64, 8, 3)),
                          _tiles(64, False, (128, 128, 8, 3), (128, 128, 4, 4))],
    "mxfp4+a32": [None, _tiles(128, True, (64, 64, 8, 3), (128, 64, 8, 3)), _tiles(64, True, (64, 64, 8, 3), (128, 64, 8, 3))],
    "mxfp4": [None, {"fp4_dot_scaled": False}, {"fp4_dot_scaled": False, "gemm1.block_n": 64, "gemm2.block_n": 64},
              {"fp4_dot_scaled": False, "block_m": 64, "gemm1.block_n": 64, "gemm2.block_n": 128},
              {"fp4_prefetch_scales": True}],
    "nvfp4": [None, {"gemm1.block_k": 128, "gemm2.block_k": 128}, {"block_m": 64},
              {"gemm1.block_n": 32, "gemm2.block_n": 128, "gemm2.num_warps": 4}, {"fp4_prefetch_scales": True}],
}


CUDA_DECODE_SWEEP = [(8, 8, 2, 1), (4, 4, 1, 1), (4, 4, 2, 1), (4, 4, 1, 2), (2, 2, 1, 1), (8, 4, 1, 1), (4, 2, 1, 2)]


def sweep_cuda_decode(log, points=(("qwen3-30b-a3b", 1), ("gpt-oss-120b", 1), ("dsv4-flash", 1),
                                   ("qwen3-30b-a3b", 16), ("gpt-oss-120b", 16)), formats=("mxfp4", "nvfp4")):
    """The CUDA MoE decode kernels (cuda/fp4_moe.py) per tile variant (gate_up warps, down warps,
    K steps per warp, down row groups), with and without PDL, beside the Triton kernels they
    replace; each call of a graph routed anew."""
    from inductor_moe.cuda import fp4_moe
    from inductor_moe.lowering.moe import fused_moe_experts
    from inductor_moe.spec import MoESpec

    for name, T in points:
        E, k, H, I = LAYERS[name]
        x, _, _, w13, w2 = sweep_inputs(T, E, k, H, I)
        routes = routings(T, E, k, torch.Generator(device="cuda").manual_seed(1), REPEAT)
        for fmt in formats:
            q13, q2, kw = quantized_layer(fmt, w13, w2)
            spec = MoESpec(weight_format=fmt)
            args = (kw["w13_scale"], kw["w2_scale"], None, None, kw["w13_global_scale"], kw["w2_global_scale"])
            variants = [("triton", None, True)] + [
                (f"gu{a} dn{b} u{u} rg{rg}{'' if pdl else ' no-PDL'}",
                 fp4_moe.MoEDecodeConfig(gate_up_warps=a, down_warps=b, unroll=u, down_row_groups=rg), pdl)
                for a, b, u, rg in CUDA_DECODE_SWEEP for pdl in ((True, False) if (a, b, u, rg) == (4, 4, 1, 1) else (True,))]
            for tag, cfg, pdl in variants:
                def one(i, w, cfg=cfg, pdl=pdl):
                    if cfg is None:
                        return fused_moe_experts(x, i, w, q13, q2, spec, *args, use_cuda_decode=False, use_pdl=pdl)
                    return fp4_moe.moe_decode(x, i, w, q13, q2, spec, *args, torch.empty_like(x), config=cfg, use_pdl=pdl)
                fn = round_robin([lambda i=i, w=w: one(i, w) for i, w in routes])  # noqa: B023
                time_variant(log, f"{name} T={T} {fmt} {tag}", fn)
        del w13, w2
        torch.cuda.empty_cache()


def sweep_prefill(log, points=(("qwen3-30b-a3b", 4096), ("gpt-oss-120b", 4096), ("dsv4-flash", 4096)),
                  formats=None):
    """Prefill variants per format: graph time and per-kernel split of each PREFILL_SWEEP entry,
    applied on the config a call gets (tuned table or heuristic)."""
    from inductor_moe.lowering.moe import _num_sms, fused_moe_experts
    from inductor_moe.lowering.moe_plan import _apply_overrides
    from inductor_moe.lowering.moe_tune import config_for_call
    from inductor_moe.spec import MoESpec

    for name, T in points:
        E, k, H, I = LAYERS[name]
        x, ids, tw, w13, w2 = sweep_inputs(T, E, k, H, I)
        for fmt in formats or tuple(PREFILL_SWEEP):
            wfmt, act = split_format(fmt)
            q13, q2, kw = quantized_layer(wfmt, w13, w2)
            spec = MoESpec(weight_format=wfmt, act_format=act)
            base = config_for_call(x, k, E, H, I, wfmt, act, _num_sms(x.device), run=None)
            for ov in PREFILL_SWEEP[fmt]:
                cfg = _apply_overrides(base, ov) if ov else base
                fn = lambda: fused_moe_experts(x, ids, tw, q13, q2, spec, kernel_config=cfg, **kw)  # noqa: E731
                time_variant(log, f"sweep-prefill {name} T={T} {fmt} ({base.source} {ov})", fn)
            del q13, q2, kw
        del w13, w2
        torch.cuda.empty_cache()


def sweep(log):
    from inductor_moe.lowering.moe import fused_moe_experts, _num_sms
    from inductor_moe.lowering.moe_plan import GemmTiles, choose_moe_config
    from inductor_moe.spec import MoESpec

    spec = MoESpec()
    for name, T in SWEEP_POINTS:
        E, k, H, I = LAYERS[name]
        x, ids, tw, w13, w2 = sweep_inputs(T, E, k, H, I)
        base = choose_moe_config(T, k, E, H, I, "dense", _num_sms(x.device))
        for bm, v1, v2 in (SWEEP_BIG if base.regime != "decode" else SWEEP_SMALL):
            cfg = base
            if bm:
                cfg = cfg.replace(block_m=bm)
            if v1:
                cfg = cfg.replace(gate_up_one_dot=v1[0], gemm1=GemmTiles(*v1[1:]))
            if v2:
                cfg = cfg.replace(gemm2=GemmTiles(*v2))
            fn = lambda: fused_moe_experts(x, ids, tw, w13, w2, spec, kernel_config=cfg)  # noqa: E731
            time_variant(log, f"sweep {name} T={T} (bm={cfg.block_m} one_dot={cfg.gate_up_one_dot} "
                         f"g1={tuple(cfg.gemm1.__dict__.values())} g2={tuple(cfg.gemm2.__dict__.values())})", fn)
        del w13, w2
        torch.cuda.empty_cache()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a subset of layers x token counts")
    p.add_argument("--layers", default=",".join(LAYERS))
    p.add_argument("--tokens", default=None, help="comma-separated token counts (overrides --quick)")
    p.add_argument("--formats", default=DEFAULT_FORMATS,
                   help="weight formats; +a128 / +a32: with fp8 activations (block-128 / mx32 scales)")
    p.add_argument("--no-compile", action="store_true", help="skip HF under torch.compile")
    p.add_argument("--no-tk", action="store_true", help="skip the OpenAI triton_kernels columns")
    p.add_argument("--same-routing", action="store_true",
                   help="every call in a graph routes alike (the expert weights stay L2-resident at small T)")
    p.add_argument("--host", action="store_true",
                   help="without CUDA graphs: wall us per call, ours / HF eager / HF compiled (default mode)")
    p.add_argument("--sweep", action="store_true", help="time tile variants per kernel, then exit")
    p.add_argument("--sweep-fp4", action="store_true", help="time fp4 kernel variants, then exit")
    p.add_argument("--sweep-prefill", action="store_true", help="time prefill variants per format, then exit")
    p.add_argument("--sweep-cuda-decode", action="store_true",
                   help="time the CUDA MoE decode kernels' tile variants (FP4, T = 1 / 16), then exit")
    args = p.parse_args(argv)
    layers = args.layers.split(",")
    if args.tokens:
        tokens_for = {n: tuple(int(t) for t in args.tokens.split(",")) for n in layers}
    elif args.host:
        tokens_for = {n: HOST_TOKENS for n in layers}
    else:
        tokens_for = {n: (QUICK[n] if args.quick else TOKENS) for n in layers}
    out_dir = os.environ.get("OUT") or "out"
    os.makedirs(out_dir, exist_ok=True)
    log_file = open(os.path.join(out_dir, "moe_bench.log"), "a")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)
        print(msg, file=log_file, flush=True)

    if args.sweep or args.sweep_fp4 or args.sweep_prefill or args.sweep_cuda_decode:
        (sweep if args.sweep else sweep_fp4 if args.sweep_fp4 else sweep_prefill if args.sweep_prefill
         else sweep_cuda_decode)(log)
        return
    if args.host:
        formats = args.formats.split(",") if args.formats != DEFAULT_FORMATS else HOST_FORMATS
        text = header().replace("median of CUDA-graph replays, us per layer call",
                                "no CUDA graphs: median wall us per layer call (graph replay beside)") + "\n\n" + run_host(
            layers, tokens_for, formats, log)
        with open(os.path.join(out_dir, "moe_host.md"), "w") as f:
            f.write(text + "\n")
        print(text, flush=True)
        return
    rows = run(layers, tokens_for, args.formats.split(","), not args.no_compile, log, with_tk=not args.no_tk,
               same_routing=args.same_routing)
    text = header() + "\n\n" + table(rows)
    with open(os.path.join(out_dir, "moe_bench.md"), "w") as f:
        f.write(text + "\n")
    try:
        plot(rows, os.path.join(out_dir, "moe_bench.png"))
    except Exception as e:  # noqa: BLE001
        log(f"plot failed: {type(e).__name__}: {e}")
    print(text, flush=True)


if __name__ == "__main__":
    main()
