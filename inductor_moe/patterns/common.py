"""Shared pieces of the pattern library: reading node metadata, closed-region checks, and
emitting a canonical op in place of a matched region (with its fake value and a report entry).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.fx as fx

from .. import report
from ..spec import GemmSpec, MoESpec

aten = torch.ops.aten


def val(node) -> Optional[torch.Tensor]:
    """The fake tensor a node produces, or None for non-tensor nodes."""
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("val")
    return v if isinstance(v, torch.Tensor) else None


def is_op(node, *targets) -> bool:
    """Whether ``node`` calls one of ``targets`` (OpOverloadPackets match any overload)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    for target in targets:
        if node.target is target:
            return True
        packet = getattr(node.target, "overloadpacket", None)
        if packet is not None and packet is target:
            return True
    return False


def users_outside(region: Iterable[fx.Node], output: fx.Node) -> list[fx.Node]:
    """Nodes of ``region`` (other than ``output``) whose tensors are read outside the region.

    Shape bookkeeping on data-dependent sizes (``sym_size`` and its runtime asserts) does not
    count: it dies with the region (``drop_shape_checks``)."""
    inside = set(region)
    return [n for n in inside if n is not output
            and any(u not in inside and not _is_shape_check(u) for u in n.users)]


def _is_shape_check(node: fx.Node) -> bool:
    return not isinstance(node.meta.get("val"), torch.Tensor) and node.op == "call_function" and (
        is_op(node, aten.sym_size, aten._assert_scalar, aten.sym_constrain_range_for_size)
        or getattr(node.target, "__module__", None) in ("_operator", "operator"))


def drop_shape_checks(region: Iterable[fx.Node]) -> None:
    """Erase the shape checks hanging off a replaced region, so its ``nonzero`` can die too."""
    doomed, stack = {}, [u for n in region for u in n.users if _is_shape_check(u)]
    while stack:
        n = stack.pop()
        if n not in doomed:
            doomed[n] = None
            stack.extend(u for u in n.users if _is_shape_check(u))
    order = {n: i for i, n in enumerate(next(iter(doomed)).graph.nodes)} if doomed else {}
    for n in sorted(doomed, key=order.__getitem__, reverse=True):
        if all(u in doomed for u in n.users):
            n.graph.erase_node(n)


class RegionRejected(Exception):
    """A candidate region that must be left to Inductor; ``str(self)`` is the human reason."""


@dataclass
class MoEMatch:
    """A matched MoE region, ready to become one ``moe_experts`` call."""

    pattern: str  # the idiom, e.g. "modulelist_loop"
    output: fx.Node  # the node whose value the canonical op replaces ([T, H] combined output)
    x: fx.Node
    topk_ids: fx.Node
    topk_weights: fx.Node
    spec: MoESpec
    w13: Optional[fx.Node] = None  # stacked weights ...
    w2: Optional[fx.Node] = None
    b13: Optional[fx.Node] = None
    b2: Optional[fx.Node] = None
    unstacked: Optional[dict] = None  # ... or per-expert lists: gate, up, down, biases (0 or 3E)
    scales: dict = field(default_factory=dict)  # w13_scale, w2_scale, w13_global_scale, w2_global_scale
    region: list = field(default_factory=list)  # nodes the match consumes (checked for outside users)
    x_transform: Optional[Callable[[fx.Graph, fx.Node], fx.Node]] = None  # e.g. reshape [B,S,H]->[T,H]
    fp4: Optional[object] = None  # fp4_experts.FP4Experts: w13/w2 are dequantised in the graph from these
    fuses: list = field(default_factory=list)  # canonical GEMM calls (block_scaled_mm) the MoE op replaces


def fake_call(target, args, kwargs):
    """Run an op's fake implementation on the fake values of fx args (for ``meta['val']``)."""
    from torch._guards import detect_fake_mode

    def to_val(a):
        if isinstance(a, fx.Node):
            return a.meta["val"]
        if isinstance(a, (list, tuple)):
            return type(a)(to_val(x) for x in a)
        return a

    fake_args, fake_kwargs = to_val(args), {k: to_val(v) for k, v in kwargs.items()}
    leaves = [v for v in torch.utils._pytree.tree_leaves((fake_args, fake_kwargs)) if isinstance(v, torch.Tensor)]
    mode = detect_fake_mode(leaves)
    if mode is None:
        return target(*fake_args, **fake_kwargs)
    with mode:
        return target(*fake_args, **fake_kwargs)


def insert_call(graph: fx.Graph, before: fx.Node, target, args, kwargs) -> fx.Node:
    with graph.inserting_before(before):
        node = graph.call_function(target, tuple(args), kwargs)
    node.meta["val"] = fake_call(target, args, kwargs)
    return node


def emit_moe(graph: fx.Graph, match: MoEMatch) -> fx.Node:
    """Replace ``match.output`` with a canonical MoE op call; record the match."""
    from ..lowering.moe import describe_moe_lowering

    outside = users_outside(match.region, match.output)
    if outside:
        raise RegionRejected(f"an intermediate of the region ({outside[0].name}) is used outside it")
    anchor = match.output
    x = match.x
    if match.x_transform is not None:
        x = match.x_transform(graph, anchor)
    spec_str = match.spec.to_str()
    if match.unstacked is not None:
        u = match.unstacked
        node = insert_call(graph, anchor, torch.ops.inductor_moe.moe_experts_unstacked.default,
                           (x, match.topk_ids, match.topk_weights, u["gate"], u["up"], u["down"],
                            u.get("biases", []), u.get("scales", []), u.get("global_scales", []), spec_str), {})
        num_experts, hidden, inter = len(u["gate"]), val(x).shape[1], val(u["gate"][0]).shape[0]
    else:
        w13, w2, scales = match.w13, match.w2, match.scales
        if match.fp4 is not None:  # the packed weights and scales the dequantisation read
            w13, w2, scales = match.fp4.materialize(graph, anchor)
        kwargs = {k: v for k, v in (("b13", match.b13), ("b2", match.b2), *scales.items()) if v is not None}
        node = insert_call(graph, anchor, torch.ops.inductor_moe.moe_experts.default,
                           (x, match.topk_ids, match.topk_weights, w13, w2, spec_str), kwargs)
        from ..ops.weights import intermediate_size

        num_experts = val(w13).shape[0]
        hidden = val(x).shape[1]
        inter = intermediate_size(match.spec, val(w13), val(w2))
    out = node
    out_val = val(anchor)
    if tuple(out_val.shape) != tuple(node.meta["val"].shape):
        out = insert_call(graph, anchor, aten.view.default, (node, list(out_val.shape)), {})
    if out_val.dtype != node.meta["val"].dtype:
        out = insert_call(graph, anchor, torch.ops.prims.convert_element_type.default, (out, out_val.dtype), {})
    anchor.replace_all_uses_with(out)
    drop_shape_checks(match.region)
    top_k = val(match.topk_ids).shape[1]
    lowering = describe_moe_lowering(match.spec, val(x).device, val(x).dtype, num_experts, hidden, inter, top_k)
    fused = report.absorb_matches({gemm_source(graph, n) for n in match.fuses})
    report.record_match("moe", match.pattern, lowering,
                        f"E={num_experts} k={top_k} H={hidden} I={inter} {spec_str or 'silu'}"
                        + (f"; fuses its {len(match.fuses)} expert FP4 GEMMs" if fused else ""))
    return node


def gemm_source(graph: fx.Graph, node: fx.Node) -> tuple:
    """How a ``fp4_gemm`` match names the call it emitted (``report.absorb_matches``)."""
    return (id(graph), node.name)


def emit_gemm(graph: fx.Graph, pattern: str, output: fx.Node, args: tuple, kwargs: dict, spec: GemmSpec,
              region: list) -> fx.Node:
    """Replace ``output`` with a ``block_scaled_mm`` call; record the match."""
    from ..lowering.gemm import describe_gemm_lowering

    outside = users_outside(region, output)
    if outside:
        raise RegionRejected(f"an intermediate of the region ({outside[0].name}) is used outside it")
    node = insert_call(graph, output, torch.ops.inductor_moe.block_scaled_mm.default,
                       (*args[:3], spec.to_str()), kwargs)
    out = node
    want = val(output)
    if tuple(want.shape) != tuple(node.meta["val"].shape):
        out = insert_call(graph, output, aten.view.default, (node, list(want.shape)), {})
    output.replace_all_uses_with(out)
    b = val(args[1])
    m = val(args[0]).shape[0] if val(args[0]).dim() else 1
    lowering = describe_gemm_lowering(spec, b.device, m, b.shape[0], b.shape[1] * 2)
    report.record_match("fp4_gemm", pattern, lowering, f"N={b.shape[0]} {spec.to_str()}", gemm_source(graph, node))
    return node


def is_weight(node) -> bool:
    """A graph input or attribute: parameters are placeholders after AOT lifting."""
    return isinstance(node, fx.Node) and node.op in ("placeholder", "get_attr")


def transposed_weight(node) -> Optional[fx.Node]:
    """``w`` when ``node`` is ``w.t()`` / ``w.permute(1, 0)`` of a 2-D weight."""
    if is_op(node, aten.permute) and list(node.args[1]) == [1, 0]:
        node = node.args[0]
    elif is_op(node, aten.t):
        node = node.args[0]
    else:
        return None
    return node if is_weight(node) else None


@dataclass
class Linear:
    """``y = x @ weight^T + bias``, as ``nn.Linear`` appears after decomposition."""

    x: fx.Node
    weight: fx.Node
    bias: Optional[fx.Node]
    nodes: list


@dataclass
class BlockScaledLinear(Linear):
    """A linear on FP4 weights that the FP4 pass already rewrote: ``block_scaled_mm(x, packed,
    scale, global_scale=, bias=)`` with dense activations and no epilogue activation."""

    scale: Optional[fx.Node] = None
    global_scale: Optional[fx.Node] = None
    fmt: str = "mxfp4"


def match_block_scaled_linear(node) -> Optional[BlockScaledLinear]:
    if not (isinstance(node, fx.Node) and node.target is torch.ops.inductor_moe.block_scaled_mm.default):
        return None
    names = ("a", "b", "b_scale", "spec", "a_scale", "global_scale", "bias")
    args = {**dict(zip(names, node.args)), **node.kwargs}
    spec = GemmSpec.from_str(args["spec"])
    if (spec.a_format != "dense" or spec.b_format not in ("mxfp4", "nvfp4") or spec.activation is not None
            or args.get("a_scale") is not None):
        return None
    return BlockScaledLinear(x=args["a"], weight=args["b"], bias=args.get("bias"), nodes=[node],
                             scale=args["b_scale"], global_scale=args.get("global_scale"), fmt=spec.b_format)


def match_linear(node) -> Optional[Linear]:
    """mm(x, w^T) or addmm(b, x, w^T), optionally wrapped in view(.., [-1, K]) / view back."""
    wrap = []
    if is_op(node, aten.view, aten.reshape, aten._unsafe_view) and is_op(node.args[0], aten.mm, aten.addmm):
        wrap.append(node)
        node = node.args[0]
    if is_op(node, aten.mm):
        x, wt, bias = node.args[0], node.args[1], None
    elif is_op(node, aten.addmm) and not node.kwargs:
        bias, x, wt = node.args[:3]
        if not is_weight(bias):
            return None
    else:
        return None
    w = transposed_weight(wt)
    if w is None:
        return None
    nodes = [*wrap, node, wt]
    if is_op(x, aten.view, aten.reshape, aten._unsafe_view) and wrap:
        nodes.append(x)
        x = x.args[0]
    return Linear(x=x, weight=w, bias=bias, nodes=nodes)
