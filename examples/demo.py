"""Demo: a small MoE language model, eager vs ``torch.compile(backend="inductor_moe")``.

Prints what the backend matched and how it lowered it, the error against eager, and timings.
Runs on the GPU if there is one, else on the CPU.   python -m examples.demo
"""

import statistics
import time

import torch

import inductor_moe
from examples.moe_model import TinyMoELM


def median_ms(fn, warmup=3, iters=20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = TinyMoELM(vocab=1000, hidden=512, intermediate=1024, num_experts=8, top_k=2, layers=2)
    model = model.to(device=device, dtype=dtype).eval()
    tokens = torch.randint(0, 1000, (4, 64), device=device)
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, dtype: {dtype}, "
          f"torch {torch.__version__}")

    with torch.no_grad():
        eager_out = model(tokens)
        compiled = torch.compile(model, backend="inductor_moe")
        with inductor_moe.report() as r:
            out = compiled(tokens)
        print(r.summary())
        err = ((out.float() - eager_out.float()).norm() / eager_out.float().norm()).item()
        print(f"relative error vs eager: {err:.2e}")

        inductor = torch.compile(model, backend="inductor")
        inductor(tokens)
        rows = [("eager", median_ms(lambda: model(tokens))),
                ("torch.compile (inductor)", median_ms(lambda: inductor(tokens))),
                ("torch.compile (inductor_moe)", median_ms(lambda: compiled(tokens)))]
    print(f"\n{'':30s} median ms for {tokens.numel()} tokens")
    for name, ms in rows:
        print(f"{name:30s} {ms:8.3f}")


if __name__ == "__main__":
    main()
