"""``fp4_linear_quantized`` (opt-in, ``config.linear_weight_format = "mxfp4" | "nvfp4"``): a plain
``nn.Linear`` with a bf16/fp16/fp32 weight becomes ``inductor_moe::linear_quantized``, which
quantises the weight once (cached on the parameter) and runs ``block_scaled_mm``.  Off by
default: it changes numerics.

Linears whose input rows are data-dependent (unbacked sizes, e.g. the per-expert linears of an
MoE loop) are left for the MoE patterns, which quantise through ``config.moe_weight_format``.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from .. import config
from ..report import record_match
from ..spec import GemmSpec
from .common import RegionRejected, aten, insert_call, is_op, match_linear, users_outside, val
from .fp4_common import epilogue_activation

NAME = "fp4_linear_quantized"
_BLOCK = {"mxfp4": 32, "nvfp4": 16}
_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def _linears(graph: fx.Graph):
    for node in graph.nodes:
        if not is_op(node, aten.mm, aten.addmm):
            continue
        users = list(node.users)
        if len(users) == 1 and is_op(users[0], aten.view, aten.reshape, aten._unsafe_view):
            lin = match_linear(users[0])
            if lin is not None:
                yield users[0], lin
                continue
        lin = match_linear(node)
        if lin is not None:
            yield node, lin


def find(graph: fx.Graph) -> list:
    fmt = config.linear_weight_format
    if fmt is None:
        return []
    found = []
    for out_node, lin in list(_linears(graph)):
        wv, xv = val(lin.weight), val(lin.x)
        if wv is None or xv is None or wv.dim() != 2 or wv.dtype not in _DTYPES or xv.dtype not in _DTYPES:
            continue
        if free_unbacked_symbols(xv.shape):
            continue  # data-dependent rows: an MoE expert; the MoE patterns own it
        k = wv.shape[1]
        if k % _BLOCK[fmt]:
            found.append(RegionRejected(f"linear with K={k}: not a multiple of the {fmt} block {_BLOCK[fmt]}"))
            continue
        found.append(_rewrite_fn(out_node, lin, fmt))
    return found


def _rewrite_fn(out_node, lin, fmt):
    def rewrite(graph: fx.Graph):
        lin_now = match_linear(out_node)  # re-read: an earlier rewrite may have replaced our input
        if lin_now is None:
            raise RegionRejected("the linear changed under an earlier rewrite")
        lin.x, lin.bias = lin_now.x, lin_now.bias
        output, act, extra = epilogue_activation(out_node)
        region = [*lin.nodes, out_node, *extra]
        outside = users_outside(region, output)
        if outside:
            raise RegionRejected(f"an intermediate of the region ({outside[0].name}) is used outside it")
        spec = GemmSpec(b_format=fmt, out_dtype=_DTYPES[val(out_node).dtype], activation=act)
        node = insert_call(graph, output, torch.ops.inductor_moe.linear_quantized.default,
                           (lin.x, lin.weight, lin.bias, spec.to_str()), {})
        out = node
        if tuple(val(output).shape) != tuple(val(node).shape):
            out = insert_call(graph, output, aten.view.default, (node, list(val(output).shape)), {})
        output.replace_all_uses_with(out)
        from ..lowering.gemm import describe_gemm_lowering

        wv = val(lin.weight)
        record_match("fp4_gemm", NAME, describe_gemm_lowering(spec, wv.device),
                     f"N={wv.shape[0]} K={wv.shape[1]} {spec.to_str()} quantised once from {wv.dtype}")

    return rewrite
