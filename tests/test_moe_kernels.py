"""Fused MoE kernels (templates/moe_*.py via lowering/moe.py) against the reference op.

CPU: the Triton kernels run under TRITON_INTERPRET=1.  Triton reads that variable when a kernel
is decorated, and other test modules in this pytest process import triton first, so the
interpreted cases run in one subprocess (this file run as a script) and report JSON lines; the
tests below check each case's numbers.  GPU tests are marked ``gpu`` and skip without CUDA.

Every case: fresh random inputs, every float buffer the kernels allocate is NaN-poisoned (int
scratch filled with -7) before the run, error ‖Δ‖/‖ref‖ against the float64 reference on the
same (quantised) inputs, NaN never passes, two runs bitwise equal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

TOL = {"dense": 1e-2, "fp8_block128": 2e-2, "mxfp4": 2e-2, "nvfp4": 2e-2}


def _case(name, T=5, E=8, H=64, I=32, k=2, dtype="bfloat16", spec="", bias=False, bad_ids=False,
          overrides=None, weight_format="dense", act="dense", settings=None, gate_up_gscales=False, swapped=None,
          big_expert=False, block_m=None, tma=None, tol=None):
    """``settings``: inductor_moe.config keys patched for the call.  ``gate_up_gscales``: NVFP4 gate and
    up quantised on their own (w13 global scales [E, 2]).  ``swapped``: whether the call must run the
    swapped FP4 tiles (None: not checked).  ``big_expert``: expert 0's weights 256x larger (MXFP4
    scales above 2).  ``block_m``: the rows per M-block the rule must pick (None: not checked).
    ``tma``: whether the expert GEMMs must read their weights through TMA descriptors (None: not checked).
    ``tol``: a tighter error bound than the format's (cases whose numerics a slip would move less)."""
    return dict(block_m=block_m, name=name, T=T, E=E, H=H, I=I, k=k, dtype=dtype, spec=spec, bias=bias, bad_ids=bad_ids,
                overrides=overrides or {}, weight_format=weight_format, act=act, settings=settings or {},
                gate_up_gscales=gate_up_gscales, swapped=swapped, big_expert=big_expert, tma=tma, tol=tol)


def _tol(case):
    if case.get("tol"):
        return case["tol"]
    return TOL[case["weight_format"]] if case["act"] == "dense" else 2e-2


CASES = [
    _case("t0", T=0),
    _case("t1_k1", T=1, k=1),
    _case("t5_k2", T=5, k=2),
    _case("t33_k6_e8", T=33, k=6, I=48),
    _case("t33_k2_e4_i64", T=33, E=4, k=2, I=64),
    _case("two_dot_gate_up", T=33, k=2, I=48, overrides={"gate_up_one_dot": False}),
    _case("two_dot_interleaved_transposed", T=5, k=6, spec="gate_up=interleaved,transposed=True",
          overrides={"gate_up_one_dot": False}),
    _case("gpt_oss", T=33, k=2, spec="alpha=1.702,limit=7.0,up_offset=1.0,gate_up=interleaved,transposed=True",
          bias=True),
    _case("gelu", T=5, k=2, spec="activation=gelu"),
    _case("gelu_tanh_limit", T=5, k=6, spec="activation=gelu_tanh,limit=10.0"),
    _case("interleaved", T=33, k=2, spec="gate_up=interleaved"),
    _case("transposed", T=5, k=2, spec="transposed=True", I=48),
    _case("before_down_bias", T=33, k=2, spec="weight_position=before_down", bias=True),
    _case("bad_ids", T=33, k=6, bad_ids=True),
    _case("fp16", T=5, k=2, dtype="float16", bias=True),
    _case("chunked_align", T=33, k=6, bad_ids=True,
          overrides={"align_one_launch": False, "align_chunk": 16}),
    _case("tiles_bm32_even_k", T=33, k=2, I=64,
          overrides={"block_m": 32, "gemm1.block_k": 32, "gemm2.block_k": 32, "gemm1.block_n": 16}),
    _case("fp8_block128", T=33, k=2, weight_format="fp8_block128", bad_ids=True),
    _case("fp8_block128_k6", T=5, k=6, I=64, H=128, weight_format="fp8_block128",
          spec="gate_up=interleaved,alpha=1.702,limit=7.0,up_offset=1.0", bias=True),
    _case("mxfp4", T=33, k=2, I=64, weight_format="mxfp4", bad_ids=True, settings={"mxfp4_mma": "dot_scaled"},
          swapped=False),
    _case("mxfp4_interleaved", T=5, k=6, I=64, weight_format="mxfp4", spec="gate_up=interleaved"),
    _case("mxfp4_in_registers", T=33, k=2, I=64, weight_format="mxfp4", bad_ids=True,
          overrides={"fp4_dot_scaled": False}, settings={"fp4_swap_ab": "off"}, swapped=False),
    _case("mxfp4_fp16_bias", T=5, k=2, I=64, H=128, dtype="float16", weight_format="mxfp4", bias=True,
          swapped=False),
    _case("nvfp4", T=33, k=6, I=64, weight_format="nvfp4", bad_ids=True, swapped=True),
    _case("nvfp4_gate_up_gscales", T=33, k=2, I=64, weight_format="nvfp4", gate_up_gscales=True),
    _case("nvfp4_gate_up_gscales_interleaved_two_dot", T=5, k=6, I=64, weight_format="nvfp4", gate_up_gscales=True,
          spec="gate_up=interleaved", overrides={"gate_up_one_dot": False}, settings={"fp4_swap_ab": "on"}),
    # two mxfp4 scale groups per K step, odd group counts per row (7 / 3), a K tail in both GEMMs
    _case("mxfp4_bk64_k_tail", T=5, k=2, I=96, H=224, weight_format="mxfp4",
          overrides={"fp4_dot_scaled": False, "gate_up_one_dot": False, "gemm1.block_k": 64, "gemm2.block_k": 64},
          settings={"fp4_swap_ab": "off"}),
    _case("nvfp4_gpt_oss", T=5, k=2, I=32, weight_format="nvfp4",
          spec="alpha=1.702,limit=7.0,up_offset=1.0,gate_up=interleaved", bias=True, settings={"fp4_swap_ab": "off"}),
    # swapped FP4 tiles (acc^T = W @ X^T, activations in to_mma_k_order): one gate/up dot and two, L2,
    # a K tail of 64 in L1 (H = 192, 128-deep steps); H = 96 does not fit them (unswapped then)
    _case("mxfp4_swap_ab", T=33, k=2, I=64, weight_format="mxfp4", bad_ids=True,
          overrides={"fp4_dot_scaled": False}, settings={"fp4_swap_ab": "on"}, swapped=True),
    # 512 rows per expert: the rule's 256-row MXFP4 blocks (two warpgroups, 64-deep steps)
    _case("mxfp4_swap_ab_256_rows", T=1024, E=4, k=2, I=64, H=128, weight_format="mxfp4",
          overrides={"fp4_dot_scaled": False}, settings={"fp4_swap_ab": "on"}, swapped=True, block_m=256),
    # 256 rows per expert: the rule's 256-row NVFP4 blocks (L1 128 deep, L2 64 deep)
    _case("nvfp4_swap_ab_256_rows", T=512, E=4, k=2, I=128, H=256, weight_format="nvfp4",
          settings={"fp4_swap_ab": "on"}, swapped=True, block_m=256),
    # the next K step's block scales prefetched to L1 (a no-op interpreted: checks the plumbing)
    _case("mxfp4_swap_ab_prefetch_scales", T=33, k=2, I=64, weight_format="mxfp4",
          overrides={"fp4_dot_scaled": False, "fp4_prefetch_scales": True}, settings={"fp4_swap_ab": "on"},
          swapped=True),
    _case("mxfp4_scales_above_2_unswapped", T=33, k=2, I=64, weight_format="mxfp4", big_expert=True,
          overrides={"fp4_dot_scaled": False}, settings={"fp4_swap_ab": "on"}, swapped=False),
    _case("nvfp4_swap_ab_two_dot_gpt_oss_k_tail", T=5, k=6, I=128, H=192, weight_format="nvfp4", bias=True,
          spec="alpha=1.702,limit=7.0,up_offset=1.0,gate_up=interleaved", settings={"fp4_swap_ab": "on"},
          overrides={"gate_up_one_dot": False}, swapped=True),
    # 128-deep steps ending in one unmasked 64-deep step (H = I = 192, K_HALF_TAIL in both GEMMs), and
    # blocks of at most 16 rows run 16-row tiles (TAIL_BLOCK_M; ~16.5 rows per expert: both kinds run)
    _case("mxfp4_swap_ab_half_k_tail_small_blocks", T=66, E=8, k=2, I=192, H=192, weight_format="mxfp4",
          spec="alpha=1.702,limit=7.0,up_offset=1.0,gate_up=interleaved", bias=True, settings={"fp4_swap_ab": "on"},
          overrides={"fp4_dot_scaled": False, "block_m": 32, "tail_block_m": 16, "gemm1.block_k": 128,
                     "gemm2.block_k": 128}, swapped=True),
    _case("dense_small_blocks", T=66, E=8, k=2, bad_ids=True, overrides={"block_m": 32, "tail_block_m": 16}),
    _case("nvfp4_swap_ab_h96_unswapped", T=5, k=6, I=64, H=96, weight_format="nvfp4", bias=True,
          spec="alpha=1.702,limit=7.0,up_offset=1.0,gate_up=interleaved", settings={"fp4_swap_ab": "on"},
          overrides={"gate_up_one_dot": False, "gemm1.block_k": 64, "gemm2.block_k": 64}, swapped=False),
    # fp8 weights with bf16 activations on the swapped tiles (the scaled weight as wgmma's register
    # operand): one gate/up dot and two, bad ids; 128-deep steps ending in one 64-deep step in both
    # GEMMs with gpt-oss's interleaved gate/up and biases; 256-row blocks; and the unswapped tiles
    _case("fp8_swap_ab", T=33, k=2, I=64, H=128, weight_format="fp8_block128", bad_ids=True,
          settings={"fp4_swap_ab": "on"}, swapped=True),
    _case("fp8_swap_ab_two_dot", T=5, k=6, I=128, H=256, weight_format="fp8_block128", bias=True,
          spec="gate_up=interleaved", overrides={"gate_up_one_dot": False}, settings={"fp4_swap_ab": "on"},
          swapped=True),
    _case("fp8_swap_ab_half_k_tail_gpt_oss", T=66, E=8, k=2, I=192, H=192, weight_format="fp8_block128",
          spec="alpha=1.702,limit=7.0,up_offset=1.0,gate_up=interleaved", bias=True, settings={"fp4_swap_ab": "on"},
          overrides={"block_m": 32, "tail_block_m": 16, "gemm1.block_k": 128, "gemm2.block_k": 128}, swapped=True),
    _case("fp8_swap_ab_256_rows", T=1024, E=4, k=2, I=64, H=128, weight_format="fp8_block128",
          settings={"fp4_swap_ab": "on"}, swapped=True, block_m=256),
    _case("fp8_unswapped", T=33, k=2, I=64, H=128, weight_format="fp8_block128", settings={"fp4_swap_ab": "off"},
          swapped=False),
    _case("quantize_fp8", T=5, k=2, I=64, spec="quantize_weights=fp8_block128"),
    # dense weights through TMA descriptors (lowering/moe_tma.py), every layout: K past the tensor's
    # end (H = 80 in 64-deep steps) and intermediate columns past I (48 in 32-column tiles) read zeros
    _case("tma_64_row_blocks", T=66, E=4, k=2, H=80, I=48, bad_ids=True, tma=True,
          overrides={"block_m": 64, "gemm1.block_n": 32, "gemm1.block_k": 64, "gemm2.block_n": 32,
                     "gemm2.block_k": 32}),
    _case("tma_interleaved_bias", T=33, E=4, k=2, H=80, I=48, spec="gate_up=interleaved", bias=True, tma=True,
          overrides={"weight_tma": True, "gemm1.block_n": 32, "gemm1.block_k": 64}),
    _case("tma_transposed", T=33, E=4, k=2, H=80, I=48, spec="transposed=True,weight_position=before_down",
          tma=True, overrides={"weight_tma": True, "gemm1.block_n": 32, "gemm1.block_k": 64}),
    _case("tma_gpt_oss", T=33, E=4, k=2, H=80, I=48, bias=True, tma=True, dtype="float16",
          spec="alpha=1.702,limit=7.0,up_offset=1.0,gate_up=interleaved,transposed=True",
          overrides={"weight_tma": True, "gemm1.block_n": 32, "gemm1.block_k": 64}),
    # an expert's last block on 16- and 32-row tail tiles (tail_block_m), weights still through TMA
    _case("tma_tail_blocks", T=150, E=4, k=2, H=80, I=48, bad_ids=True, tma=True,
          overrides={"block_m": 64, "tail_block_m": 16, "gemm1.block_n": 32, "gemm1.block_k": 64,
                     "gemm2.block_n": 32, "gemm2.block_k": 32}),
    _case("tma_off_in_the_plan", T=66, E=4, k=2, H=80, I=48, tma=False,
          overrides={"block_m": 64, "weight_tma": False}),
    _case("tma_auto_small_blocks", T=33, E=4, k=2, H=80, I=48, tma=False, overrides={"block_m": 32}),
    _case("tma_two_dot_pointer_loads", T=33, E=4, k=2, H=80, I=48, tma=False,
          overrides={"weight_tma": True, "gate_up_one_dot": False}),
    # fp8 activations (x quantised per token once, the intermediate quantised in L1's epilogue)
    _case("a128_dense_t0", T=0, act="fp8_block128"),
    _case("a128_dense_t1_k1", T=1, k=1, H=128, I=128, act="fp8_block128"),
    _case("a128_dense_t33_k6_gpt_oss", T=33, k=6, I=64, H=192, act="fp8_block128", bias=True, bad_ids=True,
          spec="alpha=1.702,limit=7.0,up_offset=1.0,gate_up=interleaved,transposed=True"),
    _case("a128_fp8w_t33_k2", T=33, k=2, I=160, H=128, act="fp8_block128", weight_format="fp8_block128",
          bad_ids=True),
    _case("a128_fp8w_t5_k6_before_down", T=5, k=6, I=64, act="fp8_block128", weight_format="fp8_block128",
          spec="weight_position=before_down", bias=True),
    _case("a128_mxfp4_t5_k2", T=5, k=2, I=64, act="fp8_block128", weight_format="mxfp4"),
    _case("mx32_dense_t0", T=0, act="fp8_mx32", weight_format="mxfp4"),
    _case("mx32_dense_t5_k6", T=5, k=6, act="fp8_mx32", overrides={"gate_up_one_dot": False}),
    _case("mx32_fp8w_t1_k1", T=1, k=1, I=64, act="fp8_mx32", weight_format="fp8_block128"),
    _case("mx32_mxfp4_t33_k2", T=33, k=2, I=96, act="fp8_mx32", weight_format="mxfp4", bad_ids=True),
    _case("mx32_mxfp4_t5_k6_gpt_oss", T=5, k=6, I=64, act="fp8_mx32", weight_format="mxfp4", bias=True,
          spec="alpha=1.702,limit=7.0,up_offset=1.0,gate_up=interleaved"),
    _case("a128_fp8w_prefill_tiles", T=33, k=2, I=128, H=128, act="fp8_block128", weight_format="fp8_block128",
          overrides={"block_m": 64, "gemm1.block_n": 128, "gemm1.block_k": 32, "gemm1.num_warps": 8,
                     "gemm2.block_n": 64, "gemm2.block_k": 64}),
    _case("a128_fp8w_two_dot_uniform_scales", T=33, k=2, I=256, H=256, act="fp8_block128", weight_format="fp8_block128",
          bad_ids=True, overrides={"block_m": 64, "gate_up_one_dot": False, "gemm1.block_n": 128, "gemm1.block_k": 64,
                                   "gemm1.num_warps": 8, "gemm2.block_n": 128, "gemm2.block_k": 128}),
    _case("a128_fp8w_two_dot_uniform_scales_128_rows", T=80, k=2, I=128, H=256, act="fp8_block128",
          weight_format="fp8_block128", overrides={"block_m": 128, "gate_up_one_dot": False, "gemm1.block_n": 128,
                                                   "gemm1.block_k": 64, "gemm1.num_warps": 8, "gemm2.block_n": 64,
                                                   "gemm2.block_k": 128}),
    _case("mx32_mxfp4_prefill_tiles", T=33, k=2, I=64, H=128, act="fp8_mx32", weight_format="mxfp4",
          settings={"mxfp4_mma": "dot_scaled"},  # the sm_100 path (tcgen05 block-scaled MMA)
          overrides={"block_m": 128, "gemm1.block_n": 64, "gemm1.block_k": 32, "gemm1.num_warps": 8,
                     "gemm2.block_n": 64, "gemm2.block_k": 64}),
    _case("a128_nvfp4_t5_k2", T=5, k=2, I=128, H=256, act="fp8_block128", weight_format="nvfp4", bad_ids=True),
    _case("mx32_nvfp4_t33_k6_gpt_oss", T=33, k=6, I=64, act="fp8_mx32", weight_format="nvfp4", bias=True,
          spec="alpha=1.702,limit=7.0,up_offset=1.0,gate_up=interleaved"),
    _case("mx32_mxfp4_in_registers_t33_k1", T=33, k=1, I=64, act="fp8_mx32", weight_format="mxfp4",
          overrides={"fp4_dot_scaled": False}),
    # fp8_mx32 activations on the swapped FP4 tiles: x and the intermediate rounded to fp8_mx32 but
    # kept in bf16 (exact); the error bound is tight enough that skipping either rounding fails it
    _case("mx32_mxfp4_swap_ab", T=33, k=2, I=64, H=128, act="fp8_mx32", weight_format="mxfp4", bad_ids=True,
          swapped=True, tol=5e-3),
    _case("mx32_nvfp4_swap_ab_256_rows", T=512, E=4, k=2, I=128, H=256, act="fp8_mx32", weight_format="nvfp4",
          swapped=True, block_m=256, tol=5e-3),
    _case("mx32_nvfp4_swap_ab_off", T=33, k=2, I=64, H=128, act="fp8_mx32", weight_format="nvfp4",
          settings={"fp4_swap_ab": "off"}, swapped=False, tol=5e-3),
]


# ----------------------------------------------------------------------------- subprocess side

def _inputs(case, gen):
    from inductor_moe.ops import weights as W

    T, E, H, I, k = case["T"], case["E"], case["H"], case["I"], case["k"]
    dtype = getattr(torch, case["dtype"])
    spec_parts = [p for p in (case["spec"],) if p]
    fmt = case["weight_format"]
    if fmt != "dense":
        spec_parts.append(f"weight_format={fmt}")
    if case.get("act", "dense") != "dense":
        spec_parts.append(f"act_format={case['act']}")
    spec = ",".join(spec_parts)
    from inductor_moe.spec import MoESpec

    s = MoESpec.from_str(spec)
    x = torch.randn(T, H, generator=gen).to(dtype)
    scores = torch.rand(T, E, generator=gen)
    ids = scores.topk(k, dim=1).indices.to(torch.int32)
    if case["bad_ids"] and T:
        ids[0, 0] = -1
        ids[T // 2, k - 1] = E
    tw = torch.softmax(torch.randn(T, k, generator=gen), dim=1)
    w13 = torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5
    w2 = torch.randn(E, H, I, generator=gen) / I ** 0.5
    if case.get("big_expert"):
        w13[0] *= 256.0
        w2[0] *= 256.0
    extra = {}
    if fmt == "dense":
        if s.transposed:
            w13, w2 = w13.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
        w13, w2 = w13.to(dtype), w2.to(dtype)
    else:
        (w13, s13, g13), (w2, s2, g2) = quantize_w13(fmt, w13, s, case["gate_up_gscales"]), W.quantize_weight(fmt, w2)
        extra = dict(w13_scale=s13, w2_scale=s2)
        if g13 is not None:
            extra.update(w13_global_scale=g13, w2_global_scale=g2)
    b13 = (torch.randn(E, 2 * I, generator=gen) * 0.1).to(dtype) if case["bias"] else None
    b2 = (torch.randn(E, H, generator=gen) * 0.1).to(dtype) if case["bias"] else None
    return s, spec, x, ids, tw, w13, w2, extra, b13, b2


def quantize_w13(fmt, w13, spec, gate_up_gscales=False):
    """``ops.weights.quantize_weight`` of w13; ``gate_up_gscales``: gate and up rows quantised on
    their own (NVFP4 global scales [E, 2]), as separate gate / up linears are."""
    from inductor_moe.ops import weights as W

    if not gate_up_gscales:
        return W.quantize_weight(fmt, w13)
    E, I2 = w13.shape[:2]
    rows = (slice(0, None, 2), slice(1, None, 2)) if spec.gate_up == "interleaved" else (
        slice(0, I2 // 2), slice(I2 // 2, None))
    (qg, sg, gg), (qu, su, gu) = (W.quantize_weight(fmt, w13[:, r].contiguous()) for r in rows)
    q, sc = torch.empty_like(torch.cat([qg, qu], 1)), torch.empty_like(torch.cat([sg, su], 1))
    for r, qq, ss in zip(rows, (qg, qu), (sg, su)):
        q[:, r], sc[:, r] = qq, ss
    return q, sc, torch.stack([gg, gu], dim=1)


class _Poison:
    """NaN-fill every float tensor (and -7 every int tensor) the kernels allocate."""

    def __enter__(self):
        self.orig = torch.empty

        def empty(*args, **kwargs):
            t = self.orig(*args, **kwargs)
            if t.dtype.is_floating_point:
                t.fill_(float("nan"))
            elif t.dtype in (torch.int32, torch.int64):
                t.fill_(-7)
            return t

        torch.empty = empty

    def __exit__(self, *exc):
        torch.empty = self.orig


def case_inputs_and_config(case):
    """The case's inputs (``_inputs``, seeded by its name) and its kernel config (heuristic + overrides)."""
    from inductor_moe.lowering.moe_plan import choose_moe_config
    from inductor_moe.ops import weights as W

    gen = torch.Generator().manual_seed(hash(case["name"]) % 2 ** 31)
    s, spec, x, ids, tw, w13, w2, extra, b13, b2 = _inputs(case, gen)
    T, E, H, k = case["T"], case["E"], case["H"], case["k"]
    I = W.intermediate_size(s, w13, w2)
    cfg = choose_moe_config(T, k, E, H, I, s.effective_weight_format, 4, overrides=case["overrides"] or None,
                            act_format=s.act_format)
    return (s, spec, x, ids, tw, w13, w2, extra, b13, b2), cfg


def run_case(case) -> dict:
    from inductor_moe import config
    from inductor_moe.lowering.moe import fused_moe_experts
    from inductor_moe.ops.moe_experts import moe_experts_reference

    from inductor_moe.testing import counting_kperm_launches, counting_weight_tma

    (s, spec, x, ids, tw, w13, w2, extra, b13, b2), cfg = case_inputs_and_config(case)

    outs = []
    with counting_kperm_launches() as kperm_grids, counting_weight_tma() as tma_calls:
        for _ in range(2):  # moe_kperm_kernel is launched only where the tiles run swapped
            with _Poison(), config.patch(**case["settings"]):
                outs.append(fused_moe_experts(x, ids, tw, w13, w2, s, b13=b13, b2=b2, kernel_config=cfg,
                                              use_pdl=False, **extra))
    f64 = lambda t: None if t is None else (t.double() if t.dtype in (torch.bfloat16, torch.float16) else t)  # noqa
    ref = moe_experts_reference(x.double(), ids, tw.double(), f64(w13), f64(w2), spec, b13=f64(b13), b2=f64(b2),
                                **extra)
    out = outs[0]
    denom = ref.norm().item()
    err = (out.double() - ref).norm().item() / denom if denom > 0 else (out.double() - ref).norm().item()
    return dict(name=case["name"], shape=list(out.shape), dtype=str(out.dtype), err=err,
                nan=bool(out.isnan().any()), deterministic=bool(torch.equal(outs[0], outs[1])),
                config=repr(cfg), swapped=bool(kperm_grids), tma=bool(tma_calls))


def report_cases(cases_and_runners):
    """Subprocess side: run each (case, runner) and print one ``RESULT {json}`` line per case
    (errors reported, not raised); ``argv[2:]`` may name the cases to run."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    torch.set_num_threads(1)
    only = set(sys.argv[2:])
    for case, runner in cases_and_runners:
        if only and case["name"] not in only:
            continue
        try:
            result = runner(case)
        except Exception as e:  # noqa: BLE001 - reported to the parent test
            result = dict(name=case["name"], error=f"{type(e).__name__}: {e}")
        print("RESULT " + json.dumps(result), flush=True)


def interpreted_results(script: str) -> dict:
    """Pytest side: run ``script --interpret`` under TRITON_INTERPRET=1 and collect its results by name."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, os.path.abspath(script), "--interpret"], env=env,
                          capture_output=True, text=True, timeout=900)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            results[r["name"]] = r
    if not results:
        pytest.fail(f"interpreted run produced nothing (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return results


ROUND_CASE = dict(name="round_mx32_kernel")


def run_round_case(case) -> dict:
    """moe_kperm_kernel rounding only (the CUDA decode kernels' fp8_mx32 activations, in bf16) against
    formats.quantize_fp8_mx32 -> dequantize: rows of magnitudes 1e-6 to 1e4, a zero row, a NaN."""
    from inductor_moe import formats as F
    from inductor_moe.templates.moe_common import moe_kperm_kernel

    g = torch.Generator().manual_seed(5)
    x = (torch.randn(19, 96, generator=g) * torch.logspace(-6, 4, 19).unsqueeze(1)).bfloat16()
    x[4] = 0.0
    x[7, 40] = float("nan")
    q, scales = F.quantize_fp8_mx32(x.float())
    want = F.dequantize_fp8_groups(q, scales, 32).bfloat16()
    out = torch.full_like(x, 7.0)
    kw = dict(BLOCK_T=16, BLOCK_K=64, USE_PDL=False, ROUND_MX32=True, K_ORDER=False)
    moe_kperm_kernel[(2, 2)](x, out, 19, 96, x.stride(0), **kw)
    inplace = x.clone()
    moe_kperm_kernel[(2, 2)](inplace, inplace, 19, 96, 96, **kw)
    same = lambda a, b: bool(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()))  # noqa
    return dict(name=case["name"], equal=same(out, want), inplace_equal=same(inplace, want),
                nan_group=bool(out[7, 32:64].isnan().all() and not out[7, :32].isnan().any()),
                changed=not torch.equal(out, x))


NAN_CASES = [_case("nan_token_a128", T=9, k=2, I=64, H=128, act="fp8_block128"),
             _case("nan_token_mx32_swapped", T=9, k=2, I=64, H=128, act="fp8_mx32", weight_format="mxfp4",
                   swapped=True)]


def run_nan_case(case) -> dict:
    """One NaN in token 2's activations, fp8 activations: its row of the output is NaN, every other
    row finite and as the reference's."""
    from inductor_moe.lowering.moe import fused_moe_experts
    from inductor_moe.ops.moe_experts import moe_experts_reference

    (s, spec, x, ids, tw, w13, w2, extra, b13, b2), cfg = case_inputs_and_config(case)
    x = x.clone()
    x[2, 5] = float("nan")
    out = fused_moe_experts(x, ids, tw, w13, w2, s, b13=b13, b2=b2, kernel_config=cfg, use_pdl=False, **extra)
    f64 = lambda t: None if t is None else (t.double() if t.dtype in (torch.bfloat16, torch.float16) else t)  # noqa
    ref = moe_experts_reference(x.double(), ids, tw.double(), f64(w13), f64(w2), spec, b13=f64(b13), b2=f64(b2),
                                **extra)
    keep = torch.arange(out.shape[0]) != 2
    err = ((out[keep].double() - ref[keep]).norm() / ref[keep].norm()).item()
    return dict(name=case["name"], nan_row=bool(out[2].isnan().all()), others_finite=bool(out[keep].isfinite().all()),
                ref_nan_row=bool(ref[2].isnan().all()), err=err)


def _main():
    report_cases([(c, run_case) for c in CASES] + [(ROUND_CASE, run_round_case)] +
                 [(c, run_nan_case) for c in NAN_CASES])


# ----------------------------------------------------------------------------- pytest side

@pytest.fixture(scope="module")
def interpreted():
    return interpreted_results(__file__)


def check_interpreted_case(r, case) -> None:
    """What every interpreted case must show: it ran, right shape, no NaN (no unwritten or
    poisoned buffer read), bitwise repeatable, within the format's tolerance of the reference."""
    assert r is not None, "case did not report"
    assert "error" not in r, r.get("error")
    assert r["shape"] == [case["T"], case["H"]]
    assert not r["nan"], "NaN in output (an unwritten or poisoned buffer was read)"
    assert r["deterministic"], "two runs differ bitwise"
    assert r["err"] <= _tol(case), f"rel err {r['err']:.3g} ({r['config']})"
    if case.get("swapped") is not None and "swapped" in r:  # the mega cases report no launch count
        assert r["swapped"] == case["swapped"], f"swapped FP4 tiles: ran {r['swapped']}, expected {case['swapped']}"
    if case.get("block_m") is not None:
        assert f"block_m={case['block_m']}," in r["config"], r["config"]
    if case.get("tma") is not None and "tma" in r:  # the mega cases report no descriptor count
        assert r["tma"] == case["tma"], f"TMA weight tiles: ran {r['tma']}, expected {case['tma']} ({r['config']})"


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_interpreted_kernels_match_reference(interpreted, case):
    check_interpreted_case(interpreted.get(case["name"]), case)


def test_round_mx32_kernel_rounds_as_the_reference(interpreted):
    """The rounding the CUDA decode kernels' fp8_mx32 calls run (x and the intermediate) is bitwise
    the reference quantiser's round trip, in place too; a NaN spoils its group of 32 only."""
    r = interpreted[ROUND_CASE["name"]]
    assert "error" not in r, r
    assert r["equal"] and r["inplace_equal"] and r["nan_group"] and r["changed"], r


@pytest.mark.parametrize("case", NAN_CASES, ids=[c["name"] for c in NAN_CASES])
def test_interpreted_nan_activation_stays_in_its_token(interpreted, case):
    """fp8 activations: a NaN in one token's x makes that token's output NaN (its group's scale is
    NaN, as the reference's) and leaves the other tokens as the reference computes them."""
    r = interpreted[case["name"]]
    assert "error" not in r, r
    assert r["nan_row"] and r["ref_nan_row"] and r["others_finite"], r
    assert r["err"] <= 5e-3, r


def test_plan_regimes_and_overrides():
    from inductor_moe.lowering.moe_plan import choose_moe_config

    decode = choose_moe_config(1, 8, 128, 2048, 768)
    assert decode.regime == "decode" and decode.block_m == 16 and decode.align_one_launch
    prefill = choose_moe_config(16384, 8, 128, 2048, 768)
    assert prefill.regime == "prefill" and prefill.block_m == 128 and not prefill.align_one_launch
    fp8 = choose_moe_config(1, 8, 128, 2048, 768, "fp8_block128")
    assert fp8.gemm1.block_k <= 128 and 128 % fp8.gemm1.block_k == 0
    assert choose_moe_config(1, 8, 128, 2048, 768, overrides={"gemm1.block_n": 32}).gemm1.block_n == 32
    for act, group in (("fp8_block128", 128), ("fp8_mx32", 32)):
        for T in (1, 16384):
            c = choose_moe_config(T, 8, 128, 2048, 768, "mxfp4", act_format=act)
            assert c.gemm1.block_n % group == 0  # L1's epilogue quantises whole groups of h
            for g in (c.gemm1, c.gemm2):
                assert (128 % g.block_k == 0) if act == "fp8_block128" else (g.block_k % 32 == 0)
    with pytest.raises(ValueError, match="no field"):
        choose_moe_config(1, 8, 128, 2048, 768, overrides={"blockm": 32})
    with pytest.raises(ValueError, match="block_m"):
        choose_moe_config(1, 8, 128, 2048, 768, overrides={"block_m": 48})


def test_plan_mid_block_rows_and_fp4_prefill_tiles():
    """bf16 activations: 32-row blocks up to 28 rows per expert, 64-row blocks above (each
    expert's weights read, and decoded or scaled in registers, once rather than twice); fp8
    activations keep 32 rows up to 48.  FP4 tiles that run unswapped (allow_swap_ab=False: fp16
    activations, tl.dot_scaled): at prefill the tiles moe_tune picked at every bucket."""
    from inductor_moe.lowering.moe_plan import GemmTiles, choose_moe_config

    for fmt in ("mxfp4", "nvfp4"):  # qwen3-30b-a3b: T * 8 / 128 rows per expert
        for T, block_m in ((384, 32), (448, 32), (449, 64), (512, 64), (1536, 64), (1537, 128)):
            cfg = choose_moe_config(T, 8, 128, 2048, 768, fmt, allow_swap_ab=False)
            assert cfg.block_m == block_m and not cfg.swap_ab, (fmt, T, cfg)
            if block_m < 128:
                assert cfg.regime == "mid" and cfg.gemm2.block_k == 64, cfg
                assert cfg.gemm1.num_stages == cfg.gemm2.num_stages == 4, cfg
    prefill = {fmt: choose_moe_config(4096, 8, 128, 2048, 768, fmt, allow_swap_ab=False) for fmt in ("mxfp4", "nvfp4")}
    assert (prefill["mxfp4"].gemm1, prefill["mxfp4"].gemm2) == (GemmTiles(64, 64, 4, 4), GemmTiles(128, 64, 4, 4))
    assert (prefill["nvfp4"].gemm1, prefill["nvfp4"].gemm2) == (GemmTiles(32, 64, 8, 3), GemmTiles(64, 64, 8, 3))
    # fp8 activations' own tiles (unswapped: sm_100, or config.fp4_swap_ab off)
    assert choose_moe_config(4096, 8, 128, 2048, 768, "mxfp4", act_format="fp8_mx32",
                             allow_swap_ab=False).gemm1.block_k == 32
    for fmt in ("dense", "fp8_block128"):  # the same rows for weights read as they are stored
        assert [choose_moe_config(T, 8, 128, 2048, 768, fmt).block_m for T in (448, 449, 1536)] == [32, 64, 64]
    fp8_mid = choose_moe_config(512, 8, 128, 2048, 768, "fp8_block128")
    assert fp8_mid.gemm1.block_k == fp8_mid.gemm2.block_k == 128, fp8_mid  # 128-deep steps up to 48 rows
    assert choose_moe_config(1024, 8, 128, 2048, 768, "fp8_block128").gemm1.block_k == 64
    for fmt in ("dense", "mxfp4"):  # fp8 activations: 32 rows up to 48
        assert choose_moe_config(512, 8, 128, 2048, 768, fmt, act_format="fp8_mx32", allow_swap_ab=False).block_m == 32


def test_plan_swapped_fp4_tiles():
    """FP4 weights with bf16 activations run the swapped tiles: 16-row blocks up to 8 rows per
    expert, 32 up to 32 (MXFP4: 28), 64 up to 48, then 128 (NVFP4: 64 through the mid sizes, 256 from 128 rows
    where both K are multiples of 128, its L1 128 deep; MXFP4: 256 from 512 rows at any K), shorter tiles for an expert's last block; 128-deep steps
    with 3 stages where both K are multiples of 128 (MXFP4: at any K), else 64-deep with 4.  Not with fp8
    activations, not where H or I is not a multiple of 64."""
    from inductor_moe.lowering.moe_plan import GemmTiles, choose_moe_config

    rows = {"mxfp4": ((1, 16), (128, 16), (129, 32), (448, 32), (449, 64), (768, 64), (769, 128), (4096, 128)),
            "nvfp4": ((129, 32), (513, 64), (1536, 64), (1537, 128))}
    for fmt, points in rows.items():  # qwen3-30b-a3b: T * 8 / 128 rows per expert
        for T, block_m in points:
            cfg = choose_moe_config(T, 8, 128, 2048, 768, fmt)
            assert cfg.block_m == block_m and cfg.swap_ab, (fmt, T, cfg)
            assert (cfg.gemm1, cfg.gemm2) == (GemmTiles(64, 128, 4, 3), GemmTiles(128, 128, 4, 3)), cfg
    gpt_oss = choose_moe_config(1024, 4, 128, 2880, 2880, "nvfp4")  # 32 rows per expert, K = 2880
    assert gpt_oss.swap_ab and gpt_oss.block_m == 32
    assert (gpt_oss.gemm1, gpt_oss.gemm2) == (GemmTiles(64, 64, 4, 4), GemmTiles(128, 64, 4, 4))
    # MXFP4 (scales in 16-byte rows, see test_mxfp4_scales_16b_rows): 128-deep steps, the last one 64 deep
    gpt_oss = choose_moe_config(1024, 4, 128, 2880, 2880, "mxfp4")
    assert (gpt_oss.gemm1, gpt_oss.gemm2) == (GemmTiles(64, 128, 4, 3), GemmTiles(128, 128, 4, 3))
    # an expert's last block runs shorter tiles: a quarter of block_m (then half), 16 at 32 rows, none at 16
    for T, block_m, tail in ((64, 16, 0), (256, 32, 16), (768, 64, 16), (4096, 128, 32)):
        assert choose_moe_config(T, 8, 128, 2048, 768, "mxfp4").tail_block_m == tail, T
    # MXFP4 from 512 rows per expert: 256-row blocks, two warpgroups, 64-deep steps, at any K
    for (T, k, H, I), block_m in (((8192, 8, 2048, 768), 256), ((16384, 4, 2880, 2880), 256),
                                  ((4096, 4, 2880, 2880), 128), ((6000, 8, 2048, 768), 128)):
        cfg = choose_moe_config(T, k, 128, H, I, "mxfp4")
        assert cfg.block_m == block_m and cfg.swap_ab, (T, cfg)
        if block_m == 256:
            assert (cfg.gemm1, cfg.gemm2) == (GemmTiles(64, 64, 8, 3), GemmTiles(128, 64, 8, 3)), cfg
    # NVFP4 from 128 rows per expert: 256-row blocks, two warpgroups, where both K are multiples of
    # 128; L1 in 128-deep steps
    for T, block_m in ((1536, 64), (2048, 256), (16384, 256)):
        cfg = choose_moe_config(T, 8, 128, 2048, 768, "nvfp4")
        assert cfg.block_m == block_m, (T, cfg)
    assert (cfg.gemm1, cfg.gemm2, cfg.tail_block_m) == (GemmTiles(64, 128, 8, 3), GemmTiles(128, 64, 8, 3), 64)
    gpt_oss = choose_moe_config(4096, 4, 128, 2880, 2880, "nvfp4")  # gpt-oss: slower at 256 rows
    assert gpt_oss.block_m == 128 and (gpt_oss.gemm1, gpt_oss.gemm2) == (GemmTiles(64, 64, 8, 4), GemmTiles(128, 64, 4, 4))
    # fp8_mx32 activations (rounded, kept in bf16) take the bf16 activations' swapped tiles; per-128 ones do not
    for T in (16, 1024, 16384):
        mx32 = choose_moe_config(T, 8, 128, 2048, 768, "mxfp4", act_format="fp8_mx32")
        bf16 = choose_moe_config(T, 8, 128, 2048, 768, "mxfp4")
        assert mx32.swap_ab and (mx32.block_m, mx32.gemm1, mx32.gemm2) == (bf16.block_m, bf16.gemm1, bf16.gemm2), T
    assert not choose_moe_config(1024, 8, 128, 2048, 768, "mxfp4", act_format="fp8_block128").swap_ab
    assert not choose_moe_config(1024, 8, 128, 96, 768, "nvfp4").swap_ab
    assert not choose_moe_config(1024, 8, 128, 2048, 768, "dense").swap_ab


def test_plan_swapped_fp8_tiles_from_192_rows_per_expert():
    """fp8 weights with bf16 activations run the swapped tiles on 256-row blocks (two warpgroups,
    64-deep steps, 64-row tiles for an expert's last block) from 192 rows per expert on average,
    where they measured faster than the unswapped tiles; below, and with fp8 activations or an H
    that is not a multiple of 64, the unswapped tiles.  Forced on at 128 rows: 64-deep steps."""
    from inductor_moe.lowering.moe_plan import GemmTiles, choose_moe_config, with_swap_ab

    for (T, k, H, I), swapped in (((3056, 8, 2048, 768), False), ((3072, 8, 2048, 768), True),
                                  ((16384, 8, 2048, 768), True), ((4096, 4, 2880, 2880), False),
                                  ((8192, 4, 2880, 2880), True), ((4096, 6, 4096, 2048), False),
                                  ((16384, 6, 4096, 2048), True)):
        E = 256 if H == 4096 else 128
        cfg = choose_moe_config(T, k, E, H, I, "fp8_block128")
        assert cfg.swap_ab == swapped, (T, H, cfg)
        if swapped:
            assert cfg.block_m == 256 and cfg.tail_block_m == 64, cfg
            assert (cfg.gemm1, cfg.gemm2) == (GemmTiles(64, 64, 8, 3), GemmTiles(128, 64, 8, 3)), cfg
    assert not choose_moe_config(16384, 8, 128, 2048, 768, "fp8_block128", act_format="fp8_block128").swap_ab
    assert not choose_moe_config(16384, 8, 128, 2112, 736, "fp8_block128").swap_ab  # I % 64 != 0
    forced = with_swap_ab(choose_moe_config(4096, 4, 128, 2880, 2880, "fp8_block128"), 2880, 2880, "fp8_block128")
    assert forced.swap_ab and forced.block_m == 128
    assert (forced.gemm1, forced.gemm2) == (GemmTiles(64, 64, 4, 4), GemmTiles(128, 64, 4, 4)), forced


def test_plan_swapped_k_loop_and_register_cap():
    """The swapped tiles' K loop runs at least once (templates/moe_common.py, k_loop_steps), so a
    half-deep last step needs a whole one before it (else K < BLOCK_K is one masked step); and
    4-warp tiles of up to 32 rows (64 in L1) are capped at 168 registers: three programs per SM."""
    from inductor_moe.lowering.moe import gemm1_constexprs, gemm2_constexprs
    from inductor_moe.lowering.moe_plan import choose_moe_config, k_half_tail, swap_ab_max_registers
    from inductor_moe.spec import MoESpec

    assert k_half_tail(2880, 128, True) and k_half_tail(192, 128, True)
    assert not k_half_tail(64, 128, True) and not k_half_tail(2880, 128, False) and not k_half_tail(2880, 64, True)
    caps = {(bm, warps, gemm): swap_ab_max_registers(bm, warps, gemm)
            for bm in (16, 32, 64, 128, 256) for warps in (4, 8) for gemm in (1, 2)}
    assert {key for key, cap in caps.items() if cap is not None} == {
        (16, 4, 1), (16, 4, 2), (32, 4, 1), (32, 4, 2), (64, 4, 1)}
    assert set(caps.values()) == {None, 168}
    spec = MoESpec(weight_format="mxfp4", gate_up="interleaved", limit=7.0)
    cfg = choose_moe_config(512, 4, 128, 2880, 2880, "mxfp4")  # 16 rows per expert: 32-row blocks
    assert cfg.swap_ab and cfg.block_m == 32
    l1 = gemm1_constexprs(spec, cfg, "mxfp4", False, False, 2880, True, True)
    l2 = gemm2_constexprs(spec, cfg, "mxfp4", False, False, 2880, True, True)
    assert l1["maxnreg"] == l2["maxnreg"] == 168 and l1["K_HALF_TAIL"] and l2["K_HALF_TAIL"]
    unswapped = gemm1_constexprs(spec, cfg, "mxfp4", False, False, 2880, True, False)
    assert "maxnreg" not in unswapped and not unswapped["K_HALF_TAIL"]
    big = choose_moe_config(4096, 4, 128, 2880, 2880, "mxfp4")
    assert big.block_m == 128 and "maxnreg" not in gemm2_constexprs(spec, big, "mxfp4", False, False, 2880, True, True)


def test_plan_puts_an_experts_blocks_side_by_side_for_16_and_8_bit_weights():
    """bf16 and fp8 weights: both GEMMs take an expert's M-blocks fastest (EXPERT_MAJOR), so its blocks
    read each weight tile together; FP4's swapped tiles keep N tiles fastest (measured level to 2%
    slower the other way: lowering/moe_plan.expert_major_order)."""
    from inductor_moe.lowering.moe import gemm1_constexprs, gemm2_constexprs
    from inductor_moe.lowering.moe_plan import choose_moe_config
    from inductor_moe.spec import MoESpec

    for fmt, want in (("dense", True), ("fp8_block128", True), ("mxfp4", False), ("nvfp4", False)):
        spec = MoESpec(weight_format=fmt) if fmt != "dense" else MoESpec()
        cfg = choose_moe_config(4096, 4, 128, 2880, 2880, fmt)
        l1 = gemm1_constexprs(spec, cfg, fmt, False, False, 2880, True, cfg.swap_ab, intermediate=2880)
        l2 = gemm2_constexprs(spec, cfg, fmt, False, False, 2880, True, cfg.swap_ab)
        assert l1["EXPERT_MAJOR"] is want and l2["EXPERT_MAJOR"] is want, fmt


def test_plan_fp8_x_fp8_two_dots_with_one_scale_per_weight_tile():
    """fp8 x fp8 from 64-row blocks: L1 as two dots whose weight tiles each sit in one 128-row scale
    block (W_SCALE_UNIFORM), 128-row blocks above 80 rows per expert; per-column scales (interleaved
    gate / up, I % 128 != 0) keep 64-row blocks, where 128 rows spill."""
    from inductor_moe.lowering.moe import gemm1_constexprs
    from inductor_moe.lowering.moe_plan import choose_moe_config
    from inductor_moe.spec import MoESpec

    fp8 = dict(act_format="fp8_block128")
    spec, interleaved = MoESpec(**fp8), MoESpec(gate_up="interleaved", **fp8)
    for T, block_m, stages in ((1024, 64, 4), (4096, 128, 3), (16384, 128, 3)):  # qwen3: 64 / 256 / 1024 rows
        cfg = choose_moe_config(T, 8, 128, 2048, 768, "fp8_block128", **fp8)
        assert (cfg.block_m, cfg.gate_up_one_dot, cfg.gemm1.num_stages) == (block_m, False, stages), (T, cfg)
        assert cfg.gemm2.block_n == (64 if block_m == 128 else 128), cfg
        assert gemm1_constexprs(spec, cfg, "fp8_block128", False, False, 2048, True, intermediate=768)["W_SCALE_UNIFORM"]
    assert choose_moe_config(4096, 6, 256, 4096, 2048, "fp8_block128", **fp8).block_m == 128  # dsv4: 96 rows
    for cfg in (choose_moe_config(4096, 4, 128, 2880, 2880, "fp8_block128", **fp8),  # I % 128 != 0
                choose_moe_config(4096, 8, 128, 2048, 768, "fp8_block128", gate_up_interleaved=True, **fp8)):
        assert cfg.block_m == 64 and not cfg.gate_up_one_dot, cfg
    cfg = choose_moe_config(4096, 8, 128, 2048, 768, "fp8_block128", gate_up_interleaved=True, **fp8)
    assert not gemm1_constexprs(interleaved, cfg, "fp8_block128", False, False, 2048, True,
                                intermediate=768)["W_SCALE_UNIFORM"]
    assert not gemm1_constexprs(spec, cfg, "fp8_block128", False, False, 2048, True)["W_SCALE_UNIFORM"]  # I unknown
    # below 64-row blocks (and with bf16 activations) nothing changed: one dot
    assert choose_moe_config(512, 8, 128, 2048, 768, "fp8_block128", **fp8).gate_up_one_dot
    assert choose_moe_config(4096, 8, 128, 2048, 768, "fp8_block128").gate_up_one_dot


def test_mxfp4_scales_16b_rows():
    """MXFP4 scale rows not on 16-byte boundaries (gpt-oss: 90 bytes) become a view of a padded copy,
    made once per weight and rebuilt after an in-place update; aligned ones are used as they are."""
    from inductor_moe import weight_cache
    from inductor_moe.lowering.moe import mxfp4_scales_16b_rows

    weight_cache.clear()
    aligned = torch.randint(0, 255, (2, 8, 64), dtype=torch.uint8)
    assert mxfp4_scales_16b_rows(aligned) is aligned
    odd = torch.randint(0, 255, (3, 8, 90), dtype=torch.uint8)
    rows = mxfp4_scales_16b_rows(odd)
    assert rows.shape == odd.shape and rows.stride() == (8 * 96, 96, 1) and torch.equal(rows, odd)
    assert mxfp4_scales_16b_rows(odd) is rows  # cached
    odd[0, 0, 0] ^= 1
    again = mxfp4_scales_16b_rows(odd)
    assert again is not rows and torch.equal(again, odd)


def test_mxfp4_scales_in_decode_read_once_per_weight_version():
    """The swapped tiles fold an e8m0 scale into the decode's multiply only for bytes <= 128 and
    255 (NaN); the answer is read once per weight and again after an in-place update."""
    from inductor_moe import weight_cache
    from inductor_moe.lowering.moe import mxfp4_scales_in_decode

    weight_cache.clear()
    scales = torch.randint(0, 129, (2, 8, 64), dtype=torch.uint8)
    scales[0, 0, :3] = torch.tensor([0, 128, 255], dtype=torch.uint8)
    assert mxfp4_scales_in_decode(scales)
    assert weight_cache.lookup("mxfp4_scales_in_decode", (scales,)) is True  # cached
    scales[1, 7, 63] = 129  # a scale of 4: 2^128 does not fit bf16's factor
    assert not mxfp4_scales_in_decode(scales)
    scales[1, 7, 63] = 254
    assert not mxfp4_scales_in_decode(scales)
    scales[1, 7, 63] = 255
    assert mxfp4_scales_in_decode(scales)
    assert weight_cache.lookup("mxfp4_scales_in_decode", (torch.zeros(1, 1, 1, dtype=torch.uint8),)) is None


def test_fp4_scales_ahead_only_where_triton_cannot_pipeline_them():
    """NVFP4 scales with a row stride Triton cannot prove 16-byte aligned (gpt-oss: 2880 / 16 = 180)
    are loaded a K step ahead by the swapped tiles (the one-dot L1 tile and L2); elsewhere not."""
    from inductor_moe.lowering.moe import gemm1_constexprs, gemm2_constexprs
    from inductor_moe.lowering.moe_plan import choose_moe_config, fp4_scales_ahead
    from inductor_moe.spec import MoESpec

    assert fp4_scales_ahead("nvfp4", 180) and not fp4_scales_ahead("nvfp4", 128)
    assert not fp4_scales_ahead("mxfp4", 90) and not fp4_scales_ahead("mxfp4", 64)
    cfg = choose_moe_config(4096, 4, 128, 2880, 2880, "nvfp4")
    spec = MoESpec(weight_format="nvfp4")
    assert gemm1_constexprs(spec, cfg, "nvfp4", False, False, 2880, True, True, False, True)["SCALES_AHEAD"]
    assert gemm2_constexprs(spec, cfg, "nvfp4", False, False, 2880, True, True, True)["SCALES_AHEAD"]
    two_dot = cfg.replace(gate_up_one_dot=False)  # its two scale tiles load in place
    assert not gemm1_constexprs(spec, two_dot, "nvfp4", False, False, 2880, True, True, False, True)["SCALES_AHEAD"]
    assert not gemm2_constexprs(spec, cfg, "nvfp4", False, False, 2880, True, False, True)["SCALES_AHEAD"]


def test_cuda_impl_falls_back_on_cpu_with_reason():
    from inductor_moe import config
    from inductor_moe.lowering.moe import moe_experts_cuda
    from inductor_moe.ops.moe_experts import moe_experts_reference
    from inductor_moe.report import report

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 16, generator=gen)
    ids = torch.tensor([[0, 1], [1, -1], [2, 0]])
    tw = torch.rand(3, 2, generator=gen)
    w13, w2 = torch.randn(3, 16, 16, generator=gen), torch.randn(3, 16, 8, generator=gen)
    with config.patch(fallback="silent"), report() as r:
        out = moe_experts_cuda(x, ids, tw, w13, w2, "")
    assert any("cpu" in s.reason for s in r.skipped)
    torch.testing.assert_close(out, moe_experts_reference(x, ids, tw, w13, w2, ""))
    for _ in range(2):  # the per-call validation memo never lets a bad signature through
        with pytest.raises(ValueError, match="w13 must be"):
            moe_experts_cuda(x[:, :8], ids, tw, w13, w2, "")


def test_describe_on_cpu_names_reference():
    from inductor_moe.lowering.moe import describe_moe_lowering

    assert describe_moe_lowering("", torch.device("cpu"), torch.bfloat16, 8, 64, 32, 2) == "reference (cpu)"


def _aot_compile(fn, pointer_types, constexprs, arch):
    """Compile a template for an NVIDIA target without a GPU; returns the PTX."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from inductor_moe.isa import optional_arguments

    import inspect

    # as a launch compiles them: w_desc None (the pointer loads), constexprs left out at their defaults
    defaults = {name: p.default for name, p in inspect.signature(fn.fn).parameters.items()
                if "constexpr" in str(p.annotation) and p.default is not inspect.Parameter.empty}
    constexprs = {**defaults, **optional_arguments(fn), **constexprs}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_types.get(name, "*bf16")
        else:
            signature[name] = "fp32" if name in ("alpha", "limit", "up_offset") else "i32"
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 128 if arch == 90 else 32)).asm["ptx"]


@pytest.mark.parametrize("case", ["bf16_prefill", "fp8_prefill", "nvfp4_decode", "nvfp4_swapped"])
def test_templates_compile_for_sm90(case):
    """CI has no GPU: build the GEMM templates for sm_90 and check the MMA kind in the PTX."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("templates are interpreted in this process")
    from inductor_moe.templates.moe_gemm1 import moe_gemm1_kernel
    from inductor_moe.templates.moe_gemm2 import moe_gemm2_kernel

    ints = {n: "*i32" for n in ("sorted_ids_ptr", "block_expert_ptr", "expert_start_ptr", "expert_count_ptr")}
    ints.update(topk_weights_ptr="*fp32", w_gscale_ptr="*fp32")
    fmt, tiles, ptrs, mma = {
        "bf16_prefill": (0, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), {}, "wgmma"),
        "fp8_prefill": (1, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
                        {"w_ptr": "*fp8e4nv", "w_scale_ptr": "*fp32"}, "wgmma"),
        "nvfp4_decode": (3, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256),
                         {"w_ptr": "*u8", "w_scale_ptr": "*fp8e4nv"}, "mma.sync"),
        # swapped: 128 decoded weight rows are wgmma's register A operand (L1: 2 x 64 gate/up columns),
        # 128-deep steps ending in a 64-deep one, 16-row tiles for an expert's short last block
        "nvfp4_swapped": (3, dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, SWAP_AB=True, K_HALF_TAIL=True,
                                  TAIL_BLOCK_M=16), {"w_ptr": "*u8", "w_scale_ptr": "*fp8e4nv"}, "wgmma"),
    }[case]
    tiles.setdefault("SWAP_AB", False)
    tiles.setdefault("K_HALF_TAIL", False)
    tiles.setdefault("TAIL_BLOCK_M", 0)
    tiles.setdefault("SCALES_AHEAD", False)
    common = dict(WEIGHT_FORMAT=fmt, EVEN_K=True, FP4_DOT_SCALED=False, USE_PDL=True, ACT_FORMAT=0, **tiles)
    l1 = dict(ACTIVATION=0, HAS_LIMIT=True, HAS_BIAS=True, INTERLEAVED=False, WEIGHT_BEFORE_DOWN=False,
              GATE_UP_ONE_DOT=True, W_SCALE_UNIFORM=False, **common)
    l2 = dict(HAS_BIAS=True, WEIGHT_AFTER_DOWN=True, **common)
    if tiles["SWAP_AB"]:
        l2["BLOCK_N"] = 128
    for fn, consts in ((moe_gemm1_kernel, l1), (moe_gemm2_kernel, l2)):
        try:
            ptx = _aot_compile(fn, {**ints, **ptrs}, consts, 90)
        except ImportError as e:  # a triton without the NVIDIA backend
            pytest.skip(str(e))
        assert mma in ptx, f"{fn.__name__}: no {mma} in the sm_90 PTX"
        assert "griddepcontrol" in ptx, f"{fn.__name__}: PDL hooks missing"


# ----------------------------------------------------------------------------- GPU

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gpu_inputs(T, E, H, I, k, fmt, spec_extra="", bias=False, seed=0, bad_ids=False, gate_up_gscales=False):
    from inductor_moe.ops import weights as W
    from inductor_moe.spec import MoESpec

    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    spec = ",".join(p for p in (spec_extra, "" if fmt == "dense" else f"weight_format={fmt}") if p)
    s = MoESpec.from_str(spec)
    x = torch.randn(T, H, device=dev, generator=g).bfloat16()
    ids = torch.rand(T, E, device=dev, generator=g).topk(k, dim=1).indices.int()
    if bad_ids and T > 1:
        ids[0, 0] = -1
        ids[1, k - 1] = E
    tw = torch.softmax(torch.randn(T, k, device=dev, generator=g), 1)
    w13 = torch.randn(E, 2 * I, H, device=dev, generator=g) / H ** 0.5
    w2 = torch.randn(E, H, I, device=dev, generator=g) / I ** 0.5
    kw = {}
    if fmt == "dense":
        if s.transposed:
            w13, w2 = w13.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
        w13, w2 = w13.bfloat16(), w2.bfloat16()
    else:
        (w13, s13, g13), (w2, s2, g2) = quantize_w13(fmt, w13, s, gate_up_gscales), W.quantize_weight(fmt, w2)
        kw = dict(w13_scale=s13, w2_scale=s2)
        if g13 is not None:
            kw.update(w13_global_scale=g13, w2_global_scale=g2)
    if bias:
        kw["b13"] = (torch.randn(E, 2 * I, device=dev, generator=g) * 0.1).bfloat16()
        kw["b2"] = (torch.randn(E, H, device=dev, generator=g) * 0.1).bfloat16()
    return spec, x, ids, tw, w13, w2, kw


def _check_gpu(T, E, H, I, k, fmt="dense", spec_extra="", bias=False, seed=0, bad_ids=False, gate_up_gscales=False):
    from inductor_moe.lowering import moe
    from inductor_moe.ops.moe_experts import moe_experts_reference
    from inductor_moe.report import report

    moe.register()
    spec, x, ids, tw, w13, w2, kw = _gpu_inputs(T, E, H, I, k, fmt, spec_extra, bias, seed, bad_ids, gate_up_gscales)
    with _Poison(), report() as fallbacks:
        out = torch.ops.inductor_moe.moe_experts(x, ids, tw, w13, w2, spec, **kw)
        out2 = torch.ops.inductor_moe.moe_experts(x, ids, tw, w13, w2, spec, **kw)
    f64 = {n: (v.double() if v.dtype == torch.bfloat16 else v) for n, v in kw.items()}
    ref = moe_experts_reference(x.double(), ids, tw.double(), w13.double() if fmt == "dense" else w13,
                                w2.double() if fmt == "dense" else w2, spec, **f64)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert not fallbacks.skipped, f"the fused kernels fell back: {fallbacks.skipped}"
    assert not out.isnan().any()
    assert torch.equal(out, out2), "two runs differ bitwise"
    assert err <= TOL[fmt], f"rel err {err:.3g} for T={T} E={E} H={H} I={I} k={k} {fmt} {spec_extra}"
    return err


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("T", [0, 1, 16, 128, 1024])
@pytest.mark.parametrize("fmt", ["dense", "fp8_block128", "mxfp4", "nvfp4"])
def test_gpu_qwen3_layer(T, fmt):
    if T == 0:
        from inductor_moe.lowering import moe

        moe.register()
        spec, x, ids, tw, w13, w2, kw = _gpu_inputs(1, 128, 2048, 768, 8, fmt)
        out = torch.ops.inductor_moe.moe_experts(x[:0], ids[:0], tw[:0], w13, w2, spec, **kw)
        assert out.shape == (0, 2048)
        return
    _check_gpu(T, 128, 2048, 768, 8, fmt, seed=T)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("T", [1, 16, 128, 1024, 4096])
@pytest.mark.parametrize("act,fmt", [("fp8_block128", "dense"), ("fp8_block128", "fp8_block128"),
                                     ("fp8_block128", "mxfp4"), ("fp8_block128", "nvfp4"), ("fp8_mx32", "dense"),
                                     ("fp8_mx32", "fp8_block128"), ("fp8_mx32", "mxfp4"), ("fp8_mx32", "nvfp4")])
def test_gpu_fp8_activations(T, act, fmt):
    """fp8 activations (x quantised once per token, the intermediate in L1's epilogue) against the
    float64 reference of the same quantised activations, decode to prefill tiles."""
    _check_gpu(T, 128, 2048, 768, 8, fmt, spec_extra=f"act_format={act}", seed=T)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("act", ["fp8_block128", "fp8_mx32"])
def test_gpu_fp8_activations_gpt_oss_like(act):
    """Biases, clamp, interleaved gate/up, K not a multiple of 128 (fp8 groups with tails)."""
    _check_gpu(33, 16, 2880, 2880, 4, "mxfp4", bias=True, bad_ids=True, seed=3,
               spec_extra=f"act_format={act},gate_up=interleaved,alpha=1.702,limit=7.0,up_offset=1.0")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("act,fmt", [("fp8_block128", "fp8_block128"), ("fp8_block128", "dense"),
                                     ("fp8_mx32", "mxfp4")])
def test_gpu_nan_activation_stays_in_its_token_fp8(act, fmt):
    """fp8 activations at prefill (fp8 x fp8: the warp-specialised GEMMs; mx32 x MXFP4: the swapped
    tiles): a NaN in one token's x makes that token's output NaN and no other's."""
    from inductor_moe.lowering import moe

    moe.register()
    spec, x, ids, tw, w13, w2, kw = _gpu_inputs(4096, 128, 2048, 768, 8, fmt, spec_extra=f"act_format={act}", seed=5)
    x = x.clone()
    x[17, 300] = float("nan")
    out = torch.ops.inductor_moe.moe_experts(x, ids, tw, w13, w2, spec, **kw)
    nan_rows = out.isnan().any(dim=1)
    assert bool(out[17].isnan().all()) and int(nan_rows.sum()) == 1, nan_rows.nonzero().flatten()[:8]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("seed", range(6))
def test_gpu_random_shapes(seed):
    import random

    rng = random.Random(seed)
    E = rng.choice([8, 32, 64, 128, 256])
    k = rng.choice([1, 2, 4, 6, 8])
    k = min(k, E)
    H = rng.choice([256, 512, 1024, 2880])
    I = rng.choice([128, 256, 384, 768, 2880])
    T = rng.choice([1, 3, 17, 200, 999, 4096])
    while E * H * I > 2 ** 27 and E > 8:  # keep the float64 reference's weights under ~3 GiB
        E //= 2
    k = min(k, E)
    fmt = rng.choice(["dense", "fp8_block128", "mxfp4", "nvfp4"])
    spec_extra = rng.choice(["", "activation=gelu", "gate_up=interleaved,alpha=1.702,limit=7.0,up_offset=1.0",
                             "weight_position=before_down", "activation=gelu_tanh,limit=10.0"])
    if fmt == "dense" and rng.random() < 0.5:
        spec_extra = ",".join(p for p in (spec_extra, "transposed=True") if p)
    _check_gpu(T, E, H, I, k, fmt, spec_extra, bias=rng.random() < 0.5, seed=seed, bad_ids=True)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("swap", ["on", "off"])
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "fp8_block128"])
def test_gpu_fp4_swapped_tiles(fmt, swap):
    """FP4 / fp8 decode tiles swapped or not (config.fp4_swap_ab), qwen3 decode/mid and a gpt-oss-like
    layer with biases, the clamped SwiGLU, interleaved gate/up and uneven tiles."""
    from inductor_moe import config

    with config.patch(fp4_swap_ab=swap, mxfp4_mma="decode"):
        for T in (1, 16, 128):
            _check_gpu(T, 128, 2048, 768, 8, fmt, seed=T)
        _check_gpu(5, 32, 2880, 2880, 4, fmt, "gate_up=interleaved,alpha=1.702,limit=7.0,up_offset=1.0", bias=True,
                   bad_ids=True)


@pytest.mark.gpu
@gpu
def test_gpu_fp8_swapped_prefill():
    """fp8 weights with bf16 activations where the rule swaps them (256-row blocks, 64-row tiles for
    an expert's last block): qwen3 at 192 rows per expert, and a gpt-oss-like layer (K = 2880,
    biases, the clamped SwiGLU, interleaved gate/up, bad ids) at 512."""
    from inductor_moe.lowering.moe_plan import choose_moe_config

    for T, E, H, I, k in ((3072, 128, 2048, 768, 8), (2048, 16, 2880, 2880, 4)):
        cfg = choose_moe_config(T, k, E, H, I, "fp8_block128")
        assert cfg.swap_ab and cfg.block_m == 256, cfg
    _check_gpu(3072, 128, 2048, 768, 8, "fp8_block128", seed=11)
    _check_gpu(2048, 16, 2880, 2880, 4, "fp8_block128", "gate_up=interleaved,alpha=1.702,limit=7.0,up_offset=1.0",
               bias=True, bad_ids=True, seed=12)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_gpu_fp4_swapped_prefill_tails(fmt):
    """Swapped prefill tiles: an expert's short last block on 32 / 64-row tiles (NVFP4: 256-row
    blocks of two warpgroups, tails of 64 / 128), and gpt-oss's K = 2880 in 128-deep steps ending in
    one 64-deep step (K_HALF_TAIL, through an explicit kernel config)."""
    from inductor_moe.lowering.moe import fused_moe_experts
    from inductor_moe.lowering.moe_plan import GemmTiles, choose_moe_config
    from inductor_moe.ops.moe_experts import moe_experts_reference
    from inductor_moe.spec import MoESpec

    _check_gpu(2048, 128, 2048, 768, 8, fmt, seed=7)
    T, E, H, I, k = 600, 16, 2880, 2880, 4  # 150 rows per expert: 128-row blocks and short last ones
    spec, x, ids, tw, w13, w2, kw = _gpu_inputs(T, E, H, I, k, fmt, "gate_up=interleaved,alpha=1.702,limit=7.0",
                                               bias=True, seed=8)
    cfg = choose_moe_config(T, k, E, H, I, fmt).replace(gemm1=GemmTiles(64, 128, 4, 3), gemm2=GemmTiles(128, 128, 4, 3))
    assert cfg.swap_ab and cfg.block_m == 128 and cfg.tail_block_m == 32
    s = MoESpec.from_str(spec)
    with _Poison():
        out = fused_moe_experts(x, ids, tw, w13, w2, s, kernel_config=cfg, use_cuda_decode=False, **kw)
    f64 = {n: (v.double() if v.dtype == torch.bfloat16 else v) for n, v in kw.items()}
    ref = moe_experts_reference(x.double(), ids, tw.double(), w13, w2, spec, **f64)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert not out.isnan().any() and err <= TOL[fmt], f"rel err {err:.3g}"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("layer,T,fmt", [("qwen3", 8192, "mxfp4"), ("qwen3", 2048, "nvfp4"), ("gpt-oss", 600, "mxfp4")])
def test_gpu_fp4_prefetched_scales_change_no_bit(layer, T, fmt):
    """MoEKernelConfig.fp4_prefetch_scales (the next K step's block scales prefetched to L1) runs
    the same MMAs in the same order: the same bits as the rule's tiles (256- / 128-row blocks)."""
    from inductor_moe.lowering.moe import fused_moe_experts
    from inductor_moe.lowering.moe_plan import choose_moe_config
    from inductor_moe.spec import MoESpec

    E, k, H, I, extra = ((128, 8, 2048, 768, "") if layer == "qwen3" else
                         (16, 4, 2880, 2880, "gate_up=interleaved,alpha=1.702,limit=7.0"))
    spec, x, ids, tw, w13, w2, kw = _gpu_inputs(T, E, H, I, k, fmt, extra, seed=9)
    cfg = choose_moe_config(T, k, E, H, I, fmt)
    assert cfg.swap_ab and not cfg.fp4_prefetch_scales
    s = MoESpec.from_str(spec)
    with _Poison():
        out = fused_moe_experts(x, ids, tw, w13, w2, s, kernel_config=cfg, use_cuda_decode=False, **kw)
        pre = fused_moe_experts(x, ids, tw, w13, w2, s, kernel_config=cfg.replace(fp4_prefetch_scales=True),
                                use_cuda_decode=False, **kw)
    assert not out.isnan().any() and torch.equal(out, pre)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mega", [True, False])
def test_gpu_nvfp4_gate_up_global_scales(mega):
    """NVFP4 w13 with gate's and up's own global scales ([E, 2], from per-expert gate / up linears),
    in the persistent kernel and the two-launch path, concat and interleaved gate/up."""
    from inductor_moe import config

    with config.patch(mega_kernel=mega):
        for T in (1, 16, 128):
            _check_gpu(T, 128, 2048, 768, 8, "nvfp4", seed=T, gate_up_gscales=True)
        _check_gpu(5, 32, 2880, 2880, 4, "nvfp4", "gate_up=interleaved,alpha=1.702,limit=7.0,up_offset=1.0", bias=True,
                   bad_ids=True, gate_up_gscales=True)


@pytest.mark.gpu
@gpu
def test_gpu_pdl_on_off_bitwise_equal_and_graph_capturable():
    from inductor_moe import config
    from inductor_moe.lowering import moe

    moe.register()
    spec, x, ids, tw, w13, w2, kw = _gpu_inputs(64, 128, 2048, 768, 8, "dense")
    with config.patch(pdl=False):
        off = torch.ops.inductor_moe.moe_experts(x, ids, tw, w13, w2, spec)
    with config.patch(pdl=True):
        on = torch.ops.inductor_moe.moe_experts(x, ids, tw, w13, w2, spec)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = torch.ops.inductor_moe.moe_experts(x, ids, tw, w13, w2, spec)
    x.copy_(torch.randn_like(x))
    graph.replay()
    fresh = torch.ops.inductor_moe.moe_experts(x, ids, tw, w13, w2, spec)
    torch.cuda.synchronize()
    assert torch.equal(on, off)
    assert torch.equal(captured, fresh)


@pytest.mark.gpu
@gpu
def test_gpu_unsupported_falls_back_with_reason():
    from inductor_moe import config
    from inductor_moe.lowering import moe
    from inductor_moe.ops.moe_experts import moe_experts_reference
    from inductor_moe.report import report

    moe.register()
    spec, x, ids, tw, w13, w2, kw = _gpu_inputs(4, 8, 256, 128, 2, "nvfp4")
    x = x.float()  # float32 activations: not in the kernels
    with config.patch(fallback="silent"), report() as r:
        out = torch.ops.inductor_moe.moe_experts(x, ids, tw, w13, w2, spec, **kw)
    assert any("float32" in s.reason for s in r.skipped)
    torch.testing.assert_close(out, moe_experts_reference(x, ids, tw, w13, w2, spec, **kw))


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--interpret":
    _main()


def test_fp4_swap_ab_rule():
    """auto follows the plan (choose_moe_config, or the tuned table's entry) on Hopper and never
    swaps on sm_100 (Triton 3.6 cannot build the swapped NVFP4 tiles there); explicit settings win."""
    from inductor_moe import config
    from inductor_moe.lowering.moe_plan import fp4_swap_ab

    assert config.choices()["fp4_swap_ab"] == ("auto", "on", "off")
    for planned in (True, False):
        assert fp4_swap_ab("auto", planned, 9) == planned
        assert not fp4_swap_ab("auto", planned, 10)
        for arch in (9, 10):
            assert fp4_swap_ab("on", planned, arch) and not fp4_swap_ab("off", planned, arch)


def test_mxfp4_mma_rule_and_decode_tiles():
    """auto: the packed in-register decode on sm_90 (every regime), tl.dot_scaled on sm_100;
    explicit settings win; the decode path's tiles stay in the spill-checked budget."""
    from inductor_moe import config
    from inductor_moe.lowering.moe_plan import choose_moe_config, mxfp4_dot_scaled

    assert config.choices()["mxfp4_mma"] == ("auto", "dot_scaled", "decode")
    assert not mxfp4_dot_scaled("auto", 9) and mxfp4_dot_scaled("auto", 10)
    assert mxfp4_dot_scaled("dot_scaled", 9) and not mxfp4_dot_scaled("decode", 10)
    for T in (1, 16, 128):  # the unswapped tiles (fp16 activations, the persistent kernel)
        cfg = choose_moe_config(T, 8, 128, 2048, 768, "mxfp4", 132, allow_swap_ab=False)
        assert cfg.regime != "prefill"
        assert cfg.gemm1.block_n <= 32 and cfg.gemm2.block_n <= 64 and cfg.gemm1.block_k <= 256, cfg
