"""Host side of the CUDA MoE decode kernels (``fp4_moe_decode.cu``): fit checks, tiles, launches.

# T: tokens, H: hidden, E: experts, k: experts per token, I: expert intermediate size, N = T*k
For FP4 experts (MXFP4 / NVFP4) with bf16 (or fp8_mx32, rounded in bf16) activations at up to
``MAX_PAIRS_PER_EXPERT[format]`` pairs per expert on average (decode and mid sizes, where the
weights' bytes dominate): L1 (gate/up GEMM + GLU, writes the [N, I] intermediate) and L2 (down GEMM
+ routing weight, writes [N, H] per-pair rows) are the CUDA decode MMA kernels, then the Triton
deterministic combine.  Up to ``SCAN_MAX_TOKENS`` tokens no routing pass runs: each CTA finds the
pairs routed to its expert itself (see the .cu); above, the Triton align kernel groups the pairs
into blocks first.  Three or four launches chained with PDL (two more rounding ones for fp8_mx32),
no host syncs, CUDA-graph capturable.  ``moe_decode_fits`` says why a call cannot take this path;
the caller then runs the Triton pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..lowering.moe_plan import ALIGN_ONE_LAUNCH_MAX_ENTRIES, align_chunk
from ..spec import MoESpec
from . import nvrtc

SCAN_MAX_TOKENS = 4  # up to here (and MAX_PAIRS pairs) each CTA scans the ids itself: no routing launch
MAX_PAIRS = 256  # T * k the scanning kernels' member lists hold (fp4_moe_decode.cu MAX_PAIRS)
# above this many pairs per expert on average the swapped Triton tiles win (H100, benchmarks/NOTES.md,
# "The CUDA/Triton crossover at 4-7 pairs per expert"): at 6 and 7 pairs they ran level with these
# kernels to 15% faster at qwen3 / gpt-oss / dsv4 in both formats; at 5 these were 7-8% faster with
# MXFP4 and, with NVFP4, 7% / 1% faster at gpt-oss / dsv4 and 4% slower at qwen3; at 4, 2-12% faster
MAX_PAIRS_PER_EXPERT = {"mxfp4": 5, "nvfp4": 5}
_FLOAT_CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_GLU_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


@dataclass(frozen=True)
class MoEDecodeConfig:
    """Warps splitting K in each kernel, 8-token MMA tiles per expert, L2's 16-row groups, K steps
    of loads in flight per warp, and per kernel whether the next steps' loads are issued before
    the current steps' math (``fp4_mma_core.cuh`` PIPE)."""

    gate_up_warps: int = 4
    down_warps: int = 4
    token_tiles: int = 1
    down_row_groups: int = 1
    unroll: int = 1
    gate_up_pipe: bool = False
    down_pipe: bool = False
    block_m: int = 0  # 0: each CTA scans the ids (decode); else pairs per align block (mid sizes)
    gate_up_col_groups: int = 1  # 16-column groups per gate_up CTA (activation fragments shared)
    gate_up_max_registers: int = 0  # per-thread register caps (0: the compiler's choice), through
    down_max_registers: int = 0  # __launch_bounds__' minimum of resident CTAs per SM


def choose_moe_decode_config(num_tokens: int, top_k: int, num_experts: int, hidden: int,
                             intermediate: int, weight_format: str = "mxfp4", num_sms: int = 132) -> MoEDecodeConfig:
    """4 warps per CTA and one K step of loads per warp: the kernels are limited by the bytes in
    flight per SM, and this leaves the most CTAs resident (H100, benchmarks/NOTES.md: 1.1-1.5x over
    8 warps x 2 steps at qwen3 / gpt-oss / dsv4, T = 1 and 16).
    Up to 4 tokens the CTAs scan the ids; gate_up issues its next step's loads before the current
    step's math (PIPE) only for MXFP4, with >= 8 K steps per warp: 8% faster at dsv4 T = 1 (H = 4096,
    two runs; NOTES.md, "next loads before the math"), or at one token (its grid is one wave, so more
    bytes in flight per warp pay): 3-4% faster at qwen3 and gpt-oss T = 1, 1% at T = 2, 2% slower at
    T = 3-4 (NOTES.md, "Register caps", 11 rounds); NVFP4 3-9% slower; down never.
    Above 4 tokens the align kernel's blocks route the CTAs (``block_m`` = 8 pairs of one expert
    each) and down takes two row groups (activations reused across 32 rows): against CTAs scanning
    the ids, 3-7% faster at T = 8 and 16, even at T = 4, 6-20% slower at T = 1 (one more launch).
    There, down runs 2 warps where 4 would get under 4 K steps each (qwen3's I = 768: 2-6% faster at
    T = 16-256; 1-3% slower at gpt-oss's I = 2880, even at dsv4's 2048).  16-pair blocks with two
    token tiles (and MXFP4 gate_up with two column groups) were 3-5% faster at qwen3 with 8-16 pairs
    per expert; at 4-5 pairs (up to MAX_PAIRS_PER_EXPERT) they ran 8-24% slower than 8-pair blocks at
    qwen3 / gpt-oss / dsv4 (NOTES.md, "The CUDA/Triton crossover at 4-7 pairs per expert"), so only an
    explicit config takes them.  MXFP4's gate_up there runs 2 warps where H is a multiple of 512 (4
    K steps of 128) and there are >= 64 pairs: 1-6% faster at H = 2048 and 4096 (qwen3-30b / dsv4 /
    qwen3-235b shapes, 64-1024 pairs; 0-2% in the benchmark command's own before / after), level at
    7168; 3-5% slower at H = 2880 (gpt-oss and two other shapes with it), 2% slower at 40 pairs
    (qwen3 T = 5), 2-9% slower with NVFP4 (NOTES.md, "Two warps in MXFP4's gate_up").  NVFP4 there
    keeps two K steps of loads in flight per warp (unroll 2) where H >= 4096: 2-2.5% faster at dsv4 /
    qwen3-235b shapes (T = 5-128), level at H = 7168; 6-7% slower at H = 2048, 1-2.5% at 2880
    (NOTES.md, same section).
    Register caps (H100, NOTES.md, "Register caps on the CUDA decode kernels"): NVFP4 kernels at 80
    per thread (the compiler chose 80-125), 3-5% faster at T = 4-128; MXFP4's gate_up capped spills and
    lost up to 1.9x.  The scanning down kernel at 64 where its grid (16-row tiles x pairs) does not fit
    one wave of 80-register CTAs: qwen3 T = 1 7% faster (1024 CTAs, all resident at 64); where the grid
    fits anyway the cap lost up to 6% (gpt-oss T = 1 NVFP4, 720 CTAs)."""
    nv_cap = 80 if weight_format == "nvfp4" else 0
    if num_tokens > SCAN_MAX_TOKENS or num_tokens * top_k > MAX_PAIRS:
        down_warps = 2 if -(-intermediate // 128) < 4 * 4 else 4
        gate_up_warps = 2 if weight_format == "mxfp4" and hidden % 512 == 0 and num_tokens * top_k >= 64 else 4
        unroll = 2 if weight_format == "nvfp4" and hidden >= 4096 else 1
        return MoEDecodeConfig(gate_up_warps=gate_up_warps, down_warps=down_warps, down_row_groups=2, block_m=8,
                               unroll=unroll, gate_up_max_registers=nv_cap, down_max_registers=nv_cap)
    gate_up_pipe = weight_format == "mxfp4" and (-(-hidden // 128) // 4 >= 8 or num_tokens == 1)
    down_ctas = -(-hidden // 16) * num_tokens * top_k
    one_wave_at_80 = down_ctas <= num_sms * nvrtc.min_ctas(80, 4)
    return MoEDecodeConfig(gate_up_warps=4, gate_up_pipe=gate_up_pipe, gate_up_max_registers=nv_cap,
                           down_max_registers=nv_cap if one_wave_at_80 else 64)


def _aligned_rows(w: torch.Tensor) -> bool:
    return (w.stride(-1) == 1 and w.data_ptr() % 16 == 0 and w.stride(-2) % 16 == 0 and w.stride(0) % 16 == 0
            and w.stride(0) < 2**31)  # the kernels take int strides


def moe_decode_fits(x, topk_ids, topk_weights, w13, w2, spec: MoESpec, w13_scale, w2_scale, b13, b2) -> Optional[str]:
    """Why the CUDA MoE decode kernels cannot take this call (None when they can); metadata only."""
    fmt = spec.effective_weight_format
    if fmt not in ("mxfp4", "nvfp4") or spec.quantize_weights is not None:
        return f"{fmt} weights (the CUDA decode takes stored MXFP4 / NVFP4)"
    if spec.act_format not in ("dense", "fp8_mx32") or x.dtype != torch.bfloat16:
        return "activations are not bf16 (nor fp8_mx32, which these kernels take rounded in bf16)"
    T, k = topk_ids.shape
    E = w13.shape[0]
    if T * k > MAX_PAIRS_PER_EXPERT[fmt] * E:
        return (f"T*k={T * k} pairs over E={E} experts, more than {MAX_PAIRS_PER_EXPERT[fmt]} per expert "
                "(the Triton tensor-core tiles are faster there)")
    H, I = x.shape[1], w2.shape[2] * 2
    if H % 32 or I % 32:
        return f"H={H} or I={I} is not a multiple of 32"
    if x.stride(1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:
        return "activation rows are not 16-byte aligned"
    if not (_aligned_rows(w13) and _aligned_rows(w2)):
        return "packed weight rows are not contiguous and 16-byte aligned"
    for s in (w13_scale, w2_scale):
        if s.stride(-1) != 1 or (fmt == "nvfp4" and (s.data_ptr() % 2 or s.stride(-2) % 2 or s.stride(0) % 2)):
            return "block scales are not row-contiguous (2-byte aligned for NVFP4)"
    if topk_weights.dtype not in _FLOAT_CODES:
        return f"topk_weights of dtype {topk_weights.dtype}"
    for b in (b13, b2):
        if b is not None and (b.dtype not in _FLOAT_CODES or b.stride(1) != 1):
            return f"bias of dtype {b.dtype} or with strided rows"
    return nvrtc.why_not(x.device.index)


def _common_defines(spec: MoESpec, fmt, ids, tw, bias, warps, row_groups, pipe, cfg: MoEDecodeConfig) -> tuple:
    routing = (("BLOCKS", 1), ("BLOCK_M", cfg.block_m), ("MAX_PAIRS", cfg.block_m)) if cfg.block_m else (
        ("MAX_PAIRS", MAX_PAIRS),)
    return (("NV", int(fmt == "nvfp4")), ("RG", row_groups), ("NT", cfg.token_tiles), ("WARPS", warps),
            ("UNROLL", cfg.unroll), ("VEC", 1), ("PIPE", int(pipe)), ("IDS_64", int(ids.dtype == torch.int64)),
            ("TW_T", _FLOAT_CODES[tw.dtype]),
            ("HAS_BIAS", int(bias is not None)), ("BIAS_T", _FLOAT_CODES[bias.dtype] if bias is not None else 0),
            ("WEIGHT_BEFORE_DOWN", int(spec.weight_position == "before_down"))) + routing


def _round_mx32(x: torch.Tensor, out: torch.Tensor, use_pdl: bool) -> torch.Tensor:
    """``out`` (bf16, contiguous) = x rounded to fp8_mx32 (moe_common.moe_kperm_kernel with K_ORDER
    off; x bf16 or fp32)."""
    from ..templates.moe_common import moe_kperm_kernel

    rows, cols = x.shape
    block_k = min(256, 1 << (cols - 1).bit_length())
    moe_kperm_kernel[(-(-rows // 16), -(-cols // block_k))](
        x, out, rows, cols, x.stride(0), BLOCK_T=16, BLOCK_K=block_k, USE_PDL=use_pdl, ROUND_MX32=True,
        K_ORDER=False, num_warps=4, **({"launch_pdl": True} if use_pdl else {}))
    return out


def moe_decode(x, topk_ids, topk_weights, w13, w2, spec: MoESpec, w13_scale, w2_scale, b13, b2,
               w13_global_scale, w2_global_scale, out, *, config: Optional[MoEDecodeConfig] = None,
               use_pdl: bool = False) -> torch.Tensor:
    """``out[T, H]`` = the MoE experts layer (inputs validated, ``moe_decode_fits`` checked)."""
    from ..lowering.moe import _num_sms
    from ..templates.moe_combine import moe_combine_kernel

    T, H = x.shape
    k = topk_ids.shape[1]
    E, I = w13.shape[0], w2.shape[2] * 2
    N = T * k
    fmt = spec.effective_weight_format
    cfg = config or choose_moe_decode_config(T, k, E, H, I, fmt, _num_sms(x.device))
    ids, tw = topk_ids.contiguous(), topk_weights.contiguous()
    s13 = w13_scale.view(torch.uint8)
    s2 = w2_scale.view(torch.uint8)
    dev = x.device.index
    stream = torch.cuda.current_stream(x.device)
    inter = torch.empty((N, I), dtype=x.dtype, device=x.device)
    rows = torch.empty((N, H), dtype=x.dtype, device=x.device)
    if cfg.block_m:  # the align kernel's blocks route the CTAs (one grid row per block)
        from ..templates.moe_align import align_blocks

        blocks = align_blocks(ids, E, cfg.block_m, one_launch=N <= ALIGN_ONE_LAUNCH_MAX_ENTRIES,
                              chunk=align_chunk(N), use_pdl=use_pdl)
        route, grid_rows = blocks.scratch, blocks.max_blocks
    else:  # each CTA scans the ids (one grid row per pair)
        route, grid_rows = ids, N
    gate_up_gscales = w13_global_scale is not None and w13_global_scale.dim() == 2
    # fp8_mx32 activations: x and the intermediate rounded as fp8_mx32 carries them, kept in bf16 (exact),
    # each right before the kernel that reads it (each launch waits on the one before: PDL); gate_up
    # then stores its fp32 values, as the reference rounds them (a bf16 step first would round twice)
    round_mx32 = spec.act_format == "fp8_mx32"
    gate_up_out = inter
    if round_mx32:
        x = _round_mx32(x, torch.empty((T, H), dtype=x.dtype, device=x.device), use_pdl)
        gate_up_out = torch.empty((N, I), dtype=torch.float32, device=x.device)

    l1 = nvrtc.build(dev, "fp4_moe_decode.cu", "fp4_moe_gate_up", _common_defines(
        spec, fmt, ids, tw, b13, cfg.gate_up_warps, 2 * cfg.gate_up_col_groups, cfg.gate_up_pipe, cfg) + (
        ("STAGE", 1), ("COL_GROUPS", cfg.gate_up_col_groups), ("GLU", _GLU_CODES[spec.activation]),
        ("HAS_LIMIT", int(spec.limit is not None)),
        ("INTERLEAVED", int(spec.gate_up == "interleaved")), ("HAS_GSCALE", int(w13_global_scale is not None)),
        ("GATE_UP_GSCALES", int(gate_up_gscales)), ("INTER_F32", int(round_mx32)),
        ("MIN_CTAS", nvrtc.min_ctas(cfg.gate_up_max_registers, cfg.gate_up_warps))))
    l1_grid = (-(-I // (16 * cfg.gate_up_col_groups)), grid_rows, 1)
    nvrtc.launch(l1, l1_grid, (32 * cfg.gate_up_warps, 1, 1), stream=stream, pdl=use_pdl, args=[
        x, ids, tw, w13, s13, w13_global_scale if w13_global_scale is not None else tw,
        b13 if b13 is not None else x, gate_up_out, N, k, E, H, I, x.stride(0),
        w13.stride(0), w13.stride(1), s13.stride(0), s13.stride(1), b13.stride(0) if b13 is not None else 0,
        float(spec.alpha), float(spec.limit or 0.0), float(spec.up_offset), route, grid_rows])
    if round_mx32:
        _round_mx32(gate_up_out, inter, use_pdl)

    l2 = nvrtc.build(dev, "fp4_moe_decode.cu", "fp4_moe_down", _common_defines(
        spec, fmt, ids, tw, b2, cfg.down_warps, cfg.down_row_groups, cfg.down_pipe, cfg) + (
        ("STAGE", 2), ("HAS_GSCALE", int(w2_global_scale is not None)),
        ("MIN_CTAS", nvrtc.min_ctas(cfg.down_max_registers, cfg.down_warps))))
    nvrtc.launch(l2, (-(-H // (16 * cfg.down_row_groups)), grid_rows, 1), (32 * cfg.down_warps, 1, 1), stream=stream,
                 pdl=use_pdl, args=[
                     inter, ids, tw, w2, s2, w2_global_scale if w2_global_scale is not None else tw,
                     b2 if b2 is not None else x, rows, N, E, H, I,
                     w2.stride(0), w2.stride(1), s2.stride(0), s2.stride(1), b2.stride(0) if b2 is not None else 0,
                     route, grid_rows])

    bh = min(1024, 1 << (H - 1).bit_length())
    pdl = {"launch_pdl": True} if use_pdl else {}
    moe_combine_kernel[(T, -(-H // bh))](rows, ids, out, T, H, E, out.stride(0), TOP_K=k, BLOCK_T=1, BLOCK_H=bh,
                                         USE_PDL=use_pdl, num_warps=4, **pdl)
    return out
