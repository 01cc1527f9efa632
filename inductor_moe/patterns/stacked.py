"""Walker shared by the idioms whose experts are 3-D parameters (w13 [E, 2I, H] / [E, H, 2I],
w2 [E, H, I] / [E, I, H]), the way Hugging Face transformers v5 ``@use_experts_implementation``
and many plain-PyTorch MoE blocks hold them.

# T: tokens, H: hidden size, E: experts, k: experts per token, I: expert intermediate size,
# S = T*k: (token, slot) rows

Both idioms end in the same combine: per-(token, slot) rows, weighted, ``view(T, k, H).sum(1)``
(the weights may also multiply the ``[T, k, H]`` view).  Walking back from that ``sum``:

- ``grouped``: rows come back through an inverse permutation of ``perm = sort(ids.view(-1))``;
  both GEMMs are ``_grouped_mm`` (or Hugging Face's opaque ``transformers::grouped_mm_fallback``)
  of ``x[perm // k]`` with offsets ``cumsum(histc(ids))``;
- ``gathered``: rows stay in token order; both GEMMs are ``bmm`` (``einsum`` decomposes to it) with
  the weights gathered per row, ``w[ids.view(-1)]``, and tokens repeated k times.

Between the GEMMs the gated activation is identified numerically (``identify_packed_glu``),
which also finds the gate/up layout.  A region is accepted only if it reads nothing but x,
the top-k ids and weights and the expert weights/biases, so anything we did not model (a
scale, a norm after the experts, another tensor) leaves it to Inductor.  Expert weights
dequantised from FP4 in the graph count as the packed weights and scales they read
(``fp4_experts``): the block becomes ``moe_experts`` with ``weight_format`` mxfp4 / nvfp4.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from ..spec import MoESpec
from .activation import ActivationUnknown, identify_packed_glu
from .common import MoEMatch, RegionRejected, aten, is_op, val
from .fp4_experts import identify_experts
from .expert_gemms import (Gemm, find_shaped, gemm_ancestor, gemm_output, getitem_of, match_gemm, peel, prims,
                           same, sentinel_mask, shape_is, split_bias, strip_convert, unclamp_ids)

@dataclass
class Combine:
    """``view(rows, [T, k, H]).sum(1)``, with the routing weights applied to rows or to the view."""

    output: fx.Node  # the sum
    rows: fx.Node  # [S, H] before the view
    weights_3d: Optional[fx.Node]  # topk_weights [T, k] when they multiply the [T, k, H] view


def match_combine(node) -> Optional[Combine]:
    if not (is_op(node, aten.sum) and len(node.args) >= 2 and list(node.args[1]) in ([1], [-2])
            and not (len(node.args) > 2 and node.args[2]) and not node.kwargs.get("keepdim", False)):
        return None
    r3 = strip_convert(node.args[0])
    v3 = val(r3)
    if v3 is None or v3.dim() != 3 or not isinstance(v3.shape[1], int):
        return None
    T, k, H = v3.shape
    weights = None
    if is_op(r3, aten.mul) and len(r3.args) == 2:
        for y3, w3 in ((r3.args[0], r3.args[1]), (r3.args[1], r3.args[0])):
            w = find_shaped(w3, T, k) if shape_is(w3, T, k, 1) or shape_is(peel(w3), T, k) else None
            if w is not None and shape_is(y3, T, k, H):
                weights, r3 = w, strip_convert(y3)
                break
        else:
            return None
    if not is_op(r3, aten.view, aten.reshape, aten._unsafe_view):
        return None
    rows = r3.args[0]
    if not shape_is(rows, T * k, H):
        return None
    return Combine(node, rows, weights)


def _inverse_permutation_of(node):
    """``perm`` when ``node`` is its inverse: ``empty.index_put_([perm], arange)`` or ``argsort(perm)``."""
    if is_op(node, aten.index_put) and len(node.args[1]) == 1 and not (len(node.args) > 3 and node.args[3]):
        base, (perm,), src = node.args[0], node.args[1], node.args[2]
        if is_op(base, aten.empty, aten.zeros, aten.full, aten.new_empty, aten.new_zeros) and _is_arange(src):
            return perm
    sort = getitem_of(node, aten.sort, 1)
    if sort is not None and _ascending(sort):
        return sort.args[0]
    return None


def _ascending(sort: fx.Node) -> bool:
    """A 1-D ascending ``sort`` (any of its overloads)."""
    descending = sort.kwargs.get("descending", sort.args[2] if len(sort.args) > 2 else False)
    dim = sort.kwargs.get("dim", sort.args[1] if len(sort.args) > 1 else -1)
    return not descending and dim in (0, -1)


def _is_arange(node) -> bool:
    node = strip_convert(node)
    if is_op(node, prims.iota):
        return node.kwargs.get("start", 0) == 0 and node.kwargs.get("step", 1) == 1
    return is_op(node, aten.arange) and (len(node.args) == 1 or (node.args[0] == 0 and len(node.args) == 2))


def _sort_of_flat_ids(perm):
    """(sort node, sorted tensor) when ``perm = sort(flat)[1]`` is an ascending sort."""
    sort = getitem_of(perm, aten.sort, 1)
    if sort is None or not _ascending(sort):
        return None, None
    return sort, sort.args[0]


def _region(output: fx.Node, stop: set) -> tuple[list[fx.Node], list[fx.Node]]:
    """(tensor nodes between the region's inputs and its output, foreign tensor inputs reached)."""
    seen, foreign, stack = set(), [], [output]
    while stack:
        n = stack.pop()
        if n in seen or n in stop:
            continue
        v = n.meta.get("val")
        is_tensorish = isinstance(v, torch.Tensor) or (
            isinstance(v, (list, tuple)) and v and all(isinstance(t, torch.Tensor) for t in v))
        if not is_tensorish:
            continue  # sizes and symbols: shape bookkeeping, never part of the region
        if n.op != "call_function":
            foreign.append(n)
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return list(seen), foreign


class _Walk:
    """One candidate region, walked back from its combine."""

    def __init__(self, combine: Combine, name: str):
        self.c, self.name = combine, name
        T, k, H = val(combine.output.args[0]).shape
        self.T, self.k, self.H = T, k, H

    def reject(self, why: str):
        raise RegionRejected(why)

    def run(self) -> MoEMatch:
        c = self.c
        rows = strip_convert(c.rows)
        perm = None
        if is_op(rows, aten.index) and len(rows.args[1]) == 1:
            perm = _inverse_permutation_of(rows.args[1][0])
            if perm is not None:
                rows = strip_convert(rows.args[0])
        kind = "grouped" if perm is not None else "gathered"
        tw = c.weights_3d
        position = "after_down"
        if tw is None and is_op(rows, aten.mul) and len(rows.args) == 2:
            for y, w in ((rows.args[0], rows.args[1]), (rows.args[1], rows.args[0])):
                tw = self.row_weights(w, perm)
                if tw is not None:
                    rows = y
                    break
        y, b2, b2_ids = split_bias(rows)
        down = match_gemm(y)
        if down is None or down.kind != kind:
            self.reject("expert outputs do not come from a grouped / batched GEMM over 3-D expert weights")
        h = down.rows
        if tw is None and is_op(h, aten.mul) and len(h.args) == 2:
            for a, w in ((h.args[0], h.args[1]), (h.args[1], h.args[0])):
                tw = self.row_weights(w, perm)
                if tw is not None:
                    h, position = peel(a), "before_down"
                    break
        if tw is None:
            self.reject("the combine is not a weighted sum over the top-k (routing weights not found)")
        up = gemm_ancestor(h, self.T * self.k)
        if up is None or up.kind != kind:
            self.reject("the expert activation does not read one gate/up GEMM of the same form")
        h13, b13, b13_ids = gemm_output(up)
        try:
            act = identify_packed_glu(h13, h)
        except ActivationUnknown as e:
            self.reject(str(e))
        if up.transposed != down.transposed:
            self.reject("gate_up and down weights are stored in different orientations")
        w13, w2 = up.weight, down.weight
        x, ids = self.check_inputs(kind, up, down, perm, [i for i in (b13_ids, b2_ids) if i is not None])
        self.check_shapes(w13, w2, b13, b2, up.transposed, x)
        fp4 = None
        if up.fp4 is not None or down.fp4 is not None:  # weights dequantised from FP4 in the graph
            fp4 = identify_experts(c.output.graph, up, down, self.H)
        spec = MoESpec(transposed=up.transposed and fp4 is None, weight_position=position,
                       weight_format=fp4.fmt if fp4 is not None else "dense", **act)
        weights = [w13, w2] if fp4 is None else fp4.leaves  # a dequantisation is part of the region
        stop = {x, ids, tw, *weights, *(b for b in (b13, b2) if b is not None)}
        region, foreign = _region(c.output, stop)
        num_experts = val(w13).shape[0]
        if any(sentinel_mask(n) not in (None, num_experts) for n in region):
            self.reject(f"rows are masked by expert id >= a bound other than the {num_experts} experts")
        if foreign:
            self.reject(f"the region reads {foreign[0].name}, which is not x, the routing or an expert weight")
        return MoEMatch(pattern=self.name, output=c.output, x=x, topk_ids=ids, topk_weights=tw, spec=spec,
                        w13=w13, w2=w2, b13=b13, b2=b2, region=region, fp4=fp4)

    def row_weights(self, w, perm):
        """topk_weights [T, k] when ``w`` is its per-row view (permuted by ``perm`` if given)."""
        w = peel(w)
        if perm is not None:
            if not (is_op(w, aten.index) and len(w.args[1]) == 1 and w.args[1][0] is perm):
                return None
            w = w.args[0]
        return find_shaped(w, self.T, self.k)

    def flat_ids(self, node, num_experts=None):
        """topk_ids [T, k] when ``node`` is ``topk_ids.view(-1)`` (clamped to [0, E) if given)."""
        if num_experts is not None:
            node = unclamp_ids(node, num_experts)
        ids = find_shaped(node, self.T, self.k)
        v = val(ids)
        return ids if v is not None and v.dtype in (torch.int32, torch.int64) else None

    def check_inputs(self, kind, up: Gemm, down: Gemm, perm, bias_ids):
        """(x, topk_ids) after checking every gather and offset reads the same routing."""
        if kind == "grouped":
            sort, flat = _sort_of_flat_ids(perm)
            ids = self.flat_ids(flat) if sort is not None else None
            if ids is None:
                self.reject("rows are not sorted by topk_ids.view(-1)")
            sorted_ids = [u for u in sort.users if getitem_of(u, aten.sort, 0) is sort]
            src = peel(up.rows)
            if not (is_op(src, aten.index) and len(src.args[1]) == 1 and self.is_token_of(src.args[1][0], perm)):
                self.reject("grouped rows are not x[perm // k]")
            x = src.args[0]
            if up.offsets is not down.offsets and peel(up.offsets) is not peel(down.offsets):
                self.reject("the two grouped GEMMs use different offsets")
            self.check_offsets(up.offsets, ids, sorted_ids, val(up.weight).shape[0])
            for b in bias_ids:
                if unclamp_ids(b, val(up.weight).shape[0]) not in sorted_ids:
                    self.reject("expert biases are not gathered by the sorted expert ids")
            return x, ids
        E = val(up.weight).shape[0]
        ids = self.flat_ids(up.gather_ids, E)
        if ids is None or self.flat_ids(down.gather_ids, E) is not ids \
                or any(self.flat_ids(b, E) is not ids for b in bias_ids):
            self.reject("expert weights are not gathered by topk_ids.view(-1)")
        x = self.repeated_rows(up.rows)
        if x is None:
            self.reject("gathered rows are not x repeated top-k times (x.repeat_interleave(k, 0))")
        return x, ids

    def is_token_of(self, node, perm) -> bool:
        """``perm // k`` (floor division by the top-k)."""
        node = strip_convert(node)
        if is_op(node, aten.div) and node.kwargs.get("rounding_mode") == "floor":
            return node.args[0] is perm and node.args[1] == self.k
        if is_op(node, aten.floor_divide):
            return node.args[0] is perm and node.args[1] == self.k
        return self.k == 1 and node is perm

    def repeated_rows(self, node):
        """x when ``node`` is ``x.repeat_interleave(k, 0)``: view(expand(x[:, None], [T, k, H]))."""
        if self.k == 1 and shape_is(node, self.T, self.H):
            return node
        if is_op(node, aten.expand):
            src = node.args[0]
            if is_op(src, aten.unsqueeze) and src.args[1] == 1 and shape_is(node, self.T, self.k, self.H):
                return src.args[0] if shape_is(src.args[0], self.T, self.H) else None
        if is_op(node, aten.index) and len(node.args[1]) == 1:
            idx = strip_convert(node.args[1][0])
            if is_op(idx, aten.div) and idx.kwargs.get("rounding_mode") == "floor" and idx.args[1] == self.k \
                    and _is_arange(idx.args[0]):
                return node.args[0]
        return None

    def check_offsets(self, offsets, ids, sorted_ids, num_experts):
        """offsets = cumsum(histc(ids, bins=E, min=0, max=E-1)) (or bincount), over ids or sorted ids."""
        off = strip_convert(offsets)
        if not is_op(off, aten.cumsum) or off.args[1] not in (0, -1):
            self.reject("grouped GEMM offsets are not a cumulative sum of per-expert counts")
        counts = strip_convert(off.args[0])
        if is_op(counts, aten.histc):
            bins, lo, hi = (list(counts.args[1:]) + [100, 0, 0])[:3]
            if not (bins == num_experts and lo == 0 and hi == num_experts - 1):
                self.reject(f"expert counts use histc(bins={bins}, min={lo}, max={hi}), not the {num_experts} experts")
        elif is_op(counts, aten.bincount):
            if counts.kwargs.get("minlength", counts.args[2] if len(counts.args) > 2 else 0) != num_experts:
                self.reject("expert counts use bincount without minlength=E")
        else:
            self.reject("grouped GEMM offsets are not computed from per-expert counts (histc / bincount)")
        src = peel(counts.args[0])
        if src not in sorted_ids and self.flat_ids(src) is not ids:
            self.reject("expert counts are not taken over the top-k ids")

    def check_shapes(self, w13, w2, b13, b2, transposed, x):
        E, a, b = val(w13).shape
        H = self.H
        I2, h_in = (b, a) if transposed else (a, b)
        if not same(h_in, H) or not shape_is(x, self.T, H) or I2 % 2:
            self.reject(f"gate_up weights {tuple(val(w13).shape)} do not fit hidden size {H}")
        want = (E, I2 // 2, H) if transposed else (E, H, I2 // 2)
        if tuple(val(w2).shape) != want:
            self.reject(f"down weights {tuple(val(w2).shape)} do not match gate_up weights {tuple(val(w13).shape)}")
        if b13 is not None and tuple(val(b13).shape) != (E, I2):
            self.reject("gate_up bias has the wrong shape")
        if b2 is not None and tuple(val(b2).shape) != (E, H):
            self.reject("down bias has the wrong shape")


def find(graph: fx.Graph, kind: str, name: str) -> list:
    """Matches (and rejections of MoE-looking regions) of one ``kind``, "grouped" or "gathered"."""
    results = []
    for node in graph.nodes:
        combine = match_combine(node)
        if combine is None or _kind_hint(combine) != kind:
            continue
        try:
            results.append(_Walk(combine, name).run())
        except RegionRejected as e:
            results.append(e)
    return results


def _kind_hint(combine: Combine) -> Optional[str]:
    """Which idiom a combine belongs to, judged only by the expert GEMMs beneath it (None: not MoE)."""
    rows = val(combine.rows).shape[0]
    seen, queue = set(), collections.deque([combine.rows])
    while queue and len(seen) < 64:
        n = queue.popleft()
        if n in seen or not isinstance(n, fx.Node) or n.op != "call_function":
            continue
        seen.add(n)
        gemm = match_gemm(n) if n is peel(n) else None
        if gemm is not None:
            return gemm.kind
        v = val(n)
        if v is not None and v.dtype.is_floating_point and v.dim() > 0 and same(v.shape[0], rows):
            queue.extend(n.all_input_nodes)  # only through per-row tensors: never into other layers
    return None
