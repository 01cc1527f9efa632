"""``hf_grouped_mm``: experts as 3-D parameters run through grouped GEMMs over tokens sorted by
expert — Hugging Face transformers v5's default ``experts_implementation="grouped_mm"`` and plain
PyTorch written the same way::

    expert_ids, perm = torch.sort(topk_ids.view(-1))
    offsets = torch.cumsum(torch.histc(expert_ids.float(), bins=E, min=0, max=E - 1), 0, dtype=torch.int32)
    h = act(torch._grouped_mm(x[perm // k], w13.transpose(1, 2), offs=offsets))   # + b13[expert_ids]
    y = torch._grouped_mm(h, w2.transpose(1, 2), offs=offsets) * topk_weights.view(-1)[perm, None]
    out = y[inverse(perm)].view(T, k, H).sum(1)

With non-bf16 weights under compile, HF calls its opaque ``transformers::grouped_mm_fallback`` op
instead of ``_grouped_mm``; both are matched.  gpt-oss (transposed weights, biases, interleaved
gate/up, clamped ``alpha`` SwiGLU) and DeepSeek-V4 (clamped SwiGLU) are the same walk.
"""

from __future__ import annotations

import torch.fx as fx

from . import stacked

NAME = "hf_grouped_mm"


def find(graph: fx.Graph) -> list:
    return stacked.find(graph, "grouped", NAME)
