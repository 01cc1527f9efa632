"""``fp4_dequant_matmul``: a weight dequantised from FP4 in plain PyTorch, then multiplied::

    lo, hi = blocks & 0x0F, blocks >> 4                # or a 256-entry byte table, either order
    w = lut[stack((lo, hi), -1)].reshape(N, K)          # e2m1 values
    w = w * 2.0 ** (scales.int() - 127)                 # or ldexp, or e8m0 .to(float32); or
    w = w * e4m3_scales.float() * global_scale          # NVFP4 (block 16)
    y = F.linear(x, w.to(bf16), bias)                   # or mm / bmm

Real layouts: gpt-oss MXFP4 (``*_blocks`` uint8 [.., N, K/32, 16] + ``*_scales`` e8m0 or uint8
[.., N, K/32]) and compressed-tensors / ModelOpt NVFP4 (``weight_packed`` uint8 [N, K/2],
``weight_scale`` e4m3 [N, K/16], a global scale).

The idiom is recognised by what it computes, not how it is spelled: the matmul's weight operand
must depend on graph inputs only (a packed uint8 tensor, one block-scale tensor, optionally a
one-element global scale and constants such as a table), and evaluating that subgraph on random
probe bytes must reproduce ``formats.dequantize_mxfp4`` / ``dequantize_nvfp4`` of the same bytes
(low nibble first, or high nibble first: then the weight is repacked once, cached); the probe
lives in ``fp4_recognise``, shared with the MoE patterns.  The block
scales may also be stored in cuBLAS's swizzled 128x4 layout, padded to whole tiles, and
un-swizzled inside the subgraph (torchao's ``MXTensor`` / ``NVFP4Tensor`` with
``is_swizzled_scales=True`` dequantise that way): then the scales are un-swizzled once, cached.
Anything else is left to Inductor with the reason recorded.

A ``_grouped_mm`` over dequantised 3-D expert weights, or a ``bmm`` over per-row gathered ones
(``w[ids]``), is an MoE block's expert GEMM: ``block_scaled_mm`` is not grouped, so it is left
to the MoE pass, which fuses the block with the packed weights (``fp4_experts``) or reports it.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from .. import config, formats
from ..report import record_match
from ..spec import GemmSpec
from . import fp4_experts
from .common import RegionRejected, aten, emit_gemm, insert_call, is_op, val
from .fp4_common import emit_relayout, epilogue_activation
from .fp4_recognise import fp4_weight_subgraph, identify

NAME = "fp4_dequant_matmul"
MAX_BMM_BATCH = 64  # bmm over more batches than this is left to Inductor (one GEMM call per batch)
_OUT_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def _plan(graph, node, x, operand, bias, sub, batched):
    bval, xval = val(operand), val(x)
    if bval is None or xval is None:
        raise RegionRejected("matmul operands carry no shape metadata")
    if bval.dim() != (3 if batched else 2):
        raise RegionRejected(f"weight operand of rank {bval.dim()}")
    k, n = bval.shape[-2], bval.shape[-1]
    batch = bval.shape[0] if batched else 0
    if k % formats.NV_BLOCK:
        raise RegionRejected(f"K={k} is not a multiple of the FP4 scale block")
    if xval.dtype not in _OUT_DTYPES or val(node).dtype not in _OUT_DTYPES:
        raise RegionRejected(f"activations of dtype {xval.dtype}")
    if batched and batch > MAX_BMM_BATCH:
        raise RegionRejected(f"bmm over {batch} batches (> {MAX_BMM_BATCH})")
    if bias is not None and (val(bias) is None or tuple(val(bias).shape) != (n,)):
        raise RegionRejected("addmm bias is not a [N] vector")
    ident = identify(sub, graph, n, k, batch)
    block = formats.MX_BLOCK if ident.fmt == "mxfp4" else formats.NV_BLOCK

    def rewrite(graph: fx.Graph):
        # re-read the activation (and bias): an earlier rewrite may have replaced the node feeding us
        x, bias = (node.args[1], node.args[0]) if is_op(node, aten.addmm) else (node.args[0], None)
        output, act, extra = (node, None, []) if _routed_rows(x) else epilogue_activation(node)
        spec = GemmSpec(b_format=ident.fmt, out_dtype=_OUT_DTYPES[val(node).dtype], activation=act)
        region = [*sub.nodes, node, *extra]
        lead = [batch] if batched else []
        b = insert_call(graph, output, aten.view.default, (ident.packed, [*lead, n, k // 2]), {})
        if val(b).dtype != torch.uint8:
            b = insert_call(graph, output, aten.view.dtype, (b, torch.uint8), {})
        s = ident.scale
        reshape_in_op = tuple(val(s).shape) != (*lead, n, k // block)
        if reshape_in_op and val(s).dtype == torch.uint8 and not ident.scale_swizzled:
            s, reshape_in_op = insert_call(graph, output, aten.view.default, (s, [*lead, n, k // block]), {}), False
        kwargs = {"global_scale": ident.global_scale, "bias": bias}
        if ident.global_scale is not None and val(ident.global_scale).dim() != 0:
            kwargs["global_scale"] = insert_call(graph, output, aten.view.default, (ident.global_scale, [1]), {})
        if not batched:
            layout = ",".join(item for item, on in (("b_high_nibble_first", ident.high_nibble_first),
                                                     ("b_scale_swizzled", ident.scale_swizzled)) if on)
            if layout or reshape_in_op:  # relayout op: cached repack, and scales reshaped inside the op
                emit_relayout(graph, NAME, output, x, b, s, spec, layout, kwargs, region)
            else:
                emit_gemm(graph, NAME, output, (x, b, s), {k_: v for k_, v in kwargs.items() if v is not None},
                          spec, region)
            return
        if reshape_in_op:
            raise RegionRejected(f"bmm with {val(s).dtype} scales of shape {tuple(val(s).shape)}")
        _emit_batched(graph, output, x, b, s, spec, kwargs, region, batch, ident)

    return rewrite


def _routed_rows(x: fx.Node) -> bool:
    """Rows chosen by data (an MoE loop's ``x[token]``): the MoE pass fuses such linears into one
    MoE op and needs to see their gated activation, so none is folded into the GEMM here."""
    xv = val(x)
    return xv is not None and bool(free_unbacked_symbols(xv.shape))


def _emit_batched(graph, output, x, b, s, spec, kwargs, region, batch, ident):
    from .common import users_outside
    from ..lowering.gemm import describe_gemm_lowering

    outside = users_outside(region, output)
    if outside:
        raise RegionRejected(f"an intermediate of the region ({outside[0].name}) is used outside it")
    kw = {k: v for k, v in kwargs.items() if v is not None}
    outs = []
    for i in range(batch):
        xi = insert_call(graph, output, aten.select.int, (x, 0, i), {})
        bi = insert_call(graph, output, aten.select.int, (b, 0, i), {})
        si = insert_call(graph, output, aten.select.int, (s, 0, i), {})
        if ident.high_nibble_first:
            yi = insert_call(graph, output, torch.ops.inductor_moe.block_scaled_mm_relayout.default,
                             (xi, bi, si, spec.to_str(), "b_high_nibble_first"), kw)
        else:
            yi = insert_call(graph, output, torch.ops.inductor_moe.block_scaled_mm.default,
                             (xi, bi, si, spec.to_str()), kw)
        outs.append(insert_call(graph, output, aten.unsqueeze.default, (yi, 0), {}))
    stacked = insert_call(graph, output, aten.cat.default, (outs, 0), {})  # stack has no post-grad lowering
    if tuple(val(stacked).shape) != tuple(val(output).shape):
        stacked = insert_call(graph, output, aten.view.default, (stacked, list(val(output).shape)), {})
    output.replace_all_uses_with(stacked)
    bv = val(b)
    record_match("fp4_gemm", NAME, describe_gemm_lowering(spec, bv.device),
                        f"bmm B={batch} N={bv.shape[1]} {spec.to_str()}")


def find(graph: fx.Graph) -> list:
    found = []
    for node in list(graph.nodes):
        batched, bias = False, None
        if is_op(node, aten.mm):
            x, operand = node.args[:2]
        elif is_op(node, aten.addmm):
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                continue
            bias, x, operand = node.args[:3]
        elif is_op(node, aten.bmm):
            (x, operand), batched = node.args[:2], True
            if any(fp4_experts.gathered_expert_weight(a) is not None for a in node.args[:2]):
                if not config.moe_rewrite:  # else the MoE pass claims it, or reports it (fp4_experts)
                    found.append(RegionRejected(fp4_experts.UNMATCHED.format(op="bmm over per-row gathered")))
                continue
        elif fp4_experts.is_grouped_mm(node):
            if not config.moe_rewrite and fp4_experts.dequantised_stack(node.args[1]) is not None:
                found.append(RegionRejected(fp4_experts.UNMATCHED.format(op="grouped_mm over")))
            continue
        else:
            continue
        sub = fp4_weight_subgraph(operand)
        if sub is None:
            continue
        try:
            found.append(_plan(graph, node, x, operand, bias, sub, batched))
        except RegionRejected as e:
            found.append(e)
    return found
