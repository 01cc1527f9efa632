"""What the backend did, and why it left things alone.

``with inductor_moe.report() as r:`` collects every rewrite (``r.matches``) and every
candidate region left to Inductor (``r.skipped``) while compiling inside the block.  The same
events go to the ``inductor_moe`` logger (``TORCH_LOGS="+inductor_moe"``).

Inductor's FX graph cache skips our passes on a hit, so a report turns that cache off for
compiles inside its block: every pass runs and reports.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass, field
from typing import Iterator

log = logging.getLogger("inductor_moe")

_active: list["Report"] = []
_warned: set[str] = set()


@dataclass(frozen=True)
class Match:
    kind: str  # "moe" or "fp4_gemm"
    pattern: str  # the idiom that matched, e.g. "modulelist_loop", "hf_grouped_mm"
    lowering: str  # what runs it, e.g. "triton_fused_pdl", "reference (cpu)"
    detail: str = ""  # shapes and spec, for people
    source: tuple = field(default=(), compare=False, repr=False)  # (graph id, node name) of the call emitted

    def __str__(self):
        return f"{self.kind}: {self.pattern} -> {self.lowering}" + (f" [{self.detail}]" if self.detail else "")


@dataclass(frozen=True)
class Skip:
    kind: str  # "moe" or "fp4_gemm"
    pattern: str  # the idiom that was tried
    reason: str  # why the region was left to Inductor, and what the user can do

    def __str__(self):
        return f"{self.kind}: {self.pattern} skipped: {self.reason}"


@dataclass
class Report:
    matches: list[Match] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"inductor_moe: {len(self.matches)} rewritten, {len(self.skipped)} left to Inductor"]
        lines += [f"  + {m}" for m in self.matches]
        lines += [f"  - {s}" for s in self.skipped]
        return "\n".join(lines)


@contextlib.contextmanager
def report() -> Iterator[Report]:
    """Collect what the backend matched and skipped while compiling inside this block."""
    import torch._inductor.config as inductor_config

    current = Report()
    _active.append(current)
    try:
        with inductor_config.patch(fx_graph_cache=False):
            yield current
    finally:
        _active.remove(current)


def record_match(kind: str, pattern: str, lowering: str, detail: str = "", source: tuple = ()) -> None:
    match = Match(kind, pattern, lowering, detail, source)
    log.info("%s", match)
    for r in _active:
        r.matches.append(match)


def absorb_matches(sources: set) -> int:
    """Drop the matches whose emitted calls a later rewrite fused into its own (e.g. an MoE loop's
    per-expert FP4 GEMMs): the report lists what runs.  Returns how many were dropped."""
    dropped = 0
    for r in _active:
        kept = [m for m in r.matches if not (m.source and m.source in sources)]
        dropped = max(dropped, len(r.matches) - len(kept))
        r.matches[:] = kept
    if dropped:
        log.info("%d matches fused into a later rewrite", dropped)
    return dropped


def record_skip(kind: str, pattern: str, reason: str) -> None:
    """Record a region left to Inductor; warns once per reason when the fallback policy says so."""
    from . import config

    skip = Skip(kind, pattern, reason)
    log.info("%s", skip)
    for r in _active:
        r.skipped.append(skip)
    if config.fallback == "raise":
        raise FallbackError(str(skip))
    if config.fallback == "warn" and str(skip) not in _warned:
        _warned.add(str(skip))
        warnings.warn(f"inductor_moe: {skip}", stacklevel=2)


def record_runtime_fallback(kind: str, reason: str) -> None:
    """A kernel handing a call to the reference op at run time.  Recorded and warned like a
    skip, but never raised: raising inside compiled code would crash the user's model (the
    compile-time report already named the reference as the lowering)."""
    skip = Skip(kind, "lowering", reason)
    log.info("%s", skip)
    for r in _active:
        r.skipped.append(skip)
    from . import config

    if config.fallback == "warn" and str(skip) not in _warned:
        _warned.add(str(skip))
        warnings.warn(f"inductor_moe: {skip}", stacklevel=2)


class FallbackError(RuntimeError):
    """Raised instead of falling back when ``config.fallback == "raise"``."""
