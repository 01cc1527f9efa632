"""Derived weights (stacked, re-laid-out, quantised) computed once and reused.

Keyed on each source tensor's storage and view geometry; an entry also remembers the
version counters and storage weak refs it was built from.  An in-place update of a parameter
(``_version`` bump) or a freed-and-reused address (dead weak ref) rebuilds the entry in
place, so the cache never returns stale data and holds one entry per weight set.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.multiprocessing.reductions import StorageWeakRef

_cache: dict[tuple, tuple[tuple[int, ...], list[StorageWeakRef], object]] = {}


def _geometry(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
            t.dtype, t.device)


def cached(tag: str, sources: Sequence[torch.Tensor], build: Callable[[], object]):
    """Return ``build()``, computed once per (tag, state of every source tensor)."""
    key = (tag, tuple(_geometry(t) for t in sources))
    versions = tuple(t._version for t in sources)
    hit = _cache.get(key)
    if hit is not None and hit[0] == versions and not any(ref.expired() for ref in hit[1]):
        return hit[2]
    for stale in [k for k, (_, refs, _) in _cache.items() if any(r.expired() for r in refs)]:
        del _cache[stale]
    value = build()
    _cache[key] = (versions, [StorageWeakRef(t.untyped_storage()) for t in sources], value)
    return value


def clear() -> None:
    _cache.clear()


def size() -> int:
    return len(_cache)
