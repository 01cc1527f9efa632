"""``modulelist_loop``: experts as an ``nn.ModuleList`` of gate/up/down ``nn.Linear`` in a static
Python loop, the way many codebases (and older Mixtral code) write an MoE block::

    out = torch.zeros_like(x)
    for e, expert in enumerate(self.experts):
        token, slot = torch.where(topk_ids == e)            # or one_hot(ids)[..., e] forms
        out.index_add_(0, token, expert(x[token]) * topk_weights[token, slot, None])

Dynamo unrolls the loop (``capture_dynamic_output_shape_ops`` keeps ``nonzero`` in the graph);
after functionalisation each iteration is ``eq -> nonzero -> unbind -> index -> 3 x linear ->
gated activation -> weight gather -> mul -> index_put(accumulate=True)`` chained on one buffer.
The whole chain becomes one ``moe_experts_unstacked`` call.  Experts whose linears dequantise
FP4 weights reach us as the ``block_scaled_mm`` calls the FP4 pass made of them (it leaves the
activation out of their epilogues when their rows are data-dependent); their packed weights and
scales are stacked once, like dense ones, and the block runs on the fused FP4 kernels.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from ..spec import MoESpec
from .activation import ActivationUnknown, identify_glu
from .common import MoEMatch, RegionRejected, aten, is_op, match_block_scaled_linear, match_linear, val

NAME = "modulelist_loop"


@dataclass
class _Link:
    """One unrolled iteration: ``acc = index_put(base, [token], contrib, accumulate=True)``."""

    node: fx.Node
    base: fx.Node
    token: fx.Node
    contrib: fx.Node


def _as_link(node) -> Optional[_Link]:
    if is_op(node, aten.index_put) and len(node.args) >= 4 and node.args[3] is True:
        indices = node.args[1]
        if len(indices) == 1 and indices[0] is not None:
            return _Link(node, node.args[0], indices[0], node.args[2])
    if is_op(node, aten.index_add) and node.args[1] == 0 and len(node.args) == 4:
        return _Link(node, node.args[0], node.args[2], node.args[3])
    return None


def _chains(graph: fx.Graph) -> list[list[_Link]]:
    links = {n: link for n in graph.nodes if (link := _as_link(n))}
    chains = []
    for node, link in links.items():
        if link.base in links and len(link.base.users) == 1:
            continue  # not the head of a chain
        chain = [link]
        while len(chain[-1].node.users) == 1:
            nxt = links.get(next(iter(chain[-1].node.users)))
            if nxt is None or nxt.base is not chain[-1].node:
                break
            chain.append(nxt)
        chains.append(chain)
    return chains


def _selection(token: fx.Node):
    """(topk_ids node, expert id, nonzero node, slot node) for the two ways a loop selects the
    rows routed to expert ``e``:

    - ``token, slot = torch.where(topk_ids == e)``: nonzero(eq(ids, e)), token is column 0;
    - Mixtral's ``mask = one_hot(ids, E).permute(2, 1, 0); slot, token = torch.where(mask[e])``:
      nonzero(select(permute(eq(ids[..., None], arange(E)), [2, 1, 0]), 0, e)), token is column 1.
    """
    def column(n, which):
        if is_op(n, operator.getitem) and is_op(n.args[0], aten.unbind) and n.args[0].args[1] == 1:
            return n.args[0].args[0] if n.args[1] == which else None
        if is_op(n, aten.select) and n.args[1] == 1 and n.args[2] == which:
            return n.args[0]
        return None

    for token_col in (0, 1):
        nz = column(token, token_col)
        if nz is None or not is_op(nz, aten.nonzero):
            continue
        found = _compare_eq(nz.args[0]) if token_col == 0 else _one_hot_column(nz.args[0])
        if found is not None:
            break
    else:
        raise RegionRejected("tokens are not selected by torch.where(topk_ids == e) or one_hot(topk_ids)[..., e]")
    ids, expert = found
    slot_col = 1 - token_col
    slot = next((u for u in nz.users if column(u, slot_col) is nz), None)
    if slot is None:
        # unbind form: the slot column is the other getitem of the same unbind
        slot = next((u for ub in nz.users if is_op(ub, aten.unbind) for u in ub.users
                     if is_op(u, operator.getitem) and u.args[1] == slot_col), None)
    return ids, expert, nz, slot


def _compare_eq(node):
    """(ids, e) for ``ids == e`` with a constant ``e``."""
    if not is_op(node, aten.eq):
        return None
    ids, expert = node.args
    if not isinstance(expert, int):
        raise RegionRejected("expert id compared against is not a constant")
    return ids, expert


def _one_hot_column(node):
    """(ids, e) for ``one_hot(ids, E).permute(2, 1, 0)[e]`` (decomposed: eq(ids[..., None], iota(E)))."""
    if not (is_op(node, aten.select) and node.args[1] == 0 and isinstance(node.args[2], int)):
        return None
    expert, mask = node.args[2], node.args[0]
    if not (is_op(mask, aten.permute) and list(mask.args[1]) == [2, 1, 0]):
        return None
    hot = mask.args[0]
    while is_op(hot, torch_convert()):
        hot = hot.args[0]
    if not is_op(hot, aten.eq) or not is_op(hot.args[0], aten.unsqueeze) or hot.args[0].args[1] not in (-1, 2):
        return None
    classes = hot.args[1]
    if not (is_op(classes, torch.ops.prims.iota) and classes.kwargs.get("start", 0) == 0
            and classes.kwargs.get("step", 1) == 1 and expert < classes.args[0]):
        return None
    ids = hot.args[0].args[0]
    return (ids, expert) if val(ids) is not None and val(ids).dim() == 2 else None


def _routing_weight(node, token, slot) -> Optional[fx.Node]:
    """topk_weights when ``node`` gathers ``topk_weights[token, slot]`` (with a trailing 1 dim)."""
    while is_op(node, aten.unsqueeze, aten.view, aten.reshape, torch_convert()):
        node = node.args[0]
    if is_op(node, aten.index) and list(node.args[1]) == [token, slot]:
        src = node.args[0]
        while is_op(src, aten.unsqueeze, torch_convert()):
            src = src.args[0]
        return src
    return None


def torch_convert():
    import torch

    return torch.ops.prims.convert_element_type.default


def _parse_link(link: _Link):
    ids, expert, nz, slot = _selection(link.token)
    contrib = link.contrib
    while is_op(contrib, torch_convert()):
        contrib = contrib.args[0]
    if not is_op(contrib, aten.mul):
        raise RegionRejected("the combine is not a weighted sum of expert outputs")
    a, b = contrib.args
    position, down = "after_down", None
    for y, w in ((a, b), (b, a)):
        tw = _routing_weight(w, link.token, slot)
        if tw is not None and (lin := _projection(y)) is not None:
            down = lin
            break
    else:
        if any(_is_fp4_gemm(y) for y in (a, b)):
            raise RegionRejected(FP4_EXPERTS)
        raise RegionRejected("the combine is not a weighted sum of expert outputs (weight gather not found)")
    h = down.x
    if is_op(h, aten.mul):
        for p, q in ((h.args[0], h.args[1]), (h.args[1], h.args[0])):
            if _routing_weight(q, link.token, slot) is not None and len(h.users) == 1:
                h, position = p, "before_down"
                break
    gate_up = _find_projections(h, link.token)
    return ids, expert, tw, h, down, gate_up, position


FP4_EXPERTS = ("the expert projections are FP4 GEMMs whose weights need a re-layout (bytes packed high nibble "
               "first or swizzled scales: block_scaled_mm_relayout) or that take quantised activations; each runs "
               "as its own GEMM (no dequantised copy), the block is not fused")


def _projection(node):
    """A linear on the routed rows: dense (``mm`` / ``addmm``) or FP4 (``block_scaled_mm``)."""
    return match_linear(node) or match_block_scaled_linear(node)


def _is_fp4_gemm(node) -> bool:
    """``node`` (through casts and views) is a ``block_scaled_mm`` the FP4 pass emitted."""
    while is_op(node, aten.view, aten.reshape, aten.unsqueeze, torch_convert()):
        node = node.args[0]
    return isinstance(node, fx.Node) and str(node.target).startswith("inductor_moe.block_scaled_mm")


def _find_projections(h: fx.Node, token: fx.Node):
    """The two linears on ``x[token]`` that feed the activation ``h``."""
    found, stack, seen = [], [h], set()
    while stack:
        n = stack.pop()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        lin = _projection(n)
        if lin is not None and is_op(lin.x, aten.index) and list(lin.x.args[1]) == [token]:
            found.append((n, lin))
            continue
        stack.extend(n.all_input_nodes)
    if len(found) != 2:
        raise RegionRejected(f"expected gate and up projections of the routed tokens, found {len(found)}")
    return found


def find(graph: fx.Graph) -> list:
    results = []
    for chain in _chains(graph):
        try:
            results.append(_match_chain(chain))
        except RegionRejected as e:
            if _looks_like_moe(chain):
                results.append(e)
    return results


def _looks_like_moe(chain) -> bool:
    try:
        _selection(chain[0].token)
        return True
    except RegionRejected:
        return False


def _match_chain(chain: list[_Link]) -> MoEMatch:
    experts, x_nodes, ids_nodes, tw_nodes, specs = {}, set(), set(), set(), set()
    for link in chain:
        ids, e, tw, h, down, projections, position = _parse_link(link)
        (g_node, g_lin), (u_node, u_lin) = projections
        try:
            act = identify_glu(g_node, u_node, h)
        except ActivationUnknown:
            try:
                act = identify_glu(u_node, g_node, h)
                (g_node, g_lin), (u_node, u_lin) = (u_node, u_lin), (g_node, g_lin)
            except ActivationUnknown as err:
                raise RegionRejected(str(err)) from err
        if e in experts:
            raise RegionRejected(f"expert {e} appears twice in the loop")
        experts[e] = (g_lin, u_lin, down)
        x_nodes.add(g_lin.x.args[0])
        ids_nodes.add(ids)
        tw_nodes.add(tw)
        specs.add(MoESpec(weight_position=position, **act))
    if len(x_nodes) != 1 or len(ids_nodes) != 1 or len(tw_nodes) != 1:
        raise RegionRejected("experts read different inputs, routing ids or routing weights")
    if len(specs) != 1:
        raise RegionRejected("experts use different activations")
    num_experts = len(experts)
    if sorted(experts) != list(range(num_experts)):
        raise RegionRejected(f"the loop covers experts {sorted(experts)}, not 0..{num_experts - 1}")
    ordered = [experts[e] for e in range(num_experts)]
    has_bias = [lin.bias is not None for trio in ordered for lin in trio]
    if any(has_bias) and not all(has_bias):
        raise RegionRejected("some expert projections have a bias and others do not")
    biases = [trio[i].bias for i in range(3) for trio in ordered] if all(has_bias) else []
    weight_format, scales, global_scales = _weight_format(ordered)
    (x,), (ids,), (tw,) = x_nodes, ids_nodes, tw_nodes
    if val(x) is None or val(x).dim() != 2:
        raise RegionRejected("routed tokens are not a 2-D [T, H] tensor")
    head, last = chain[0], chain[-1]
    base_is_zero = is_op(head.base, aten.full, aten.zeros) and (not is_op(head.base, aten.full) or
                                                              head.base.args[1] == 0)
    if not base_is_zero:
        raise RegionRejected("the combine buffer does not start from zeros")
    region = _region(last.node, stop={x, ids, tw, head.base})
    return MoEMatch(
        pattern=NAME, output=last.node, x=x, topk_ids=ids, topk_weights=tw,
        spec=dataclasses.replace(specs.pop(), weight_format=weight_format),
        unstacked={"gate": [t[0].weight for t in ordered], "up": [t[1].weight for t in ordered],
                   "down": [t[2].weight for t in ordered], "biases": biases, "scales": scales,
                   "global_scales": global_scales},
        region=region, fuses=[lin.nodes[0] for trio in ordered for lin in trio if weight_format != "dense"],
    )


def _weight_format(ordered) -> tuple[str, list, list]:
    """(weight format, block scales, global scales) of the experts' projections, each list in
    gate, up, down order over the experts (empty when unused)."""
    formats = {getattr(lin, "fmt", "dense") for trio in ordered for lin in trio}
    if len(formats) != 1:
        raise RegionRejected(f"the expert projections mix weight formats ({', '.join(sorted(formats))})")
    fmt = formats.pop()
    if fmt == "dense":
        return fmt, [], []
    scales = [trio[i].scale for i in range(3) for trio in ordered]
    global_scales = [trio[i].global_scale for i in range(3) for trio in ordered]
    if fmt == "mxfp4":
        global_scales = []
    elif any(g is None for g in global_scales):
        raise RegionRejected("NVFP4 expert projections without a global scale on each")
    return fmt, scales, global_scales


def _region(output: fx.Node, stop: set) -> list[fx.Node]:
    """All computation between the region's inputs and its output."""
    seen, stack = set(), [output]
    while stack:
        n = stack.pop()
        if n in seen or n in stop or n.op != "call_function":
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return list(seen)
