"""Lowering of ``inductor_moe::block_scaled_mm`` to the Triton block-scaled GEMM template.

# M: rows of A (tokens), N: output features, K: reduction dim
``register()`` installs the CUDA kernel of the op (``templates/block_scaled_gemm.py``), which picks
per call between the fused Triton kernel and, at large M on sm_90 (no FP4 MMA), decoding weight
row chunks into a bounded bf16 workspace for cuBLAS (``choose_strategy``); what the template does
not cover runs the reference op with the reason recorded in the report, never a
wrong result.  The launch is sized from shapes alone (no host syncs), so it is CUDA-graph
capturable; with PDL on sm_90+ its prologue overlaps the previous kernel's tail.
"""

from __future__ import annotations

import functools

import os
from typing import Optional

import torch

from .. import report
from ..ops.block_scaled_mm import block_scaled_mm_reference, validate_gemm_inputs
from ..spec import GemmSpec

DENSE_A_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unsupported_reason(spec: GemmSpec, device: torch.device, a_dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Why the Triton template cannot run this call (None when it can)."""
    if device.type != "cuda" and not _interpreting():
        return f"no Triton kernels on {device.type}"
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        return "the block-scaled GEMM template needs sm_80 or newer"
    if spec.a_format == "dense" and a_dtype is not None and a_dtype not in DENSE_A_DTYPES:
        return f"dense activations of dtype {a_dtype}"
    return None


def describe_gemm_lowering(spec, device: torch.device, m=None, n=None, k=None) -> str:
    """The implementation a call will use, for the report (nothing runs)."""
    spec = GemmSpec.from_str(spec) if isinstance(spec, str) else spec
    reason = unsupported_reason(spec, device)
    if reason is not None:
        return f"reference ({device.type})"
    name = f"triton block_scaled_gemm ({spec.a_format} x {spec.b_format})"
    if spec.a_format == "dense" and spec.b_format in ("mxfp4", "nvfp4") and device.type == "cuda":
        from ..cuda import nvrtc

        index = device.index if device.index is not None else torch.cuda.current_device()
        if nvrtc.why_not(index) is None:  # built on this GPU and switched on (config.cuda_decode)
            name += "; cuda fp4_decode_mma at M <= 16 (bf16 activations, where NVRTC builds it)"
        from .. import config
        from ..templates.block_scaled_gemm import WS_MAX_M, WS_MIN_M
        from ..templates.fp4_gemm_ws import HAS_GLUON

        if HAS_GLUON and config.warp_specialized and torch.cuda.get_device_capability(device)[0] == 9:
            name += (f"; gluon fp4_gemm_ws at {WS_MIN_M}-{WS_MAX_M - 1} rows where its tiles fill the GPU "
                     "(bf16 activations)")
    return name


def block_scaled_mm_cuda(a, b, b_scale, spec, a_scale=None, global_scale=None, bias=None):
    from ..templates.block_scaled_gemm import block_scaled_gemm
    from .moe import pdl_enabled

    s = GemmSpec.from_str(spec)
    validate_gemm_inputs(a, b, b_scale, s, a_scale, global_scale, bias)
    reason = unsupported_reason(s, a.device, a.dtype)
    if reason is not None:
        report.record_runtime_fallback("fp4_gemm", reason)
        return block_scaled_mm_reference(a, b, b_scale, s, a_scale, global_scale, bias)
    return block_scaled_gemm(a, b, b_scale, s, a_scale, global_scale, bias, use_pdl=pdl_enabled(a.device))


@functools.cache
def register() -> None:
    """Install the CUDA kernel of ``inductor_moe::block_scaled_mm`` (once)."""
    torch.library.register_kernel("inductor_moe::block_scaled_mm", "cuda", block_scaled_mm_cuda)
