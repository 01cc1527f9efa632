"""The pattern library: idioms real models produce, rewritten into canonical ops.

Each module exposes ``find(graph) -> list`` of candidate matches (``MoEMatch`` or callables
that perform an FP4 rewrite) and never edits the graph itself; ``passes.py`` emits the
canonical ops, counts them, and records every rejection with its reason.  Order matters
only where two idioms could claim the same nodes: the more specific idiom comes first.
"""

import importlib

# MoE idioms, most specific first.
MOE_PATTERNS = (
    "hf_grouped_mm",  # 3-D expert params, tokens sorted by expert, _grouped_mm / transformers fallback op
    "hf_batched_mm",  # 3-D expert params gathered per row (w[ids]) and applied with bmm / einsum
    "modulelist_loop",  # per-expert nn.Linear triples in a static loop, torch.where + index_add_
    "hf_eager_loop",  # HF experts_implementation="eager": never one graph; reported as skipped, with the fix
    "split_block",  # top-k ids leave the graph unfused (block split by a graph break): reported
    "fp4_experts",  # grouped / gathered GEMMs over FP4-dequantised expert weights left unfused: reported, last
)

# Block-scaled FP4 matmul idioms.
FP4_PATTERNS = (
    "fp4_scaled_mm",  # torch._scaled_mm / F.scaled_mm with float4_e2m1fn_x2 operands and block scales
    "fp4_dequant_matmul",  # unpack nibbles -> e2m1 -> x block scale -> linear / mm / bmm
    "fp4_linear_quantized",  # opt-in (config.linear_weight_format): bf16 nn.Linear quantised once
)


def load(names):
    """Import pattern modules lazily (only when a pass runs)."""
    return [importlib.import_module(f"{__name__}.{name}") for name in names]
