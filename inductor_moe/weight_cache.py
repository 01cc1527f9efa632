"""Derived weights (stacked, re-laid-out, quantised) computed once and reused.

An entry is keyed on the source tensors' data pointers (and the first one's shape) and remembers
their version counters and weak references to their storages.  An in-place update of a parameter
(``_version`` bump) or a storage freed and its address reused (``param.data = ...``,
``model.cpu().cuda()``, another model loaded: a dead weak reference) rebuilds the entry in place;
a miss also drops the entries whose storages died.  Inference tensors (made under
``torch.inference_mode``) have no version counter: an in-place update of one is not seen (as with
Inductor's freezing); replace such a weight (new storage) instead.

The hit path makes no Python object per source (an ``nn.ModuleList`` MoE layer hands its 3E, FP4:
9E, per-expert tensors on every call): data pointers, versions, and the storages' liveness read
through ``UntypedStorage._expired`` on the weak references' handles.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.multiprocessing.reductions import StorageWeakRef

_expired = torch.UntypedStorage._expired


class _Entry:
    __slots__ = ("versions", "refs", "handles", "value")

    def __init__(self, versions: tuple, sources: Sequence[torch.Tensor], value: object):
        self.versions, self.value = versions, value
        self.refs = [StorageWeakRef(t.untyped_storage()) for t in sources]  # keep the handles valid
        self.handles = [r.cdata for r in self.refs]

    def alive(self) -> bool:
        return not any(map(_expired, self.handles))


_cache: dict[tuple, _Entry] = {}


def _versions(sources: Sequence[torch.Tensor]) -> tuple:
    try:
        return tuple(t._version for t in sources)
    except RuntimeError:  # inference tensors have no version counter
        return tuple(-1 if t.is_inference() else t._version for t in sources)


def _key(tag: str, sources: Sequence[torch.Tensor]) -> tuple:
    return (tag, tuple(t.data_ptr() for t in sources), tuple(sources[0].shape) if sources else ())


def cached(tag: str, sources: Sequence[torch.Tensor], build: Callable[[], object]):
    """Return ``build()``, computed once per (tag, sources, their storages and versions)."""
    key = _key(tag, sources)
    versions = _versions(sources)
    hit = _cache.get(key)
    if hit is not None and hit.versions == versions and hit.alive():
        return hit.value
    for stale in [k for k, e in _cache.items() if not e.alive()]:
        del _cache[stale]
    entry = _cache[key] = _Entry(versions, sources, build())
    return entry.value


def lookup(tag: str, sources: Sequence[torch.Tensor]):
    """What ``cached`` holds for (tag, sources) as they are now, else None; builds nothing (for a
    value whose build cannot run now, e.g. a host read during CUDA-graph capture)."""
    hit = _cache.get(_key(tag, sources))
    if hit is not None and hit.versions == _versions(sources) and hit.alive():
        return hit.value
    return None


def clear() -> None:
    _cache.clear()


def size() -> int:
    return len(_cache)
