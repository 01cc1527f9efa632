"""``fp4_scaled_mm``: ``torch._scaled_mm`` / ``torch.nn.functional.scaled_mm`` (``_scaled_mm_v2``)
with ``float4_e2m1fn_x2`` operands and block scales::

    y = torch._scaled_mm(a_fp4, w_fp4.t(), a_scale, w_scale, out_dtype=torch.bfloat16)

MX (e8m0 scales, block 32) or NV (e4m3 scales, block 16; with ``scaled_mm`` also a tensor-wise
fp32 global scale per operand).  cuBLAS runs these only on Blackwell and reads the scales in its
swizzled 128x4 layout (always, for ``_scaled_mm``; ``SWIZZLE_32_4_4`` for ``scaled_mm``); we
un-swizzle weight scales once (cached) and activation scales per call, so the same graph runs on
Hopper and on the CPU.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from ..spec import GemmSpec
from .common import RegionRejected, aten, insert_call, is_op, val
from .fp4_common import emit_relayout, epilogue_activation

NAME = "fp4_scaled_mm"
_FP4 = getattr(torch, "float4_e2m1fn_x2", None)
_OUT = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
# torch.nn.functional.ScalingType / SwizzleType values in _scaled_mm_v2's int lists
_TENSORWISE, _BLOCK1X16, _BLOCK1X32 = 0, 2, 3
_NO_SWIZZLE, _SWIZZLE_32_4_4 = 0, 1


def _weight_rows(mat2: fx.Node) -> tuple[fx.Node, Optional[str]]:
    """``mat2`` is [K/2, N]; the canonical weight is [N, K/2] contiguous: ``w.t()`` gives it back."""
    if is_op(mat2, aten.t) or (is_op(mat2, aten.permute) and list(mat2.args[1]) == [1, 0]):
        inner = mat2.args[0]
        if val(inner) is not None and val(inner).is_contiguous():
            return inner, None
    v = val(mat2)
    if v is not None and v.dim() == 2 and v.stride(0) == 1 and v.stride(1) == v.shape[0]:
        return mat2, "transpose"  # column-major [K/2, N]: its transpose is a contiguous [N, K/2]
    return mat2, "the FP4 weight operand must be a transposed row-major [N, K/2] tensor (w.t())"


def _format(scale_a, scale_b) -> str:
    sa, sb = val(scale_a), val(scale_b)
    if sa is None or sb is None:
        raise RegionRejected("scales carry no metadata")
    if sa.dtype == sb.dtype == torch.float8_e8m0fnu:
        return "mxfp4"
    if sa.dtype == sb.dtype == torch.float8_e4m3fn:
        return "nvfp4"
    raise RegionRejected(f"block scales of dtypes {sa.dtype} / {sb.dtype} (want e8m0 for MX or e4m3 for NV)")


def _plan(node, a, mat2, scale_a, scale_b, bias, out_dtype, swizzled: bool, globals_=()):
    av, bv = val(a), val(mat2)
    if av is None or bv is None or av.dtype != _FP4 or bv.dtype != _FP4:
        return None  # not an FP4 scaled matmul (fp8 ones stay with Inductor)
    if av.dim() != 2 or bv.dim() != 2:
        raise RegionRejected(f"scaled_mm operands of ranks {av.dim()} / {bv.dim()}")
    fmt = _format(scale_a, scale_b)
    w, problem = _weight_rows(mat2)
    if problem not in (None, "transpose"):
        raise RegionRejected(problem)
    out_dtype = out_dtype or torch.bfloat16
    if out_dtype not in _OUT:
        raise RegionRejected(f"out_dtype {out_dtype}")
    if bias is not None and (val(bias) is None or val(bias).dim() != 1):
        raise RegionRejected("bias is not a [N] vector")
    k = av.shape[1] * 2
    block = 32 if fmt == "mxfp4" else 16
    if k % block:
        raise RegionRejected(f"K={k} is not a multiple of the {fmt} block {block}")

    def rewrite(graph: fx.Graph):
        output, act, extra = epilogue_activation(node)
        spec = GemmSpec(a_format=fmt, b_format=fmt, out_dtype=_OUT[out_dtype], activation=act)
        b = w if problem is None else insert_call(graph, output, aten.permute.default, (mat2, [1, 0]), {})
        layout = "a_scale_swizzled,b_scale_swizzled" if swizzled else ""
        a_scale, b_scale = scale_a, scale_b  # plain ones of another shape are reshaped inside the op
        glob = None
        if globals_:
            ga, gb = globals_
            glob = insert_call(graph, output, aten.mul.Tensor, (ga, gb), {})
            glob = insert_call(graph, output, aten.view.default, (glob, [1]), {})
        emit_relayout(graph, NAME, output, a, b, b_scale, spec, layout,
                      {"a_scale": a_scale, "global_scale": glob, "bias": bias}, [node, *extra])

    return rewrite


def find(graph: fx.Graph) -> list:
    found = []
    if _FP4 is None:
        return found
    v2 = getattr(aten, "_scaled_mm_v2", None)
    for node in list(graph.nodes):
        try:
            if is_op(node, aten._scaled_mm):
                args = list(node.args) + [None] * (8 - len(node.args))
                a, mat2, sa, sb, bias, scale_result, out_dtype = args[:7]
                bias = node.kwargs.get("bias", bias)
                out_dtype = node.kwargs.get("out_dtype", out_dtype)
                if node.kwargs.get("scale_result", scale_result) is not None and val(a) is not None \
                        and val(a).dtype == _FP4:
                    raise RegionRejected("scale_result with FP4 operands")
                plan = _plan(node, a, mat2, sa, sb, bias, out_dtype, swizzled=True)
            elif v2 is not None and is_op(node, v2):
                names = [arg.name for arg in v2.default._schema.arguments]
                bound = dict(zip(names, node.args), **node.kwargs)
                a, mat2 = bound["self"], bound["mat2"]
                if val(a) is None or val(a).dtype != _FP4:
                    continue
                if list(bound.get("contraction_dim") or []) not in ([], [1, 0]):
                    raise RegionRejected(f"contraction_dim={bound['contraction_dim']}")
                sa, ra, wa = bound["scale_a"], list(bound["recipe_a"]), list(bound["swizzle_a"])
                sb, rb, wb = bound["scale_b"], list(bound["recipe_b"]), list(bound["swizzle_b"])
                globals_ = ()
                if ra == rb == [_BLOCK1X32] or ra == rb == [_BLOCK1X16]:
                    pass
                elif ra == rb == [_BLOCK1X16, _TENSORWISE]:
                    globals_ = (sa[1], sb[1])
                else:
                    raise RegionRejected(f"scaled_mm recipes {ra} / {rb} with FP4 operands")
                if set(wa + wb) - {_NO_SWIZZLE, _SWIZZLE_32_4_4} or len(set(wa + wb)) != 1:
                    raise RegionRejected(f"scale swizzles {wa} / {wb}")
                plan = _plan(node, a, mat2, sa[0], sb[0], bound.get("bias"), bound.get("out_dtype"),
                             swizzled=wa[0] == _SWIZZLE_32_4_4, globals_=globals_)
            else:
                continue
        except RegionRejected as e:
            found.append(e)
            continue
        if plan is not None:
            found.append(plan)
    return found
