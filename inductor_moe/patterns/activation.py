"""Recognise the gated activation between the gate/up projections and the down projection.

After decomposition the same activation is spelt many ways (``silu`` as ``x * sigmoid(x)`` or
``x / (1 + exp(-x))``; gpt-oss's clamp and ``(up + 1)``; gelu through ``erf``), and the
spelling moves between torch versions.  So instead of matching op sequences we identify the
function: the sub-graph from (gate, up) to h must depend on nothing else, and evaluated on
probe values it must equal one ``MoESpec`` activation variant to float64 precision.  Anything
else (ReLU², a learned scale, ...) is reported as unsupported, never guessed.
"""

from __future__ import annotations

import itertools
import operator
from typing import Optional

import torch
import torch.fx as fx

from ..spec import MoESpec
from ..ops.moe_experts import apply_activation

_PROBE_POINTS = 257


class ActivationUnknown(Exception):
    pass


def _subgraph(inputs: list[fx.Node], output: fx.Node) -> list[fx.Node]:
    """Nodes strictly between ``inputs`` and ``output`` (inclusive of output), topologically
    ordered; raises if the output depends on any other tensor."""
    seen: dict[fx.Node, None] = {}
    stack = [output]
    while stack:
        n = stack.pop()
        if n in seen or n in inputs:
            continue
        if n.op != "call_function":
            raise ActivationUnknown(f"activation depends on {n.op} {n.name}")
        seen[n] = None
        for a in n.all_input_nodes:
            stack.append(a)
    order = {n: i for i, n in enumerate(output.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def _constants(nodes) -> set[float]:
    found = set()
    for n in nodes:
        for a in itertools.chain(n.args, n.kwargs.values()):
            if isinstance(a, (int, float)) and not isinstance(a, bool):
                found.add(abs(float(a)))
    return found


def _evaluate(nodes, inputs, output, probes) -> torch.Tensor:
    env = dict(zip(inputs, probes))

    def load(a):
        return torch.fx.node.map_arg(a, lambda n: env[n])

    for n in nodes:
        args, kwargs = load(n.args), load(n.kwargs)
        kwargs = {k: (torch.float64 if k == "dtype" and v in (torch.bfloat16, torch.float16, torch.float32) else v)
                  for k, v in kwargs.items()}
        if n.target is torch.ops.prims.convert_element_type.default:
            env[n] = args[0]  # keep float64: we identify the function, not its rounding
            continue
        if n.target is operator.getitem and not isinstance(args[0], (list, tuple)):
            raise ActivationUnknown("unexpected getitem in activation")
        env[n] = n.target(*args, **kwargs)
    return env[output]


def identify_glu(gate: fx.Node, up: fx.Node, h: fx.Node) -> dict:
    """The MoESpec fields (activation, alpha, limit, up_offset) that ``h = f(gate, up)`` computes.

    Raises ActivationUnknown with a human reason when no supported variant matches.
    """
    nodes = _subgraph([gate, up], h)
    g = torch.linspace(-24.0, 24.0, _PROBE_POINTS, dtype=torch.float64)
    gg, uu = torch.meshgrid(g, torch.linspace(-13.0, 13.0, 53, dtype=torch.float64), indexing="ij")
    gate_shape = gate.meta["val"].shape
    try:
        got = _evaluate(nodes, [gate, up], h, [gg, uu])
    except ActivationUnknown:
        raise
    except Exception as e:
        raise ActivationUnknown(f"could not evaluate the activation sub-graph ({type(e).__name__})") from e
    if got.shape != gg.shape:
        raise ActivationUnknown(f"activation changes the shape (gate {tuple(gate_shape)})")
    found = _match_variant(got, gg, uu, _constants(nodes))
    if found is None:
        raise ActivationUnknown(_UNSUPPORTED)
    return found


_UNSUPPORTED = ("the expert activation is not a supported gated form "
                "(silu/gelu/gelu_tanh, optional alpha, clamp limit, up+1)")


def _match_variant(got, gg, uu, consts) -> Optional[dict]:
    """The activation fields whose ``apply_activation(gg, uu)`` equals ``got``, or None."""
    alphas = [1.0] + sorted(c for c in consts if c not in (0.0, 1.0))
    limits = [None] + sorted(c for c in consts if c > 1.0)
    for activation, alpha, limit, up_offset in itertools.product(("silu", "gelu", "gelu_tanh"), alphas, limits,
                                                                  (0.0, 1.0)):
        if activation != "silu" and alpha != 1.0:
            continue
        spec = MoESpec(activation=activation, alpha=alpha, limit=limit, up_offset=up_offset)
        want = apply_activation(gg, uu, spec)
        if got.shape == want.shape and torch.allclose(got, want, rtol=1e-9, atol=1e-9, equal_nan=False):
            return {"activation": activation, "alpha": alpha, "limit": limit, "up_offset": up_offset}
    return None


def identify_packed_glu(h13: fx.Node, h: fx.Node) -> dict:
    """Like ``identify_glu`` when gate and up come packed in one tensor ``h13 [..., 2I]`` (a fused
    gate_up projection) and ``h = f(h13)`` splits it itself: also finds the layout, ``gate_up``
    "concat" (``chunk(2, -1)``) or "interleaved" (``[..., ::2]`` / ``[..., 1::2]``)."""
    nodes = _subgraph([h13], h)
    shape = h13.meta["val"].shape
    if len(shape) < 2 or not isinstance(shape[-1], int) or shape[-1] % 2 or any(d != 1 for d in shape[1:-1]):
        raise ActivationUnknown(f"gate/up projection output has shape {tuple(shape)}")
    inter = shape[-1] // 2
    g = torch.linspace(-24.0, 24.0, _PROBE_POINTS, dtype=torch.float64)
    gg, uu = torch.meshgrid(g, torch.linspace(-13.0, 13.0, 53, dtype=torch.float64), indexing="ij")
    gg, uu = gg.reshape(-1), uu.reshape(-1)
    rows = -(-gg.numel() // inter)
    pad = rows * inter - gg.numel()
    ones = (1,) * (len(shape) - 2)  # rows first, then the size-1 dims the graph carries ([S, 1, 2I])
    gg = torch.cat([gg, gg[:pad]]).reshape(rows, *ones, inter)
    uu = torch.cat([uu, uu[:pad]]).reshape(rows, *ones, inter)
    consts = _constants(nodes)
    for layout in ("concat", "interleaved"):
        packed = torch.cat([gg, uu], -1) if layout == "concat" else torch.stack([gg, uu], -1).flatten(-2)
        try:
            got = _evaluate(nodes, [h13], h, [packed])
        except ActivationUnknown:
            raise
        except Exception as e:
            raise ActivationUnknown(f"could not evaluate the activation sub-graph ({type(e).__name__})") from e
        if got.numel() == gg.numel():  # size-1 dims may be squeezed away inside the activation
            got = got.reshape(gg.shape)
        found = _match_variant(got, gg, uu, consts)
        if found is not None:
            return {**found, "gate_up": layout}
    raise ActivationUnknown(_UNSUPPORTED)
