"""Canonical ops: the contract between patterns (which emit them) and lowerings (which run them)."""

from .block_scaled_mm import block_scaled_mm, block_scaled_mm_reference
from . import linear_quantized  # noqa: F401  (linear_quantized, block_scaled_mm_relayout)
from .moe_experts import moe_experts, moe_experts_reference, moe_experts_unstacked

__all__ = ["block_scaled_mm", "block_scaled_mm_reference", "moe_experts", "moe_experts_reference",
           "moe_experts_unstacked"]
