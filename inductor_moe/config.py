"""User knobs, in Inductor's style: ``inductor_moe.config.patch(...)``, environment variables,
and the same keys through ``torch.compile(..., backend="inductor_moe", options={...})``.

Every key that can change the generated graph is part of the pass ``uuid()``, so Inductor's
FX graph cache never hands back a graph compiled under other settings.
"""

import sys
from typing import Optional

from torch.utils._config_module import Config, install_config_module

# Rewrite MoE blocks into ``inductor_moe::moe_experts``.  Env: INDUCTOR_MOE_REWRITE=0 turns it off.
moe_rewrite: bool = Config(default=True, env_name_force="INDUCTOR_MOE_REWRITE")

# Rewrite block-scaled FP4 matmuls into ``inductor_moe::block_scaled_mm``.
fp4_gemm_rewrite: bool = Config(default=True, env_name_force="INDUCTOR_MOE_FP4_GEMM_REWRITE")

# Chain the GPU kernels with Programmatic Dependent Launch (sm_90+).
pdl: bool = Config(default=True, env_name_force="INDUCTOR_MOE_PDL")

# Allow the persistent single-launch "mega" MoE kernel where the plan says it wins.
mega_kernel: bool = Config(default=True, env_name_force="INDUCTOR_MOE_MEGA_KERNEL")

# Combine each token's k contributions in a fixed order (bitwise reproducible, no float atomics).
deterministic: bool = Config(default=True, env_name_force="INDUCTOR_MOE_DETERMINISTIC")

# What happens when a candidate region cannot be rewritten or a pass fails internally:
# "silent" records it in the report, "warn" also warns once, "raise" makes compilation fail.
fallback: str = Config(default="warn", env_name_force="INDUCTOR_MOE_FALLBACK")

# Quantise bf16/fp16 expert weights once, at first use, to "fp8_block128", "mxfp4" or "nvfp4".
# None keeps the model's numerics unchanged.
moe_weight_format: Optional[str] = Config(default=None, env_name_force="INDUCTOR_MOE_WEIGHT_FORMAT")

# Feed the expert GEMMs fp8 e4m3 activations: "fp8_block128" (fp32 scale per token per 128)
# or "fp8_mx32" (e8m0 scale per 32). "dense" keeps the activation dtype.
moe_act_format: str = Config(default="dense", env_name_force="INDUCTOR_MOE_ACT_FORMAT")

# Quantise the weights of plain bf16 ``nn.Linear`` layers once to "mxfp4" or "nvfp4" and run
# them through ``inductor_moe::block_scaled_mm``.  None leaves them alone.
linear_weight_format: Optional[str] = Config(default=None, env_name_force="INDUCTOR_MOE_LINEAR_WEIGHT_FORMAT")

# How MXFP4 weights meet the tensor cores: "dot_scaled" (tl.dot_scaled: the block-scaled MMA on
# sm_100, Triton's emulation on sm_90), "decode" (the packed in-register e2m1 -> bf16 decode, then a
# bf16 MMA: about 3x fewer instructions per weight than that emulation on sm_90), or "auto"
# (lowering/moe_plan.py: mxfp4_dot_scaled).
mxfp4_mma: str = Config(default="auto", env_name_force="INDUCTOR_MOE_MXFP4_MMA")

# MoE FP4 weights decoded in registers (NVFP4, and MXFP4 on the "decode" path; bf16 or fp8_mx32
# activations) and fp8 block-128 weights (bf16 activations), H and I multiples of 64: "on" computes
# each tile transposed, the decoded weight rows as wgmma's register operand and the tokens as its
# small side, with the activations' K permuted to match (templates/moe_common.py: to_mma_k_order);
# "off" keeps tokens as rows; "auto" swaps (lowering/moe_plan.py: choose_moe_config): FP4 everywhere
# (1.2-1.8x faster on H100 at every size measured), fp8 from 192 rows per expert (0.74-0.91x the
# unswapped tiles' layer time there).
fp4_swap_ab: str = Config(default="auto", env_name_force="INDUCTOR_MOE_FP4_SWAP_AB")

# Run decode calls on the CUDA kernels (cuda/, built by NVRTC at run time) where they fit: FP4
# matmuls at M <= 16 and FP4 MoE experts up to 5 (token, slot) pairs per
# expert, bf16 activations.  Off: the Triton paths.
# Read when the kernels run.
cuda_decode: bool = Config(default=True, env_name_force="INDUCTOR_MOE_CUDA_DECODE")

# On sm_90, fp8 block-128 weights with fp8 block-128 activations: run the gate/up and down GEMMs
# (L1, L2) as warp-specialised persistent kernels (templates/moe_gemm1_ws.py, moe_gemm2_ws.py,
# Gluon); bf16 / fp16 experts with a short I: the down GEMM so (moe_gemm2_ws_dense.py); where they
# fit (lowering/moe_ws.py: ws_l1_reason, ws_l2_reason).  Off: the Triton kernels (the same bits).
# Also FP4 matmuls (bf16 activations) of 1024..4095 rows: the weight decoded into wgmma's registers
# (templates/fp4_gemm_ws.py), which keeps one re-laid-out copy of each such packed weight and its
# scales (1.18 / 1.33x the packed MXFP4 / NVFP4 weight and scale bytes: the scales repeated for
# the four lanes that share a row) beside the original; off: those
# calls decode row chunks to a bf16 workspace for cuBLAS ("dequant_chunks", no copy kept).
# Read when the kernels run.
warp_specialized: bool = Config(default=True, env_name_force="INDUCTOR_MOE_WARP_SPECIALIZED")
# Opt-in, sm_90: FP4 MoE experts with bf16 activations at >= 128 (token, slot) pairs per expert run
# L1 and L2 as warp-specialised Gluon kernels decoding the weights into wgmma's registers
# (templates/moe_fp4_ws.py), each keeping a re-laid-out copy of its expert weights (1.18 / 1.33x
# the packed MXFP4 / NVFP4 bytes) where that leaves a quarter of the device free.  Off by default:
# on an H100 the layer took 0.96-1.26x the swapped Triton tiles' time at 4096-16384 tokens, faster
# only at gpt-oss-120b NVFP4 16384 (BENCHMARKS.md, "The MoE's FP4 GEMMs warp-specialised").
# Needs warp_specialized on.
moe_fp4_ws: bool = Config(default=False, env_name_force="INDUCTOR_MOE_FP4_WS")
# Time MoE kernel tile candidates at the first call of each shape bucket that has no tuned entry
# (seconds per bucket; never while a CUDA graph is being captured) and keep the fastest in
# ~/.cache/inductor_moe/moe_tuned.json (env INDUCTOR_MOE_TUNE_CACHE).  Off: tuned entries already
# in that file or shipped in lowering/tuned/ are still used, the heuristic otherwise.  Read when
# the kernels run: set it globally or by env (torch.compile options apply at compile time only).
autotune: bool = Config(default=False, env_name_force="INDUCTOR_MOE_AUTOTUNE")

def choices() -> dict:
    """Allowed values of the keys that take one of a few names."""
    return {
        "fallback": ("silent", "warn", "raise"),
        "moe_weight_format": (None, "fp8_block128", "mxfp4", "nvfp4"),
        "moe_act_format": ("dense", "fp8_block128", "fp8_mx32"),
        "linear_weight_format": (None, "mxfp4", "nvfp4"),
        "mxfp4_mma": ("auto", "dot_scaled", "decode"),
        "fp4_swap_ab": ("auto", "on", "off"),
    }


def validate() -> None:
    """Fail loudly, with the allowed values, on a misspelt setting."""
    current = sys.modules[__name__]
    for key, allowed in choices().items():
        value = getattr(current, key)
        if value not in allowed:
            raise ValueError(f"inductor_moe.config.{key}={value!r}; allowed: {allowed}")


install_config_module(sys.modules[__name__])
