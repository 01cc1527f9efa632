"""Our post-grad graph pass, plugged into Inductor through ``CustomGraphPass``.

Order: FP4 matmul idioms first (an MoE whose experts dequantise FP4 weights then sees the
canonical GEMMs), then MoE idioms.  The pass snapshots our config when it is created, so a
backward graph compiled later runs under the same settings, and ``uuid()`` covers both the
config and our source files, so Inductor's FX graph cache stays correct.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from . import config, patterns, report
from .patterns.common import RegionRejected

log = logging.getLogger("inductor_moe")

_SOURCES = tuple(sorted(str(p) for p in Path(__file__).parent.rglob("*.py")))


class InductorMoEPass(CustomGraphPass):
    """Rewrites MoE regions and FP4 matmuls into canonical ops; chains a user's own pass."""

    def __init__(self, settings: dict, chained: CustomGraphPass | None = None):
        self.settings = dict(settings)
        self.chained = chained

    def __call__(self, graph: fx.Graph) -> None:
        with config.patch(self.settings):
            if config.fp4_gemm_rewrite:
                run_patterns(graph, "fp4_gemm", patterns.FP4_PATTERNS)
            if config.moe_rewrite:
                run_patterns(graph, "moe", patterns.MOE_PATTERNS)
        if self.chained is not None:
            self.chained(graph)

    def uuid(self):
        chained = self.chained.uuid() if self.chained is not None else None
        return (get_hash_for_files(_SOURCES), tuple(sorted(self.settings.items())), chained)


def run_patterns(graph: fx.Graph, kind: str, names) -> int:
    """Apply each pattern module in order; a failing pattern leaves the graph as it was."""
    from .patterns.common import emit_moe

    rewritten = 0
    for module in patterns.load(names):
        name = module.__name__.rsplit(".", 1)[-1]
        try:
            candidates = module.find(graph)
        except Exception as e:  # an internal error must never fail the user's compile
            if config.fallback == "raise":
                raise
            report.record_skip(kind, name, f"internal error in pattern: {type(e).__name__}: {e}")
            continue
        for candidate in candidates:
            if isinstance(candidate, RegionRejected):
                report.record_skip(kind, name, str(candidate))
                continue
            try:
                if kind == "moe":
                    candidate = _with_config(candidate)
                    emit_moe(graph, candidate)
                else:
                    candidate(graph)
                rewritten += 1
            except RegionRejected as e:
                report.record_skip(kind, name, str(e))
            except Exception as e:
                if config.fallback == "raise":
                    raise
                report.record_skip(kind, name, f"internal error while rewriting: {type(e).__name__}: {e}")
        graph.eliminate_dead_code()
    if rewritten:
        graph.lint()
    return rewritten


def _with_config(match):
    """Apply the opt-in numeric knobs (weight / activation formats) to a matched MoE spec."""
    import dataclasses

    spec = match.spec
    if config.moe_weight_format is not None and spec.weight_format == "dense":
        spec = dataclasses.replace(spec, quantize_weights=config.moe_weight_format)
    if config.moe_act_format != "dense":
        spec = dataclasses.replace(spec, act_format=config.moe_act_format)
    match.spec = spec
    return match
