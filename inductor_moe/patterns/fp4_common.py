"""Helpers shared by the FP4 matmul patterns (``fp4_*``): epilogue-activation folding, weight
subgraphs (what a matmul's weight operand is computed from), and emitting the relayout op.

Not a pattern itself (it is not listed in ``FP4_PATTERNS``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

from ..report import record_match
from ..spec import GemmSpec
from .common import RegionRejected, aten, insert_call, is_op, is_weight, users_outside, val

MAX_WEIGHT_SUBGRAPH = 400  # nodes; a dequantise idiom is a few dozen

MAX_EPILOGUE_NODES = 16  # nodes an activation decomposes into (silu: 6, gelu via erf: ~8)
MAX_EPILOGUE_PROBE = 1 << 22  # elements; larger outputs keep the activation outside the GEMM
_EPILOGUES = {
    "silu": torch.nn.functional.silu,
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
}


def epilogue_activation(node: fx.Node) -> tuple[fx.Node, Optional[str], list]:
    """(node whose value the rewrite replaces, activation folded or None, extra region nodes).

    Looks at the elementwise nodes right after ``node`` that read nothing but it (an activation
    as Inductor decomposes it: ``silu`` is ``x / (1 + exp(-x))`` in fp32, ``gelu`` goes through
    ``erf``) and keeps the longest closed run that computes silu, gelu, gelu_tanh or relu,
    checked on probe values."""
    v = val(node)
    if v is None or v.numel() > MAX_EPILOGUE_PROBE or any(isinstance(d, torch.SymInt) for d in v.shape):
        return node, None, []
    inside, ordered = {node}, []
    cur = node.next
    while cur.op == "call_function" and len(ordered) < MAX_EPILOGUE_NODES:
        cv = cur.meta.get("val")
        ins = cur.all_input_nodes
        if ins and all(i in inside for i in ins) and isinstance(cv, torch.Tensor) and cv.numel() == v.numel():
            inside.add(cur)
            ordered.append(cur)
        elif any(i in inside for i in ins):
            break  # something else reads the output: stop here
        cur = cur.next
    best = (node, None, [])
    for i in range(len(ordered)):
        run = [node, *ordered[: i + 1]]
        run_set = set(run)
        end = run[-1]
        if any(u not in run_set for n in run[:-1] for u in n.users):
            continue
        act = _identify_unary(run, end)
        if act is not None:
            best = (end, act, run)
    return best


def _identify_unary(run: list, end: fx.Node) -> Optional[str]:
    v = val(run[0])
    g = torch.Generator().manual_seed(7)
    probe = (torch.randn(tuple(v.shape), generator=g) * 3).to(v.dtype)
    env = {run[0]: probe}

    def load(a):
        return env[a] if isinstance(a, fx.Node) else a

    try:
        for n in run[1:]:
            kwargs = {k: (torch.device("cpu") if k == "device" else load(x)) for k, x in n.kwargs.items()}
            env[n] = n.target(*fx.node.map_aggregate(n.args, load), **kwargs)
    except Exception:  # noqa: BLE001 - not something we can evaluate: no folding
        return None
    got = env[end]
    if not isinstance(got, torch.Tensor) or got.numel() != probe.numel():
        return None
    for name, fn in _EPILOGUES.items():
        want = fn(probe.float()).to(got.dtype).reshape(got.shape)
        if torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2):
            return name
    return None


def base_weight(node) -> tuple[Optional[fx.Node], bool]:
    """(graph input, transposed?) for ``w`` / ``w.t()`` / ``w.permute(1, 0)`` of a 2-D input."""
    if is_op(node, aten.t) or (is_op(node, aten.permute) and list(node.args[1]) == [1, 0]):
        inner = node.args[0]
        return (inner, True) if is_weight(inner) else (None, False)
    return (node, False) if is_weight(node) else (None, False)


@dataclass
class WeightSubgraph:
    """The nodes a matmul's weight operand is computed from, with its graph inputs."""

    nodes: list  # computed nodes in graph order (the operand last)
    leaves: list  # placeholders / get_attrs it reads
    constants: list = field(default_factory=list)  # nodes without inputs (full, arange, empty)


def weight_subgraph(operand: fx.Node) -> Optional[WeightSubgraph]:
    """Everything ``operand`` depends on, if it depends on graph inputs only (no activations
    flowing through the graph) and on no symbolic sizes; None otherwise."""
    seen, stack, leaves, constants = {}, [operand], [], []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen[n] = None
        if n.op in ("placeholder", "get_attr"):
            leaves.append(n)
            continue
        if n.op != "call_function" or len(seen) > MAX_WEIGHT_SUBGRAPH:
            return None
        v = n.meta.get("val")
        if isinstance(v, torch.SymInt) or (isinstance(v, torch.Tensor)
                                          and any(isinstance(d, torch.SymInt) for d in v.shape)):
            return None
        inputs = n.all_input_nodes
        if not inputs:
            constants.append(n)
        stack.extend(inputs)
    order = {n: i for i, n in enumerate(operand.graph.nodes)}
    nodes = sorted((n for n in seen if n.op == "call_function"), key=order.__getitem__)
    return WeightSubgraph(nodes, sorted(leaves, key=order.__getitem__), constants)


def evaluate(sub: WeightSubgraph, inputs: dict, graph: fx.Graph, transform=None, check=None) -> torch.Tensor:
    """Run the subgraph on concrete CPU tensors (``inputs``: leaf -> tensor).

    ``transform(node, args, kwargs) -> (args, kwargs)`` may rewrite a node's arguments first and
    ``check(node, value)`` may inspect its result (``fp4_recognise`` probes expert stacks on a
    few experts that way)."""
    env = dict(inputs)
    module = graph.owning_module
    for leaf in sub.leaves:
        if leaf not in env:
            if leaf.op != "get_attr" or module is None:
                raise RegionRejected(f"weight subgraph reads {leaf.name}, which is neither a weight nor a constant")
            obj = module
            for part in leaf.target.split("."):
                obj = getattr(obj, part)
            env[leaf] = obj.detach().cpu() if isinstance(obj, torch.Tensor) else obj

    def load(a):
        return env[a] if isinstance(a, fx.Node) else a

    for n in sub.nodes:
        args = fx.node.map_aggregate(n.args, load)
        kwargs = {k: (torch.device("cpu") if k == "device" and v is not None else fx.node.map_aggregate(v, load))
                  for k, v in n.kwargs.items()}
        if "pin_memory" in kwargs:
            kwargs["pin_memory"] = False
        if transform is not None:
            args, kwargs = transform(n, args, kwargs)
        env[n] = n.target(*args, **kwargs)
        if check is not None:
            check(n, env[n])
    return env[sub.nodes[-1]] if sub.nodes else env[sub.leaves[0]]


def emit_relayout(graph: fx.Graph, pattern: str, output: fx.Node, a, b, b_scale, spec: GemmSpec, layout: str,
                  kwargs: dict, region: list) -> fx.Node:
    """Replace ``output`` with ``block_scaled_mm_relayout`` (weights re-laid out once, cached)."""
    from ..lowering.gemm import describe_gemm_lowering

    outside = users_outside(region, output)
    if outside:
        raise RegionRejected(f"an intermediate of the region ({outside[0].name}) is used outside it")
    node = insert_call(graph, output, torch.ops.inductor_moe.block_scaled_mm_relayout.default,
                       (a, b, b_scale, spec.to_str(), layout), {k: v for k, v in kwargs.items() if v is not None})
    out = node
    want = val(output)
    if tuple(want.shape) != tuple(node.meta["val"].shape):
        out = insert_call(graph, output, aten.view.default, (node, list(want.shape)), {})
    output.replace_all_uses_with(out)
    bv = val(b)
    lowering = describe_gemm_lowering(spec, bv.device)
    record_match("fp4_gemm", pattern, lowering, f"N={bv.shape[0]} {spec.to_str()} layout={layout}")
    return node
