"""Helpers for tests: compile through the backend and print the rewritten regions in a
normalised form that does not churn across torch versions (no node names, no symbol
numbering, no decomposition details; just our canonical calls and what flows into them); and
count which kernels a call launched."""

from __future__ import annotations

import contextlib
import re
from typing import Callable

import torch
import torch.fx as fx

_OUR_NAMESPACE = "inductor_moe"


def _describe(arg) -> str:
    if isinstance(arg, fx.Node):
        v = arg.meta.get("val")
        if isinstance(v, torch.Tensor):
            shape = ",".join(re.sub(r"\b[su]\d+\b", "T", str(d)) for d in v.shape)
            dtype = str(v.dtype).replace("torch.", "")
            return f"{dtype}[{shape}]"
        return "sym"
    if isinstance(arg, (list, tuple)):
        if not arg:
            return "[]"
        runs: list[list] = []  # run-length groups keep per-expert lists short: "10 x f32[32] + 5 x f32[64]"
        for part in (_describe(a) for a in arg):
            if runs and runs[-1][1] == part:
                runs[-1][0] += 1
            else:
                runs.append([1, part])
        return " + ".join(f"{n} x {p}" for n, p in runs)
    if isinstance(arg, str):
        return repr(arg)
    return str(arg)


def format_rewrites(graph: fx.Graph) -> str:
    """One line per canonical op call: ``op(arg=dtype[shape], ..., spec='...')``."""
    lines = []
    for node in graph.nodes:
        if node.op != "call_function" or not str(node.target).startswith(_OUR_NAMESPACE + "."):
            continue
        schema = node.target._schema
        args = []
        for i, formal in enumerate(schema.arguments):
            if i < len(node.args):
                value = node.args[i]
            elif formal.name in node.kwargs:
                value = node.kwargs[formal.name]
            else:
                continue
            if value is None:
                continue
            args.append(f"{formal.name}={_describe(value)}")
        name = str(node.target).split(".")[1]
        lines.append(f"{name}(" + ", ".join(args) + ")")
    return "\n".join(lines)


def compile_and_capture(model: Callable, *inputs, **compile_kwargs) -> tuple[object, list[str]]:
    """Run ``torch.compile(model, backend="inductor_moe")`` on ``inputs``; return the output and
    the normalised rewrites of every graph compiled (one string per graph)."""
    import torch._inductor.config as inductor_config

    from .passes import InductorMoEPass

    captured: list[str] = []
    original_call = InductorMoEPass.__call__

    def spy(self, graph):
        original_call(self, graph)
        captured.append(format_rewrites(graph))

    torch._dynamo.reset()
    InductorMoEPass.__call__ = spy
    try:
        with inductor_config.patch(fx_graph_cache=False):
            out = torch.compile(model, backend="inductor_moe", **compile_kwargs)(*inputs)
    finally:
        InductorMoEPass.__call__ = original_call
    return out, captured


@contextlib.contextmanager
def counting_kperm_launches():
    """Record the grid of every ``moe_kperm_kernel`` launch while active: the activations are put
    in the MMA's K order only where FP4 tiles run swapped, so tests read from it which tiles ran."""
    from .templates import moe_common

    kperm, grids = moe_common.moe_kperm_kernel, []

    class _Counting:
        def __getitem__(self, grid):
            grids.append(grid)
            return kperm[grid]

    moe_common.moe_kperm_kernel = _Counting()
    try:
        yield grids
    finally:
        moe_common.moe_kperm_kernel = kperm


@contextlib.contextmanager
def counting_weight_tma():
    """Record the (spec, block_m) of every call whose expert GEMMs read their dense weights through
    TMA descriptors (lowering/moe_tma.py) while active, so tests read which path ran."""
    from .lowering import moe as moe_lowering

    build, calls = moe_lowering.weight_tma_arguments, []

    def counting(spec, w13, w2, cfg):
        calls.append((spec, cfg.block_m))
        return build(spec, w13, w2, cfg)

    moe_lowering.weight_tma_arguments = counting
    try:
        yield calls
    finally:
        moe_lowering.weight_tma_arguments = build


@contextlib.contextmanager
def counting_ws_launches():
    """Record the max_blocks of every warp-specialised L1 and L2 launch (lowering/moe_ws.py) while
    active, as {"l1": [...], "l2": [...]}, so tests read which kernels ran."""
    from .lowering import moe as moe_lowering

    launches, calls = {"l1": moe_lowering.launch_ws_l1, "l2": moe_lowering.launch_ws_l2}, {"l1": [], "l2": []}

    def counting(which):
        def launch(*args):
            calls[which].append(args[-3])  # max_blocks: both launchers end (max_blocks, num_sms, use_pdl)
            return launches[which](*args)
        return launch

    moe_lowering.launch_ws_l1, moe_lowering.launch_ws_l2 = counting("l1"), counting("l2")
    try:
        yield calls
    finally:
        moe_lowering.launch_ws_l1, moe_lowering.launch_ws_l2 = launches["l1"], launches["l2"]
