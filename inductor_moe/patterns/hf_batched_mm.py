"""``hf_batched_mm``: experts as 3-D parameters gathered per (token, slot) row and applied with
``bmm`` — Hugging Face transformers v5's ``experts_implementation="batched_mm"`` and plain PyTorch
written with ``torch.bmm`` or ``torch.einsum`` (which decomposes to ``bmm``)::

    ids = topk_ids.view(-1)
    xs = x.repeat_interleave(k, dim=0)
    h = act(torch.bmm(w13[ids], xs[..., None])[..., 0])            # or xs[:, None] @ w13[ids] (transposed)
    y = torch.bmm(w2[ids], h[..., None])[..., 0] * topk_weights.view(-1, 1)
    out = y.view(T, k, H).sum(1)                                     # or (y.view(T, k, H) * w[..., None]).sum(1)
"""

from __future__ import annotations

import torch.fx as fx

from . import stacked

NAME = "hf_batched_mm"


def find(graph: fx.Graph) -> list:
    return stacked.find(graph, "gathered", NAME)
