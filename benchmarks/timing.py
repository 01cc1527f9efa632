"""How every benchmark here times: CUDA-graph replays, median, per call."""

import statistics
import time

import torch


def graph_time_us(fn, reps: int = 20, inner: int = 10) -> float:
    """Median µs per call over ``reps`` replays of a CUDA graph holding ``inner`` calls of ``fn``.

    Warm-up runs on a side stream first (module load, autotuning, weight caches stay out of the
    graph and the numbers)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / inner)
    del graph
    return statistics.median(times)


def kernel_times_by_name(fn, iters: int = 10) -> dict:
    """{kernel name: device µs per call} of the kernels one call launches, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return {ev.key: (getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)) / iters
            for ev in prof.key_averages()}


def kernel_us(fn, iters: int = 10) -> float:
    """Summed device time of the kernels one call launches (µs): beside the graph time it
    separates kernel execution from launch gaps and tails."""
    return sum(kernel_times_by_name(fn, iters).values())


def sync_time_us(fn, reps: int = 20) -> float:
    """Median wall µs per call, synchronised before and after: for what cannot be captured in a
    CUDA graph (graphs that sync on the host, e.g. an unfused MoE loop's ``nonzero``)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def interleaved_stream_times_us(fns: dict, calls: int = 50, rounds: int = 9) -> dict:
    """{name: median wall µs per call} of ``calls`` back-to-back calls of each function, no CUDA
    graph, one sync per round: what a model run without graphs (eager, ``torch.compile``'s default
    mode) pays per call -- the host's launch work where it exceeds the GPU's, else the GPU's time.
    The functions' rounds are taken in turn: host timings drift with the machine's load and clocks
    from one second to the next, so contenders timed side by side compare where ones timed one
    after the other do not."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    times = {name: [] for name in fns}
    for r in range(rounds):
        order = list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]
        for name, fn in order:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) * 1e6 / calls)
    return {name: statistics.median(t) for name, t in times.items()}
