"""Derived weights (stacked, re-laid-out, quantised) computed once and reused.

An entry is keyed on the source tensors' data pointers (and the first one's shape) and remembers
their version counters.  An in-place update of a parameter (``_version`` bump) rebuilds the entry
in place; when a source's base tensor (the parameter or buffer a view reads) is garbage collected,
a finalizer drops every entry built from it, so an address freed and reused by another model
never hits a stale entry.  Inference tensors (made under ``torch.inference_mode``) have no version
counter: an in-place update of one is not seen (as with Inductor's freezing); replace such a
weight (new storage) instead.  The hit path reads two attributes per source and allocates nothing:
an ``nn.ModuleList`` MoE layer hands its 3E (FP4: 9E) per-expert tensors on every call.
"""

from __future__ import annotations

import weakref
from typing import Callable, Sequence

import torch


class _Entry:
    __slots__ = ("versions", "value", "__weakref__")

    def __init__(self, versions: tuple, value: object):
        self.versions, self.value = versions, value


_cache: dict[tuple, _Entry] = {}


def _key(tag: str, sources: Sequence[torch.Tensor]) -> tuple:
    return (tag, tuple(t.data_ptr() for t in sources), tuple(sources[0].shape) if sources else ())


def _drop(key: tuple, entry_ref: "weakref.ref[_Entry]") -> None:
    entry = entry_ref()
    if entry is not None and _cache.get(key) is entry:
        del _cache[key]


def cached(tag: str, sources: Sequence[torch.Tensor], build: Callable[[], object]):
    """Return ``build()``, computed once per (tag, sources and their versions)."""
    key = _key(tag, sources)
    try:
        versions = tuple(t._version for t in sources)
    except RuntimeError:  # inference tensors have no version counter
        versions = tuple(-1 if t.is_inference() else t._version for t in sources)
    hit = _cache.get(key)
    if hit is not None and hit.versions == versions:
        return hit.value
    entry = _Entry(versions, build())
    _cache[key] = entry
    bases = {id(b): b for b in (t if t._base is None else t._base for t in sources)}
    for base in bases.values():
        weakref.finalize(base, _drop, key, weakref.ref(entry))
    return entry.value


def clear() -> None:
    _cache.clear()


def size() -> int:
    return len(_cache)
