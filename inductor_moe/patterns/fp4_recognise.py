"""Recognising an FP4 dequantisation by what it computes, not how it is spelled.

Shared by ``fp4_dequant_matmul`` (2-D and bmm weights -> ``block_scaled_mm``) and
``fp4_experts`` (3-D expert stacks -> ``moe_experts``).  A weight operand that depends on graph
inputs only (``fp4_common.weight_subgraph``) is evaluated on random probe bytes and scales; it is
an FP4 dequantisation if that reproduces ``formats.dequantize_mxfp4`` / ``dequantize_nvfp4`` of
the same bytes (low nibble first, or high nibble first).

Expert stacks are large (gpt-oss-20b's w13 holds 5.3e8 values), too large to evaluate whole at
compile time.  When the subgraph treats the leading (expert) dimension uniformly -- every tensor
it computes keeps a leading dimension that is a multiple of E, and dim-0 slices are whole -- it
is evaluated on ``PROBE_EXPERTS`` experts instead: each shape argument's leading size is scaled
down and every intermediate's shape is checked against the scaled-down fake shape.  Anything
that does not reduce cleanly is evaluated whole (up to ``MAX_PROBE_ELEMENTS``) or rejected.
Results are cached by the subgraph's structure, so the layers of a model are probed once.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from .. import formats
from .common import RegionRejected, aten, is_op, val
from .fp4_common import WeightSubgraph, evaluate, weight_subgraph

MAX_PROBE_ELEMENTS = 1 << 27  # weights above this many values are not evaluated whole at compile time
PROBE_EXPERTS = 2  # experts a uniform expert-stack dequantisation is evaluated on
MAX_SIGNATURE_CONSTANT = 1 << 16  # elements; larger get_attr constants make a subgraph uncacheable
MAX_CACHED = 1024  # identification results kept (one per distinct dequantisation structure)
PACKED_DTYPES = (torch.uint8, torch.float4_e2m1fn_x2)
E8M0 = (torch.float8_e8m0fnu, torch.uint8)

_cache: dict = {}
# ops a dequantisation never runs: a subgraph holding one computes activations, not a weight
_NOT_DEQUANTISATION = tuple(op for op in (aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.convolution, aten.topk,
                                          aten.sort, aten.embedding, getattr(aten, "_grouped_mm", None))
                            if op is not None)


@dataclass(frozen=True)
class Identified:
    """What a dequantisation subgraph reads and computes."""

    fmt: str  # "mxfp4" / "nvfp4"
    high_nibble_first: bool
    packed: fx.Node  # uint8 / float4_e2m1fn_x2 bytes, two e2m1 per byte
    scale: fx.Node  # block scales: e8m0 (or its uint8 bytes) per 32, or e4m3 per 16
    global_scale: Optional[fx.Node]  # nvfp4: fp32, one element (or one per batch / expert)
    scale_swizzled: bool = False  # scales stored in the padded 128x4 layout (2-D weights only)


def fp4_weight_subgraph(operand) -> Optional[WeightSubgraph]:
    """The subgraph computing ``operand`` if it depends on graph inputs only, reads a packed FP4
    byte tensor and multiplies no matrices (a cheap structural test; ``identify`` proves what it
    computes).  The last rule keeps activations out: with static shapes, a later layer's
    activations also depend on graph inputs only, among them an earlier layer's FP4 bytes."""
    if not isinstance(operand, fx.Node):
        return None
    sub = weight_subgraph(operand)
    if sub is None or not sub.nodes:
        return None
    if not any(val(l) is not None and val(l).dtype in PACKED_DTYPES for l in sub.leaves):
        return None
    if any(is_op(n, *_NOT_DEQUANTISATION) or str(n.target).startswith(("inductor_moe.", "transformers."))
           for n in sub.nodes):
        return None
    return sub


def _swizzled_numel(rows: int, cols: int) -> int:
    return -(-rows // 128) * 128 * -(-cols // 4) * 4


def _probe_inputs(packed, scale, glob, fmt, shrink=None):
    """Random bytes and scales for the probe; ``shrink(node) -> shape`` sizes the batched leaves."""
    g = torch.Generator().manual_seed(1234)
    shape = (lambda n: tuple(val(n).shape)) if shrink is None else shrink
    pv, sv = val(packed), val(scale)
    p = torch.randint(0, 256, shape(packed), dtype=torch.uint8, generator=g).view(pv.dtype)
    if fmt == "mxfp4":  # scales 2^-9 .. 2^3: no overflow or subnormals on any path
        s = torch.randint(118, 131, shape(scale), dtype=torch.uint8, generator=g).view(sv.dtype)
    else:
        s = (torch.rand(shape(scale), generator=g) * 3.5 + 0.25).to(torch.float8_e4m3fn)
    inputs = {packed: p, scale: s}
    if glob is not None:
        per_expert = val(glob).numel() > 1
        gs = torch.rand(shape(glob), generator=g) * 0.5 + 0.25 if per_expert else torch.full(shape(glob), 0.375)
        inputs[glob] = gs.to(val(glob).dtype)
    return inputs


def _expected(fmt, p_bytes, s, g, n, k, batch, swizzled=False):
    lead = (batch,) if batch else ()
    if swizzled:
        from ..ops.linear_quantized import unswizzle_128x4

        s = unswizzle_128x4(s, n, k // (formats.MX_BLOCK if fmt == "mxfp4" else formats.NV_BLOCK))
    s = s.reshape(*lead, n, -1)
    if fmt == "mxfp4":
        return formats.dequantize_mxfp4(p_bytes, s)
    if g is None:
        gs = torch.ones(())
    else:
        gs = g.reshape(()).float() if g.numel() == 1 else g.reshape(batch).float()
    return formats.dequantize_nvfp4(p_bytes, s, gs)


# ------------------------------------------------------------------ probing on fewer experts


class _NotReducible(Exception):
    pass


def _rows(node) -> Optional[tuple]:
    """(rank, leading size) of a tensor node, None for scalars and non-tensors."""
    v = val(node)
    return (v.dim(), v.shape[0]) if v is not None and v.dim() > 0 else None


class _ExpertSlice:
    """Evaluate a subgraph on the first ``keep`` of its ``batch`` experts (see the module doc)."""

    def __init__(self, sub: WeightSubgraph, batched_leaves, batch: int, keep: int):
        self.batch, self.keep = batch, keep
        self.batched = self._mark(sub, set(batched_leaves))

    def _mark(self, sub, batched):
        """Nodes carrying the expert dimension: those computed from a batched leaf, and those
        combined with such a tensor row for row (an ``empty`` buffer the dequantised values are
        scattered into), back to the factory that made them."""
        inside = set(sub.nodes)
        changed = True
        while changed:
            changed = False
            for n in sub.nodes:
                if n in batched:
                    continue
                if any(i in batched for i in n.all_input_nodes):
                    batched.add(n)
                    changed = True
                elif self._row_aligned(n, batched, inside):
                    changed = True
                    stack = [n]
                    while stack:  # whatever made this buffer, row for row, must shrink with it
                        m = stack.pop()
                        if m in batched:
                            continue
                        if m.op != "call_function":
                            raise _NotReducible(f"{m.name} is a full-size input aligned with the experts")
                        batched.add(m)
                        stack.extend(i for i in m.all_input_nodes if _rows(i) == _rows(m))
        for n in batched:
            v = val(n)
            if v is None or v.dim() == 0 or v.shape[0] % self.batch or v.shape[0] == 0:
                raise _NotReducible(f"{n.name} has no leading dimension over the experts")
        return batched

    @staticmethod
    def _row_aligned(n, batched, inside) -> bool:
        """``n`` meets a batched tensor of its rank and leading size in one of its users."""
        rows = _rows(n)
        return rows is not None and any(i is not n and i in batched and _rows(i) == rows
                                        for u in n.users if u in inside for i in u.all_input_nodes)

    def shape(self, node) -> tuple:
        full = tuple(val(node).shape)
        if node not in self.batched:
            return full
        return (full[0] * self.keep // self.batch, *full[1:])

    def transform(self, node, args, kwargs):
        if node not in self.batched:
            return args, kwargs
        if is_op(node, aten.slice, aten.slice_scatter):
            args = list(args)
            d = 1 if is_op(node, aten.slice) else 2
            dim = args[d] if len(args) > d else kwargs.get("dim", 0)
            if dim % val(node).dim() == 0:
                start, end, step = (list(args[d + 1:]) + [None, None, 1])[:3]
                full = val(node.args[0]).shape[0]
                if start not in (None, 0) or step != 1 or not (end is None or end >= full):
                    raise _NotReducible(f"{node.name} slices part of the expert dimension")
                args = (args + [None] * 3)[:d + 1] + [0, sys.maxsize, 1]
            return tuple(args), kwargs
        full, reduced = val(node).shape[0], self.shape(node)[0]

        def shrink(a):
            if isinstance(a, (list, tuple)) and a and all(type(x) is int for x in a) \
                    and len(a) == val(node).dim() and a[0] == full:
                return type(a)([reduced, *a[1:]])
            return a

        done = False
        new_args = []
        for a in args:  # only the first shape list (empty_strided's strides follow its sizes)
            b = a if done else shrink(a)
            done = done or b is not a
            new_args.append(b)
        new_kwargs = {key: (v if done else shrink(v)) for key, v in kwargs.items()}
        return tuple(new_args), new_kwargs

    def check(self, node, value):
        if isinstance(value, torch.Tensor) and tuple(value.shape) != self.shape(node):
            raise _NotReducible(f"{node.name} is {tuple(value.shape)} on {self.keep} experts, "
                                f"not {self.shape(node)}")


# ------------------------------------------------------------------------------ identification


def _signature(sub: WeightSubgraph, graph: fx.Graph, key: tuple) -> Optional[str]:
    """A structural key: the same ops, arguments, shapes and constants give the same result."""
    index = {n: f"l{i}" for i, n in enumerate(sub.leaves)}
    index.update({n: f"n{i}" for i, n in enumerate(sub.nodes)})
    h = hashlib.sha256(repr(key).encode())
    module = graph.owning_module
    for leaf in sub.leaves:
        v = val(leaf)
        h.update(f"{leaf.op}:{tuple(v.shape) if v is not None else None}:{v.dtype if v is not None else None}".encode())
        if leaf.op == "get_attr":
            obj = module
            for part in leaf.target.split("."):
                obj = getattr(obj, part, None)
            if not isinstance(obj, torch.Tensor) or obj.numel() > MAX_SIGNATURE_CONSTANT:
                return None
            h.update(obj.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    for n in sub.nodes:
        norm = fx.node.map_arg((n.args, n.kwargs), lambda a: index.get(a, "?"))
        v = n.meta.get("val")
        h.update(f"{n.target}:{norm}:{getattr(v, 'shape', None)}:{getattr(v, 'dtype', None)}".encode())
    return h.hexdigest()


def identify(sub: WeightSubgraph, graph: fx.Graph, n: int, k: int, batch: int, *, k_last: bool = False,
             batch_global: bool = False) -> Identified:
    """Which leaf is what, and which FP4 format and nibble order the subgraph computes.

    The operand is ``[batch?, K, N]`` (what ``x @ w`` reads), or ``[batch?, N, K]`` with ``k_last``.
    ``batch_global``: an NVFP4 global scale may hold one value per batch (per expert)."""
    key = (n, k, batch, k_last, batch_global)
    sig = _signature(sub, graph, key)
    if sig is not None and sig in _cache:
        kind, payload = _cache[sig]
        if kind == "rejected":
            raise RegionRejected(payload)
        fmt, high, ip, isc, ig, swz = payload
        return Identified(fmt, high, sub.leaves[ip], sub.leaves[isc], None if ig is None else sub.leaves[ig], swz)
    if len(_cache) >= MAX_CACHED:
        _cache.clear()
    try:
        found = _identify(sub, graph, n, k, batch, k_last, batch_global)
    except RegionRejected as e:
        if sig is not None:
            _cache[sig] = ("rejected", str(e))
        raise
    if sig is not None:
        pos = sub.leaves.index
        _cache[sig] = ("ok", (found.fmt, found.high_nibble_first, pos(found.packed), pos(found.scale),
                              None if found.global_scale is None else pos(found.global_scale), found.scale_swizzled))
    return found


def _identify(sub, graph, n, k, batch, k_last, batch_global) -> Identified:
    count = max(batch, 1) * n
    packed = [l for l in sub.leaves if val(l) is not None and val(l).dtype in PACKED_DTYPES
              and val(l).numel() == count * k // 2]
    if len(packed) != 1:
        raise RegionRejected(f"expected one packed FP4 weight of {count * k // 2} bytes among the weight's inputs")
    packed = packed[0]
    rest = [l for l in sub.leaves if l is not packed]
    candidates = []
    for s in rest:
        sv = val(s)
        if sv is None:
            continue
        for fmt, dtypes, block in (("mxfp4", E8M0, formats.MX_BLOCK),
                                   ("nvfp4", (torch.float8_e4m3fn,), formats.NV_BLOCK)):
            if sv.dtype not in dtypes:
                continue
            if sv.numel() * block == count * k:
                candidates.append((fmt, s, False))
            if not batch and k % block == 0 and sv.numel() == _swizzled_numel(n, k // block):
                candidates.append((fmt, s, True))
    if not candidates:
        raise RegionRejected("no block-scale input of the expected size (e8m0 per 32 or e4m3 per 16 along K)")
    if k % formats.MX_BLOCK and all(c[0] == "mxfp4" for c in candidates):
        raise RegionRejected(f"K={k} is not a multiple of the mxfp4 block 32")
    if not val(packed).is_contiguous():
        raise RegionRejected(f"packed FP4 weight {packed.name} is not contiguous; call .contiguous() once at load")
    unknown = None
    for fmt, scale, swizzled in candidates:
        if fmt == "mxfp4" and k % formats.MX_BLOCK:
            continue
        others = [l for l in rest if l is not scale and l.op == "placeholder"]
        glob = None
        if fmt == "nvfp4" and others:
            glob, gv = others[0], val(others[0])
            sizes = (1, batch) if batch_global and batch else (1,)
            if len(others) > 1 or gv is None or gv.numel() not in sizes or gv.dtype != torch.float32:
                unknown = next(o for o in others if o is not glob or gv is None or gv.numel() not in sizes)
                continue
        elif others:
            unknown = others[0]
            continue
        for high in _probe(sub, graph, packed, scale, glob, fmt, n, k, batch, k_last, swizzled):
            return Identified(fmt, high, packed, scale, glob, swizzled)
    if unknown is not None:
        uv = val(unknown)
        raise RegionRejected(f"the dequantisation also reads graph input {unknown.name} "
                             f"({uv.dtype if uv is not None else '?'}{list(uv.shape) if uv is not None else ''}), "
                             "whose values are unknown at compile time; build lookup tables inline "
                             "(torch.tensor(...) in forward) so they are constants")
    raise RegionRejected("the weight subgraph reads FP4 bytes and block scales but does not compute an "
                         "MXFP4/NVFP4 dequantisation this pass knows (checked on probe values)")


def _probe(sub, graph, packed, scale, glob, fmt, n, k, batch, k_last, swizzled):
    """The nibble orders (a list of at most one) under which the subgraph computes ``fmt``."""
    attempts = []
    if batch > PROBE_EXPERTS:
        leaves = [packed, scale] + ([glob] if glob is not None and val(glob).numel() == batch else [])
        if all(val(l).shape[0] % batch == 0 for l in leaves):
            try:
                attempts.append((_ExpertSlice(sub, leaves, batch, PROBE_EXPERTS), PROBE_EXPERTS))
            except _NotReducible:
                pass
    attempts.append((None, batch))
    reduced_ran = False
    for shrink, b in attempts:
        if shrink is None and max(batch, 1) * n * k > MAX_PROBE_ELEMENTS:
            if reduced_ran:  # probed on a few experts, and it is not FP4
                return []
            raise RegionRejected(f"weight of {max(batch, 1) * n * k} values is too large to verify by probing at "
                                 f"compile time (limit {MAX_PROBE_ELEMENTS}), and its dequantisation does not treat "
                                 "the expert dimension uniformly (so it cannot be probed on a few experts)")
        inputs = _probe_inputs(packed, scale, glob, fmt, shrink.shape if shrink else None)
        try:
            got = evaluate(sub, inputs, graph, transform=shrink.transform if shrink else None,
                           check=shrink.check if shrink else None).float()
        except _NotReducible:
            continue
        except RegionRejected:
            raise
        except Exception as e:  # noqa: BLE001 - an op we cannot run on the CPU: not our idiom
            if shrink is not None:
                continue
            raise RegionRejected(f"cannot evaluate the weight subgraph on probe values ({type(e).__name__})")
        reduced_ran = shrink is not None
        if not k_last:
            got = got.transpose(-1, -2)  # operand is W^T: [.., K, N] -> [.., N, K]
        lead = (b,) if batch else ()
        p_bytes = inputs[packed].view(torch.uint8).reshape(*lead, n, k // 2)
        for high in (False, True):
            bytes_ = ((p_bytes << 4) | (p_bytes >> 4)) if high else p_bytes
            want = _expected(fmt, bytes_, inputs[scale].reshape(-1), inputs.get(glob), n, k, b, swizzled)
            if got.shape == want.shape and torch.allclose(got, want, rtol=1e-2, atol=0.0, equal_nan=True):
                return [high]
    return []
