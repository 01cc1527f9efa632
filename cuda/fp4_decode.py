"""Host side of the CUDA FP4 decode GEMM (``fp4_decode_mma.cu``): fit checks, tiles, NVRTC build, launch.

# M: rows of X (tokens, <= 16), N: output features (weight rows), K: reduction dim
The kernel is built at run time by NVRTC (``cuda/nvrtc.py``) once per (device, variant) and
launched on the current stream: no host syncs, CUDA-graph capturable.
Where it cannot run (no NVRTC, an unaligned operand, formats it does not take) ``decode_mma_fits``
says why and the caller keeps the Triton path.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from ..spec import GemmSpec
from . import nvrtc

MAX_M = 16  # two 8-token MMA tiles
_DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_ACT_CODES = {None: 0, "silu": 1, "gelu": 2, "gelu_tanh": 3, "relu": 4}


@dataclass(frozen=True)
class DecodeMmaConfig:
    """One launch: ``warps`` split K inside a CTA of 16 * ``row_groups`` weight rows; a warp step
    is 128 * ``vec`` K (``vec`` 16-byte loads per row and thread), and each warp issues the loads
    of ``unroll`` steps before their math; with ``pipe`` it also issues the next ``unroll`` steps'
    loads before that math (two groups of registers)."""

    row_groups: int = 1
    warps: int = 8
    unroll: int = 2
    vec: int = 1
    pipe: bool = False
    max_registers: int = 0  # per-thread register cap (0: the compiler's choice)

    def __post_init__(self):
        if self.row_groups not in (1, 2) or self.warps not in (1, 2, 4, 8, 16) or self.unroll < 1 or self.vec not in (1, 2):
            raise ValueError(f"unsupported {self}")


def choose_decode_mma_config(m: int, n: int, k: int, num_sms: int, weight_format: str = "mxfp4") -> DecodeMmaConfig:
    """H100, weights L2-cold, N x K in {4096², 14336 x 4096, 4096 x 14336, 2880², 5760 x 2880},
    MXFP4 and NVFP4 (benchmarks/NOTES_fp4.md, "the pipelined K loop").
    Up to 8 tokens: the pipelined loop (the next step's loads in flight through each step's math),
    8 warps x 1 step, or 4 warps x 2 steps where the grid has more than 4 CTAs per SM (14336 rows):
    5-25% faster than 8 warps x 2 steps unpipelined, except NVFP4 14336 x 4096 (4% slower).
    9-16 tokens: 8 warps, not pipelined (that would hold twice the 16-token activation registers;
    within +-10% either way); 2 steps of loads in flight where each warp's steps split into full
    groups, else 1 (K = 2880 has 23 steps: 10-18% faster than a half-empty second group).
    MXFP4 with N >= 8192 at 9-16 tokens: two row groups per warp, 1 step.  With one, each CTA of 16
    rows re-reads all of X (16 tokens x K) from L2, four times its weight bytes; sharing the
    activation fragments across 32 rows was 8-22% faster at N = 8192-28672 (M = 12 and 16, two
    runs), not at N = 4096, and mixed for NVFP4 (benchmarks/NOTES_fp4.md, "activation re-reads").
    NVFP4 at 9-16 tokens: at most 64 registers per thread (4 CTAs of 8 warps per SM; the compiler
    chose 94-114): 2-15% faster at 5 of 6 shapes (N x K = 4096², 14336 x 4096, 2880², 5760 x 2880,
    8192²), level at 4096 x 14336 (H100, benchmarks/NOTES.md, "Register caps").  The same cap spills
    MXFP4's kernels (1.3-3x slower), and the pipelined loop's at up to 8 tokens."""
    if m > 8:
        if weight_format == "mxfp4" and n >= 8192:
            return DecodeMmaConfig(row_groups=2, warps=8, unroll=1)
        steps = -(-k // 128)
        steps_per_warp = -(-steps // 8)
        return DecodeMmaConfig(row_groups=1, warps=8, unroll=2 if steps_per_warp % 2 == 0 else 1,
                               max_registers=64 if weight_format == "nvfp4" else 0)
    if -(-n // 16) > 4 * num_sms:
        return DecodeMmaConfig(row_groups=1, warps=4, unroll=2, pipe=True)
    return DecodeMmaConfig(row_groups=1, warps=8, unroll=1, pipe=True)


def vec2_fits(k: int, b_scale: torch.Tensor, spec: GemmSpec) -> bool:
    """Two 16-byte loads per row and step read a thread's scales as one 2- (MXFP4) or 4-byte
    (NVFP4) word: K % 64 == 0 and an aligned scale tensor."""
    return k % 64 == 0 and b_scale.data_ptr() % (4 if spec.b_format == "nvfp4" else 2) == 0


def decode_mma_fits(a2: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, spec: GemmSpec,
                    bias: Optional[torch.Tensor]) -> Optional[str]:
    """Why the CUDA decode GEMM cannot take this call (None when it can); metadata only."""
    if spec.a_format != "dense" or a2.dtype != torch.bfloat16:
        return "activations are not bf16"
    if spec.b_format not in ("mxfp4", "nvfp4"):
        return f"{spec.b_format} weights"
    m, k = a2.shape[0], b.shape[1] * 2
    if m > MAX_M:
        return f"M={m} > {MAX_M}"
    if k % 32:
        return f"K={k} is not a multiple of 32"
    if a2.stride(-1) != 1 or a2.stride(0) % 8 or a2.data_ptr() % 16:
        return "activation rows are not 16-byte aligned"
    if b.data_ptr() % 16:
        return "weights are not 16-byte aligned"
    if not b_scale.is_contiguous() or b_scale.data_ptr() % 2:
        return "block scales are not contiguous and 2-byte aligned"
    if bias is not None and (bias.dtype not in _DTYPE_CODES or bias.stride(0) != 1):
        return f"bias of dtype {bias.dtype}"
    if spec.activation not in _ACT_CODES:
        return f"activation {spec.activation}"
    return None


def nvrtc_unavailable_reason(device_index: int) -> Optional[str]:
    """None when the kernel may run on this device (switched on, NVRTC builds it), else why not."""
    return nvrtc.why_not(device_index)


def _defines(spec: GemmSpec, m: int, cfg: DecodeMmaConfig, bias: Optional[torch.Tensor], global_scale,
             out_dtype) -> tuple:
    return (("NV", int(spec.b_format == "nvfp4")), ("RG", cfg.row_groups), ("NT", 2 if m > 8 else 1),
            ("WARPS", cfg.warps), ("UNROLL", cfg.unroll), ("VEC", cfg.vec), ("PIPE", int(cfg.pipe)),
            ("HAS_BIAS", int(bias is not None)),
            ("BIAS_T", _DTYPE_CODES[bias.dtype] if bias is not None else 0), ("OUT_T", _DTYPE_CODES[out_dtype]),
            ("ACT", _ACT_CODES[spec.activation]), ("HAS_GSCALE", int(global_scale is not None)),
            ("MIN_CTAS", nvrtc.min_ctas(cfg.max_registers, cfg.warps)))


def decode_mma_gemm(a2, b, b_scale, spec: GemmSpec, global_scale, bias, out, cfg: DecodeMmaConfig,
                    use_pdl: bool = False):
    """``out[M, N] = act(global_scale * (A @ B^T) + bias)``; inputs validated, ``decode_mma_fits``
    and ``nvrtc_unavailable_reason`` checked by the caller.  ``use_pdl``: launched with PDL (the
    kernel waits for the previous one before reading anything)."""
    m, n, k = a2.shape[0], b.shape[0], b.shape[1] * 2
    dev = a2.device
    if cfg.vec == 2 and not vec2_fits(k, b_scale, spec):
        cfg = replace(cfg, vec=1)
    kernel = nvrtc.build(dev.index, "fp4_decode_mma.cu", "fp4_decode_mma", _defines(spec, m, cfg, bias, global_scale, out.dtype))
    b_u8 = b if b.dtype == torch.uint8 else b.view(torch.uint8)
    s_u8 = b_scale if b_scale.dtype == torch.uint8 else b_scale.view(torch.uint8)
    rows = 16 * cfg.row_groups
    nvrtc.launch(kernel, (-(-n // rows), 1, 1), (32 * cfg.warps, 1, 1), stream=torch.cuda.current_stream(dev),
                 pdl=use_pdl, args=[a2, b_u8, s_u8, global_scale if global_scale is not None else out,
                                    bias if bias is not None else out, out, m, n, k, a2.stride(0), out.stride(0)])
    return out
