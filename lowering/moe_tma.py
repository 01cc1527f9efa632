"""Dense expert weights through TMA: the host-built tensor descriptors of the L1 / L2 weight tiles.

# E: experts, H: hidden, I: expert intermediate size; BN / BK: a GEMM's block_n / block_k.
# With pointer loads every thread computes addresses and issues cp.async for its share of each
# weight tile; with a descriptor the copy engine fetches the whole box, zero-filling rows and K
# past the tensor's end, and the warps only run the MMAs.  The activations stay pointer loads:
# their rows are gathered per token, which Hopper's TMA cannot do.
# A descriptor is built per call, with the checks of ``weight_tma_reason`` (a pure function of
# shapes, strides and tiles): ~15 host µs a call on a 2-core CI machine, from 64-row blocks only
# (calls of about 0.5 ms and up on the GPU), none under CUDA graphs (the launch records it by value).  Not
# cached: a descriptor holds its tensor, so a cache keyed on the weight would keep freed weights alive.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

MAX_BOX = 256  # TMA box: at most 256 elements per dimension
# MoEKernelConfig.weight_tma None takes TMA from this many rows per M-block.  H100, alternating
# same-process A/B (benchmarks/NOTES.md, "Dense weights through TMA"): 0.94-0.996x the pointer
# loads' time at 64- and 128-row blocks (T = 1024-16384 on the three TARGETS layers), 1.003-1.007x
# at 16- and 32-row blocks (T = 16-1024), where a tile's few rows leave the loads no work to hide.
TMA_MIN_BLOCK_M = 64


@functools.lru_cache(maxsize=None)
def _descriptor_class():
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # a triton without host-side tensor descriptors
        return None
    return TensorDescriptor


def _views(spec, w13: torch.Tensor, w2: torch.Tensor, bn1: int, bk1: int, bn2: int, bk2: int):
    """((shape, strides, block) of w13's view, the same of w2's, K-major?) -- K-major: [E, N, K]
    as the model stores it; else [E, K, N] (spec.transposed).  A non-interleaved w13 is seen with
    its gate / up halves as a dimension of 2, so one box holds BN gate then BN up columns."""
    E = w13.shape[0]
    if spec.transposed:  # w13 [E, H, 2I], w2 [E, I, H]
        H, I = w13.shape[1], w13.shape[2] // 2
        s0, sk, sn = w13.stride()
        if spec.gate_up == "interleaved":
            v13 = ([E, H, 2 * I], [s0, sk, sn], [1, bk1, 2 * bn1])
        else:
            v13 = ([E, H, 2, I], [s0, sk, I * sn, sn], [1, bk1, 2, bn1])
        v2 = ([E, I, H], list(w2.stride()), [1, bk2, bn2])
        return v13, v2, False
    H, I = w13.shape[2], w13.shape[1] // 2  # w13 [E, 2I, H], w2 [E, H, I]
    s0, sn, sk = w13.stride()
    if spec.gate_up == "interleaved":
        v13 = ([E, 2 * I, H], [s0, sn, sk], [1, 2 * bn1, bk1])
    else:
        v13 = ([E, 2, I, H], [s0, I * sn, sn, sk], [1, 2, bn1, bk1])
    v2 = ([E, H, I], list(w2.stride()), [1, bn2, bk2])
    return v13, v2, True


def weight_tma_reason(spec, fmt: str, x_dtype: torch.dtype, w13: torch.Tensor, w2: torch.Tensor, cfg,
                      *, arch_major: int, interpreting: bool, use_mega: bool) -> Optional[str]:
    """Why this call's weight tiles cannot come through TMA descriptors (None: they can)."""
    if cfg.weight_tma is False:
        return "off in the plan (MoEKernelConfig.weight_tma)"
    if cfg.weight_tma is None and cfg.block_m < TMA_MIN_BLOCK_M:
        return f"{cfg.block_m}-row blocks (TMA from {TMA_MIN_BLOCK_M}: measured slower below)"
    if fmt != "dense" or spec.act_format != "dense":
        return f"{fmt} weights with {spec.act_format} activations (dense x dense only)"
    if w13.dtype != x_dtype or w2.dtype != x_dtype:
        return "weights and activations differ in dtype"
    if use_mega:
        return "the persistent kernel loads its weights with pointers"
    if not cfg.gate_up_one_dot:
        return "L1 with two dots (gate_up_one_dot off)"
    if not interpreting and arch_major < 9:
        return f"no TMA before sm_90 (sm_{arch_major}x)"
    if _descriptor_class() is None:
        return "this triton has no triton.tools.tensor_descriptor"
    g1, g2 = cfg.gemm1, cfg.gemm2
    v13, v2, _ = _views(spec, w13, w2, g1.block_n, g1.block_k, g2.block_n, g2.block_k)
    size = w13.element_size()
    for name, w, (shape, strides, block) in (("w13", w13, v13), ("w2", w2, v2)):
        if strides[-1] != 1:
            return f"{name}'s innermost dimension is strided ({strides[-1]})"
        if any(s * size % 16 for s in strides[:-1]) or w.data_ptr() % 16:
            return f"{name} is not 16-byte aligned in its base or strides {tuple(strides)}"
        if max(block) > MAX_BOX:
            return f"{name}'s box {tuple(block)} exceeds {MAX_BOX} elements in a dimension"
    return None


def weight_tma_arguments(spec, w13: torch.Tensor, w2: torch.Tensor, cfg) -> tuple[dict, dict]:
    """The (w_desc, W_DESC_K_MAJOR) keyword arguments of moe_gemm1_kernel and moe_gemm2_kernel
    (call ``weight_tma_reason`` first)."""
    TensorDescriptor = _descriptor_class()
    g1, g2 = cfg.gemm1, cfg.gemm2
    v13, v2, k_major = _views(spec, w13, w2, g1.block_n, g1.block_k, g2.block_n, g2.block_k)
    d13 = TensorDescriptor(w13, shape=v13[0], strides=v13[1], block_shape=v13[2])
    d2 = TensorDescriptor(w2, shape=v2[0], strides=v2[1], block_shape=v2[2])
    return dict(w_desc=d13, W_DESC_K_MAJOR=k_major), dict(w_desc=d2, W_DESC_K_MAJOR=k_major)
