"""Host side of the block-scaled GEMM template: tile choice, workspace, launch, ISA specs.

# M: rows of A (tokens), N: output features, K: reduction dim
``block_scaled_gemm(a, b, b_scale, spec, ...)`` computes exactly what the reference op
``inductor_moe::block_scaled_mm`` defines, on CUDA, or on CPU under ``TRITON_INTERPRET=1``.
Tiles come from ``choose_gemm_config`` (a pure function, testable without a GPU):
  * decode (small M): weight-bandwidth bound.  Narrow N tiles and split-K put every SM on the
    weight stream; the split partials are summed in a fixed order (deterministic).
  * prefill (large M): MMA bound.  128 x 128 tiles, grouped ordering for L2 reuse.
``choose_strategy`` picks, per call, between "cuda_decode" (M <= 16, bf16 activations: the CUDA
mma.sync decode GEMM of ``cuda/fp4_decode_mma.cu``, built by NVRTC, where it builds), "gemv" (M <=
``GEMV_MAX_M``, dense activations: a tl.dot-free kernel that decodes each weight slice once into
fp32 registers, many small programs with split-K for bytes in flight;
``templates/_details/_fp4_gemv.py``), that kernel ("fused": on sm_90 with bf16 activations from
17 to 128 rows the MoE's swapped FP4 tile, to 512 it or its two-warpgroup form where
``choose_swapped_tile`` estimates them faster than dequant_chunks; from 65 rows its 128-token form
where that fills the SMs) and "dequant_chunks": on GPUs
without FP4 MMA (Hopper) at large M the fused kernel re-decodes every weight tile once per M tile,
so instead chunks of weight rows are decoded once into a bounded bf16 workspace
(``DEQUANT_CHUNK_BYTES``, reused chunk after chunk; the whole dequantised weight never exists)
and multiplied by cuBLAS straight into the output's columns.  ``default_plan`` is that choice
for one call.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from typing import Optional

import torch

from ..cuda.fp4_decode import DecodeMmaConfig
from ..spec import GemmSpec
from ._details._block_scaled_gemm import (DENSE, FP8_MX32, GELU, GELU_TANH, MXFP4, NO_ACTIVATION, NVFP4, RELU,
                                          SILU, block_scaled_gemm_kernel)
from .swapped_tile_choice import WIDE_SWAPPED_MAX_M, choose_swapped_tile, takes_rows

FORMAT_CODES = {"dense": DENSE, "fp8_mx32": FP8_MX32, "mxfp4": MXFP4, "nvfp4": NVFP4}
ACTIVATION_CODES = {None: NO_ACTIVATION, "silu": SILU, "gelu": GELU, "gelu_tanh": GELU_TANH, "relu": RELU}
_PACKED = ("mxfp4", "nvfp4")
DEQUANT_CHUNK_BYTES = 16 << 20  # bf16 workspace of the "dequant_chunks" strategy
# Rows of A from which "dequant_chunks" runs on sm_90.  Measured on H100 (triton 3.6): the fused
# kernel took 5.8x / 3.9x / 3.5x torch.mm bf16's time at M = 128 / 1024 / 4096 (N = K = 4096), and
# at M <= 16 it streams 3.9x fewer bytes than any dequantise-first path; "dequant_chunks" costs
# about torch.mm bf16 plus one decode pass over the weight (an estimate: not yet timed there).
DEQUANT_CHUNKS_MIN_M = 128
# Rows of A up to which the decode GEMV runs (dense activations; it decodes the weight once and
# loops over the rows in registers, so its FMA work grows with M while its bytes do not).
GEMV_MAX_M = 2  # H100: the GEMV costs ~3.3 us per row (M=1: 11.4 us, M=16: 60.7 us at 4096^2)
# Rows of A from which, and below which, "ws" (templates/fp4_gemm_ws.py: the weight decoded into
# wgmma's registers, warp-specialised) runs on sm_90 where it takes the operands, in place of
# "dequant_chunks".  H100 (BENCHMARKS.md): 0.94-1.06x bf16 torch.mm at 1024-2048 rows on 4096^2,
# 8192^2, 14336 x 4096 (dequant_chunks 1.1-1.55x), 1.26-1.41x at 2880^2; at 4096 rows dequant_chunks'
# one decode pass is amortised and ws took 0.90-1.09x its time (1.24-1.28x at 1280 x 4096)
WS_MIN_M, WS_MAX_M = 1024, 4096
# ...and where its tiles (fp4_gemm_ws: W_ROWS weight rows x TOKENS rows of A) number at least this
# share of the SMs: 1280 x 4096 at 1024 / 2048 rows (40 / 80 tiles on 132 SMs, the last wave split
# in K) took 1.3 / 1.25x dequant_chunks' time, 2880^2 at 1024 rows (92 tiles) 0.80x
WS_MIN_FILL = 2 / 3


@dataclass(frozen=True)
class GemvConfig:
    """One launch of ``fp4_gemv_kernel``: BLOCK_N weight rows x BLOCK_K per step, SPLIT_K programs
    per N tile (whole BLOCK_K steps each), ROWS = next power of two >= M (set at launch)."""

    block_n: int = 32
    block_k: int = 512
    split_k: int = 8
    num_warps: int = 4
    words: bool = False  # decode from 32-bit words with x pre-scaled by 2^64 (|x| < 2^64; kernel notes)

    def __post_init__(self):
        if self.block_n < 1 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n={self.block_n} must be a power of two")
        if self.block_k < 32 or self.block_k & (self.block_k - 1):
            raise ValueError(f"block_k={self.block_k} must be a power of two >= 32")
        if self.split_k < 1:
            raise ValueError(f"split_k={self.split_k} must be >= 1")


def choose_gemv_config(m: int, n: int, k: int, num_sms: int) -> GemvConfig:
    """Decode GEMV tiles: 64 weight rows x 256 K per program, K split for ~4 programs per SM, each
    one or two K steps (the loads of a step are all issued before its math; nothing is pipelined
    across steps).  H100, M = 1, N = K = 4096: 9.9 us against 10.3-12.4 for 16/32-row tiles with
    512-K steps (benchmarks/NOTES_fp4.md)."""
    block_k = min(256, _pow2_at_least(k, 32))
    block_n = 64
    steps = -(-k // block_k)
    tiles = -(-n // block_n)
    split = max(1, min(steps, -(-4 * num_sms // tiles)))
    return GemvConfig(block_n, block_k, split, num_warps=4)


@dataclass(frozen=True)
class GemmKernelConfig:
    """One launch of ``block_scaled_gemm_kernel``."""

    block_m: int  # rows of A per program (>= 16)
    block_n: int  # weight rows per program
    block_k: int  # K per main-loop step (multiple of 32)
    split_k: int = 1  # programs sharing one output tile along K (fp32 workspace + ordered sum)
    group_m: int = 8  # tile rows visited together (L2 reuse of weight tiles)
    num_warps: int = 4
    num_stages: int = 3
    dot_scaled: bool = False  # tl.dot_scaled (native block-scaled MMA on sm_100) vs in-register dequant
    prefetch: bool = False  # double-buffer the K loop's loads in registers (see the kernel's notes)
    # decoded weight tile as the MMA's A operand (out^T = B @ A^T): on sm_90 the weight rows fill
    # wgmma's M = 64 straight from registers and the few tokens are its N (>= 16); dense bf16 A only
    swap_ab: bool = False
    scales_ahead: Optional[bool] = None  # swapped tile: block scales a K step ahead (None: the MoE's rule)
    # swapped tile with its scales loaded in the step: prefetch the next step's to L1 (opt-in; timed
    # slower than the rule's tiles, BENCHMARKS.md)
    prefetch_scales: bool = False
    # the kernel states that each program's K range starts at a whole block_k (K_ALIGNED; the
    # kernel's notes): faster for every swapped tile but MXFP4's two-warpgroup one with its scales
    # ahead and NVFP4's 4-warp 17..128-row ones (choose_gemm_config)
    k_aligned: bool = True

    def __post_init__(self):
        if self.swap_ab and self.dot_scaled:
            raise ValueError("swap_ab decodes the weight in registers; it excludes dot_scaled")
        if self.swap_ab and (self.block_k % 64 or self.prefetch):
            raise ValueError("swap_ab takes K steps of whole 64s (the activations' K order) and no prefetch")
        if self.prefetch_scales and (not self.swap_ab or self.scales_ahead):
            raise ValueError("prefetch_scales is for the swapped tile with its scales loaded in the step")
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two >= 16")
        if self.block_k < 32 or self.block_k & (self.block_k - 1):
            raise ValueError(f"block_k={self.block_k} must be a power of two >= 32")
        if self.split_k < 1:
            raise ValueError(f"split_k={self.split_k} must be >= 1")


def _pow2_at_least(x: int, lo: int) -> int:
    return max(lo, 1 << max(0, (x - 1).bit_length()))


def _small_m_block_k(k: int) -> int:
    """K step of the small-M tiles: 256, or K rounded up to a power of two (>= 32) for K < 1024."""
    return 256 if k >= 1024 else max(32, _pow2_at_least(min(k, 256), 32))


def swap_ab_fits(spec: GemmSpec, a_dtype: torch.dtype) -> bool:
    """The swapped tile runs the packed bf16 decoder: bf16 activations, FP4 weights."""
    return spec.a_format == "dense" and a_dtype == torch.bfloat16 and spec.b_format in _PACKED


def dequant_chunks_fits(spec: GemmSpec, a_dtype: torch.dtype) -> bool:
    """What "dequant_chunks" (decode to a bf16 workspace, then cuBLAS) can compute."""
    return (spec.a_format == "dense" and a_dtype == torch.bfloat16 and spec.out_dtype == "bfloat16"
            and spec.activation in (None, "relu", "silu", "gelu", "gelu_tanh"))


def swapped_tile_runs(m: int, n: int, k: int, b_format: str, num_sms: int, chunks_fit: bool = True) -> bool:
    """Whether a call of ``m`` rows runs a swapped tile on sm_90 (where it takes the operands):
    17..128 rows always (faster than dequant_chunks there, 1.03-2.1x at 128 rows), 129..512 where
    ``choose_swapped_tile`` estimates one of them faster than dequant_chunks (or that cannot run).
    From 1024 rows dequant_chunks wins (cuBLAS)."""
    if 16 < m <= 128:
        return True
    return 128 < m <= WIDE_SWAPPED_MAX_M and choose_swapped_tile(m, n, k, b_format, num_sms,
                                                                  chunks_fit).tile != "dequant_chunks"


def swapped_tile_takes(b_scale: torch.Tensor, k: int, spec: GemmSpec) -> bool:
    """What the swapped tile needs of the operands beyond ``swap_ab_fits``: K in whole 64s (the
    activations' to_mma_k_order), and MXFP4 scales that fit the decode's multiply (read once per
    weight version: lowering.moe.mxfp4_scales_in_decode)."""
    if k % 64:
        return False
    if spec.b_format == "mxfp4":
        from ..lowering.moe import mxfp4_scales_in_decode

        return mxfp4_scales_in_decode(b_scale)
    return True


def dot_scaled_fits(spec: GemmSpec, a_dtype: torch.dtype, arch: int) -> bool:
    """Whether tl.dot_scaled can take these operands (else the in-register dequant path runs).
    NV scales (e4m3 per 16) go through dot_scaled only on sm_100, where Triton lowers them natively."""
    if spec.a_format == "dense" and a_dtype not in (torch.bfloat16,):
        return False
    if "nvfp4" in (spec.a_format, spec.b_format):
        return arch >= 100 and spec.a_format in ("dense", "nvfp4") and spec.b_format == "nvfp4"
    return True


def choose_gemm_config(m: int, n: int, k: int, spec: GemmSpec, a_dtype: torch.dtype, num_sms: int,
                       arch: int = 90, swap_allowed: bool = True) -> GemmKernelConfig:
    """Tiles for one call; pure, so tests can check it without a GPU.  ``swap_allowed``: False
    where the operands do not suit the swapped tile (``swapped_tile_takes``)."""
    use_dot_scaled = dot_scaled_fits(spec, a_dtype, arch) and (arch >= 100 or os.environ.get(
        "INDUCTOR_MOE_FP4_DOT_SCALED", "0") == "1")
    if arch < 100 and not use_dot_scaled and swap_ab_fits(spec, a_dtype) and swap_allowed and k % 64 == 0 \
            and swapped_tile_runs(m, n, k, spec.b_format, num_sms, chunks_fit=False):
        # 17..128 rows on Hopper, bf16 activations: the MoE's swapped tile (64 or 128 decoded weight
        # rows as wgmma's register A operand, the tokens as N), ~2 programs per SM, each >= 4 K
        # steps.  H100 sweep (benchmarks/NOTES_fp4.md, "The MoE's swapped tile in the GEMM"): 64-row
        # token tiles, 64 x 256-deep weight tiles (NVFP4 with K not in 256s: 128 x 64 and 8 warps,
        # within 4% of the best there).  M = 64, 4096^2: 15.7 us (17.6 with the GEMM's earlier tile).
        # 129..512 rows, and 65..128 where its grid fills the SMs (``takes_rows``): the tile
        # ``choose_swapped_tile`` estimates fastest.  The two-warpgroup tile:
        # 256 tokens x 128 weight rows x 64-deep steps, no split-K.  The one-warpgroup tile: 128
        # tokens x 128 weight rows x 64-deep steps, 4 stages (within 4% of the best one-warpgroup
        # tile at N = 8192 and 14336).  MXFP4's 2 scale bytes per row and step are too few for
        # cp.async, so both load them a step ahead (one CTA per SM has no other warps to hide a
        # synchronous load: M = 1024, 4096^2, 86 -> 58 us, ncu; one-warpgroup tile at 8192^2, one
        # split: 141 -> 100 us).  NVFP4's 4 bytes go by cp.async under K_ALIGNED, in the step.
        # K_ALIGNED (the kernel's notes), H100 sweep ("The K range's alignment"): NVFP4's tiles here
        # 1.2-1.4x faster with it (8192^2 at 256 rows: 112 -> 86 us; 512 rows: 163 -> 129), MXFP4's
        # one-warpgroup tile too (100 -> 81); MXFP4's two-warpgroup tile keeps its scales ahead
        # without it (122 against 126 with it and the scales in the step, 143 ahead).
        # 17..128 rows: MXFP4's tiles 1.15x faster with it (64 x 8192^2: 47 -> 40), NVFP4's 4-warp
        # tiles slower, its 8-warp tile at 33..64 rows faster (below).
        mx = spec.b_format == "mxfp4"
        if takes_rows(m, n, num_sms):
            choice = choose_swapped_tile(m, n, k, spec.b_format, num_sms, chunks_fit=False)
            if choice.tile == "two_warpgroups":
                return GemmKernelConfig(256, 128, 64, num_warps=8, num_stages=3, swap_ab=True,
                                        scales_ahead=True if mx else None, k_aligned=choice.k_aligned)
            return GemmKernelConfig(128, 128, 64, split_k=choice.split_k, num_warps=4, num_stages=4, swap_ab=True,
                                    scales_ahead=True if mx else None, k_aligned=choice.k_aligned)
        block_m = min(64, _pow2_at_least(m, 16))
        # 33..64 rows (H100, 11 shapes N = 4096-28672, K = 4096-14336, at 48 and 64 rows;
        # benchmarks/NOTES_fp4.md, "33-64 rows: one round of programs"): NVFP4 on two warpgroups of
        # 64 weight rows with K_ALIGNED, 0.66-1.01x the time of the 4-warp tile (8192^2 at 64 rows:
        # 50.8 -> 36.2 us); both formats split K only as far as one round of programs on the SMs
        # (MXFP4 8192 x 4096: 25.0 -> 20.0, 4096 x 8192: 26.2 -> 20.8).  At 17..32 rows the same
        # rule was mixed (0.78-1.33x), so those keep ~2 programs per SM, rounded up.
        one_round = 32 < m <= 64 and k >= 1024 and (mx or k % 256 == 0)
        if spec.b_format == "nvfp4" and k % 256:
            block_n, block_k, warps, stages = 128, 64, 8, 3
        elif one_round and not mx:
            block_n, block_k, warps, stages = 128, _small_m_block_k(k), 8, 3
        else:
            block_n, block_k, warps, stages = 64, _small_m_block_k(k), 4, 3
        tiles = -(-m // block_m) * -(-n // block_n)
        steps = -(-k // block_k)
        if one_round:  # at most 2 programs of 4 warps, or 1 of 8, per SM
            split = max(1, min(steps // 4, (2 if warps == 4 else 1) * num_sms // tiles))
        else:
            split = max(1, min(steps // 4, -(-2 * num_sms // tiles)))  # ~2 programs per SM
        return GemmKernelConfig(block_m, block_n, block_k, split_k=split, num_warps=warps, num_stages=stages,
                                swap_ab=True, k_aligned=mx or one_round)
    if m <= 64:
        # Small M: BLOCK_N 64 (or 32 for small N) and enough K splits for ~2 programs per SM, each
        # still running >= 4 K steps.  Measured on H100 (triton 3.6): 16.9 us at M = 1..16,
        # N = K = 4096.  A variant with ~8 programs per SM and one K step each is untimed.
        block_m = _pow2_at_least(m, 16)
        block_k = _small_m_block_k(k)
        block_n = 64 if n >= 64 * num_sms // 2 else 32
        tiles = -(-m // block_m) * -(-n // block_n)
        steps = -(-k // block_k)
        split = 1
        while tiles * split * 2 <= 2 * num_sms and steps // (split * 2) >= 4:
            split *= 2
        return GemmKernelConfig(block_m, block_n, block_k, split_k=split, num_warps=4, num_stages=4,
                                dot_scaled=use_dot_scaled)
    if m <= 256:
        # one or two M tiles: each weight tile is decoded once or twice; split-K for occupancy
        block_m = min(128, _pow2_at_least(m, 16))
        tiles = -(-n // 64)
        steps = -(-k // 128)
        split = 1
        while tiles * split < 4 * num_sms and split * 2 <= steps // 2:
            split *= 2
        return GemmKernelConfig(block_m, 64, 128, split_k=split, num_warps=8, num_stages=1, dot_scaled=use_dot_scaled)
    return GemmKernelConfig(128, 128, 128, num_warps=8, num_stages=3, dot_scaled=use_dot_scaled)


def gemv_fits(m: int, spec: GemmSpec, a_dtype: torch.dtype) -> bool:
    return (spec.a_format == "dense" and a_dtype in (torch.bfloat16, torch.float16, torch.float32)
            and spec.b_format in _PACKED and m <= 16)


STRATEGIES = ("cuda_decode", "gemv", "fused", "dequant_chunks", "ws")


def choose_strategy(m: int, n: int, k: int, spec: GemmSpec, a_dtype: torch.dtype, arch: int,
                    cuda_decode: bool = False, swapped_tile: bool = False, num_sms: int = 132,
                    ws: bool = False) -> str:
    """"cuda_decode" (M <= 16, bf16 activations: the CUDA mma.sync decode GEMM, where the caller
    found it buildable and the operands aligned: ``cuda_decode``), "gemv" (decode, no tl.dot),
    "fused" (the Triton GEMM kernel) or "dequant_chunks" (decode weight row chunks to bf16 once,
    then cuBLAS; where the swapped tile takes the operands, ``swapped_tile``, at the rows it does
    not run (``swapped_tile_runs``), else from ``DEQUANT_CHUNKS_MIN_M``) or "ws" (the weight
    decoded into wgmma's registers, sm_90, from ``WS_MIN_M`` to below ``WS_MAX_M`` rows where its
    tiles fill ``WS_MIN_FILL`` of the SMs and the caller found it takes the operands: ``ws``).
    ``INDUCTOR_MOE_FP4_STRATEGY=<one of STRATEGIES>`` overrides where the forced one applies (else
    the default choice stands)."""
    chunks_fit = dequant_chunks_fits(spec, a_dtype)
    decode_fit = cuda_decode and swap_ab_fits(spec, a_dtype) and m <= 16
    forced = os.environ.get("INDUCTOR_MOE_FP4_STRATEGY")
    if forced is not None:
        if forced not in STRATEGIES:
            raise ValueError(f"INDUCTOR_MOE_FP4_STRATEGY={forced!r}; allowed: {', '.join(STRATEGIES)}")
        if forced == "fused" or (forced == "gemv" and gemv_fits(m, spec, a_dtype)) or (
                forced == "dequant_chunks" and chunks_fit) or (forced == "cuda_decode" and decode_fit) or (
                forced == "ws" and ws and arch == 90):
            return forced
    if decode_fit:
        return "cuda_decode"
    if gemv_fits(m, spec, a_dtype) and m <= GEMV_MAX_M:
        return "gemv"
    if swapped_tile and arch < 100 and swapped_tile_runs(m, n, k, spec.b_format, num_sms, chunks_fit):
        return "fused"
    if ws and arch == 90 and WS_MIN_M <= m < WS_MAX_M and ws_tiles(m, n) >= WS_MIN_FILL * num_sms:
        return "ws"
    return "dequant_chunks" if chunks_fit and arch < 100 and m >= DEQUANT_CHUNKS_MIN_M else "fused"


def ws_tiles(m: int, n: int) -> int:
    """Tiles of the "ws" kernel for an [m, K] x [n, K] call."""
    from .fp4_gemm_ws import TOKENS, W_ROWS

    return -(-m // TOKENS) * -(-n // W_ROWS)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_counters: dict = {}


def _tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Per-device split-K arrival counters, zero between launches (each launch re-arms its own).
    Launches on concurrent streams must not share them: kernels here run on one stream."""
    buf = _counters.get(device)
    if buf is None or buf.numel() < tiles:
        buf = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        _counters[device] = buf
    return buf


@functools.lru_cache(maxsize=None)
def _arch(device: torch.device) -> int:
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _cuda_decode_reason(a2, b, b_scale, spec: GemmSpec, bias) -> Optional[str]:
    """Why the CUDA decode GEMM cannot take this call (None when it can)."""
    if a2.device.type != "cuda":
        return f"no CUDA kernels on {a2.device.type}"
    from ..cuda.fp4_decode import decode_mma_fits, nvrtc_unavailable_reason

    return decode_mma_fits(a2, b, b_scale, spec, bias) or nvrtc_unavailable_reason(a2.device.index)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """Packed fp4 / fp8 / e8m0 storage as uint8 (Triton reads the raw codes)."""
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


def dequant_chunks_gemm(a, b, b_scale, spec: GemmSpec, global_scale=None, bias=None,
                        chunk_bytes: int = DEQUANT_CHUNK_BYTES) -> torch.Tensor:
    """``act(global_scale * (A @ B^T) + bias)`` for bf16 A: weight rows decoded chunk by chunk into
    one bf16 workspace (global scale folded in) and multiplied by cuBLAS into the output columns."""
    from ._details._fp4_dequant import fp4_dequant_rows_kernel

    lead = a.shape[:-1]
    a2 = a.reshape(-1, a.shape[-1])
    M, N, K = a2.shape[0], b.shape[0], b.shape[1] * 2
    out = torch.empty((M, N), dtype=torch.bfloat16, device=a.device)
    rows = max(128, min(N, chunk_bytes // (2 * K)) // 128 * 128)
    ws = torch.empty((min(rows, N), K), dtype=torch.bfloat16, device=a.device)
    b_s = _as_bytes(b_scale)
    block_r, block_k = 32, 128
    for r0 in range(0, N, rows):
        r = min(rows, N - r0)
        fp4_dequant_rows_kernel[(-(-r // block_r), -(-K // block_k))](
            b, b_s, global_scale if global_scale is not None else ws, ws, r0, r, K,
            b.stride(0), b_s.stride(0), ws.stride(0),
            NV=spec.b_format == "nvfp4", HAS_GLOBAL_SCALE=global_scale is not None,
            BLOCK_R=block_r, BLOCK_K=block_k, num_warps=4)
        chunk = out[:, r0:r0 + r]
        if bias is not None:
            torch.addmm(bias[r0:r0 + r].to(torch.bfloat16), a2, ws[:r].t(), out=chunk)
        else:
            torch.mm(a2, ws[:r].t(), out=chunk)
    if spec.activation is not None:
        from ..ops.block_scaled_mm import apply_epilogue_activation

        out = apply_epilogue_activation(out, spec.activation)
    return out.reshape(*lead, N)


def _launch_gemv(a2, b, b_scale, spec: GemmSpec, global_scale, bias, out, cfg: GemvConfig, use_pdl: bool):
    from ._details._fp4_gemv import fp4_gemv_kernel

    M, N, K = a2.shape[0], b.shape[0], b.shape[1] * 2
    steps = -(-K // cfg.block_k)
    split = min(cfg.split_k, steps)
    k_per_split = -(-steps // split) * cfg.block_k
    split = -(-K // k_per_split)
    tiles_n = -(-N // cfg.block_n)
    if split > 1:
        ws = torch.empty((split, M, N), dtype=torch.float32, device=a2.device)
        counters = _tile_counters(a2.device, tiles_n)
    else:
        ws = counters = out
    use_pdl = use_pdl and not _interpreting()
    pdl = {"launch_pdl": True} if use_pdl else {}
    b_t, b_s = _as_bytes(b), _as_bytes(b_scale)
    fp4_gemv_kernel[(tiles_n, split)](
        a2, b_t, b_s, out, bias if bias is not None else out,
        global_scale if global_scale is not None else out, ws, counters,
        M, N, K, k_per_split, a2.stride(0), b_t.stride(0), b_s.stride(0), out.stride(0),
        NV=spec.b_format == "nvfp4", HAS_BIAS=bias is not None, HAS_GLOBAL_SCALE=global_scale is not None,
        ACTIVATION=ACTIVATION_CODES[spec.activation], ROWS=_pow2_at_least(M, 1), BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, SPLIT_K=split, USE_PDL=use_pdl, WORDS=cfg.words, num_warps=cfg.num_warps, num_stages=1,
        **pdl)
    return out


def _swapped_tile_ok(a2, b_scale, k: int, spec: GemmSpec) -> bool:
    return swap_ab_fits(spec, a2.dtype) and swapped_tile_takes(b_scale, k, spec)


def _swapped_tile_planned(a2, b_scale, m: int, n: int, k: int, spec: GemmSpec, num_sms: int, chunks_fit: bool) -> bool:
    """Whether a call runs the swapped tile: the rows first, so calls that would not run it never
    read the scales (``swapped_tile_takes``)."""
    return (swap_ab_fits(spec, a2.dtype) and swapped_tile_runs(m, n, k, spec.b_format, num_sms, chunks_fit)
            and swapped_tile_takes(b_scale, k, spec))


def _ws_reason(a2, b, b_scale, spec: GemmSpec) -> Optional[str]:
    """Why the "ws" kernel cannot take this call (None when it can): sm_90, the operands
    (fp4_gemm_ws.ws_operands_reason), MXFP4 scales in the decode's range, and the weight's
    re-layout made (it cannot be made during CUDA-graph capture)."""
    from .. import config
    from .fp4_gemm_ws import cached_weight_layout, ws_operands_reason

    if a2.device.type != "cuda" or _interpreting() or _arch(a2.device) != 90:
        return "sm_90 only"
    if not config.warp_specialized:
        return "config.warp_specialized is off"
    why = ws_operands_reason(spec, a2.dtype)
    if why is None and spec.b_format == "mxfp4":
        from ..lowering.moe import mxfp4_scales_in_decode

        if not mxfp4_scales_in_decode(b_scale):
            why = "MXFP4 scales above 2 (e8m0 bytes 129..254) do not fit the decode's multiply"
    if why is None and cached_weight_layout(b, b_scale, spec.b_format == "nvfp4") is None:
        why = "the weight's re-layout was not made before CUDA-graph capture"
    return why


def default_plan(a2, b, b_scale, spec: GemmSpec, bias=None):
    """(strategy, config) that ``block_scaled_gemm`` runs a call [M, K] x [N, K / 2] left to its
    defaults with (config None for "dequant_chunks" and "ws").  The swapped tile and "ws" are
    considered only where they may run (``swapped_tile_runs``; WS_MIN_M..WS_MAX_M rows on sm_90 with
    the SMs filled), so other calls never read the scales nor re-lay-out the weight."""
    M, N, K = a2.shape[0], b.shape[0], b.shape[1] * 2
    arch, sms = _arch(a2.device), _num_sms(a2.device)
    decode_ok = M <= 16 and _cuda_decode_reason(a2, b, b_scale, spec, bias) is None
    swapped = arch < 100 and _swapped_tile_planned(a2, b_scale, M, N, K, spec, sms, dequant_chunks_fits(spec, a2.dtype))
    ws = (arch == 90 and WS_MIN_M <= M < WS_MAX_M and ws_tiles(M, N) >= WS_MIN_FILL * sms
          and _ws_reason(a2, b, b_scale, spec) is None)  # the re-layout is made only where ws would run
    strategy = choose_strategy(M, N, K, spec, a2.dtype, arch, cuda_decode=decode_ok, swapped_tile=swapped,
                               num_sms=sms, ws=ws)
    if strategy == "cuda_decode":
        from ..cuda.fp4_decode import choose_decode_mma_config

        return strategy, choose_decode_mma_config(M, N, K, sms, spec.b_format)
    if strategy == "gemv":
        return strategy, choose_gemv_config(M, N, K, sms)
    if strategy == "fused":
        return strategy, choose_gemm_config(M, N, K, spec, a2.dtype, sms, arch, swap_allowed=swapped)
    return strategy, None


def block_scaled_gemm(a, b, b_scale, spec: GemmSpec, a_scale=None, global_scale=None, bias=None, *,
                      config=None, use_pdl: bool = False,
                      strategy: Optional[str] = None) -> torch.Tensor:
    """``act(global_scale * (A @ B^T) + bias)``; inputs already validated.  ``strategy`` and
    ``config`` default to ``default_plan``; a strategy is one of STRATEGIES ("fused": the Triton
    kernel, tiles from ``config``)."""
    lead = a.shape[:-1]
    a2 = a.reshape(-1, a.shape[-1])
    if a2.stride(-1) != 1:
        a2 = a2.contiguous()
    M, N = a2.shape[0], b.shape[0]
    K = b.shape[1] * 2
    out = torch.empty((M, N), dtype=getattr(torch, spec.out_dtype), device=a.device)
    if M == 0 or N == 0:
        return out.reshape(*lead, N)
    if K == 0:
        out.zero_()
        return out.reshape(*lead, N)
    arch = _arch(a.device)
    planned = config is None and strategy is None
    if planned:
        strategy, config = default_plan(a2, b, b_scale, spec, bias)
    if isinstance(config, DecodeMmaConfig):
        strategy = "cuda_decode"
    if strategy == "cuda_decode":
        from ..cuda.fp4_decode import choose_decode_mma_config, decode_mma_gemm

        decode_reason = None if planned else _cuda_decode_reason(a2, b, b_scale, spec, bias)
        if decode_reason is not None:
            raise ValueError(f"the cuda_decode strategy cannot take this call: {decode_reason}")
        cfg = config if isinstance(config, DecodeMmaConfig) else choose_decode_mma_config(
            M, N, K, _num_sms(a.device), spec.b_format)
        return decode_mma_gemm(a2, b, b_scale, spec, global_scale, bias, out, cfg, use_pdl).reshape(*lead, N)
    if isinstance(config, GemvConfig):
        strategy = "gemv"
    if strategy == "dequant_chunks":
        return dequant_chunks_gemm(a, b, b_scale, spec, global_scale, bias)
    if strategy == "ws":
        from .fp4_gemm_ws import cached_weight_layout, launch_fp4_gemm_ws

        why = None if planned else _ws_reason(a2, b, b_scale, spec)
        if why is not None:
            raise ValueError(f"the ws strategy cannot take this call: {why}")
        nv = spec.b_format == "nvfp4"
        return launch_fp4_gemm_ws(a2, cached_weight_layout(b, b_scale, nv), nv, global_scale, bias, out,
                                  ACTIVATION_CODES[spec.activation], use_pdl and not _interpreting(),
                                  num_sms=_num_sms(a.device)).reshape(*lead, N)
    if strategy == "gemv":
        if not gemv_fits(M, spec, a2.dtype):
            raise ValueError(f"the gemv strategy takes dense activations and M <= 16 (M={M}, {spec.a_format})")
        gcfg = config if isinstance(config, GemvConfig) else choose_gemv_config(M, N, K, _num_sms(a.device))
        return _launch_gemv(a2, b, b_scale, spec, global_scale, bias, out, gcfg, use_pdl).reshape(*lead, N)
    if config is None:  # strategy "fused" forced, tiles left to the rule
        sms = _num_sms(a.device)
        cfg = choose_gemm_config(M, N, K, spec, a2.dtype, sms, arch,
                                 swap_allowed=_swapped_tile_planned(a2, b_scale, M, N, K, spec, sms, chunks_fit=False))
    else:  # planned (already checked) or given: a given swapped tile the operands do not suit runs unswapped
        cfg = config
        if not planned and cfg.swap_ab and not _swapped_tile_ok(a2, b_scale, K, spec):
            cfg = replace(cfg, swap_ab=False)
    if cfg.dot_scaled and not dot_scaled_fits(spec, a2.dtype, arch):
        cfg = replace(cfg, dot_scaled=False)
    use_pdl = use_pdl and not _interpreting()
    pdl = {"launch_pdl": True} if use_pdl else {}
    a_fmt = spec.a_format
    a_t = a2 if a_fmt == "dense" else _as_bytes(a2)
    if cfg.swap_ab:  # the swapped tile reads A with K in to_mma_k_order: one pass over A
        from .moe_common import moe_kperm_kernel

        a_t = torch.empty((M, K), dtype=a2.dtype, device=a.device)
        moe_kperm_kernel[(-(-M // 16), -(-K // 256))](a2, a_t, M, K, a2.stride(0), BLOCK_T=16, BLOCK_K=256,
                                                       USE_PDL=use_pdl, num_warps=4, **pdl)
    a_s = _as_bytes(a_scale.reshape(-1, a_scale.shape[-1])) if a_scale is not None else a_t
    b_t, b_s = _as_bytes(b), _as_bytes(b_scale)
    scales_ahead = False
    if cfg.swap_ab:  # the MoE's swapped tile takes NVFP4 scales as e4m3 and MXFP4's in 16-byte rows
        from ..lowering.moe import mxfp4_scales_16b_rows
        from ..lowering.moe_plan import fp4_scales_ahead

        b_s = b_scale.view(torch.float8_e4m3fn) if spec.b_format == "nvfp4" else mxfp4_scales_16b_rows(
            b_scale.unsqueeze(0))[0].view(torch.uint8)
        scales_ahead = fp4_scales_ahead(spec.b_format, b_s.stride(0)) if cfg.scales_ahead is None else cfg.scales_ahead
    # K splits are whole BLOCK_K steps
    steps = -(-K // cfg.block_k)
    split = min(cfg.split_k, steps)
    k_per_split = -(-steps // split) * cfg.block_k
    split = -(-K // k_per_split)
    tiles_m, tiles_n = -(-M // cfg.block_m), -(-N // cfg.block_n)
    if split > 1:
        ws = torch.empty((split, M, N), dtype=torch.float32, device=a.device)
        counters = _tile_counters(a.device, tiles_m * tiles_n)
    else:
        ws = counters = out
    block_scaled_gemm_kernel[(tiles_m * tiles_n, split)](
        a_t, a_s, b_t, b_s, out, bias if bias is not None else out,
        global_scale if global_scale is not None else out, ws, counters,
        M, N, K, k_per_split,
        a_t.stride(0), a_t.stride(1), a_s.stride(0), a_s.stride(1) if a_s.dim() > 1 else 1,
        b_t.stride(0), b_t.stride(1), b_s.stride(0), b_s.stride(1), out.stride(0), out.stride(1),
        A_FORMAT=FORMAT_CODES[a_fmt], B_FORMAT=FORMAT_CODES[spec.b_format], DOT_SCALED=cfg.dot_scaled,
        MMA_FP32=(a_fmt == "dense" and a2.dtype == torch.float32) or _interpreting(),
        HAS_BIAS=bias is not None, HAS_GLOBAL_SCALE=global_scale is not None,
        ACTIVATION=ACTIVATION_CODES[spec.activation],
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, SPLIT_K=split,
        USE_PDL=use_pdl, PREFETCH=cfg.prefetch, SWAP_AB=cfg.swap_ab, EVEN_K=K % cfg.block_k == 0,
        SCALES_AHEAD=scales_ahead, PREFETCH_SCALES=cfg.prefetch_scales and not scales_ahead, K_ALIGNED=cfg.k_aligned,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl)
    return out.reshape(*lead, N)


# --- what ``python -m inductor_moe.isa`` compiles --------------------------------------------

def _isa_spec(label, a_fmt, b_fmt, dot_scaled, a_dtype="*bf16", m=128, expect="", prefetch=False, swap_ab=False):
    sig = {"a_ptr": "*u8" if a_fmt != "dense" else a_dtype, "a_scale_ptr": "*u8", "b_ptr": "*u8",
           "b_scale_ptr": "*fp8e4nv" if swap_ab and b_fmt == "nvfp4" else "*u8", "out_ptr": "*bf16", "bias_ptr": "*bf16", "global_scale_ptr": "*fp32",
           "ws_ptr": "*fp32", "counter_ptr": "*i32"}
    sig.update({name: "i32" for name in ("M", "N", "K", "K_PER_SPLIT", "stride_am", "stride_ak", "stride_asm",
                                          "stride_ask", "stride_bn", "stride_bk", "stride_bsn", "stride_bsk",
                                          "stride_om", "stride_on")})
    const = dict(A_FORMAT=FORMAT_CODES[a_fmt], B_FORMAT=FORMAT_CODES[b_fmt], DOT_SCALED=dot_scaled, MMA_FP32=False,
                 HAS_BIAS=True, HAS_GLOBAL_SCALE=b_fmt == "nvfp4", ACTIVATION=SILU, BLOCK_M=m, BLOCK_N=128,
                 BLOCK_K=128, GROUP_M=8, SPLIT_K=1, USE_PDL=True, PREFETCH=prefetch, SWAP_AB=swap_ab,
                 EVEN_K=True, SCALES_AHEAD=False, PREFETCH_SCALES=False, K_ALIGNED=True)
    for name in const:
        sig[name] = "constexpr"
    options = {"num_warps": 8 if m >= 128 else 4, "num_stages": 3}
    if expect:
        options["expect_sm100"] = expect
    if swap_ab:  # choose_gemm_config swaps on Hopper only
        options.update(only_arch=90, why_only="swapped tiles on Hopper only (choose_gemm_config)")
    return (label, block_scaled_gemm_kernel, sig, const, options)


# (label, kernel, signature, constexprs, options); options["expect_sm100"] = "block_scale" marks
# the variants whose sm_100a PTX must hold tcgen05 block-scaled MMA (both operands scaled: with
# bf16 activations Triton upcasts the weight and issues kind::f16).
def _dequant_isa_spec():
    from ._details._fp4_dequant import fp4_dequant_rows_kernel as kernel

    sig = {"b_ptr": "*u8", "b_scale_ptr": "*u8", "global_scale_ptr": "*fp32", "ws_ptr": "*bf16", "row0": "i32",
           "R": "i32", "K": "i32", "stride_bn": "i32", "stride_bsn": "i32", "stride_wr": "i32"}
    const = dict(NV=False, HAS_GLOBAL_SCALE=False, BLOCK_R=32, BLOCK_K=128)
    sig.update({name: "constexpr" for name in const})
    return ("fp4_dequant_rows[mxfp4 -> bf16]", kernel, sig, const, {"num_warps": 4})


ISA_SPECS = [
    _isa_spec("block_scaled_gemm[mxfp4 x mxfp4, dot_scaled]", "mxfp4", "mxfp4", True, expect="block_scale"),
    _isa_spec("block_scaled_gemm[fp8_mx32 x mxfp4, dot_scaled]", "fp8_mx32", "mxfp4", True, expect="block_scale"),
    _isa_spec("block_scaled_gemm[nvfp4 x nvfp4, dot_scaled]", "nvfp4", "nvfp4", True, expect="block_scale"),
    _isa_spec("block_scaled_gemm[bf16 x mxfp4, dot_scaled]", "dense", "mxfp4", True),
    _isa_spec("block_scaled_gemm[bf16 x mxfp4, dequant]", "dense", "mxfp4", False),
    _isa_spec("block_scaled_gemm[bf16 x nvfp4, dequant]", "dense", "nvfp4", False),
    _isa_spec("block_scaled_gemm[bf16 x mxfp4, dequant, decode tiles, prefetch]", "dense", "mxfp4", False, m=16,
              prefetch=True),
    _isa_spec("block_scaled_gemm[bf16 x nvfp4, dequant, swapped decode tiles]", "dense", "nvfp4", False, m=16,
              swap_ab=True),
    _dequant_isa_spec(),
]
