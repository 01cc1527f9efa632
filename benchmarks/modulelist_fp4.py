"""An ``nn.ModuleList`` MoE layer with NVFP4 expert linears dequantised in forward (the way a
compressed-tensors / ModelOpt checkpoint runs without a kernel), Mixtral-8x7B-shaped by default.

    python -m benchmarks.modulelist_fp4 [--tokens 1,16,128,1024] [--hidden 4096 --inter 14336 --experts 8]

Columns, µs per layer call (median):
* inductor: ``torch.compile`` as is: every call dequantises all 3E weights to bf16, then the loop;
* per-linear FP4: our backend with MoE fusion off: each expert linear a ``block_scaled_mm``;
* ours: the whole loop fused into one MoE op on the packed weights.
The unfused loops keep ``nonzero`` (a host sync per expert), so they cannot be captured in a CUDA
graph: all three are timed as eager launches (``sync_time_us``); "ours (graph)" is our layer as
CUDA-graph replays (``timing.graph_time_us``), which only the fused form allows.
"""

from __future__ import annotations

import argparse

import torch

from examples.moe_model import MoEBlock, with_nvfp4_experts

from .timing import graph_time_us, sync_time_us


def main(argv=None) -> int:
    import inductor_moe

    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="1,16,128,1024")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--inter", type=int, default=14336)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    with torch.device("cuda"):
        block = MoEBlock(args.hidden, args.inter, args.experts, args.top_k).to(torch.bfloat16)
    block = with_nvfp4_experts(block).eval()
    variants = {}
    with torch.no_grad():
        for name, options in (("inductor", None), ("per-linear FP4", {"moe_rewrite": False}), ("ours", {})):
            torch._dynamo.reset()
            if options is None:
                variants[name] = torch.compile(block, backend="inductor")
            else:
                with inductor_moe.report() as r:
                    variants[name] = torch.compile(block, backend="inductor_moe", options=options)
                    variants[name](torch.randn(4, args.hidden, device="cuda", dtype=torch.bfloat16))
                print(f"{name}: {r.summary().splitlines()[0]}; " + "; ".join(str(m) for m in r.matches if m.kind == "moe"))
        import triton

        print(f"\nMoE layer E={args.experts} k={args.top_k} H={args.hidden} I={args.inter}, NVFP4 expert linears, "
              f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
        print("| T | inductor | per-linear FP4 | ours | ours (graph) | ours vs inductor | ours vs per-linear |")
        print("|---|---|---|---|---|---|---|")
        for T in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(T, args.hidden, device="cuda", dtype=torch.bfloat16)
            t = {name: sync_time_us(lambda f=f: f(x)) for name, f in variants.items()}
            g = graph_time_us(lambda: variants["ours"](x))
            print(f"| {T} | {t['inductor']:.0f} | {t['per-linear FP4']:.0f} | {t['ours']:.0f} | {g:.0f} | "
                  f"{t['inductor'] / t['ours']:.1f}x | {t['per-linear FP4'] / t['ours']:.1f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
