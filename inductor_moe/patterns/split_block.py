"""``split_block``: an MoE block that Dynamo split at a graph break right after routing.

When the top-k expert ids are an *output* of a graph and nothing in that graph consumed them as
an MoE op, the experts run in later graphs: typically a Python loop over ``.tolist()`` counts or
over ``nonzero()`` experts, whose trip count is data-dependent, so Dynamo cannot unroll it even
with the backend's ``capture_scalar_outputs`` / ``capture_dynamic_output_shape_ops``.  Each
piece then looks like a dense MLP, and fusing is impossible; this module matches nothing and
reports the block as skipped, with what to do instead.  It runs last, so blocks that another
pattern already rewrote (their ids feed an ``inductor_moe`` op) are not reported.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from .common import RegionRejected, aten, is_op
from .expert_gemms import peel

NAME = "split_block"

REASON = ("the top-k expert ids leave the graph ({name}): the MoE block after the router was split off by a graph "
          "break (e.g. a Python loop over .tolist() counts or over nonzero() experts, a data-dependent trip count), "
          "so no graph holds the whole block. Loop over range(num_experts) with torch.where(topk_ids == e), or keep "
          "the experts as 3-D parameters (torch._grouped_mm / bmm); for Hugging Face models use "
          "experts_implementation=\"grouped_mm\" (the default).")


def _is_topk_ids(node) -> bool:
    return is_op(node, operator.getitem) and node.args[1] == 1 and is_op(node.args[0], aten.topk)


def find(graph: fx.Graph) -> list:
    output = next((n for n in graph.nodes if n.op == "output"), None)
    if output is None:
        return []
    results = []
    for leaf in output.all_input_nodes:
        ids = peel(leaf)
        if not _is_topk_ids(ids):
            continue
        consumed = any(str(u.target).startswith("inductor_moe.") for n in (ids, leaf) for u in n.users)
        if not consumed:
            results.append(RegionRejected(REASON.format(name=ids.name)))
    return results
