"""OpenAI triton_kernels ("TK") ``matmul_ogs``: the MoE layer baseline TARGETS.md measures against.

    python -m benchmarks.tk_baseline --check    # on a GPU: numerics vs our float64 reference, quick timings

# T: tokens, E: experts, k: experts per token, H: hidden, I: expert intermediate size
TK is not a dependency of this repo.  The benchmarks use the pure-Python wheel in the git-ignored
``.whl/`` (``scripts/gpu_check.sh`` installs every wheel there), version ``1.0.0.post20251121``,
upstream's package files unchanged, from

    triton-lang/triton @ 4b184cccbb42c3aa5f24e34c39c5358636b3e2bd : python/triton_kernels
    (main, 2025-11-21, "patch workaround by correctly setting stage/cluster attrubtes (#8797)")

the release/3.6.x branch point: the ``python/triton`` sources of the triton 3.6.0 wheel (what the
GPU machine runs) equal that commit's, save the version string and one later ``knobs.py``
cherry-pick.  TK changes its API without notice, so the kernels are pinned to the compiler release.

One layer call, as gpt-oss runs its MoE MLP on Hopper, from the top-k our kernels get:
  1. routing metadata: TK ``topk`` with the given ids (``y_indx=``; no logits, no top-k of its own)
     -> bitmatrix -> expert-sorted gather/scatter indices -> ragged block schedule;
  2. ``matmul_ogs(x, W13, gather)`` with TK's fused SwiGLU epilogue       -> h [T*k, I] bf16;
  3. ``matmul_ogs(h, W2, scatter, gammas=routing weights)`` + TK's reduce over k -> [T, H].
Weights are laid out (and for MXFP4 quantised and swizzled by TK's own helpers) once, outside
the timed call; nothing above syncs with the host, and ``--check`` times it through a CUDA graph.

Limits, stated where they bite:
  * TK's SwiGLU is gpt-oss's: interleaved gate/up columns, ``gate * sigmoid(alpha * gate) *
    (up + 1)`` with clamps at ``limit``.  Our qwen3/dsv4 layers use plain SiLU; for timing that
    costs the same, so those rows time TK's variant.  ``--check`` compares numerics on a layer
    with the matching ``MoESpec``.
  * TK's topk and bitmatrix kernels index slots with ``tl.arange(0, k)``: k must be a power of
    two, so dsv4-flash (top-6) reads n/a.
  * It does not run on CPU: TRITON_INTERPRET cannot copy TK's ``Tensor`` wrapper, and its tile
    heuristics query ``torch.cuda`` device properties.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Optional

import torch

TK_SOURCE = "triton-lang/triton@4b184cccbb42c3aa5f24e34c39c5358636b3e2bd:python/triton_kernels"
FORMATS = ("bf16", "mxfp4")
GPT_OSS_ALPHA, GPT_OSS_LIMIT = 1.702, 7.0


class Unavailable(RuntimeError):
    """TK cannot run this here (not installed, no CUDA, unsupported layer): the column reads n/a."""


@functools.lru_cache(maxsize=None)
def _import_tk() -> tuple[Optional[SimpleNamespace], str]:
    try:
        from triton_kernels import matmul_ogs, swiglu, tensor, topk
        from triton_kernels.numerics_details import mxfp
        from triton_kernels.tensor_details import layout
    except Exception as e:  # noqa: BLE001  (any import failure means: no TK column)
        return None, f"triton_kernels is not importable ({type(e).__name__}: {e}); see .whl/ and scripts/gpu_check.sh"
    return SimpleNamespace(mo=matmul_ogs, swiglu=swiglu, tensor=tensor, topk=topk.topk, mxfp=mxfp, layout=layout), ""


def tk() -> SimpleNamespace:
    """TK's modules, imported once; Unavailable (with the reason) where they cannot run."""
    mods, why = _import_tk()
    if mods is None:
        raise Unavailable(why)
    if not torch.cuda.is_available():
        raise Unavailable("TK needs a CUDA device")
    return mods


def version() -> str:
    try:
        return f"triton_kernels {importlib.metadata.version('triton_kernels')}"
    except importlib.metadata.PackageNotFoundError:
        return "triton_kernels not installed"


def check_top_k(k: int) -> None:
    if k < 1 or k & (k - 1):
        raise Unavailable(f"top-{k}: TK's topk/bitmatrix kernels need a power-of-two k")


# ----------------------------------------------------------------------------- weights

@dataclass
class TKWeights:
    """One layer's expert weights as TK's ``matmul_ogs`` reads them: [E, K, N], K-contiguous."""

    fmt: str  # "bf16" or "mxfp4"
    num_experts: int
    w13: object  # [E, H, 2I], gate/up interleaved along 2I (a view, or TK's swizzled FP4 Tensor)
    w2: object  # [E, I, H]
    # mxfp4 only: e8m0 scales in TK's Hopper layout, which fixes the kernel's num_warps -> keyed by it
    w13_scale: dict = field(default_factory=dict)
    w2_scale: dict = field(default_factory=dict)
    # mxfp4 only, with keep_raw: TK's quantised bits in our layout ([E, N, K//2] e2m1, [E, N, K//32] e8m0)
    raw: Optional[dict] = None


def interleave_gate_up(w13: torch.Tensor) -> torch.Tensor:
    """[E, 2I, H] with rows [gate | up] -> rows gate0, up0, gate1, up1, ... (what TK's SwiGLU pairs)."""
    E, I2, H = w13.shape
    return torch.stack((w13[:, : I2 // 2], w13[:, I2 // 2:]), dim=2).reshape(E, I2, H)


def _mxfp4(w_t: torch.Tensor, keep_raw: bool):
    """TK's MXFP4 quantisation of w_t [E, K, N] along K and its default layouts for this GPU.
    Returns (value Tensor, {num_warps: scale Tensor}, raw bits in our layout or None)."""
    m = tk()
    q, s = m.mxfp.downcast_to_mxfp(w_t, torch.uint8, axis=1)  # [E, K//2, N], [E, K//32, N] (K-contiguous)
    value_layout, value_opts = m.layout.make_default_matmul_mxfp4_w_layout(mx_axis=1)
    value = m.tensor.convert_layout(m.tensor.wrap_torch_tensor(q, dtype=m.tensor.FP4), value_layout, **value_opts)
    scales = {}
    for num_warps in (4, 8):  # TK's bench_mlp: 4 warps up to 512 tokens, else 8
        scale_layout, scale_opts = m.layout.make_default_matmul_mxfp4_w_scale_layout(mx_axis=1, num_warps=num_warps)
        scales[num_warps] = m.tensor.convert_layout(m.tensor.wrap_torch_tensor(s), scale_layout, **scale_opts)
    raw = (q.transpose(1, 2).contiguous(), s.transpose(1, 2).contiguous()) if keep_raw else None
    return value, scales, raw


def prepare_weights(w13: torch.Tensor, w2: torch.Tensor, fmt: str, gate_up: str = "concat",
                    keep_raw: bool = False) -> TKWeights:
    """Our weights (w13 [E, 2I, H], w2 [E, H, I], bf16) -> TK operands in ``fmt``, once per layer.

    ``gate_up="concat"`` reorders W13's rows so that TK pairs each gate with its own up row
    (the copy happens here, never in the timed call)."""
    if fmt not in FORMATS:
        raise ValueError(f"TK format {fmt!r} is not one of {FORMATS}")
    tk()
    w13 = interleave_gate_up(w13) if gate_up == "concat" else w13
    w13_t, w2_t = w13.transpose(1, 2), w2.transpose(1, 2)  # [E, K, N] views, K-contiguous as TK wants
    if fmt == "bf16":
        return TKWeights(fmt, w13.shape[0], w13_t.to(torch.bfloat16), w2_t.to(torch.bfloat16))
    v13, s13, r13 = _mxfp4(w13_t, keep_raw)
    v2, s2, r2 = _mxfp4(w2_t, keep_raw)
    raw = dict(w13=r13[0], w13_scale=r13[1], w2=r2[0], w2_scale=r2[1]) if keep_raw else None
    return TKWeights(fmt, w13.shape[0], v13, v2, s13, s2, raw)


# ----------------------------------------------------------------------------- layer

def make_layer(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weights: TKWeights,
               alpha: float = GPT_OSS_ALPHA, limit: Optional[float] = GPT_OSS_LIMIT) -> Callable[[], torch.Tensor]:
    """fn() -> [T, H] in x's dtype: TK's routing metadata from these top-k, then the two matmul_ogs calls."""
    m = tk()
    T, k = topk_ids.shape
    check_top_k(k)
    E = weights.num_experts
    ids = topk_ids.to(torch.int32).contiguous()  # topk reads y_indx with its own [T, k] stride
    gates = topk_weights.to(torch.float32).reshape(-1).contiguous()
    # topk(y_indx=ids) gathers values at ids and builds the bitmatrix; the values are not used.
    unused_logits = torch.zeros(T, E, dtype=torch.bfloat16, device=x.device)
    num_warps = 4 if T <= 512 else 8
    pc1 = m.mo.PrecisionConfig(weight_scale=weights.w13_scale.get(num_warps))
    pc2 = m.mo.PrecisionConfig(weight_scale=weights.w2_scale.get(num_warps))
    swiglu = m.mo.FusedActivation(m.mo.FnSpecs("swiglu", m.swiglu.swiglu_fn, ("alpha", "limit"), reduction_n=2),
                                  (alpha, limit))

    def layer():
        meta = m.topk(unused_logits, k, apply_softmax=False, y_indx=ids).mask_metadata
        dispatch, combine = meta.row_sorted_indx, meta.col_sorted_indx  # slot -> sorted row, sorted row -> slot
        ragged = m.tensor.make_ragged_tensor_metadata(meta.col_sum, dispatch.shape[0])
        gate_scal = gates[combine]
        routing = m.mo.RoutingData(gate_scal, ragged.slice_sizes, E, k, ragged)
        h = m.mo.matmul_ogs(x, weights.w13, None, routing, gather_indx=m.mo.GatherIndx(combine, dispatch),
                            precision_config=pc1, fused_activation=swiglu)
        return m.mo.matmul_ogs(h, weights.w2, None, routing, scatter_indx=m.mo.ScatterIndx(dispatch, combine),
                               precision_config=pc2, gammas=gate_scal)

    return layer


# ----------------------------------------------------------------------------- benchmarks.moe columns

class TKColumns:
    """The "TK bf16" / "TK mxfp4" columns of ``benchmarks.moe``: weights prepared once per layer,
    one CUDA-graph time per (layer, T, format), the string "n/a" where TK cannot run, each reason
    logged once."""

    KEYS = {"bf16": "tk_bf16", "mxfp4": "tk_mxfp4"}

    def __init__(self, log: Callable[[str], None], enabled: bool = True):
        self.log = log
        self.weights: dict[str, TKWeights] = {}
        self.logged: set[tuple[str, str]] = set()
        self.disabled = "" if enabled else "disabled (--no-tk)"
        if enabled:
            try:
                tk()
            except Unavailable as e:
                self.disabled = str(e)
        if self.disabled:
            self._na("TK", self.disabled)
        else:
            log(f"TK baseline: {version()} ({TK_SOURCE})")

    def _na(self, what: str, reason: str, where: str = "") -> None:
        if (what, reason) not in self.logged:
            self.logged.add((what, reason))
            self.log(f"{what} n/a{' (' + where + ')' if where else ''}: {reason}")

    def prepare(self, name: str, w13: torch.Tensor, w2: torch.Tensor, k: int) -> None:
        self.weights = {}
        if self.disabled:
            return
        try:
            check_top_k(k)
            w13 = interleave_gate_up(w13)
            for fmt in FORMATS:
                try:
                    self.weights[fmt] = prepare_weights(w13, w2, fmt, gate_up="interleaved")
                except Exception as e:  # noqa: BLE001
                    self._na(f"TK {fmt}", f"{type(e).__name__}: {str(e)[:300]}", name)
        except Unavailable as e:
            self._na("TK", str(e), name)

    def time(self, row: dict, x, routes, time_fn: Callable, round_robin: Callable) -> None:
        """``routes``: [(topk_ids, topk_weights)], one layer call each in turn."""
        for fmt, key in self.KEYS.items():
            row[key] = "n/a"
            if fmt in self.weights:
                try:
                    row[key] = time_fn(round_robin([make_layer(x, i, w, self.weights[fmt]) for i, w in routes]))
                except Exception as e:  # noqa: BLE001
                    self._na(f"TK {fmt}", f"{type(e).__name__}: {str(e)[:300]}", f"{row['layer']} T={row['T']}")

    def release(self) -> None:
        self.weights = {}


# ----------------------------------------------------------------------------- --check

def _errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(||out - ref|| / ||ref||, max|out - ref| / max|ref|), in float64."""
    d = out.double() - ref.double()
    return (d.norm() / ref.double().norm()).item(), (d.abs().max() / ref.double().abs().max()).item()


def check_numerics(tol: float = 1e-2, log=print) -> bool:
    """A small gpt-oss-style layer through TK (bf16, mxfp4) against our float64 reference op.

    The reference gets the same weights (for mxfp4: TK's quantised bits, decoded by our formats
    module), ``MoESpec(alpha=1.702, limit=7, up_offset=1, gate_up=interleaved)``; TK keeps h in
    bf16, so ~4e-3 is expected."""
    from inductor_moe.ops.moe_experts import moe_experts_reference
    from inductor_moe.spec import MoESpec

    E, k, H, I = 16, 4, 512, 256
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) / H ** 0.5).bfloat16()  # interleaved rows
    w2 = (torch.randn(E, H, I, device="cuda", generator=g) / I ** 0.5).bfloat16()
    spec = dict(alpha=GPT_OSS_ALPHA, limit=GPT_OSS_LIMIT, up_offset=1.0, gate_up="interleaved")
    weights = {fmt: prepare_weights(w13, w2, fmt, gate_up="interleaved", keep_raw=True) for fmt in FORMATS}
    r = weights["mxfp4"].raw
    ref_args = {"bf16": ((w13.double(), w2.double()), MoESpec(**spec), {}),
                "mxfp4": ((r["w13"], r["w2"]), MoESpec(weight_format="mxfp4", **spec),
                          dict(w13_scale=r["w13_scale"], w2_scale=r["w2_scale"]))}
    ok = True
    for T in (77, 700):  # 4- and 8-warp MXFP4 scale layouts
        x = (3 * torch.randn(T, H, device="cuda", generator=g)).bfloat16()  # wide enough to hit the clamps
        tw, ids = torch.randn(T, E, device="cuda", generator=g).softmax(-1).topk(k, dim=-1)
        ids = ids.int()
        for fmt in FORMATS:
            out = make_layer(x, ids, tw, weights[fmt])()
            (a, b), s, kw = ref_args[fmt]
            ref = moe_experts_reference(x.double(), ids, tw.double(), a, b, s, **kw)
            rel, max_rel = _errors(out, ref)
            passed = bool(torch.isfinite(out).all()) and rel < tol
            ok &= passed
            log(f"check TK {fmt}: T={T} E={E} k={k} H={H} I={I}  ||d||/||ref|| = {rel:.2e}  "
                f"max|d|/max|ref| = {max_rel:.2e}  {'PASS' if passed else 'FAIL'} (tol {tol:g})")
    return ok


def quick_times(log=print) -> None:
    """TK bf16 / mxfp4 on qwen3-30b-a3b at T=1 and T=4096, as benchmarks.moe times them."""
    from .moe import LAYERS, REPEAT, sweep_inputs
    from .timing import graph_time_us

    E, k, H, I = LAYERS["qwen3-30b-a3b"]
    for T in (1, 4096):
        x, ids, tw, w13, w2 = sweep_inputs(T, E, k, H, I)
        w13 = interleave_gate_up(w13)
        for fmt in FORMATS:
            weights = prepare_weights(w13, w2, fmt, gate_up="interleaved")
            us = graph_time_us(make_layer(x, ids, tw, weights), reps=15, inner=REPEAT)
            log(f"time TK {fmt}: qwen3-30b-a3b T={T}: {us:.1f} us per layer call (CUDA-graph replay)")
            del weights
        del x, w13, w2
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="numerics vs our reference, then quick timings (GPU)")
    p.add_argument("--no-times", action="store_true", help="with --check: numerics only")
    args = p.parse_args(argv)
    print(f"{version()} | source {TK_SOURCE}")
    if not args.check:
        p.print_help()
        return 0
    try:
        tk()
    except Unavailable as e:
        print(f"TK check: n/a: {e}")
        return 2
    import triton

    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    ok = check_numerics()
    if not args.no_times:
        quick_times()
    print(f"TK check: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
