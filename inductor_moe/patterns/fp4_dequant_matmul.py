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
(low nibble first, or high nibble first: then the weight is repacked once, cached).  The block
scales may also be stored in cuBLAS's swizzled 128x4 layout, padded to whole tiles, and
un-swizzled inside the subgraph (torchao's ``MXTensor`` / ``NVFP4Tensor`` with
``is_swizzled_scales=True`` dequantise that way): then the scales are un-swizzled once, cached.
Anything else is left to Inductor with the reason recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from .. import formats
from ..report import record_match
from ..spec import GemmSpec
from .common import RegionRejected, aten, emit_gemm, insert_call, is_op, val
from .fp4_common import WeightSubgraph, emit_relayout, epilogue_activation, evaluate, weight_subgraph

NAME = "fp4_dequant_matmul"
MAX_BMM_BATCH = 64  # bmm over more batches than this is left to Inductor (one GEMM call per batch)
MAX_PROBE_ELEMENTS = 1 << 27  # weights above this many values are not evaluated on the CPU at compile time
_PACKED_DTYPES = (torch.uint8, torch.float4_e2m1fn_x2)
_E8M0 = (torch.float8_e8m0fnu, torch.uint8)
_OUT_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


@dataclass
class _Identified:
    fmt: str  # "mxfp4" / "nvfp4"
    high_nibble_first: bool
    packed: fx.Node
    scale: fx.Node
    global_scale: Optional[fx.Node]
    scale_swizzled: bool = False  # scales stored in the padded 128x4 layout (2-D weights only)


def _swizzled_numel(rows: int, cols: int) -> int:
    return -(-rows // 128) * 128 * -(-cols // 4) * 4


def _probe_inputs(packed, scale, glob, fmt):
    g = torch.Generator().manual_seed(1234)
    pv, sv = val(packed), val(scale)
    p = torch.randint(0, 256, tuple(pv.shape), dtype=torch.uint8, generator=g).view(pv.dtype)
    if fmt == "mxfp4":  # scales 2^-9 .. 2^3: no overflow or subnormals on any path
        s = torch.randint(118, 131, tuple(sv.shape), dtype=torch.uint8, generator=g).view(sv.dtype)
    else:
        s = (torch.rand(tuple(sv.shape), generator=g) * 3.5 + 0.25).to(torch.float8_e4m3fn)
    inputs = {packed: p, scale: s}
    if glob is not None:
        inputs[glob] = torch.full(tuple(val(glob).shape), 0.375, dtype=val(glob).dtype)
    return inputs


def _expected(fmt, p_bytes, s, g, n, k, batch, swizzled=False):
    lead = (batch,) if batch else ()
    if swizzled:
        from ..ops.linear_quantized import unswizzle_128x4

        s = unswizzle_128x4(s, n, k // (formats.MX_BLOCK if fmt == "mxfp4" else formats.NV_BLOCK))
    s = s.reshape(*lead, n, -1)
    if fmt == "mxfp4":
        return formats.dequantize_mxfp4(p_bytes, s)
    gs = g.reshape(()).float() if g is not None else torch.ones(())
    return formats.dequantize_nvfp4(p_bytes, s, gs)


def identify(sub: WeightSubgraph, operand: fx.Node, graph: fx.Graph, n: int, k: int, batch: int) -> _Identified:
    """Which leaf is what, and which FP4 format and nibble order the subgraph computes."""
    count = max(batch, 1) * n
    packed = [l for l in sub.leaves if val(l) is not None and val(l).dtype in _PACKED_DTYPES
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
        for fmt, dtypes, block in (("mxfp4", _E8M0, formats.MX_BLOCK),
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
    if count * k > MAX_PROBE_ELEMENTS:
        raise RegionRejected(f"weight of {count * k} values is too large to verify by probing at compile time "
                             f"(limit {MAX_PROBE_ELEMENTS})")
    if not val(packed).is_contiguous():
        raise RegionRejected(f"packed FP4 weight {packed.name} is not contiguous; call .contiguous() once at load")
    unknown = None
    for fmt, scale, swizzled in candidates:
        if fmt == "mxfp4" and k % formats.MX_BLOCK:
            continue
        others = [l for l in rest if l is not scale and l.op == "placeholder"]
        glob = None
        if fmt == "nvfp4" and others:
            glob = others[0]
            gv = val(glob)
            if len(others) > 1 or gv is None or gv.numel() != 1 or gv.dtype != torch.float32:
                unknown = next(o for o in others if o is not glob or gv is None or gv.numel() != 1)
                continue
        elif others:
            unknown = others[0]
            continue
        inputs = _probe_inputs(packed, scale, glob, fmt)
        try:
            got = evaluate(sub, inputs, graph).float()
        except RegionRejected:
            raise
        except Exception as e:  # noqa: BLE001 - an op we cannot run on the CPU: not our idiom
            raise RegionRejected(f"cannot evaluate the weight subgraph on probe values ({type(e).__name__})")
        got = got.transpose(-1, -2)  # operand is W^T: [.., K, N] -> [.., N, K]
        lead = (batch,) if batch else ()
        p_bytes = inputs[packed].view(torch.uint8).reshape(*lead, n, k // 2)
        for high in (False, True):
            bytes_ = ((p_bytes << 4) | (p_bytes >> 4)) if high else p_bytes
            want = _expected(fmt, bytes_, inputs[scale].reshape(-1), inputs.get(glob), n, k, batch, swizzled)
            if got.shape == want.shape and torch.allclose(got, want, rtol=1e-2, atol=0.0, equal_nan=True):
                return _Identified(fmt, high, packed, scale, glob, swizzled)
    if unknown is not None:
        uv = val(unknown)
        raise RegionRejected(f"the dequantisation also reads graph input {unknown.name} "
                             f"({uv.dtype if uv is not None else '?'}{list(uv.shape) if uv is not None else ''}), "
                             "whose values are unknown at compile time; build lookup tables inline "
                             "(torch.tensor(...) in forward) so they are constants")
    raise RegionRejected("the weight subgraph reads FP4 bytes and block scales but does not compute an "
                         "MXFP4/NVFP4 dequantisation this pass knows (checked on probe values)")


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
    ident = identify(sub, operand, graph, n, k, batch)
    block = formats.MX_BLOCK if ident.fmt == "mxfp4" else formats.NV_BLOCK

    def rewrite(graph: fx.Graph):
        # re-read the activation (and bias): an earlier rewrite may have replaced the node feeding us
        x, bias = (node.args[1], node.args[0]) if is_op(node, aten.addmm) else (node.args[0], None)
        output, act, extra = epilogue_activation(node)
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


def _fp4_subgraph(operand) -> Optional[WeightSubgraph]:
    if not isinstance(operand, fx.Node):
        return None
    sub = weight_subgraph(operand)
    if sub is None or not sub.nodes:
        return None
    if not any(val(l) is not None and val(l).dtype in _PACKED_DTYPES for l in sub.leaves):
        return None
    return sub


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
        elif getattr(aten, "_grouped_mm", None) is not None and is_op(node, aten._grouped_mm):
            if _fp4_subgraph(node.args[1]) is not None:
                found.append(RegionRejected("grouped_mm over dequantised FP4 expert weights is not rewritten "
                                            "(block_scaled_mm is not grouped); left to Inductor"))
            continue
        else:
            continue
        sub = _fp4_subgraph(operand)
        if sub is None:
            continue
        try:
            found.append(_plan(graph, node, x, operand, bias, sub, batched))
        except RegionRejected as e:
            found.append(e)
    return found
