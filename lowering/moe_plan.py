"""Tile choices for the fused MoE kernels: a pure function of the problem, testable without a GPU.

# T: tokens, k: experts per token, E: experts, H: hidden, I: expert intermediate size, N = T*k
# Regimes: decode (few rows per expert: weight-bandwidth bound, BLOCK_M 16, narrow N tiles so
# every SM streams a slice of the active experts' weights), mid, and prefill (128-row tiles,
# wgmma-sized, deep num_stages pipelining).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

# up to this many (token, slot) entries one align launch takes them all; above, count then place
# (templates/moe_align.py; H100: 4.2 against 4.7 µs at 1024 entries, 6.7 against 4.8 at 4096)
ALIGN_ONE_LAUNCH_MAX_ENTRIES = 1024
CONFIG_SOURCES = ("heuristic", "tuned", "tuned-cache", "tuned-shipped")  # MoEKernelConfig.source


@dataclass(frozen=True)
class GemmTiles:
    block_n: int  # output columns per program (L1: intermediate columns, i.e. gate and up tiles each)
    block_k: int  # reduction step
    num_warps: int
    num_stages: int

    def __post_init__(self):
        for name in ("block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two >= 16")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps={self.num_warps} must be a power of two <= 16")
        if self.num_stages < 1:
            raise ValueError(f"num_stages={self.num_stages} must be >= 1")


@dataclass(frozen=True)
class MoEKernelConfig:
    block_m: int  # rows per M-block; every expert's rows are padded to a multiple of it
    gemm1: GemmTiles  # L1: x @ w13 with the SwiGLU epilogue
    gemm2: GemmTiles  # L2: intermediate @ w2
    align_chunk: int  # entries per align step (a power of two)
    align_one_launch: bool  # one align launch (moe_align_fused) or count, then place
    combine_block_t: int  # tokens per combine program
    combine_block_h: int  # hidden columns per combine program
    regime: str  # "decode", "mid" or "prefill", for people and the report
    gate_up_one_dot: bool = True  # L1: one [BK, 2*block_n] weight tile (gate/up alternating) per step
    fp4_dot_scaled: bool = True  # mxfp4 through tl.dot_scaled (else e2m1 decoded in registers + tl.dot)
    swap_ab: bool = False  # FP4 / fp8 weights decoded in registers as wgmma's register A operand (fp4_swap_ab)
    # swapped FP4 tiles with their block scales loaded in the K step: prefetch the next step's to L1
    # (templates/moe_tiles.py: prefetch_fp4_weight_scales); opt-in, no rule sets it (timed slower: BENCHMARKS.md)
    fp4_prefetch_scales: bool = False
    # dense weights with dense activations: L1 / L2 read their weight tiles through TMA descriptors
    # (lowering/moe_tma.py) instead of per-thread pointer loads.  None: where block_m >= 64
    # (moe_tma.TMA_MIN_BLOCK_M); True / False: wherever the call allows it / never
    weight_tma: Optional[bool] = None
    tail_block_m: int = 0  # > 0 and < block_m: an expert's last M-block runs tiles of this many rows, or
    # twice it, where they hold its rows (moe_gemm1_kernel); swap_ab_tail_block_m
    source: str = "heuristic"  # where block_m / gemm tiles came from: "heuristic", or tuned (lowering/moe_tune.py):
    # "tuned" (this process), "tuned-cache" (user cache file), "tuned-shipped" (lowering/tuned/<device>.json)

    def __post_init__(self):
        if self.block_m not in (16, 32, 64, 128, 256):
            raise ValueError(f"block_m={self.block_m} must be one of 16, 32, 64, 128, 256")
        if self.tail_block_m not in (0, 16, 32, 64, 128):
            raise ValueError(f"tail_block_m={self.tail_block_m} must be 0 or one of 16, 32, 64, 128")
        if self.source not in CONFIG_SOURCES:
            raise ValueError(f"source={self.source!r} must be one of {CONFIG_SOURCES}")
        for name in ("align_chunk", "combine_block_t", "combine_block_h"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two")

    def replace(self, **overrides) -> "MoEKernelConfig":
        """A copy with fields replaced; unknown names fail loudly."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise ValueError(f"MoEKernelConfig has no field(s) {sorted(unknown)}; fields: {sorted(names)}")
        return dataclasses.replace(self, **overrides)


def _pow2_at_least(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def _fp4_decode_register_budget(g1: GemmTiles, g2: GemmTiles) -> tuple[GemmTiles, GemmTiles]:
    """Decode/mid tiles for e2m1 weights decoded in registers (templates/_details/fp_codes.py:
    e2m1_pairs_to_bf16): L1 32 (x2 gate/up) columns by 64 K, L2 64 columns by 128 K -- what
    moe_tune picked on H100 for MXFP4 and NVFP4 at T = 16 and 128 on all three TARGETS layers
    (1.3-1.5x over 32x256 / 64x256 tiles; lowering/tuned/).  ptxas -v for sm_90a: 256-K tiles
    already fit (157-164 registers); these are smaller.  Past such a budget the decode spills:
    NVFP4 with the bf16 tiles (L1 64 x 256, L2 128 x 256) spilled 2.4 KB per thread and ran 7.2 ms
    instead of ~0.3 ms at qwen3 T=16 on H100 (commit 559d0b1)."""
    return (dataclasses.replace(g1, block_n=min(g1.block_n, 32), block_k=64),
            dataclasses.replace(g2, block_n=min(g2.block_n, 64), block_k=max(64, min(g2.block_k, 128))))


def _fp8_act_tiles(g1: GemmTiles, g2: GemmTiles, act_format: str, weight_format: str,
                   regime: str) -> tuple[GemmTiles, GemmTiles]:
    """fp8 activations: the L1 epilogue quantises whole scale groups of h per tile, so L1's
    block_n is a multiple of the group (128 or 32); block-128 scales need block_k | 128 (one
    scale per row per K step), mx32 scales 32 | block_k.  fp8 x fp8 (DeepSeek): measured tiles
    (below).  The other pairs: sized so that ptxas (sm_90a, triton 3.9, qwen3-30b-a3b shape)
    reports no spills (except fp8_block128 x mxfp4 / nvfp4 at prefill, whose 128-row L1 spills ~1.1 KB
    and still ran 1.8-2x faster than 64 rows on H100); a register-budget
    choice, correct on H100 (tests/test_moe_kernels.py) but not tuned there."""
    if act_format == "fp8_block128" and weight_format == "fp8_block128":
        # whole 128-deep K steps in every regime (block_m still by regime: 16 / 32-64 / 64), so each
        # fp8 MMA partial is promoted (times the activation row scale and the weight tile scale) once
        # per scale block, not 4 times.  ptxas spills ~1.9 KB in L1, yet on H100
        # (benchmarks.moe --sweep-prefill) against 32-deep L1 / 64-wide L2 tiles: qwen3 T=1 60 -> 31 us,
        # T=16 220 -> 164, T=128 328 -> 266, T=1024 595 -> 329, T=4096 1432 -> 797; gpt-oss T=1
        # 96 -> 59, T=128 1503 -> 1205, T=4096 4008 -> 2279; dsv4 T=4096 6892 -> 3496
        tiles = GemmTiles(block_n=128, block_k=128, num_warps=8, num_stages=3)
        return tiles, tiles
    group = 128 if act_format == "fp8_block128" else 32
    g1 = dataclasses.replace(g1, block_n=max(g1.block_n, group))
    if act_format == "fp8_block128":
        g1 = dataclasses.replace(g1, block_k=min(g1.block_k, 128))
        g2 = dataclasses.replace(g2, block_k=min(g2.block_k, 128))
        if regime != "prefill":  # L1 16 x 128 x 128 spilled 7.4 KB with dense weights
            g1 = dataclasses.replace(g1, block_k=min(g1.block_k, 16 if weight_format == "dense" else 32))
            g2 = dataclasses.replace(g2, block_n=min(g2.block_n, 64))
        else:  # with block_m 64 (choose_moe_config); 128-row tiles spilled 0.7-2.6 KB
            g1 = dataclasses.replace(g1, block_k=32)
    else:
        g1 = dataclasses.replace(g1, block_k=max(g1.block_k, 32))
        g2 = dataclasses.replace(g2, block_k=max(g2.block_k, 32))
        if regime != "prefill" and weight_format != "mxfp4":  # in-register dequant of the A tile
            g1 = dataclasses.replace(g1, block_k=32)
            g2 = dataclasses.replace(g2, block_k=min(g2.block_k, 64))
        elif regime == "prefill" and weight_format in ("mxfp4", "nvfp4"):  # 128-row tiles (choose_moe_config)
            g1 = dataclasses.replace(g1, block_n=64, block_k=32, num_stages=3)
        elif regime == "prefill":
            g1 = dataclasses.replace(g1, block_n=64, block_k=64, num_stages=2)
    if regime == "prefill":
        g2 = dataclasses.replace(g2, block_n=64, block_k=64)
    return g1, g2


def _fp8_x_fp8_tiles(rows_per_expert: float, intermediate: int, gate_up_interleaved: bool, g1: GemmTiles,
                     g2: GemmTiles) -> tuple:
    """(gate_up_one_dot, block_m, L1 tiles, L2 tiles) of fp8 x fp8 from 64-row blocks up.  L1 runs
    gate and up as two dots: where each dot's weight tile lies in one 128-row scale block
    (fp8_weight_scales_uniform: I % 128 == 0, gate / up not interleaved) every K step promotes with
    one FMA per accumulator element instead of a per-column scale vector, and 128-row blocks fit
    (L1 182 registers at 64 rows, 255 and a 16-byte spill at 128; with per-column scales 128 rows
    spill more and run 2x slower).  H100,
    same-process A/B against the one-dot 64-row tiles (benchmarks/NOTES.md, "fp8 x fp8: one scale
    per weight tile"): qwen3 T = 4096 / 16384 809.7 -> 692.4 / 2851.4 -> 2351.5 us, dsv4 T = 4096
    (96 rows per expert) 3464.0 -> 2879.0 with 128-row blocks and 64-column L2 tiles (123 registers:
    two CTAs per SM); at 64 rows per expert 64-row blocks with 4 stages (qwen3 T = 1024 329.9 ->
    307.4; 128-row blocks 337.6); gpt-oss (I = 2880, per-column scales) T = 4096 2269.5 -> 2171-2201
    with two dots at 64 rows."""
    if not _gate_up_in_scale_blocks(intermediate, gate_up_interleaved, 128):
        return False, 64, g1, g2
    if rows_per_expert > FP8_X_FP8_FULL_BLOCK_ROWS:
        return False, 128, g1, dataclasses.replace(g2, block_n=64)
    return False, 64, dataclasses.replace(g1, num_stages=4), dataclasses.replace(g2, num_stages=4)


FP8_X_FP8_FULL_BLOCK_ROWS = 80  # rows per expert above which fp8 x fp8 runs 128-row blocks


def fp8_x_fp8_ws_blocks(cfg: MoEKernelConfig, weight_format: str, act_format: str, num_tokens: int, top_k: int,
                        num_experts: int, intermediate: int) -> Optional[MoEKernelConfig]:
    """The heuristic's fp8 x fp8 tiles on 128-row blocks where _fp8_x_fp8_tiles kept 64 only because
    the Triton L1's up tiles straddle two scale blocks (I % 128 = 64, gpt-oss): the warp-specialised
    GEMMs (lowering/moe_ws.py) promote those per column at no register cost, so when both take the
    call the blocks are as where I % 128 == 0.  None where this call keeps ``cfg``."""
    rows_per_expert = max(num_tokens * top_k, 1) / min(num_experts, max(num_tokens * top_k, 1))
    if (weight_format != "fp8_block128" or act_format != "fp8_block128" or cfg.source != "heuristic"
            or cfg.block_m != 64 or intermediate % 128 == 0 or rows_per_expert <= FP8_X_FP8_FULL_BLOCK_ROWS):
        return None
    return cfg.replace(block_m=128, gemm2=dataclasses.replace(cfg.gemm2, block_n=64))


def fp8_weight_scales_uniform(spec, cfg: "MoEKernelConfig", weight_format: str, intermediate: int) -> bool:
    """fp8 x fp8 L1 with two dots whose weight tiles each lie in one 128-row scale block (gate rows
    n, up rows I + n; block_n is 128, the activation group): a K step's weight scale is then one
    scalar per dot, and the promotion one FMA per accumulator element (moe_gemm1 W_SCALE_UNIFORM).
    L2's tiles of block_n | 128 rows always are (moe_gemm2 decides that itself)."""
    return (weight_format == "fp8_block128" and spec.act_format == "fp8_block128" and not cfg.gate_up_one_dot
            and _gate_up_in_scale_blocks(intermediate, spec.gate_up == "interleaved", cfg.gemm1.block_n))


def _gate_up_in_scale_blocks(intermediate: int, gate_up_interleaved: bool, block_n: int) -> bool:
    """Whether every L1 two-dot weight tile of ``block_n`` gate rows (n) or up rows (I + n) lies in
    one 128-row fp8 scale block (0: I unknown)."""
    return (not gate_up_interleaved and 128 % block_n == 0 and intermediate > 0
            and intermediate % block_n == 0)


def expert_major_order(weight_format: str) -> bool:
    """Whether the Triton expert GEMMs run an expert's M-blocks side by side (moe_gemm1 / moe_gemm2
    EXPERT_MAJOR; else N tiles fastest): for 16- and 8-bit weights, whose bytes bound the prefill,
    so the blocks after an expert's first read its weight tiles from L2 rather than again from DRAM.
    H100 (benchmarks/NOTES.md, "An expert's M-blocks side by side"), layer time against N fastest:
    bf16 gpt-oss T = 2048-16384 and dsv4 T = 16384 0.94-0.95, qwen3 0.98-1.01; fp8 weights with bf16
    activations 0.98-0.99.  FP4's swapped tiles ran 0.99-1.02 and keep N fastest (their weight
    tiles are a quarter of the bytes)."""
    return weight_format in ("dense", "fp8_block128")


def mxfp4_dot_scaled(setting: str, arch_major: int) -> bool:
    """Whether MXFP4 weights go through tl.dot_scaled (else the packed in-register decode).
    ``setting`` is config.mxfp4_mma.  auto: dot_scaled where the hardware has block-scaled MMA
    (sm_100+); on sm_90 the packed decode in every regime.  Triton's sm_90 emulation of
    tl.dot_scaled costs ~3x the instructions per weight at decode (ptxas/nvdisasm counts,
    benchmarks/NOTES.md) and was slower at prefill too on H100 (benchmarks.moe --sweep-prefill,
    T=4096: qwen3 1356 vs 1238 us, gpt-oss 4121 vs 3766 with bf16 activations; 2730 vs 1546 and
    7504 vs 4423 with fp8_mx32 activations, where it upcasts both operands)."""
    if setting != "auto":
        return setting == "dot_scaled"
    return arch_major >= 10


def fp4_swap_ab(setting: str, planned: bool, arch_major: int = 9) -> bool:
    """Whether FP4 (or fp8) weights decoded in registers run the swapped tiles (acc^T = W @ X^T, the decoded
    weight as wgmma's register A operand, activations in moe_common.to_mma_k_order): ``setting``
    is config.fp4_swap_ab, ``planned`` what choose_moe_config (or the tuned table) decided.  auto:
    on Hopper only, as the FP4 GEMM (block_scaled_gemm.choose_gemm_config): the tiles are built
    around wgmma's register operand, and Triton 3.6 (torch 2.11's) cannot lower the NVFP4 ones for
    sm_100a ("Illegal shared layout"; the unswapped tiles build there: tcgen05 kind::f16)."""
    if setting == "auto":
        return planned and arch_major < 10
    return setting == "on"


def swap_ab_fits(weight_format: str, act_format: str, hidden: int, intermediate: int) -> bool:
    """The swapped tiles take FP4 or fp8 weights with bf16 activations and K permuted per 64 (both
    GEMMs' K); FP4 weights with fp8_mx32 activations too, which they run rounded to fp8_mx32 but kept
    in bf16 (exact: 4 significant bits times a power of two; lowering/moe.py, plan.round_mx32)."""
    acts = ("dense", "fp8_mx32") if weight_format in ("mxfp4", "nvfp4") else ("dense",)
    return (weight_format in ("mxfp4", "nvfp4", "fp8_block128") and act_format in acts
            and hidden % 64 == 0 and intermediate % 64 == 0)


# fp8 weights with bf16 activations run the swapped tiles (on 256-row blocks) from this many rows per
# expert on average.  H100, same process against the unswapped plan (benchmarks/NOTES.md, "fp8 weights
# on the swapped tiles"): 256-row blocks at 192-1024 rows per expert 0.76-0.88x (dsv4 T = 8192 /
# 16384, gpt-oss T = 8192 / 16384, qwen3 T = 4096 / 16384), level at 128 (gpt-oss T = 4096, 0.99x),
# 1.21x at 96 (dsv4 T = 4096); 128-row swapped tiles 0.97-1.03x (64 deep) or 1.2-1.3x (128 deep).
FP8_SWAP_AB_MIN_ROWS_PER_EXPERT = 192


def with_swap_ab(cfg: "MoEKernelConfig", hidden: int, intermediate: int, weight_format: str) -> "MoEKernelConfig":
    """``cfg`` with the swapped tiles at its block_m (fp8 weights: at 256 rows as MXFP4; at 128 rows
    and below, where only config.fp4_swap_ab "on" swaps them, 64-deep steps with 4 stages).  Up to
    128 rows: 4 warps (one warpgroup:
    64 weight rows per wgmma), 128 weight rows per program (L1: 64 intermediate columns, gate and
    up), 128 of K per step with 3 stages where both GEMMs' K are multiples of 128, else (NVFP4) 64
    with 4: on gpt-oss (K = 2880) 128-deep steps ending in one 64-deep step (K_HALF_TAIL) measured
    3-7% slower at T = 1024 and 16384 and up to 43% with padded scales.  Fastest or within 8% of
    it at every point of an H100 sweep (qwen3, gpt-oss, dsv4, T = 256-16384; benchmarks/NOTES.md,
    "Swapped FP4 tiles").  256 rows: 8 warps, 64-deep steps, 3 stages (two warpgroups of 64 weight
    rows by 256 tokens: each decoded weight serves twice the tokens), but NVFP4's L1 128-deep
    (H100: qwen3 T = 2048-16384 3-5% faster, dsv4 T = 8192 / 16384 1-2%, in the noise; 128-deep L2 and MXFP4
    L1 were not faster, benchmarks/NOTES.md, "128-deep NVFP4 L1 steps at 256 rows").  NVFP4's 64-deep L1 at 128
    rows: 8 warps too (gpt-oss T = 4096 / 16384: L1 1653 -> 1445 / 5191 -> 4640 us on H100 with
    asynchronous wgmma; 8-warp L2 and MXFP4 were 5-25% slower, benchmarks/NOTES.md, "Asynchronous
    wgmma in the swapped tiles").  An expert's last block runs shorter tiles (swap_ab_tail_block_m).  MXFP4 takes 128-deep steps at any K (a K of 128n + 64 ends in one
    64-deep step, K_HALF_TAIL) with its scale rows 16-byte aligned (lowering/moe.py:
    mxfp4_scales_16b_rows), so Triton pipelines a step's 4 scale bytes per row: gpt-oss T =
    512-16384 9-17% faster than 64-deep steps with the scales as stored (benchmarks/NOTES.md,
    "MXFP4 scales in 16-byte rows")."""
    if cfg.block_m == 256:  # NVFP4 takes them only where hidden % 128 == 0 (swap_ab_block_m)
        g1, g2 = GemmTiles(64, 128 if weight_format == "nvfp4" else 64, 8, 3), GemmTiles(128, 64, 8, 3)
    elif weight_format == "fp8_block128":  # forced on (config.fp4_swap_ab): 64 deep, as measured fastest
        g1, g2 = GemmTiles(64, 64, 4, 4), GemmTiles(128, 64, 4, 4)
    elif (hidden % 128 == 0 and intermediate % 128 == 0) or weight_format == "mxfp4":
        g1, g2 = GemmTiles(64, 128, 4, 3), GemmTiles(128, 128, 4, 3)
    elif cfg.block_m == 128:  # NVFP4, K = 64 (mod 128): L1 in two warpgroups of 64 weight rows
        g1, g2 = GemmTiles(64, 64, 8, 4), GemmTiles(128, 64, 4, 4)
    else:
        g1, g2 = GemmTiles(64, 64, 4, 4), GemmTiles(128, 64, 4, 4)
    return cfg.replace(swap_ab=True, gemm1=g1, gemm2=g2, tail_block_m=swap_ab_tail_block_m(cfg.block_m))


def fp4_scales_ahead(weight_format: str, scale_row_stride: int) -> bool:
    """Whether the swapped tiles load each K step's block scales one step ahead (SCALES_AHEAD):
    NVFP4 where the scales' row stride is not a multiple of 16 bytes.  Triton pipelines a row's
    scale bytes (cp.async) only when they are 4 bytes and aligned, which the JIT knows from a
    16-divisible stride; otherwise each step waits on a synchronous DRAM load (ncu, gpt-oss:
    20-28% of L1's stall samples).  H100, benchmarks.moe at 5e0bcb9 (ahead for every FP4 call)
    against 2028d36: gpt-oss NVFP4 (stride 180) T = 512-16384 9-15% faster; where Triton already
    pipelined them (qwen3, dsv4) 10-55% slower, and MXFP4 on gpt-oss (stride 90, 2 bytes a step)
    up to 31% slower (benchmarks/NOTES.md, "Block scales a K step ahead")."""
    return weight_format == "nvfp4" and scale_row_stride % 16 != 0


def swap_ab_tail_block_m(block_m: int) -> int:
    """The swapped tiles' shortest tile for an expert's last block: a quarter of block_m (the
    kernels try it, then twice it), 64 at 256 rows, 16 at 32, none at 16.  With random routing
    about half the experts end in a block of a few rows, which otherwise costs a full-height
    MMA: on H100 (benchmarks/NOTES.md, "Shorter tiles for an expert's last block") 1-10% faster
    at 128 rows (MXFP4 qwen3 T = 1024 402 -> 361 us, gpt-oss T = 4096 3159 -> 2962, NVFP4 gpt-oss
    T = 4096 3377 -> 3082), except NVFP4 on qwen3 and dsv4 at >= 256 rows per expert (2-6%
    slower; they take 256-row blocks)."""
    return {16: 0, 32: 16, 256: 64}.get(block_m, block_m // 4)


SWAP_AB_PROGRAMS_PER_SM_REGISTERS = 168  # 65536 / (3 programs x 128 threads), in ptxas's steps of 8


def swap_ab_max_registers(block_m: int, num_warps: int, gemm: int) -> Optional[int]:
    """The register cap (Triton's ``maxnreg``) of a swapped tile of ``block_m`` rows in L1 (``gemm``
    1) or L2 (2), or None.  With its wgmmas asynchronous (templates/moe_common.py, k_loop_steps)
    ptxas gives the 4-warp tiles 162-202 registers at 32-64 rows: two programs per SM.  Capped at
    168, three fit: on H100 (benchmarks/NOTES.md, "Asynchronous wgmma in the swapped tiles") MXFP4
    gpt-oss T = 512 (32 rows) 975 -> 882 us, T = 1024 (64 rows) 1141 -> 1108, qwen3 T = 512 254 ->
    238, NVFP4 qwen3 T = 512 / 1024 268 -> 251 / 360 -> 347.  At 64 rows only L1 is capped: L2
    spills 136 bytes there (ptxas, triton 3.9) and gained 0-3%.  128 registers (four programs)
    spilled and ran up to 1.5x slower; 128-row tiles keep 255 (their accumulator alone is 128)."""
    if num_warps == 4 and (block_m <= 32 or (block_m == 64 and gemm == 1)):
        return SWAP_AB_PROGRAMS_PER_SM_REGISTERS
    return None


def k_half_tail(k_dim: int, block_k: int, swap_ab: bool) -> bool:
    """Whether a GEMM with reduction ``k_dim`` ends with one unmasked half-deep step (K_HALF_TAIL):
    the swapped tiles only, where K = n * block_k + block_k / 2 and the half step still takes
    whole 64s of K (gpt-oss's 2880 = 22 * 128 + 64) after at least one whole step (the K loop runs at
    least once: templates/moe_common.py, k_loop_steps); elsewhere a K tail is masked (EVEN_K off)."""
    return swap_ab and block_k >= 128 and k_dim % block_k == block_k // 2 and k_dim > block_k


def swap_ab_block_m(rows_per_expert: float, weight_format: str, regime: str, hidden: int,
                    intermediate: int) -> int:
    """Rows per M-block for the swapped tiles, where the tokens are wgmma's N (fp8 weights: 256, the
    one height at which they beat the unswapped tiles, FP8_SWAP_AB_MIN_ROWS_PER_EXPERT): 16 up to 8 rows per
    expert, 32 up to 32 (MXFP4: 28), 64 up to 48, then 128 -- but NVFP4 keeps 64 at mid sizes, and takes 256
    from 128 rows per expert where both K are multiples of 128, MXFP4 from 512 at any K (H100 sweeps: 16 beat 32 at 8 rows
    per expert by 9%, 32 beat 16 at 16 rows by 0-25% and 64 at 24-32 by 3-30%; at 64 rows 128 beat
    64 by 7% with MXFP4 and lost by 25% with NVFP4; at 256, MXFP4, 128 beat 64 by 30%; NVFP4 256
    rows, 8 warps, against 128: qwen3 T = 2048-16384 4-20% faster, dsv4 T = 16384 13%, gpt-oss
    (K = 2880) 9-37% slower; MXFP4 256 rows from 512 rows per expert: qwen3 T = 16384 3120 -> 2845 us,
    gpt-oss T = 16384 7406 -> 6804, while at 128-256 rows per expert (T = 4096) +3% / -12%
    (benchmarks/NOTES.md, "MXFP4 prefill on 256-row swapped tiles"); MXFP4 with its scales in
    16-byte rows, 64 against 32 rows at 32 rows per expert: qwen3 / gpt-oss 3% / 9% faster, at 24
    (dsv4) 7% slower, at 16 12-13% slower)."""
    if weight_format == "fp8_block128":  # swapped from 192 rows per expert (FP8_SWAP_AB_MIN_ROWS_PER_EXPERT)
        return 256
    if rows_per_expert <= 8:
        return 16
    if rows_per_expert <= (28 if weight_format == "mxfp4" else 32):
        return 32
    if rows_per_expert <= 48 or (weight_format == "nvfp4" and regime == "mid"):
        return 64
    if weight_format == "nvfp4" and rows_per_expert >= 128 and hidden % 128 == 0 and intermediate % 128 == 0:
        return 256
    if weight_format in ("mxfp4", "fp8_block128") and rows_per_expert >= 512:
        return 256
    return 128


def align_chunk(n_entries: int) -> int:
    """Entries per program of the two-launch align: 256, more from 32K entries so the table of
    per-chunk counts every program sums stays at 128 rows, at most 1024 (each program sorts its
    chunk: 24 µs a launch at 2048, against 10-12 at 1024; H100, benchmarks/NOTES.md, "align")."""
    return max(16, min(_pow2_at_least(n_entries), max(256, min(1024, _pow2_at_least(n_entries) // 128))))


def choose_moe_config(num_tokens: int, top_k: int, num_experts: int, hidden: int, intermediate: int,
                      weight_format: str = "dense", num_sms: int = 132,
                      overrides: Optional[dict] = None, act_format: str = "dense",
                      allow_swap_ab: bool = True, gate_up_interleaved: bool = False) -> MoEKernelConfig:
    """Pick tiles for one MoE layer call.  ``weight_format`` is the format the GEMMs read,
    ``act_format`` the activations' (dense, or fp8 e4m3 with per-128 / per-32 scales).
    ``allow_swap_ab=False``: the tiles for FP4 weights that will not run swapped (tl.dot_scaled,
    fp16 activations, the persistent kernel, config.fp4_swap_ab off).  ``gate_up_interleaved``:
    w13's gate / up rows alternate (their fp8 block scales then vary along an L1 tile)."""
    n_entries = max(num_tokens * top_k, 1)
    active = min(num_experts, n_entries)
    rows_per_expert = n_entries / active

    # Every M-block reads (and for FP4 / fp8 weights decodes or scales in registers) its expert's
    # whole weight: with bf16 activations, 32-row blocks up to 28 rows per expert on average (few
    # experts need a second block), 64-row blocks above, where 32 would process many experts'
    # weights twice (H100, benchmarks/NOTES.md, "Mid sizes: 64-row blocks from 29 rows per expert")
    mid_32_max = 28 if act_format == "dense" else 48
    fp4_in_registers = weight_format in ("mxfp4", "nvfp4") and act_format == "dense"
    if rows_per_expert <= 16:
        regime, block_m = "decode", 16
    elif rows_per_expert <= mid_32_max:
        regime, block_m = "mid", 32
    elif rows_per_expert <= 96:
        regime, block_m = "mid", 64
    else:
        regime, block_m = "prefill", 128

    def tiles_for(n_out: int, k_dim: int, two_acc: bool) -> GemmTiles:
        # measured on H100 (benchmarks/NOTES.md, sweep at d67d346)
        if regime == "prefill":  # L1: 128 x (2*128) MMA tile; L2: 128 x 256
            return GemmTiles(block_n=128 if two_acc else 256, block_k=64, num_warps=8, num_stages=3)
        # 64-row blocks: these tiles, but fp8 weights keep the 128-deep steps below up to 48 rows
        # per expert (4-19% faster at 32-40, H100)
        if block_m == 64 and (weight_format != "fp8_block128" or rows_per_expert > 48):
            return GemmTiles(block_n=64 if two_acc else 128, block_k=64, num_warps=4, num_stages=4)
        # weight-bandwidth bound: enough programs for ~2 waves over the active experts
        blocks_m = max(1, n_entries // block_m) if regime == "mid" else active
        bn = 128 if not two_acc else 64
        while bn > 32 and blocks_m * -(-n_out // bn) < 2 * num_sms:
            bn //= 2
        bk = 128 if k_dim >= 128 else _pow2_at_least(max(k_dim, 16))
        if weight_format in ("mxfp4", "nvfp4") and k_dim >= 256:
            bk = 256  # half the bytes per K step: keep as many bytes in flight as bf16 does
        stages = 4 if regime == "decode" else 3
        return GemmTiles(block_n=bn, block_k=bk, num_warps=4, num_stages=stages)

    bk_cap = 128 if weight_format == "fp8_block128" else 256
    g1 = tiles_for(intermediate, hidden, two_acc=True)
    g2 = tiles_for(hidden, intermediate, two_acc=False)
    g1 = dataclasses.replace(g1, block_k=min(g1.block_k, bk_cap))
    g2 = dataclasses.replace(g2, block_k=min(g2.block_k, bk_cap))
    if weight_format in ("mxfp4", "nvfp4"):
        g1 = dataclasses.replace(g1, block_k=max(g1.block_k, 64))
        g2 = dataclasses.replace(g2, block_k=max(g2.block_k, 64))

    if weight_format in ("mxfp4", "nvfp4") and regime != "prefill":  # the sm_90 in-register decode
        g1, g2 = _fp4_decode_register_budget(g1, g2)
    if fp4_in_registers and regime == "mid":  # 4 stages and 64-deep L2 steps at 32 rows too (as at 64)
        g1 = dataclasses.replace(g1, num_stages=4)
        g2 = dataclasses.replace(g2, block_k=64, num_stages=4)
    elif fp4_in_registers and regime == "prefill":
        # what moe_tune chose at every FP4 prefill bucket of lowering/tuned/ (3 layers, T = 4096 /
        # 16384); at untuned buckets (T = 2048, 8192) against the tiles above: MXFP4 1-8% faster,
        # NVFP4 7-15% (H100, benchmarks/NOTES.md, "FP4 prefill tiles")
        if weight_format == "mxfp4":
            g1, g2 = GemmTiles(64, 64, 4, 4), GemmTiles(128, 64, 4, 4)
        else:
            g1, g2 = GemmTiles(32, 64, 8, 3), GemmTiles(64, 64, 8, 3)
    if act_format != "dense":
        g1, g2 = _fp8_act_tiles(g1, g2, act_format, weight_format, regime)
        if regime == "prefill" and weight_format not in ("mxfp4", "nvfp4"):
            block_m = 64  # register budget of the fp8 paths (see _fp8_act_tiles).  FP4 weights keep
            # 128 rows: Triton lowers tl.dot_scaled to the sm_100 block-scaled tcgen05 MMA
            # (kind::mxf8f6f4.block_scale) only for 128-row tiles (64 gives kind::f16), and on H100
            # the in-register decode is amortised over twice the rows (T=4096, 64 -> 128 rows, qwen3 /
            # gpt-oss: fp8_block128 x mxfp4 4402 -> 2327 / 12700 -> 6939 us, x nvfp4 5009 -> 2521 /
            # 13374 -> 7070; fp8_mx32 x nvfp4 6853 -> 1718 / 19782 -> 4893)

    one_dot = True
    if act_format == weight_format == "fp8_block128" and block_m >= 64:
        one_dot, block_m, g1, g2 = _fp8_x_fp8_tiles(rows_per_expert, intermediate, gate_up_interleaved, g1, g2)

    cfg = MoEKernelConfig(
        block_m=block_m, gemm1=g1, gemm2=g2, align_chunk=align_chunk(n_entries),
        align_one_launch=n_entries <= ALIGN_ONE_LAUNCH_MAX_ENTRIES,
        combine_block_t=4 if num_tokens >= 4 else 1,
        combine_block_h=min(1024, _pow2_at_least(hidden)), regime=regime, gate_up_one_dot=one_dot)
    if (allow_swap_ab and swap_ab_fits(weight_format, act_format, hidden, intermediate)
            and (weight_format != "fp8_block128" or rows_per_expert >= FP8_SWAP_AB_MIN_ROWS_PER_EXPERT)):
        cfg = with_swap_ab(cfg.replace(block_m=swap_ab_block_m(rows_per_expert, weight_format, regime, hidden,
                                                               intermediate)), hidden, intermediate, weight_format)
    if overrides:
        cfg = _apply_overrides(cfg, overrides)
    return cfg


def _apply_overrides(cfg: MoEKernelConfig, overrides: dict) -> MoEKernelConfig:
    """``{"block_m": 64, "gemm1.block_n": 32, ...}``; unknown keys fail loudly."""
    top, g1, g2 = {}, {}, {}
    for key, value in overrides.items():
        head, _, tail = key.partition(".")
        if head in ("gemm1", "gemm2") and tail:
            (g1 if head == "gemm1" else g2)[tail] = value
        else:
            top[key] = value
    if g1:
        top["gemm1"] = dataclasses.replace(cfg.gemm1, **g1)
    if g2:
        top["gemm2"] = dataclasses.replace(cfg.gemm2, **g2)
    return cfg.replace(**top)
