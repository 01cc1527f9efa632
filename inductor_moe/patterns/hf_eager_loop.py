"""``hf_eager_loop``: Hugging Face transformers v5 ``experts_implementation="eager"`` — a Python
loop over the experts that were hit::

    expert_mask = one_hot(topk_ids, E).permute(2, 1, 0)
    expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:                      # data-dependent trip count
        ...

Dynamo cannot unroll a loop whose trip count is a tensor's data-dependent size (not even with
``capture_dynamic_output_shape_ops``, which the backend turns on): it ends the graph at
``nonzero`` and compiles each iteration separately, so no graph ever holds the whole block.
This module matches nothing; it recognises the graph that ends at ``expert_hit`` and reports
the block as skipped, with what to do instead.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .common import RegionRejected, aten, is_op
from .expert_gemms import strip_convert

NAME = "hf_eager_loop"

REASON = ("Hugging Face experts_implementation='eager' loops over the experts hit (`for expert_idx in "
          "expert_hit`), a data-dependent trip count that Dynamo splits into one graph per expert, so the "
          "block cannot become one fused op. Load the model with experts_implementation=\"grouped_mm\" "
          "(the transformers default) or \"batched_mm\".")


def _is_expert_mask(node) -> bool:
    """``one_hot(ids, n).permute(2, 1, 0)`` after decomposition (eq(ids[..., None], arange(n)))."""
    if not (is_op(node, aten.permute) and list(node.args[1]) == [2, 1, 0]):
        return False
    hot = strip_convert(node.args[0])
    if is_op(hot, aten.one_hot):
        return True
    return (is_op(hot, aten.eq) and is_op(hot.args[0], aten.unsqueeze)
            and is_op(hot.args[1], torch.ops.prims.iota, aten.arange))


def _is_expert_hit(node) -> bool:
    """``nonzero(mask.sum((-1, -2)) > 0)``."""
    if not is_op(node, aten.nonzero):
        return False
    hit = node.args[0]
    if not (is_op(hit, aten.gt, aten.ne) and hit.args[1] == 0):
        return False
    total = hit.args[0]
    return is_op(total, aten.sum) and sorted(total.args[1]) in ([-2, -1], [1, 2]) and _is_expert_mask(total.args[0])


def find(graph: fx.Graph) -> list:
    return [RegionRejected(REASON) for node in graph.nodes if _is_expert_hit(node)]
