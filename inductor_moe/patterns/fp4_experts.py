"""``fp4_experts``: MoE expert weights dequantised from FP4 inside the graph, e.g. gpt-oss
checkpoints run through Hugging Face's experts with the MXFP4 weights dequantised in forward::

    w13 = dequant(gate_up_proj_blocks [E, 2I, H/32, 16], gate_up_proj_scales [E, 2I, H/32])  # -> [E, 2I, H]
    h = torch._grouped_mm(x[perm // k], w13.transpose(1, 2), offs=offsets)    # or bmm(w13[ids], ...)

or compressed-tensors / ModelOpt NVFP4 stacks (``[E, N, K/2]`` bytes, e4m3 ``[E, N, K/16]``
scales, an fp32 global scale per expert or one for all).

The ``stacked`` walker (``hf_grouped_mm`` / ``hf_batched_mm``) accepts such an operand in place of
a 3-D parameter (``expert_gemms.match_gemm``), then ``identify_experts`` proves what it computes
with the shared FP4 probe (``fp4_recognise``) and the block becomes one ``moe_experts`` call on
the packed bytes and scales (``weight_format`` mxfp4 / nvfp4).  The fused kernels read those
directly: the dequantised copy the model built on every call disappears.  The checkpoint
layouts are the op's layout up to free views (``[E, N, K/32, 16]`` blocks are ``[E, N, K/2]``
bytes); anything that would need a real re-layout (bytes packed high nibble first, scales of
another order) is left to Inductor with the reason.

This module is also the last MoE pattern: ``find`` reports every grouped / gathered GEMM over
dequantised FP4 expert weights that no MoE pattern fused (``block_scaled_mm`` is not grouped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from .. import formats
from .common import RegionRejected, aten, insert_call, is_op, is_weight, val
from .expert_gemms import Gemm, fallback_op, peel
from .fp4_common import WeightSubgraph
from .fp4_recognise import Identified, fp4_weight_subgraph, identify

NAME = "fp4_experts"

UNMATCHED = ("{op} dequantised FP4 expert weights is not rewritten outside a matched MoE block "
             "(block_scaled_mm is not grouped): the weights are dequantised on every call; left to Inductor. "
             "An MoE pattern's skip entry, if any, says why the block did not match")


def is_grouped_mm(node) -> bool:
    fallback = fallback_op()
    return is_op(node, aten._grouped_mm) or (fallback is not None and is_op(node, fallback))


def dequantised_stack(node) -> Optional[WeightSubgraph]:
    """The subgraph computing ``node`` when it is a 3-D float tensor computed (not just viewed)
    from a packed FP4 graph input; a structural test, ``identify_experts`` proves the values."""
    v = val(node)
    if v is None or v.dim() != 3 or not v.dtype.is_floating_point or is_weight(node):
        return None
    return fp4_weight_subgraph(node)


def gathered_expert_weight(node) -> Optional[fx.Node]:
    """``w`` for ``w[ids]`` (through layout ops) of a dequantised 3-D FP4 expert stack ``w``."""
    node = peel(node)
    if is_op(node, aten.index) and len(node.args[1]) == 1 and dequantised_stack(node.args[0]) is not None:
        return node.args[0]
    return None


@dataclass
class FP4Experts:
    """The packed weights, scales and format that replace a block's dequantised w13 and w2."""

    fmt: str  # "mxfp4" / "nvfp4"
    w13: Identified
    w2: Identified
    shapes: dict  # "w13" / "w2" -> (E, N, K)
    leaves: list  # graph inputs and constants the dequantisations read (they bound the region)

    def materialize(self, graph: fx.Graph, anchor: fx.Node) -> tuple[fx.Node, fx.Node, dict]:
        """(w13, w2, scale kwargs) in ``moe_experts``'s layout, as free views of the inputs."""
        scales = {}
        packed = []
        for name, ident in (("w13", self.w13), ("w2", self.w2)):
            E, N, K = self.shapes[name]
            block = formats.MX_BLOCK if self.fmt == "mxfp4" else formats.NV_BLOCK
            packed.append(_as_shape(graph, anchor, ident.packed, [E, N, K // 2], torch.uint8))
            scales[f"{name}_scale"] = _as_shape(graph, anchor, ident.scale, [E, N, K // block])
            if self.fmt == "nvfp4":
                scales[f"{name}_global_scale"] = _per_expert(graph, anchor, ident.global_scale, E)
        return packed[0], packed[1], scales


def _as_shape(graph, anchor, node, shape, dtype=None):
    if dtype is not None and val(node).dtype != dtype:
        node = insert_call(graph, anchor, aten.view.dtype, (node, dtype), {})
    if list(val(node).shape) != list(shape):
        node = insert_call(graph, anchor, aten.view.default, (node, list(shape)), {})
    return node


def _per_expert(graph, anchor, glob, E):
    """The op reads one fp32 global scale per expert, contiguous: a view of a per-expert input;
    a one-element input is repeated (E floats per call), an absent one is 1."""
    if glob is None:
        return insert_call(graph, anchor, aten.full.default, ([E], 1.0),
                           {"dtype": torch.float32, "device": val(anchor).device})
    if val(glob).numel() == E:
        return _as_shape(graph, anchor, glob, [E])
    one = _as_shape(graph, anchor, glob, [1])
    return insert_call(graph, anchor, aten.repeat.default, (one, [E]), {})


def identify_experts(graph: fx.Graph, up: Gemm, down: Gemm, hidden: int) -> FP4Experts:
    """Prove that both expert GEMMs read FP4-dequantised stacks of one format; RegionRejected else."""
    if up.fp4 is None or down.fp4 is None:
        which = "gate/up" if up.fp4 is not None else "down"
        raise RegionRejected(f"only the {which} expert weights are dequantised from FP4 in the graph; "
                             "moe_experts takes one weight format for both")
    E, a, b = val(up.weight).shape
    inter2 = b if up.transposed else a
    shapes = {"w13": (E, inter2, hidden), "w2": (E, hidden, inter2 // 2)}
    found = {}
    for name, gemm in (("w13", up), ("w2", down)):
        _, n, k = shapes[name]
        if k % formats.NV_BLOCK:
            raise RegionRejected(f"{name}: K={k} is not a multiple of the FP4 scale block (16 for nvfp4, "
                                 "32 for mxfp4)")
        ident = identify(gemm.fp4, graph, n, k, E, k_last=not gemm.transposed, batch_global=True)
        block = formats.MX_BLOCK if ident.fmt == "mxfp4" else formats.NV_BLOCK
        sv = val(ident.scale)
        if ident.high_nibble_first:
            raise RegionRejected(f"{name}: FP4 expert weights packed high nibble first (moe_experts reads the "
                                 "low nibble first); repack them once at load")
        if not sv.is_contiguous():
            raise RegionRejected(f"{name}: block scales {ident.scale.name} are not contiguous")
        if tuple(sv.shape) != (E, n, k // block) and sv.dtype == torch.float8_e8m0fnu:
            raise RegionRejected(f"{name}: e8m0 scales of shape {tuple(sv.shape)}, not [E, N, K/32] = "
                                 f"{[E, n, k // block]}; store them in that shape or as uint8")
        found[name] = ident
    if found["w13"].fmt != found["w2"].fmt:
        raise RegionRejected(f"gate/up weights are {found['w13'].fmt} but down weights are {found['w2'].fmt}")
    leaves = list(dict.fromkeys([*up.fp4.leaves, *down.fp4.leaves]))
    return FP4Experts(found["w13"].fmt, found["w13"], found["w2"], shapes, leaves)


def find(graph: fx.Graph) -> list:
    """Grouped / gathered GEMMs over dequantised FP4 expert weights left after the MoE patterns."""
    found = []
    for node in graph.nodes:
        if is_grouped_mm(node) and dequantised_stack(node.args[1]) is not None:
            found.append(RegionRejected(UNMATCHED.format(op="grouped_mm over")))
        elif is_op(node, aten.bmm) and any(gathered_expert_weight(a) is not None for a in node.args[:2]):
            found.append(RegionRejected(UNMATCHED.format(op="bmm over per-row gathered")))
    return found
