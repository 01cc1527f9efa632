"""One call of each FP4 decode kernel, for a hardware-counter profiler (Nsight Compute).

    ncu --profile-from-start off --clock-control none --section WarpStateStats ... \
        python -m benchmarks.profile_fp4 [--points qwen3-30b-a3b:1:mxfp4,...] [--gemm 4096x4096:1,...]
    python -m benchmarks.profile_fp4 --time ...   (no profiler: CUDA-graph replay median per point,
                                                  and each kernel's device time)

A point's format "tk" runs OpenAI triton_kernels' MXFP4 layer on the same inputs (its kernels are
matched by scripts/gpu_check.sh ncu too), so both sides' kernels are profiled in one run.

Every kernel is compiled and run once before the profiled region (cudaProfilerStart/Stop), so
the profiler sees exactly one launch per kernel of each point and none of the compilation.
Why: the FP4 decode kernels issue at a low rate (benchmarks/NOTES_fp4.md); the stall reasons
say whether that is memory latency, dependency chains, barriers or too few warps.
"""

from __future__ import annotations

import argparse

import torch

from inductor_moe.spec import GemmSpec, MoESpec

from .fp4_gemm import quantized_weight
from .moe import LAYERS, quantized_layer, sweep_inputs


def moe_call(name: str, T: int, fmt: str):
    from inductor_moe.lowering.moe import fused_moe_experts

    E, k, H, I = LAYERS[name]
    x, ids, tw, w13, w2 = sweep_inputs(T, E, k, H, I)
    if fmt == "tk":
        from . import tk_baseline

        return tk_baseline.make_layer(x, ids, tw, tk_baseline.prepare_weights(w13, w2, "mxfp4"))
    q13, q2, kw = quantized_layer(fmt, w13, w2)
    spec = MoESpec(weight_format=fmt)
    return lambda: fused_moe_experts(x, ids, tw, q13, q2, spec, **kw)


def gemm_call(n: int, k: int, m: int, fmt: str):
    from inductor_moe.templates.block_scaled_gemm import block_scaled_gemm

    q, s, g = quantized_weight(fmt, torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    spec = GemmSpec(b_format=fmt)
    return lambda: block_scaled_gemm(x, q, s, spec, global_scale=g, use_pdl=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", default="qwen3-30b-a3b:1:mxfp4,gpt-oss-120b:1:mxfp4,qwen3-30b-a3b:128:mxfp4",
                   help="layer:T:format, comma separated")
    p.add_argument("--gemm", default="4096x4096:1:mxfp4,4096x4096:16:mxfp4", help="NxK:M:format, comma separated")
    p.add_argument("--time", action="store_true", help="print each point's graph-replay median, no profiling")
    args = p.parse_args(argv)
    calls = []
    for pt in filter(None, args.points.split(",")):
        name, T, fmt = pt.split(":")
        calls.append((pt, moe_call(name, int(T), fmt)))
    for pt in filter(None, args.gemm.split(",")):
        nk, m, fmt = pt.split(":")
        n, k = (int(v) for v in nk.split("x"))
        calls.append((pt, gemm_call(n, k, int(m), fmt)))
    if args.time:
        from .timing import graph_time_us, kernel_times_by_name

        for pt, fn in calls:
            split = " ".join(f"{n[:48]}={us:.1f}" for n, us in kernel_times_by_name(fn, 5).items())
            print(f"time {pt} {graph_time_us(fn):.1f} us | {split}", flush=True)
        return 0
    calls = [fn for _, fn in calls]
    for fn in calls:  # compile and warm up outside the profiled region
        fn()
        fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for fn in calls:
        fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
