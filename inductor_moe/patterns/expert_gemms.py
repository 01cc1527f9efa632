"""Recognising one expert projection over 3-D expert parameters (or 3-D stacks dequantised from
FP4 in the graph, see ``fp4_experts``), and the layout-only ops, casts and expert-parallel masks
around it, for the ``stacked`` walker.

# S: (token, slot) rows, E: experts, K / N: a projection's input / output size
"""

from __future__ import annotations

import collections
import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .common import aten, is_op, is_weight, val
from .fp4_common import WeightSubgraph

prims = torch.ops.prims
_SHAPE_ONLY = (aten.view, aten.reshape, aten._unsafe_view, aten.unsqueeze, aten.squeeze, aten.clone, aten.alias)


def fallback_op():
    """Hugging Face's ``transformers::grouped_mm_fallback`` (non-bf16 weights under compile)."""
    ns = getattr(torch.ops, "transformers", None)
    return getattr(ns, "grouped_mm_fallback", None) if ns is not None else None


def same(a, b) -> bool:
    """Sizes that are provably equal (ints or SymInts), without adding guards."""
    try:
        return bool(statically_known_true(a == b))
    except Exception:
        return False


def shape_is(node, *dims) -> bool:
    v = val(node)
    return v is not None and v.dim() == len(dims) and all(d is None or same(s, d) for s, d in zip(v.shape, dims))


def strip_convert(node):
    while is_op(node, prims.convert_element_type):
        node = node.args[0]
    return node


def _identity_permute(node) -> bool:
    return is_op(node, aten.permute) and list(node.args[1]) == list(range(len(node.args[1])))


def peel(node):
    """Through dtype casts, layout-only ops (views, unsqueeze/squeeze, clone, identity permute) and
    expert-parallel sentinel masks (``sentinel_mask`` below)."""
    while True:
        if is_op(node, prims.convert_element_type, *_SHAPE_ONLY) or _identity_permute(node):
            node = node.args[0]
        elif sentinel_mask(node) is not None:
            node = node.args[2]
        else:
            return node


def sentinel_mask(node) -> Optional[int]:
    """``E`` when ``node`` is ``t.masked_fill((expert_ids >= E)[..., None], 0)``, i.e.
    ``where(ge(ids, E).unsqueeze(-1), 0, t)``: the rows of expert-parallel sentinel ids zeroed
    (transformers 5.x before ~5.20 always emits it).  For ids in [0, E) it is the identity, and
    ``moe_experts`` skips ids outside [0, E) anyway; ``_Walk.run`` checks E."""
    if not (is_op(node, aten.where) and len(node.args) == 3):
        return None
    cond, zero = node.args[0], node.args[1]
    zero_ok = zero == 0 or (is_op(zero, aten.full) and list(zero.args[0]) == [] and zero.args[1] == 0)
    if not zero_ok:
        return None
    ge = cond.args[0] if is_op(cond, aten.unsqueeze) and cond.args[1] in (-1, 1) else cond
    if is_op(ge, aten.ge) and isinstance(ge.args[1], int) and val(ge.args[0]) is not None \
            and not val(ge.args[0]).dtype.is_floating_point:
        return ge.args[1]
    return None


def unclamp_ids(node, num_experts: int):
    """``ids`` for ``ids.clamp(0, E - 1)`` / ``ids.clamp(max=E - 1)`` (sentinel ids kept in bounds
    for a gather; the identity on the ids a router produces), else ``node``."""
    while True:
        node = strip_convert(node)
        if is_op(node, aten.clamp_max) and node.args[1] == num_experts - 1:
            node = node.args[0]
        elif is_op(node, aten.clamp_min) and node.args[1] == 0:
            node = node.args[0]
        elif is_op(node, aten.clamp) and node.args[1:3] in ((0, num_experts - 1), (None, num_experts - 1)):
            node = node.args[0]
        else:
            return node


def find_shaped(node, *dims):
    """The outermost node, through casts and layout-only ops, whose value has shape ``dims``."""
    while True:
        if shape_is(node, *dims):
            return node
        if not (is_op(node, prims.convert_element_type, *_SHAPE_ONLY) or _identity_permute(node)):
            return None
        node = node.args[0]


def getitem_of(node, target, index):
    """``op`` when ``node`` is ``op(...)[index]`` for ``op`` calling ``target``."""
    if is_op(node, operator.getitem) and node.args[1] == index and is_op(node.args[0], target):
        return node.args[0]
    return None


@dataclass
class Gemm:
    """One expert projection over all (token, slot) rows."""

    kind: str  # "grouped" or "gathered"
    node: fx.Node  # the GEMM call
    rows: fx.Node  # its activation operand, [S, K]
    weight: fx.Node  # the 3-D expert parameter
    transposed: bool  # weight stored [E, K, N] (used as rows @ w[e]) rather than [E, N, K]
    offsets: Optional[fx.Node] = None  # grouped: cumulative rows per expert
    gather_ids: Optional[fx.Node] = None  # gathered: the per-row expert ids indexing the weight
    fp4: Optional[WeightSubgraph] = None  # ``weight`` is dequantised from FP4 in the graph (fp4_experts)


def _stacked_weight(node) -> tuple[bool, Optional[WeightSubgraph]]:
    """(is a 3-D expert weight, its FP4 dequantisation subgraph if it is computed from one)."""
    if is_weight(node):
        return val(node) is not None and val(node).dim() == 3, None
    from .fp4_experts import dequantised_stack

    sub = dequantised_stack(node)
    return sub is not None, sub


def _gathered_weight(node):
    """(weight, ids, fp4 subgraph) for ``w[ids]`` of a 3-D parameter (or FP4-dequantised stack),
    through layout-only ops."""
    node = peel(node)
    if is_op(node, aten.index) and len(node.args[1]) == 1:
        ok, fp4 = _stacked_weight(node.args[0])
        if ok:
            return node.args[0], node.args[1][0], fp4
    return None


def match_gemm(node) -> Optional[Gemm]:
    """``node`` (through casts/views) as a grouped or gathered expert GEMM, else None."""
    g = peel(node)
    fallback = fallback_op()
    if is_op(g, aten._grouped_mm) or (fallback is not None and is_op(g, fallback)):
        rows, wv, offs = g.args[:3]
        if any(a is not None for a in g.args[3:]) or any(v is not None for k, v in g.kwargs.items() if k != "offs"):
            return None  # bias / out_dtype arguments we do not model
        offs = g.kwargs.get("offs", offs)
        if is_weight(wv) and val(wv).dim() == 3:
            return Gemm("grouped", g, peel(rows), wv, True, offsets=offs)
        if is_op(wv, aten.permute) and list(wv.args[1]) == [0, 2, 1] and is_weight(wv.args[0]):
            return Gemm("grouped", g, peel(rows), wv.args[0], False, offsets=offs)
        ok, fp4 = _stacked_weight(wv)  # [E, K, N] dequantised in the graph
        return Gemm("grouped", g, peel(rows), wv, True, offsets=offs, fp4=fp4) if ok else None
    if is_op(g, aten.bmm):
        a, b = g.args
        gathered = _gathered_weight(a)
        if gathered is not None and shape_is(b, None, None, 1):  # w[ids] [S,N,K] @ rows [S,K,1]
            return Gemm("gathered", g, peel(b), gathered[0], False, gather_ids=gathered[1], fp4=gathered[2])
        gathered = _gathered_weight(b)
        if gathered is not None and shape_is(a, None, 1, None):  # rows [S,1,K] @ w[ids] [S,K,N]
            return Gemm("gathered", g, peel(a), gathered[0], True, gather_ids=gathered[1], fp4=gathered[2])
    return None


def _bias_of(node):
    """(bias parameter [E, N], ids) for ``b[ids]``."""
    node = peel(node)
    if is_op(node, aten.index) and len(node.args[1]) == 1 and is_weight(node.args[0]) \
            and val(node.args[0]) is not None and val(node.args[0]).dim() == 2:
        return node.args[0], node.args[1][0]
    return None


def split_bias(node):
    """(product, bias param, bias ids) for ``product + b[ids]``; bias None when there is none."""
    n = peel(node)
    if is_op(n, aten.add) and len(n.args) == 2 and not n.kwargs:
        for p, q in ((n.args[0], n.args[1]), (n.args[1], n.args[0])):
            bias = _bias_of(q)
            if bias is not None and match_gemm(p) is not None:
                return p, bias[0], bias[1]
    return node, None, None


def gemm_output(gemm: Gemm) -> tuple[fx.Node, Optional[fx.Node], Optional[fx.Node]]:
    """Follow the up projection forward to the tensor the activation reads: (h13, bias, bias ids)."""
    node, bias, bias_ids = gemm.node, None, None
    while len(node.users) == 1:
        user = next(iter(node.users))
        if is_op(user, prims.convert_element_type, *_SHAPE_ONLY) or _identity_permute(user) \
                or (sentinel_mask(user) is not None and user.args[2] is node):
            node = user
            continue
        if bias is None and is_op(user, aten.add) and len(user.args) == 2:
            other = user.args[1] if user.args[0] is node else user.args[0]
            found = _bias_of(other)
            if found is not None:
                bias, bias_ids = found
                node = user
                continue
        break
    return node, bias, bias_ids


def gemm_ancestor(h: fx.Node, rows) -> Optional[Gemm]:
    """The one expert GEMM the activation ``h`` is computed from: walk back through float
    per-row tensors ([S, ...]), never through a gather, stopping at expert GEMMs."""
    seen, queue, found = set(), collections.deque([h]), []
    while queue and len(seen) < 256:
        n = queue.popleft()
        if n in seen or not isinstance(n, fx.Node) or n.op != "call_function":
            continue
        seen.add(n)
        gemm = match_gemm(n) if n is peel(n) else None
        if gemm is not None:
            if all(f.node is not gemm.node for f in found):
                found.append(gemm)
            continue
        v = val(n)
        if is_op(n, aten.index) or (v is not None and (not v.dtype.is_floating_point or v.dim() == 0
                                                       or not same(v.shape[0], rows))):
            continue
        queue.extend(n.all_input_nodes)
    return found[0] if len(found) == 1 else None
