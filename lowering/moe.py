"""Lowering of ``inductor_moe::moe_experts`` to the fused Triton kernels.

# T: tokens, H: hidden, E: experts, k: experts per token, I: expert intermediate size, N = T*k
Pipeline (templates/): align (route + pad per expert) -> L1 (dispatch x w13, SwiGLU epilogue,
writes the one [N, I] intermediate) -> L2 (x w2, routing weight, writes [N, H] per-(token, slot)
rows) -> combine (fixed-order fp32 sum over slots).  Chained with PDL on sm_90+.  Where
``moe_mega.choose_mega`` says so (small decode calls), L1 and L2 run as one persistent launch.
FP4 experts with bf16 or fp8_mx32 activations (fp8 experts from 192 rows per expert) run swapped
tiles (``MoEKernelConfig.swap_ab``): x's K is permuted once first (``moe_kperm_kernel``) and L1
writes the intermediate in the same order; fp8_mx32 activations are rounded there and kept in bf16.

``register()`` installs the CUDA kernel of the op; anything the kernels do not cover runs the
reference op, with the reason recorded in the report, never a wrong result.  No per-call host
syncs and no per-expert Python loops: every launch is sized from shapes alone, so the whole call
is CUDA-graph capturable (MXFP4 scales are read once per weight version: mxfp4_scales_in_decode).
Every decision is made once per call signature (``_call_plan``); a call then allocates and launches.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from .. import config as moe_config
from ..report import log, record_runtime_fallback
from ..ops import weights as W
from ..ops.moe_experts import moe_experts_reference, validate_moe_inputs_once
from ..spec import MoESpec
from .launch import PlannedLaunches
from .moe_mega import MegaLaunch, choose_mega, mega_isa_specs, mega_max_tokens
from .moe_plan import (MoEKernelConfig, choose_moe_config, expert_major_order, fp4_scales_ahead, fp4_swap_ab,
                       fp8_weight_scales_uniform, fp8_x_fp8_ws_blocks, k_half_tail, mxfp4_dot_scaled, swap_ab_fits,
                       swap_ab_max_registers, with_swap_ab)
from .moe_tma import weight_tma_arguments, weight_tma_reason
from .moe_fp4_ws import MIN_ROWS_PER_EXPERT, fp4_ws_reason, fp4_ws_tokens, launch_fp4_ws, weight_layouts
from .moe_ws import launch_ws_l1, launch_ws_l2, ws_isa_specs, ws_l1_reason, ws_l2_reason
from .moe_tune_cache import kernel_constraint_violation

FORMAT_LABELS = {torch.bfloat16: "bf16", torch.float16: "fp16"}
KERNEL_WEIGHT_FORMATS = ("dense", "fp8_block128", "mxfp4", "nvfp4")  # what the templates read
# weight formats the templates pair with fp8 activations (act_format fp8_block128 / fp8_mx32);
# fp8_mx32 x mxfp4 is the block-scaled FP8 x FP4 MMA (tl.dot_scaled e4m3 x e2m1)
FP8_ACT_WEIGHT_FORMATS = ("dense", "fp8_block128", "mxfp4", "nvfp4")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_has_pdl() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions

        from ..templates.moe_common import HAS_GDC
    except Exception:  # noqa: BLE001 - no NVIDIA backend
        return False
    return HAS_GDC and "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


def pdl_enabled(device: torch.device) -> bool:
    """PDL chaining: config.pdl, a CUDA device of sm_90+, a triton with launch_pdl, no interpreter."""
    if not moe_config.pdl or device.type != "cuda" or _interpreting() or not _triton_has_pdl():
        return False
    return _arch_major(device) >= 9


@functools.lru_cache(maxsize=None)
def _arch_major(device: torch.device) -> int:
    """sm major version (9 for Hopper); the interpreter compiles nothing, 9 stands in.  Cached: the
    driver query costs host time on every call of the op."""
    return torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 9


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def unsupported_reason(spec: MoESpec, device: torch.device, x_dtype: torch.dtype,
                       w_dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Why the fused kernels cannot run this call (None when they can)."""
    if device.type != "cuda" and not _interpreting():
        return f"no Triton kernels on {device.type}"
    if device.type == "cuda" and _arch_major(device) < 8:
        return "the fused MoE kernels need sm_80 or newer"
    if x_dtype not in FORMAT_LABELS:
        return f"activations of dtype {x_dtype} (the kernels take bfloat16/float16)"
    fmt = spec.effective_weight_format
    if fmt not in KERNEL_WEIGHT_FORMATS:
        return f"weight format {fmt!r} is not implemented in the fused kernels yet"
    if spec.act_format != "dense" and fmt not in FP8_ACT_WEIGHT_FORMATS:
        return (f"act_format={spec.act_format!r} (fp8 activations) with weight format {fmt!r} is not "
                f"implemented in the fused kernels (they take {', '.join(FP8_ACT_WEIGHT_FORMATS)} weights)")
    if spec.weight_format == "dense" and spec.quantize_weights is None and w_dtype is not None and w_dtype != x_dtype:
        return f"dense weights of dtype {w_dtype} with activations of dtype {x_dtype}"
    return None


def describe_moe_lowering(spec, device: torch.device, x_dtype, num_experts, hidden, intermediate, top_k) -> str:
    """Name what will run for such a call, without running anything."""
    spec = MoESpec.from_str(spec) if isinstance(spec, str) else spec
    device = torch.device(device)
    if device.type != "cuda" and not _interpreting():
        return f"reference ({device.type})"
    reason = unsupported_reason(spec, device, x_dtype)
    if reason is not None:
        return f"reference ({reason})"
    fmt = spec.effective_weight_format
    label = FORMAT_LABELS[x_dtype] if fmt == "dense" else fmt
    if spec.act_format != "dense":
        label = f"{spec.act_format} x {label}"
    pdl = "_pdl" if pdl_enabled(device) else ""
    name = f"triton_fused{pdl}[{label}]"
    if _cuda_decode_available(spec, device, x_dtype):  # cuda/fp4_moe.py, where operands are aligned
        from ..cuda.fp4_moe import MAX_PAIRS_PER_EXPERT

        return f"{name} + cuda_decode[{label}] for <= {MAX_PAIRS_PER_EXPERT[fmt]} pairs per expert"
    if device.type == "cuda" and moe_config.mega_kernel and all(
            isinstance(v, int) for v in (num_experts, hidden, intermediate, top_k)):
        sms = _num_sms(device)
        t_max = mega_max_tokens(lambda t: choose_moe_config(t, top_k, num_experts, hidden, intermediate, fmt, sms,
                                                            act_format=spec.act_format),
                                top_k, num_experts, hidden, intermediate, sms)
        if t_max:  # the persistent kernel runs the calls with few tokens (lowering/moe_mega.py)
            name += f" + triton_mega{pdl}[{label}] for T <= {t_max}"
    if device.type == "cuda" and fp4_ws_reason(spec, fmt, x_dtype, MIN_ROWS_PER_EXPERT, 1, 64, 64, True,
                                               _arch_major(device), _interpreting(), moe_config.warp_specialized,
                                               moe_config.moe_fp4_ws) is None:
        name += (f" + gluon moe_fp4_ws[{label}] from {MIN_ROWS_PER_EXPERT} pairs per expert (L1 and L2 decode in "
                 "wgmma's registers; MXFP4 scales <= 2)")
    if device.type == "cuda" and isinstance(hidden, int) and isinstance(intermediate, int):
        name += ws_description(spec, x_dtype, hidden, intermediate, _arch_major(device), _interpreting(),
                               moe_config.warp_specialized)
    return name


def ws_description(spec: MoESpec, x_dtype, hidden: int, intermediate: int, arch_major: int, interpreting: bool,
                   setting: bool) -> str:
    """The report's note of the warp-specialised GEMMs (lowering/moe_ws.py) that calls of this kind
    run on 128-row blocks (prefill), "" where neither would: by the format, shape and device rules
    (a call whose weights are not TMA-ready runs the Triton kernels)."""
    fmt = spec.effective_weight_format
    w_dtype = x_dtype if fmt == "dense" else torch.float8_e4m3fn
    dtypes = (x_dtype, w_dtype)
    taken = []
    # contiguous stacked weights, as _gemm_operands sees them: (expert, row, K) strides
    if fmt == "dense" and spec.transposed:  # [E, K, N]
        w13_strides, w2_strides = (2 * intermediate * hidden, 1, 2 * intermediate), (hidden * intermediate, 1, hidden)
    else:
        w13_strides, w2_strides = (2 * intermediate * hidden, hidden, 1), (hidden * intermediate, intermediate, 1)
    if ws_l1_reason(fmt, spec.act_format, dtypes, 128, hidden, intermediate, w13_strides, 0, spec.gate_up,
                    spec.activation, arch_major, interpreting, setting) is None:
        taken.append("L1")
    if ws_l2_reason(fmt, spec.act_format, dtypes, 128, hidden, intermediate, w2_strides, 0, arch_major, interpreting,
                    setting) is None:
        taken.append("L2")
    return f" + gluon warp-specialised {' + '.join(taken)} on 128-row blocks (prefill)" if taken else ""


def _cuda_decode_available(spec: MoESpec, device: torch.device, x_dtype) -> bool:
    """Whether decode calls of this kind take the CUDA kernels (cuda/fp4_moe.py)."""
    if device.type != "cuda" or spec.effective_weight_format not in ("mxfp4", "nvfp4"):
        return False
    if x_dtype != torch.bfloat16 or spec.act_format != "dense":
        return False
    from ..cuda import nvrtc

    return nvrtc.why_not(device.index if device.index is not None else torch.cuda.current_device()) is None


# ------------------------------------------------------------------------------ launcher

@functools.lru_cache(maxsize=1024)
def _unswapped_plan(T, k, E, H, I, fmt, num_sms, act_format) -> MoEKernelConfig:  # noqa: E741
    """The heuristic's tiles for a call planned swapped that cannot run so (tl.dot_scaled, fp16
    activations, the persistent kernel, config.fp4_swap_ab off, sm_100): planned once per shape, not
    per call."""
    return choose_moe_config(T, k, E, H, I, fmt, num_sms, act_format=act_format, allow_swap_ab=False)


def _tail_constexprs(cfg: MoEKernelConfig, half_tail: bool, scales_ahead: bool) -> dict:
    """K_HALF_TAIL / TAIL_BLOCK_M / SCALES_AHEAD / PREFETCH_SCALES (the persistent kernel takes none
    of them: lowering/moe_mega.py); a tail_block_m not below block_m (a tuned block_m) means none."""
    return dict(K_HALF_TAIL=half_tail, TAIL_BLOCK_M=cfg.tail_block_m if cfg.tail_block_m < cfg.block_m else 0,
                SCALES_AHEAD=scales_ahead, PREFETCH_SCALES=cfg.fp4_prefetch_scales and not scales_ahead)


def _launch_options(tiles, block_m: int, swap_ab: bool, gemm: int) -> dict:
    """num_warps / num_stages, and the swapped tiles' register cap (moe_plan.swap_ab_max_registers)."""
    options = dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    cap = swap_ab_max_registers(block_m, tiles.num_warps, gemm) if swap_ab else None
    if cap is not None:
        options["maxnreg"] = cap
    return options


LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg")  # what gemm*_constexprs adds besides constexprs


def split_launch_options(const: dict) -> dict:
    """Pop the launch options out of a gemm*_constexprs dict (for an AOT compile's options)."""
    return {name: const.pop(name) for name in LAUNCH_OPTIONS if name in const}


def gemm1_constexprs(spec: MoESpec, cfg: MoEKernelConfig, fmt: str, fp4_dot_scaled: bool, has_bias: bool,
                     hidden: int, use_pdl: bool, swap_ab: bool = False, gate_up_gscales: bool = False,
                     scales_ahead: bool = False, intermediate: int = 0, round_inter_mx32: bool = False) -> dict:
    """Compile-time arguments (and launch options) of L1; shared by the launcher and the ISA listing.
    ``gate_up_gscales``: NVFP4 w13 global scales are [E, 2] (gate's, up's), not [E].  ``scales_ahead``:
    moe_plan.fp4_scales_ahead (the swapped one-dot tiles only).  ``intermediate``: I, for
    moe_plan.fp8_weight_scales_uniform (0: unknown, so per-column fp8 weight scales).  ``round_inter_mx32``:
    the intermediate rounded to fp8_mx32 and kept in bf16 (fp8_mx32 activations on the swapped tiles)."""
    from ..templates.moe_common import ACT_FORMAT_CODES, ACTIVATION_CODES
    from ..templates.moe_tiles import WEIGHT_FORMAT_CODES

    g1 = cfg.gemm1
    half_tail = k_half_tail(hidden, g1.block_k, swap_ab)
    return dict(ACTIVATION=ACTIVATION_CODES[spec.activation], HAS_LIMIT=spec.limit is not None, HAS_BIAS=has_bias,
                INTERLEAVED=spec.gate_up == "interleaved", WEIGHT_BEFORE_DOWN=spec.weight_position == "before_down",
                WEIGHT_FORMAT=WEIGHT_FORMAT_CODES[fmt], BLOCK_M=cfg.block_m, BLOCK_N=g1.block_n,
                BLOCK_K=g1.block_k, EVEN_K=hidden % g1.block_k == 0 or half_tail, GATE_UP_ONE_DOT=cfg.gate_up_one_dot,
                FP4_DOT_SCALED=fp4_dot_scaled, USE_PDL=use_pdl, ACT_FORMAT=ACT_FORMAT_CODES[spec.act_format],
                SWAP_AB=swap_ab, GATE_UP_GSCALES=gate_up_gscales,
                W_SCALE_UNIFORM=fp8_weight_scales_uniform(spec, cfg, fmt, intermediate) and not swap_ab,
                EXPERT_MAJOR=expert_major_order(fmt), ROUND_INTER_MX32=round_inter_mx32,
                **_tail_constexprs(cfg, half_tail, scales_ahead and swap_ab and cfg.gate_up_one_dot),
                **_launch_options(g1, cfg.block_m, swap_ab, 1))


def gemm2_constexprs(spec: MoESpec, cfg: MoEKernelConfig, fmt: str, fp4_dot_scaled: bool, has_bias: bool,
                     intermediate: int, use_pdl: bool, swap_ab: bool = False, scales_ahead: bool = False) -> dict:
    """Compile-time arguments (and launch options) of L2; shared by the launcher and the ISA listing."""
    from ..templates.moe_common import ACT_FORMAT_CODES
    from ..templates.moe_tiles import WEIGHT_FORMAT_CODES

    g2 = cfg.gemm2
    half_tail = k_half_tail(intermediate, g2.block_k, swap_ab)
    return dict(HAS_BIAS=has_bias, WEIGHT_AFTER_DOWN=spec.weight_position == "after_down",
                WEIGHT_FORMAT=WEIGHT_FORMAT_CODES[fmt], BLOCK_M=cfg.block_m, BLOCK_N=g2.block_n,
                BLOCK_K=g2.block_k, EVEN_K=intermediate % g2.block_k == 0 or half_tail, FP4_DOT_SCALED=fp4_dot_scaled,
                USE_PDL=use_pdl, ACT_FORMAT=ACT_FORMAT_CODES[spec.act_format],
                SWAP_AB=swap_ab, EXPERT_MAJOR=expert_major_order(fmt),
                **_tail_constexprs(cfg, half_tail, scales_ahead and swap_ab),
                **_launch_options(g2, cfg.block_m, swap_ab, 2))


def isa_specs() -> dict:
    """{template module: [(label, kernel, signature, constexprs, options)]} for ``inductor_moe.isa``:
    the expert GEMMs exactly as the launcher builds them for a qwen3-30b-a3b prefill call
    (T=4096, E=128, k=8, H=2048, I=768) in every weight format the kernels read, with bf16
    activations, plus the fp8-activation pairs (``act x weight``); and the persistent L1+L2
    kernel (``moe_mega``) at a decode call (lowering/moe_mega.py), and the warp-specialised GEMMs
    (lowering/moe_ws.py, sm_90a only).  Dense weights are listed with
    pointer loads (``w_desc`` None): the launcher passes them TMA descriptors at such a call
    (lowering/moe_tma.py), which changes the loads, not the MMA kind."""
    from ..isa import auto_signature
    from ..templates.moe_gemm1 import moe_gemm1_kernel
    from ..templates.moe_gemm2 import moe_gemm2_kernel

    wtypes = {"dense": ("*bf16", "*bf16"), "fp8_block128": ("*fp8e4nv", "*fp32"), "mxfp4": ("*u8", "*u8"),
              "nvfp4": ("*u8", "*fp8e4nv")}
    act_scale = {"dense": "*bf16", "fp8_block128": "*fp32", "fp8_mx32": "*u8"}
    combos = [("dense", fmt) for fmt in KERNEL_WEIGHT_FORMATS] + [
        ("fp8_block128", "dense"), ("fp8_block128", "fp8_block128"), ("fp8_mx32", "mxfp4")]
    specs: dict = {"moe_gemm1": [], "moe_gemm2": []}
    # (activations, weights, swapped tiles allowed, the one target that runs them): MXFP4 as sm_100
    # runs it (tl.dot_scaled, unswapped); bf16 x NVFP4 and bf16 x fp8 swapped on sm_90, unswapped on
    # sm_100 (moe_plan.fp4_swap_ab)
    swapped_on_90 = (("dense", "nvfp4"), ("dense", "fp8_block128"))
    variants = [(act, fmt, fmt != "mxfp4", 90 if (act, fmt) in swapped_on_90 else None) for act, fmt in combos]
    variants += [(act, fmt, False, 100) for act, fmt in swapped_on_90]
    for act, fmt, allow_swap, only_arch in variants:
        spec = MoESpec(act_format=act)
        cfg = choose_moe_config(4096, 8, 128, 2048, 768, fmt, 132, act_format=act, allow_swap_ab=allow_swap)
        dot_scaled = cfg.fp4_dot_scaled and fmt == "mxfp4"
        w, s = wtypes[fmt]
        a = "*bf16" if act == "dense" else "*fp8e4nv"
        for name, kernel, build, ptrs, floats, k_dim in (
                ("moe_gemm1", moe_gemm1_kernel, gemm1_constexprs,
                 {"x_ptr": a, "b_ptr": "*bf16", "topk_weights_ptr": "*fp32", "inter_ptr": a,
                  "x_scale_ptr": act_scale[act], "inter_scale_ptr": act_scale[act]},
                 ("alpha", "limit", "up_offset"), 2048),
                ("moe_gemm2", moe_gemm2_kernel, gemm2_constexprs,
                 {"inter_ptr": a, "b_ptr": "*bf16", "topk_weights_ptr": "*fp32", "rows_out_ptr": "*bf16",
                  "inter_scale_ptr": act_scale[act]},
                 (), 768)):
            const = build(spec, cfg, fmt, dot_scaled, False, k_dim, True, cfg.swap_ab,
                          **({"intermediate": 768} if name == "moe_gemm1" else {}))
            options = split_launch_options(const)
            if act == "fp8_mx32" and dot_scaled:  # e4m3 x e2m1 through tl.dot_scaled: CI checks the MMA
                options["expect_sm100"] = "block_scale"
            ptr_types = {**ptrs, "w_ptr": w, "w_scale_ptr": s, "w_gscale_ptr": "*fp32"}
            sig = auto_signature(kernel, ptr_types, const, floats)
            label = f"{name}[bf16 x {fmt}]" if act == "dense" else f"{name}[{act} x {fmt}]"
            if only_arch == 90:
                options.update(only_arch=90, why_only="sm_100 runs the unswapped tiles (moe_plan.fp4_swap_ab)")
            elif only_arch == 100:
                label = label[:-1] + ", unswapped]"
                options.update(only_arch=100, why_only="sm_90 runs the swapped tiles")
            specs[name].append((label, kernel, sig, const, options))
    specs["moe_mega"] = mega_isa_specs()  # the persistent L1+L2 kernel, at a decode call
    specs.update(ws_isa_specs())  # the warp-specialised GEMMs (sm_90a only)
    return specs


def mxfp4_scales_16b_rows(scale: torch.Tensor) -> torch.Tensor:
    """MXFP4 scales [E, N, K / 32] whose rows start on 16-byte boundaries: the tensor itself where
    they do, else a view of a padded copy made once per weight (``weight_cache``; 16 / 32 of a
    byte more per weight element at most, e.g. 96 for gpt-oss's 90-byte rows).  The swapped tiles
    read 4 scale bytes per row and 128-deep K step; Triton turns that load into cp.async (pipelined
    with the weight bytes) only when it can prove it 4-byte aligned, which it knows from a row
    stride divisible by 16.  As stored they were a synchronous DRAM load every step."""
    if scale.stride(2) == 1 and scale.stride(1) % 16 == 0 and scale.stride(0) % 16 == 0:
        return scale
    from .. import weight_cache

    def build():
        E, N, G = scale.shape
        rows = torch.zeros((E, N, -(-G // 16) * 16), dtype=torch.uint8, device=scale.device)
        rows[..., :G] = scale.view(torch.uint8)  # e8m0 bytes, whatever dtype holds them
        return rows.view(scale.dtype)[..., :G]

    return weight_cache.cached("mxfp4_scales_16b_rows", (scale,), build)


def mxfp4_scales_in_decode(scale: torch.Tensor) -> bool:
    """Whether the swapped tiles can take these MXFP4 scales: every e8m0 byte is at most 128 (a
    scale of at most 2: weights under 12 in magnitude, as in every trained model we know) or 255
    (NaN), so the scale rides in the decode's one multiply (fp_codes.e8m0_decode_factor).  Other
    weights run the unswapped tiles.  Read once per weight version (one host sync, ``weight_cache``);
    during CUDA-graph capture, where it cannot be read, a weight not read before counts as not fitting."""
    from .. import weight_cache

    if scale.is_cuda and torch.cuda.is_current_stream_capturing():
        return bool(weight_cache.lookup("mxfp4_scales_in_decode", (scale,)))

    def build():
        b = scale.view(torch.uint8)
        fits = bool(((b <= 128) | (b == 255)).all())
        if not fits:
            log.info("MXFP4 scales above 2 (e8m0 bytes 129..254): the unswapped FP4 tiles run this weight")
        return fits

    return weight_cache.cached("mxfp4_scales_in_decode", (scale,), build)


def _gemm_operands(spec: MoESpec, fmt: str, w, scale, which: str):
    """(weight, scale-or-dummy, strides e/n/k of the weight, strides e/n/k of the scale)."""
    if fmt == "dense":
        if spec.transposed:  # [E, K, N]
            strides = (w.stride(0), w.stride(2), w.stride(1))
        else:  # [E, N, K]
            strides = (w.stride(0), w.stride(1), w.stride(2))
        return w, w, strides, (0, 0, 0)
    if fmt == "mxfp4":
        scale = scale.view(torch.uint8)  # e8m0 bytes
    return w, scale, (w.stride(0), w.stride(1), w.stride(2)), (scale.stride(0), scale.stride(1), scale.stride(2))


class _CallPlan:
    """Every decision of the launcher for one call signature (``_call_plan``), made once: the route
    (CUDA decode kernels or Triton), the tiles, which kernels run, their constexprs.  Holds no
    tensors: a plan outlives the inputs it was made for."""

    __slots__ = ("cuda_decode", "use_pdl", "cfg", "use_mega", "act", "fp4_dot_scaled", "swap_ab", "ws_l1", "ws_l2",
                 "tma", "l1_kw", "l2_kw", "mega", "scales_fit", "launches", "fp4_ws", "round_mx32")


_PLANS: dict = {}  # call signature (_plan_key) -> _CallPlan
MAX_PLANS = 4096


def _tensor_key(t: Optional[torch.Tensor]):
    """What a plan depends on in a tensor: shape, strides, dtype, and 16-byte alignment (which
    Triton specialises on, and the TMA / warp-specialised kernels' rules check)."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.data_ptr() % 16)


def _plan_key(x, topk_ids, topk_weights, w13, w2, spec, w13_scale, w2_scale, b13, b2, w13_global_scale,
              w2_global_scale, use_pdl, use_mega, use_cuda_decode) -> tuple:
    """The call's signature: everything ``_make_plan`` reads but weight values, and the settings
    (config's hash, the tuned tables' generation).  (MXFP4 Triton plans also depend on whether
    the scales fit the decode: ``_call_plan``.)"""
    from . import moe_tune_cache

    return (spec, x.device, _tensor_key(x), _tensor_key(topk_ids), _tensor_key(topk_weights), _tensor_key(w13),
            _tensor_key(w2), _tensor_key(w13_scale), _tensor_key(w2_scale), _tensor_key(b13), _tensor_key(b2),
            _tensor_key(w13_global_scale), _tensor_key(w2_global_scale), use_pdl, use_mega, use_cuda_decode,
            moe_config.get_hash(), moe_tune_cache.generation())


_BY_SCALES = object()  # _PLANS' entry for a signature whose plan depends on the MXFP4 scales' values


def _mxfp4_scales_fit(w13_scale, w2_scale) -> bool:
    return mxfp4_scales_in_decode(w13_scale) and mxfp4_scales_in_decode(w2_scale)


def _call_plan(x, topk_ids, topk_weights, w13, w2, spec: MoESpec, w13_scale, w2_scale, b13, b2, w13_global_scale,
               w2_global_scale, kernel_config, use_pdl, use_mega, use_cuda_decode) -> _CallPlan:
    """The plan of this call: made at the first call of a signature, then looked up (a decode call's
    host time was mostly these decisions).  A Triton plan for MXFP4 weights and bf16 activations is
    kept per answer of ``mxfp4_scales_in_decode`` (read per weight version): two layers of one shape
    whose scales differ get their own plans.  A call given its tiles (``kernel_config``: the tuner,
    tests) is planned afresh; plans made during CUDA-graph capture are not kept (no tuning there)."""
    args = (x, topk_ids, topk_weights, w13, w2, spec, w13_scale, w2_scale, b13, b2, w13_global_scale,
            w2_global_scale)
    if kernel_config is not None:
        return _make_plan(*args, kernel_config, use_pdl, use_mega, use_cuda_decode)
    key = _plan_key(*args, use_pdl, use_mega, use_cuda_decode)
    plan = _PLANS.get(key)
    if plan is _BY_SCALES:
        plan = _PLANS.get(key + (_mxfp4_scales_fit(w13_scale, w2_scale),))
    if plan is None:
        plan = _make_plan(*args, None, use_pdl, use_mega, use_cuda_decode)
        if x.device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
            if len(_PLANS) >= MAX_PLANS:
                _PLANS.clear()
            if plan.scales_fit is None:
                _PLANS[key] = plan
            else:
                _PLANS[key], _PLANS[key + (plan.scales_fit,)] = _BY_SCALES, plan
    return plan


def _make_plan(x, topk_ids, topk_weights, w13, w2, spec: MoESpec, w13_scale, w2_scale, b13, b2, w13_global_scale,
               w2_global_scale, kernel_config, use_pdl, use_mega, use_cuda_decode, allow_fp4_ws=True) -> _CallPlan:
    """Every launcher decision for this call, in the order they depend on each other (the CUDA
    decode route first, then the warp-specialised FP4 GEMMs, then the tiles, then what the tiles
    allow).  ``allow_fp4_ws`` False: a plan for a call whose FP4 weights have no re-laid-out copy."""
    from ..templates.moe_common import ACT_FORMAT_CODES

    T, H = x.shape
    k = topk_ids.shape[1]
    E = w13.shape[0]
    I = W.intermediate_size(spec, w13, w2)
    fmt = spec.effective_weight_format
    plan = _CallPlan()
    if use_pdl is None:
        use_pdl = pdl_enabled(x.device)
    plan.use_pdl, plan.cuda_decode, plan.mega, plan.scales_fit, plan.fp4_ws = use_pdl, False, None, None, 0
    plan.round_mx32 = False
    plan.launches = PlannedLaunches()  # the Triton launches, through their compiled kernels after the first
    if use_cuda_decode is not False and x.device.type == "cuda":
        from ..cuda.fp4_moe import moe_decode_fits

        why_not = moe_decode_fits(x, topk_ids, topk_weights, w13, w2, spec, w13_scale, w2_scale, b13, b2)
        if why_not is None:
            plan.cuda_decode = True
            return plan
        if use_cuda_decode:
            raise ValueError(f"the CUDA MoE decode kernels cannot take this call: {why_not}")
    arch, interpreting, ws_setting = _arch_major(x.device), _interpreting(), moe_config.warp_specialized
    if fmt == "mxfp4" and x.dtype == torch.bfloat16 and w13_scale is not None:  # what the decode in registers needs
        plan.scales_fit = _mxfp4_scales_fit(w13_scale, w2_scale)
    if (allow_fp4_ws and kernel_config is None and not use_mega and x.device.type == "cuda"
            and fp4_ws_reason(spec, fmt, x.dtype, T * k, E, H, I, plan.scales_fit, arch, interpreting,
                              ws_setting, moe_config.moe_fp4_ws) is None
            and weight_layouts(spec, fmt, w13, w13_scale, w2, w2_scale) is not None):
        plan.fp4_ws = fp4_ws_tokens(T * k, E)  # L1 and L2 decode in wgmma's registers (lowering/moe_fp4_ws.py)
        plan.cfg = _unswapped_plan(T, k, E, H, I, fmt, _num_sms(x.device), spec.act_format).replace(
            block_m=plan.fp4_ws, tail_block_m=0)
        plan.use_mega, plan.act, plan.fp4_dot_scaled, plan.swap_ab = False, 0, False, False
        plan.ws_l1 = plan.ws_l2 = plan.tma = False
        plan.l1_kw = plan.l2_kw = None
        return plan
    if kernel_config is None:  # the bucket's tuned tiles, else the heuristic's (lowering/moe_tune.py)
        from .moe_tune import config_for_call

        kernel_config = config_for_call(x, k, E, H, I, fmt, spec.act_format, _num_sms(x.device), run=lambda c: (
            fused_moe_experts(x, topk_ids, topk_weights, w13, w2, spec, w13_scale, w2_scale, b13, b2, w13_global_scale,
                              w2_global_scale, kernel_config=c, use_pdl=use_pdl)),
            gate_up_interleaved=spec.gate_up == "interleaved")
    cfg = kernel_config
    wide = None if use_mega else fp8_x_fp8_ws_blocks(cfg, fmt, spec.act_format, T, k, E, I)
    if wide is not None and _ws_reasons(spec, fmt, x, w13, w13_scale, w2, w2_scale, wide.block_m, H, I, arch,
                                        interpreting, ws_setting) == (None, None):
        cfg = wide  # 128-row blocks, both GEMMs warp-specialised (gpt-oss's I % 128 = 64)
    if use_mega is None:
        use_mega = x.device.type == "cuda" and moe_config.mega_kernel and choose_mega(
            cfg, T, k, E, H, I, _num_sms(x.device))
    use_mega = bool(use_mega)
    if use_mega and cfg.tail_block_m:  # the persistent kernel's tile loops run whole blocks only
        cfg = cfg.replace(tail_block_m=0)
    act = ACT_FORMAT_CODES[spec.act_format]
    fp4_dot_scaled = (cfg.fp4_dot_scaled and fmt == "mxfp4" and (x.dtype == torch.bfloat16 or act != 0)
                      and mxfp4_dot_scaled(moe_config.mxfp4_mma, _arch_major(x.device)))
    swap_ab = (not fp4_dot_scaled and x.dtype == torch.bfloat16 and not use_mega
               and swap_ab_fits(fmt, spec.act_format, H, I)
               and fp4_swap_ab(moe_config.fp4_swap_ab, cfg.swap_ab, _arch_major(x.device))
               and (fmt != "mxfp4" or bool(plan.scales_fit)))
    if cfg.swap_ab and not swap_ab and cfg.source == "heuristic":  # planned swapped, runs unswapped
        cfg = _unswapped_plan(T, k, E, H, I, fmt, _num_sms(x.device), spec.act_format).replace(
            fp4_dot_scaled=cfg.fp4_dot_scaled)
    elif swap_ab and kernel_constraint_violation(cfg.block_m, cfg.gemm1, cfg.gemm2, fmt, spec.act_format, True):
        cfg = with_swap_ab(cfg, H, I, fmt)  # forced on (config.fp4_swap_ab) over tiles planned unswapped
    if swap_ab and fmt == "mxfp4":
        w13_scale, w2_scale = mxfp4_scales_16b_rows(w13_scale), mxfp4_scales_16b_rows(w2_scale)
    # fp8_mx32 activations on the swapped tiles: x and the intermediate rounded as fp8_mx32 carries
    # them but kept in bf16 (exact), so the GEMMs run the bf16-activation tiles (moe_plan.swap_ab_fits)
    plan.round_mx32 = swap_ab and spec.act_format == "fp8_mx32"
    gemm_spec = MoESpec(**{**spec.__dict__, "act_format": "dense"}) if plan.round_mx32 else spec
    if plan.round_mx32:
        act = 0
    w13_t, _, _, (_, s13_sn, _) = _gemm_operands(spec, fmt, w13, w13_scale, "w13")
    w2_t, _, _, (_, s2_sn, _) = _gemm_operands(spec, fmt, w2, w2_scale, "w2")
    l1_why, l2_why = _ws_reasons(spec, fmt, x, w13, w13_scale, w2, w2_scale, cfg.block_m, H, I, arch, interpreting,
                                 ws_setting)
    plan.ws_l1, plan.ws_l2 = not use_mega and l1_why is None, not use_mega and l2_why is None
    plan.l1_kw = gemm1_constexprs(gemm_spec, cfg, fmt, fp4_dot_scaled, b13 is not None, H, use_pdl, swap_ab,
                                  W.gate_up_global_scales(spec, w13_global_scale), fp4_scales_ahead(fmt, s13_sn), I,
                                  plan.round_mx32)
    plan.l2_kw = gemm2_constexprs(gemm_spec, cfg, fmt, fp4_dot_scaled, b2 is not None, I, use_pdl, swap_ab,
                                  fp4_scales_ahead(fmt, s2_sn))
    plan.tma = not use_mega and weight_tma_reason(spec, fmt, x.dtype, w13_t, w2_t, cfg, arch_major=arch,
                                                  interpreting=interpreting, use_mega=use_mega) is None
    plan.cfg, plan.use_mega, plan.act, plan.fp4_dot_scaled, plan.swap_ab = cfg, use_mega, act, fp4_dot_scaled, swap_ab
    return plan


def _ws_reasons(spec, fmt, x, w13, w13_scale, w2, w2_scale, block_m, H, I, arch, interpreting, ws_setting) -> tuple:
    """(why the warp-specialised L1 does not take the call or None, the same of L2) on ``block_m``-row
    blocks (lowering/moe_ws.py)."""
    w13_t, _, w13_strides, _ = _gemm_operands(spec, fmt, w13, w13_scale, "w13")
    w2_t, _, w2_strides, _ = _gemm_operands(spec, fmt, w2, w2_scale, "w2")
    return (ws_l1_reason(fmt, spec.act_format, (x.dtype, w13_t.dtype), block_m, H, I, w13_strides, w13_t.data_ptr(),
                         spec.gate_up, spec.activation, arch, interpreting, ws_setting),
            ws_l2_reason(fmt, spec.act_format, (x.dtype, w2_t.dtype), block_m, H, I, w2_strides, w2_t.data_ptr(),
                         arch, interpreting, ws_setting))


def fused_moe_experts(x, topk_ids, topk_weights, w13, w2, spec: MoESpec, w13_scale=None, w2_scale=None,
                      b13=None, b2=None, w13_global_scale=None, w2_global_scale=None, *, kernel_config: Optional[MoEKernelConfig] = None,
                      use_pdl: Optional[bool] = None, use_mega: Optional[bool] = None,
                      use_cuda_decode: Optional[bool] = None) -> torch.Tensor:
    """Run the fused kernels (inputs already validated and supported).  Works on CUDA, and on CPU
    under TRITON_INTERPRET=1.  ``use_mega``: force the persistent L1+L2 kernel on or off (None:
    on CUDA where ``config.mega_kernel`` and ``moe_mega.choose_mega`` say so).  ``use_cuda_decode``:
    the CUDA decode kernels for FP4 experts at decode / mid sizes (``cuda/fp4_moe.py``); None: wherever they
    fit, False: never, True: required (raises where they do not fit).  The decisions come from the
    call's plan (``_call_plan``); what remains per call is allocating and launching."""
    T, H = x.shape
    k = topk_ids.shape[1]
    out = torch.empty((T, H), dtype=x.dtype, device=x.device)
    if T == 0 or k == 0:
        return out.zero_()
    if spec.quantize_weights is not None:
        fmt = spec.effective_weight_format
        (w13, w13_scale, w13_global_scale), (w2, w2_scale, w2_global_scale) = W.quantized_expert_weights(
            spec, w13, w2)
        spec = MoESpec(**{**spec.__dict__, "quantize_weights": None, "weight_format": fmt, "transposed": False})
    plan = _call_plan(x, topk_ids, topk_weights, w13, w2, spec, w13_scale, w2_scale, b13, b2, w13_global_scale,
                      w2_global_scale, kernel_config, use_pdl, use_mega, use_cuda_decode)
    layouts = None
    if plan.fp4_ws:
        layouts = weight_layouts(spec, spec.effective_weight_format, w13, w13_scale, w2, w2_scale)
        if layouts is None:  # this layer's weights have no re-laid-out copy (capture, memory): the Triton tiles
            plan = _plan_without_fp4_ws(x, topk_ids, topk_weights, w13, w2, spec, w13_scale, w2_scale, b13, b2,
                                        w13_global_scale, w2_global_scale, use_pdl, use_mega, use_cuda_decode)
    if plan.cuda_decode:
        from ..cuda.fp4_moe import moe_decode

        return moe_decode(x, topk_ids, topk_weights, w13, w2, spec, w13_scale, w2_scale, b13, b2,
                          w13_global_scale, w2_global_scale, out, use_pdl=plan.use_pdl)
    return _run_triton(plan, x, topk_ids, topk_weights, w13, w2, spec, w13_scale, w2_scale, b13, b2,
                       w13_global_scale, w2_global_scale, out, layouts)


def _plan_without_fp4_ws(x, topk_ids, topk_weights, w13, w2, spec, w13_scale, w2_scale, b13, b2, w13_global_scale,
                         w2_global_scale, use_pdl, use_mega, use_cuda_decode) -> _CallPlan:
    """The call's plan with the Triton expert GEMMs (kept beside the signature's own)."""
    args = (x, topk_ids, topk_weights, w13, w2, spec, w13_scale, w2_scale, b13, b2, w13_global_scale, w2_global_scale)
    key = _plan_key(*args, use_pdl, use_mega, use_cuda_decode) + ("without fp4_ws",)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _make_plan(*args, None, use_pdl, use_mega, use_cuda_decode, allow_fp4_ws=False)
        if not torch.cuda.is_current_stream_capturing():
            _PLANS[key] = plan
    return plan


def _run_triton(plan: _CallPlan, x, topk_ids, topk_weights, w13, w2, spec: MoESpec, w13_scale, w2_scale, b13, b2,
                w13_global_scale, w2_global_scale, out, fp4_ws_layouts=None) -> torch.Tensor:
    """Allocate and launch what ``plan`` says: align -> (x -> fp8) -> L1 -> L2 (or both in the
    persistent kernel, or the warp-specialised FP4 GEMMs on ``fp4_ws_layouts``) -> combine."""
    from ..templates.moe_align import align_blocks
    from ..templates.moe_combine import moe_combine_kernel
    from ..templates.moe_common import ACT_GROUPS, moe_kperm_kernel, moe_quant_act_kernel
    from ..templates.moe_gemm1 import moe_gemm1_kernel
    from ..templates.moe_gemm2 import moe_gemm2_kernel

    T, H = x.shape
    k = topk_ids.shape[1]
    E = w13.shape[0]
    I = W.intermediate_size(spec, w13, w2)
    fmt = spec.effective_weight_format
    cfg, use_pdl, use_mega, act, swap_ab = plan.cfg, plan.use_pdl, plan.use_mega, plan.act, plan.swap_ab
    launch = plan.launches.launch
    x = x if x.stride(1) == 1 else x.contiguous()
    ids = topk_ids.contiguous()
    tw = topk_weights.contiguous()
    N = T * k
    pdl = {"launch_pdl": True} if use_pdl else {}
    if act:  # fp8 activations: x -> e4m3 + per-token group scales, once (not per L1 tile)
        G = ACT_GROUPS[act]
        s_dtype = torch.float32 if spec.act_format == "fp8_block128" else torch.uint8
        xq = torch.empty((T, H), dtype=torch.float8_e4m3fn, device=x.device)
        x_s = torch.empty((T, -(-H // G)), dtype=s_dtype, device=x.device)
        bt = 16
        bk = max(G, min(512, 1 << (H - 1).bit_length()))
        launch("quant", moe_quant_act_kernel, (-(-T // bt), -(-H // bk)), (x, xq, x_s, T, H, x.stride(0), x_s.stride(0)),
               dict(ACT_FORMAT=act, BLOCK_T=bt, BLOCK_K=bk, USE_PDL=use_pdl, num_warps=4, **pdl))
        inter = torch.empty((N, I), dtype=torch.float8_e4m3fn, device=x.device)
        inter_s = torch.empty((N, -(-I // G)), dtype=s_dtype, device=x.device)
        a1, a1_s, inter_s_stride = xq, x_s, inter_s.stride(0)
    else:
        inter = torch.empty((N, I), dtype=x.dtype, device=x.device)
        a1, a1_s, inter_s, inter_s_stride = x, x, x, 0

    if swap_ab and fmt == "mxfp4":  # scale rows Triton can pipeline (a cached copy where they are not so)
        w13_scale, w2_scale = mxfp4_scales_16b_rows(w13_scale), mxfp4_scales_16b_rows(w2_scale)
    w13_t, s13, (w13_se, w13_sn, w13_sk), (s13_se, s13_sn, s13_sk) = _gemm_operands(spec, fmt, w13, w13_scale, "w13")
    w2_t, s2, (w2_se, w2_sn, w2_sk), (s2_se, s2_sn, s2_sk) = _gemm_operands(spec, fmt, w2, w2_scale, "w2")
    # the warp-specialised GEMMs take their tiles from a counter that align zeroes (ready[0])
    blocks = align_blocks(ids, E, cfg.block_m, one_launch=cfg.align_one_launch, chunk=cfg.align_chunk,
                          use_pdl=use_pdl, zero_ready=use_mega or plan.ws_l1 or plan.ws_l2 or bool(plan.fp4_ws),
                          launch=launch)
    max_blocks = blocks.max_blocks
    sorted_ids, block_expert = blocks.sorted_ids, blocks.block_expert
    expert_start, expert_count = blocks.expert_start, blocks.expert_count

    g13 = w13_global_scale if w13_global_scale is not None else x
    g2s = w2_global_scale if w2_global_scale is not None else x
    if swap_ab:  # L1 reads x with K in to_mma_k_order (L1 writes the intermediate so for L2)
        a1 = torch.empty((T, H), dtype=x.dtype, device=x.device)
        launch("kperm", moe_kperm_kernel, (-(-T // 16), -(-H // 256)), (x, a1, T, H, x.stride(0)),
               dict(BLOCK_T=16, BLOCK_K=256, USE_PDL=use_pdl, ROUND_MX32=plan.round_mx32, num_warps=4, **pdl))
    l1_args = (a1, w13_t, s13, g13, b13 if b13 is not None else x, tw, inter,
               sorted_ids, block_expert, expert_start, expert_count, a1_s, inter_s,
               H, I, k,
               a1.stride(0), w13_se, w13_sn, w13_sk, s13_se, s13_sn, s13_sk, b13.stride(0) if b13 is not None else 0,
               a1_s.stride(0) if act else 0, inter_s_stride,
               float(spec.alpha), float(spec.limit or 0.0), float(spec.up_offset))
    rows = torch.empty((N, H), dtype=x.dtype, device=x.device)
    l2_args = (inter, w2_t, s2, g2s, b2 if b2 is not None else x, tw, rows,
               sorted_ids, block_expert, expert_start, expert_count, inter_s,
               H, I,
               w2_se, w2_sn, w2_sk, s2_se, s2_sn, s2_sk, b2.stride(0) if b2 is not None else 0, inter_s_stride)
    l1_kw, l2_kw = plan.l1_kw, plan.l2_kw
    if plan.fp4_ws:
        launch_fp4_ws(spec, fmt, fp4_ws_layouts, x, inter, rows, tw, blocks, plan.fp4_ws, k, H, I, b13, b2,
                      w13_global_scale, w2_global_scale, _num_sms(x.device), use_pdl, launch)
    elif use_mega:  # one persistent launch runs the same L1 and L2 tiles
        if plan.mega is None:
            plan.mega = MegaLaunch(moe_gemm1_kernel, l1_args, l1_kw, moe_gemm2_kernel, l2_args, l2_kw,
                                   ready=blocks.ready, max_blocks=max_blocks, num_sms=_num_sms(x.device), pdl=pdl)
        plan.mega.launch(l1_args, l2_args, blocks.ready, launch)
    else:
        if plan.tma:  # descriptors hold their tensor: built per call, never cached (lowering/moe_tma.py)
            tma1, tma2 = weight_tma_arguments(spec, w13_t, w2_t, cfg)
            l1_kw, l2_kw = {**l1_kw, **tma1}, {**l2_kw, **tma2}
        tickets = 0  # the counter's tickets L1 took (L2 counts on from there)
        if plan.ws_l1:
            tickets = launch_ws_l1(l1_args, l1_kw, blocks.ready, max_blocks, _num_sms(x.device), use_pdl, launch)
        else:
            launch("l1", moe_gemm1_kernel, (max_blocks * -(-I // cfg.gemm1.block_n),), l1_args, {**l1_kw, **pdl})
        if plan.ws_l2:
            launch_ws_l2(l2_args, b2 is not None, l2_kw["WEIGHT_AFTER_DOWN"], blocks.ready, tickets, max_blocks,
                         _num_sms(x.device), use_pdl, launch)
        else:
            launch("l2", moe_gemm2_kernel, (max_blocks * -(-H // cfg.gemm2.block_n),), l2_args, {**l2_kw, **pdl})

    bt, bh = cfg.combine_block_t, cfg.combine_block_h
    launch("combine", moe_combine_kernel, (-(-T // bt), -(-H // bh)), (rows, ids, out, T, H, E, out.stride(0)),
           dict(TOP_K=k, BLOCK_T=bt, BLOCK_H=bh, USE_PDL=use_pdl, num_warps=4, **pdl))
    return out


# ------------------------------------------------------------------------------ the op's CUDA kernel

def moe_experts_cuda(x, topk_ids, topk_weights, w13, w2, spec, w13_scale=None, w2_scale=None,
                     w13_global_scale=None, w2_global_scale=None, b13=None, b2=None):
    spec_obj = MoESpec.from_str(spec)
    validate_moe_inputs_once(x, topk_ids, topk_weights, w13, w2, spec_obj, w13_scale, w2_scale,
                             w13_global_scale, w2_global_scale, b13, b2)
    reason = unsupported_reason(spec_obj, x.device, x.dtype, w13.dtype)
    if reason is not None:
        record_runtime_fallback("moe", reason)
        return moe_experts_reference(x, topk_ids, topk_weights, w13, w2, spec, w13_scale, w2_scale,
                                     w13_global_scale, w2_global_scale, b13, b2)
    try:
        return fused_moe_experts(x, topk_ids, topk_weights, w13, w2, spec_obj, w13_scale, w2_scale, b13, b2,
                                 w13_global_scale, w2_global_scale)
    except _compile_errors() as e:  # a template this triton cannot build: never a wrong result
        record_runtime_fallback("moe", f"Triton could not compile the fused kernels: {type(e).__name__}: "
                                       f"{str(e).splitlines()[0] if str(e) else ''}")
        return moe_experts_reference(x, topk_ids, topk_weights, w13, w2, spec, w13_scale, w2_scale,
                                     w13_global_scale, w2_global_scale, b13, b2)


@functools.lru_cache(maxsize=None)
def _compile_errors() -> tuple:
    """Exception types that mean "this template does not compile here" (nothing ran yet)."""
    try:
        from triton.compiler.errors import CompilationError

        return (CompilationError,)
    except ImportError:  # pragma: no cover
        return ()


@functools.cache
def register() -> None:
    """Install the CUDA kernel of ``inductor_moe::moe_experts`` (once)."""
    torch.library.register_kernel("inductor_moe::moe_experts", "cuda", moe_experts_cuda)
