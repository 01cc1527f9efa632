"""Where the MoE's warp-specialised FP4 GEMMs (templates/moe_fp4_ws.py) run, and their launches.

# Opt-in (config.moe_fp4_ws): on an H100 they measured slower than the swapped Triton tiles
# (BENCHMARKS.md, "The MoE's FP4 GEMMs warp-specialised"; benchmarks/NOTES_fp4.md says where the
# time goes).  They replace L1 and L2 together (align's blocks are theirs: 128 or 256 rows) for FP4 experts with
# bf16 activations on sm_90 at prefill sizes, where each expert gets enough rows for their tiles
# (MIN_ROWS_PER_EXPERT; below it the swapped Triton tiles and the CUDA decode kernels stay).  Each
# takes a re-laid-out copy of its expert weights (1.18 / 1.33x the packed MXFP4 / NVFP4 weight and
# scale bytes), made once per weight version and only while it leaves FREE_MEMORY_RESERVE of the
# device free: a model whose experts do not fit twice keeps the Triton tiles for the layers that
# come after (logged once).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from ..templates.moe_gemm2_ws import HAS_GLUON

log = logging.getLogger(__name__)

MIN_ROWS_PER_EXPERT = 128  # (token, slot) pairs per expert, on average, from which these GEMMs run
WIDE_ROWS_PER_EXPERT = 512  # and from which the M-blocks are 256 rows (else 128)
FREE_MEMORY_RESERVE = 0.25  # of the device's memory, left free after a weight's re-laid-out copy
_refused_for_memory = set()


def fp4_ws_tokens(num_pairs: int, num_experts: int) -> int:
    """Rows of an M-block: 256 where experts average WIDE_ROWS_PER_EXPERT pairs (the pad of each
    expert's last block is then small beside its rows), else 128."""
    return 256 if num_pairs >= WIDE_ROWS_PER_EXPERT * num_experts else 128


def fp4_ws_reason(spec, fmt: str, x_dtype: torch.dtype, num_pairs: int, num_experts: int, hidden: int,
                  intermediate: int, scales_fit: Optional[bool], arch_major: int, interpreting: bool,
                  setting: bool, opted_in: bool = True) -> Optional[str]:
    """None where the warp-specialised FP4 GEMMs take the call (the weights' copies aside:
    ``weight_layouts``), else why not.  ``setting``: config.warp_specialized; ``opted_in``:
    config.moe_fp4_ws."""
    if not opted_in:
        return "config.moe_fp4_ws is off (opt-in: slower than the Triton tiles on an H100)"
    if not setting:
        return "config.warp_specialized is off"
    if fmt not in ("mxfp4", "nvfp4") or spec.act_format != "dense" or x_dtype != torch.bfloat16:
        return "FP4 experts with bf16 activations only"
    if not HAS_GLUON:
        return "this triton has no Gluon"
    if interpreting or arch_major != 9:
        return "sm_90 only (wgmma)"
    if fmt == "mxfp4" and not scales_fit:
        return "MXFP4 scales within the decode's multiply only (e8m0 <= 2)"
    if hidden % 64 or intermediate % 64:
        return "H and I multiples of 64"
    if num_pairs < MIN_ROWS_PER_EXPERT * num_experts:
        return f"at least {MIN_ROWS_PER_EXPERT} (token, slot) pairs per expert on average"
    return None


def _fits_in_memory(w: torch.Tensor, scale: torch.Tensor, nv: bool) -> bool:
    from ..templates.moe_fp4_ws import layout_bytes

    free, total = torch.cuda.mem_get_info(w.device)
    return free - layout_bytes(w, scale, nv) >= FREE_MEMORY_RESERVE * total


def weight_layouts(spec, fmt: str, w13, w13_scale, w2, w2_scale) -> Optional[tuple]:
    """The two re-laid-out expert stacks (``cached_moe_layout``), or None where one is not there and
    cannot be made now (during CUDA-graph capture, or where it would leave too little memory free)."""
    from .. import weight_cache
    from ..templates.moe_fp4_ws import cached_moe_layout, layout_tag

    nv = fmt == "nvfp4"
    if fmt == "mxfp4":
        w13_scale, w2_scale = w13_scale.view(torch.uint8), w2_scale.view(torch.uint8)
    layouts = []
    for w, s, gate_up in ((w13, w13_scale, spec.gate_up), (w2, w2_scale, None)):
        layout = weight_cache.lookup(layout_tag(gate_up), (w, s))
        if layout is None:
            if torch.cuda.is_current_stream_capturing():
                return None
            if not _fits_in_memory(w, s, nv):
                key = (tuple(w.shape), w.device.index)
                if key not in _refused_for_memory:
                    _refused_for_memory.add(key)
                    log.info("the warp-specialised FP4 MoE GEMMs need a re-laid-out copy of %s %s weights that "
                             "would leave less than %.0f%% of the device free: the Triton tiles run them",
                             tuple(w.shape), fmt, 100 * FREE_MEMORY_RESERVE)
                return None
            layout = cached_moe_layout(w, s, nv, gate_up)
        layouts.append(layout)
    return tuple(layouts)


def launch_fp4_ws(spec, fmt: str, layouts: tuple, x, inter, rows, tw, blocks, tokens: int, top_k: int, H: int,
                  I: int, b13, b2, w13_global_scale, w2_global_scale, num_sms: int, use_pdl: bool,
                  launch) -> None:
    """L1 then L2, their tiles from align's counter (blocks.ready[0]): x -> intermediate -> rows."""
    from ..ops import weights as W
    from ..templates.moe_common import ACTIVATION_CODES
    from ..templates.moe_fp4_ws import L1, L2, launch_moe_fp4_ws

    nv = fmt == "nvfp4"
    pairs = inter.shape[0]
    common = dict(tokens=tokens, top_k=top_k, num_pairs=pairs, nv=nv, num_sms=num_sms, use_pdl=use_pdl, launch=launch)
    tickets = launch_moe_fp4_ws(
        L1, x, layouts[0], I, H, inter, b13, w13_global_scale if nv else None, tw, blocks,
        gate_up_gscales=W.gate_up_global_scales(spec, w13_global_scale), interleaved=spec.gate_up == "interleaved",
        activation=ACTIVATION_CODES[spec.activation], limit=spec.limit, alpha=spec.alpha, up_offset=spec.up_offset,
        routing_weight=spec.weight_position == "before_down", **common)
    launch_moe_fp4_ws(L2, inter, layouts[1], H, I, rows, b2, w2_global_scale if nv else None, tw, blocks,
                      routing_weight=spec.weight_position == "after_down", ticket_base=tickets, **common)
