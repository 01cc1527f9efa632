"""``inductor_moe::moe_experts``: the canonical MoE experts op.

# T: tokens, H: hidden size, E: experts, k: experts per token, I: expert intermediate size

The reference implementation below is the numerical definition every kernel is tested
against; it runs on any device.  GPU kernels register themselves for CUDA from
``inductor_moe.lowering.moe``; the fake implementation serves any (dynamic) token count.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .. import weight_cache
from ..spec import MoESpec
from . import weights as W

Tensor = torch.Tensor


@torch.library.custom_op("inductor_moe::moe_experts", mutates_args=())
def moe_experts(
    x: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    w13: Tensor,
    w2: Tensor,
    spec: str,
    w13_scale: Optional[Tensor] = None,
    w2_scale: Optional[Tensor] = None,
    w13_global_scale: Optional[Tensor] = None,
    w2_global_scale: Optional[Tensor] = None,
    b13: Optional[Tensor] = None,
    b2: Optional[Tensor] = None,
) -> Tensor:
    """Route each token through its top-k experts (SwiGLU-style MLPs) and combine.

    x [T, H]; topk_ids [T, k] (ids outside [0, E) are skipped); topk_weights [T, k];
    w13/w2 and their scales as ``ops.weights.expert_weight_shapes`` describes for ``spec``.
    """
    return moe_experts_reference(x, topk_ids, topk_weights, w13, w2, spec, w13_scale, w2_scale,
                                 w13_global_scale, w2_global_scale, b13, b2)


@moe_experts.register_fake
def _(x, topk_ids, topk_weights, w13, w2, spec, w13_scale=None, w2_scale=None,
      w13_global_scale=None, w2_global_scale=None, b13=None, b2=None):
    validate_moe_inputs(x, topk_ids, topk_weights, w13, w2, MoESpec.from_str(spec), w13_scale, w2_scale,
                        w13_global_scale, w2_global_scale, b13, b2)
    return x.new_empty(x.shape)


@torch.library.custom_op("inductor_moe::moe_experts_unstacked", mutates_args=())
def moe_experts_unstacked(
    x: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    gate: list[Tensor],
    up: list[Tensor],
    down: list[Tensor],
    biases: list[Tensor],
    scales: list[Tensor],
    global_scales: list[Tensor],
    spec: str,
) -> Tensor:
    """The same op over per-expert ``nn.Linear`` weights ([I, H], [I, H], [H, I] each, or packed
    FP4 [I, H/2], [I, H/2], [H, I/2] for ``weight_format`` mxfp4 / nvfp4).

    ``biases``, ``scales`` (FP4 block scales) and ``global_scales`` (NVFP4, one element each) are
    empty, or the E gate, E up and E down tensors in that order.  Models that keep experts in an
    ``nn.ModuleList`` never hold stacked weights; the stack is built once (cached on the
    parameters' storage and version) and reused on every call.
    """
    stacked = stack_expert_weights(gate, up, down, biases, scales, global_scales)
    w13, w2, b13, b2 = stacked["w13"], stacked["w2"], stacked["b13"], stacked["b2"]
    quant = {k: v for k, v in stacked.items() if k.endswith("scale") and v is not None}
    return torch.ops.inductor_moe.moe_experts(x, topk_ids, topk_weights, w13, w2, spec, b13=b13, b2=b2, **quant)


@moe_experts_unstacked.register_fake
def _(x, topk_ids, topk_weights, gate, up, down, biases, scales, global_scales, spec):
    E = len(gate)
    if not (len(up) == len(down) == E) or not gate or any(len(t) not in (0, 3 * E) for t in (biases, scales, global_scales)):
        raise ValueError("moe_experts_unstacked: need one gate/up/down weight per expert and 0 or 3E biases, "
                         "scales and global scales")
    if (MoESpec.from_str(spec).weight_format in ("mxfp4", "nvfp4")) != bool(scales):
        raise ValueError("moe_experts_unstacked: FP4 weight formats need block scales, other formats none")
    return x.new_empty(x.shape)


def stack_expert_weights(gate: Sequence[Tensor], up: Sequence[Tensor], down: Sequence[Tensor],
                         biases: Sequence[Tensor] = (), scales: Sequence[Tensor] = (),
                         global_scales: Sequence[Tensor] = ()) -> dict:
    """w13 [E, 2I, H(/2)], w2 [E, H, I(/2)], b13 [E, 2I], b2 [E, H], their block scales and NVFP4
    global scales (w13: [E, 2], gate's and up's own; w2: [E]); absent ones are None.  Built once."""
    E = len(gate)

    def gate_up_down(parts):
        if not parts:
            return None, None
        gate_up = torch.cat([torch.stack(list(parts[:E])), torch.stack(list(parts[E:2 * E]))], dim=1)
        return gate_up, torch.stack(list(parts[2 * E:]))

    def build():
        w13, w2 = gate_up_down([*gate, *up, *down])
        b13, b2 = gate_up_down(biases)
        s13, s2 = gate_up_down(scales)
        g13, g2 = gate_up_down([g.reshape(1).float() for g in global_scales])
        return {"w13": w13.contiguous(), "w2": w2.contiguous(), "b13": b13, "b2": b2,
                "w13_scale": s13, "w2_scale": s2, "w13_global_scale": g13,
                "w2_global_scale": None if g2 is None else g2.reshape(E)}

    return weight_cache.cached("stack_experts", [*gate, *up, *down, *biases, *scales, *global_scales], build)


# ----------------------------------------------------------------------------- validation

def validate_moe_inputs_once(x, topk_ids, topk_weights, w13, w2, spec: MoESpec, *optional) -> None:
    """``validate_moe_inputs`` for the kernels' per-call path: a signature (shapes, dtypes,
    devices) that passed once passes again without the Python checks."""
    tensors = (x, topk_ids, topk_weights, w13, w2, *optional)
    key = (spec, tuple(None if t is None else (tuple(t.shape), t.dtype, t.device) for t in tensors))
    if key not in _validated:
        validate_moe_inputs(x, topk_ids, topk_weights, w13, w2, spec, *optional)
        if len(_validated) >= 4096:
            _validated.clear()
        _validated.add(key)


_validated: set = set()


def validate_moe_inputs(x, topk_ids, topk_weights, w13, w2, spec: MoESpec, w13_scale=None, w2_scale=None,
                        w13_global_scale=None, w2_global_scale=None, b13=None, b2=None) -> None:
    """Clear errors for shapes, dtypes and devices; called by the reference, fake and kernels."""
    if x.dim() != 2 or not x.dtype.is_floating_point:
        raise ValueError(f"moe_experts: x must be a 2-D float tensor [T, H], got {x.dtype} {tuple(x.shape)}")
    if topk_ids.dim() != 2 or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"moe_experts: topk_ids must be int32/int64 [T, k], got {topk_ids.dtype} {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape or not topk_weights.dtype.is_floating_point:
        raise ValueError(f"moe_experts: topk_weights must be float with topk_ids' shape {tuple(topk_ids.shape)}, "
                         f"got {topk_weights.dtype} {tuple(topk_weights.shape)}")
    if topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"moe_experts: topk_ids has {topk_ids.shape[0]} rows but x has {x.shape[0]} tokens")
    tensors = [t for t in (x, topk_ids, topk_weights, w13, w2, w13_scale, w2_scale, w13_global_scale,
                           w2_global_scale, b13, b2) if t is not None]
    devices = {t.device.type for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"moe_experts: all tensors must be on one device, got {sorted(devices)}")
    expected = W.expert_weight_shapes(spec, num_experts=w13.shape[0], hidden=x.shape[1],
                                      intermediate=W.intermediate_size(spec, w13, w2))
    given = {"w13": w13, "w2": w2, "w13_scale": w13_scale, "w2_scale": w2_scale,
             "w13_global_scale": w13_global_scale, "w2_global_scale": w2_global_scale}
    for name, (shape, dtypes) in expected.items():
        t = given[name]
        if shape is None:
            if t is not None:
                raise ValueError(f"moe_experts: {name} is not used by weight format {spec.weight_format!r}")
            continue
        if t is None:
            raise ValueError(f"moe_experts: weight format {spec.weight_format!r} needs {name} {shape}")
        shapes = [tuple(shape)]
        if name == "w13_global_scale":
            shapes.append((*shape, 2))  # gate's and up's own (W.gate_up_global_scales)
        if tuple(t.shape) not in shapes or t.dtype not in dtypes:
            raise ValueError(f"moe_experts: {name} must be {' or '.join(map(str, shapes))} of "
                             f"{[str(d) for d in dtypes]}, got {tuple(t.shape)} {t.dtype}")
    E, I2 = w13.shape[0], 2 * W.intermediate_size(spec, w13, w2)
    if b13 is not None and tuple(b13.shape) != (E, I2):
        raise ValueError(f"moe_experts: b13 must be [{E}, {I2}], got {tuple(b13.shape)}")
    if b2 is not None and tuple(b2.shape) != (E, x.shape[1]):
        raise ValueError(f"moe_experts: b2 must be [{E}, {x.shape[1]}], got {tuple(b2.shape)}")


# ------------------------------------------------------------------------------ reference

def apply_activation(gate: Tensor, up: Tensor, spec: MoESpec) -> Tensor:
    """``act(gate) * (up + up_offset)`` after the optional clamp; the SwiGLU family."""
    if spec.limit is not None:
        gate = gate.clamp(max=spec.limit)
        up = up.clamp(min=-spec.limit, max=spec.limit)
    if spec.activation == "silu":
        act = gate * torch.sigmoid(spec.alpha * gate)
    elif spec.activation == "gelu":
        act = F.gelu(gate)
    else:
        act = F.gelu(gate, approximate="tanh")
    return act * (up + spec.up_offset)


def split_gate_up(h13: Tensor, spec: MoESpec) -> tuple[Tensor, Tensor]:
    if spec.gate_up == "interleaved":
        return h13[..., 0::2], h13[..., 1::2]
    half = h13.shape[-1] // 2
    return h13[..., :half], h13[..., half:]


def round_activation(h: Tensor, spec: MoESpec, storage_dtype: torch.dtype) -> Tensor:
    """What the GEMMs see: the activation rounded to its storage format (bf16 or fp8 + scales)."""
    from .. import formats

    if spec.act_format == "dense":
        return h.to(storage_dtype).to(h.dtype)
    if spec.act_format == "fp8_block128":
        q, s = formats.quantize_fp8_per_token(h, group=128)
        return formats.dequantize_fp8_groups(q, s, 128).to(h.dtype)
    q, s = formats.quantize_fp8_mx32(h)
    return formats.dequantize_fp8_groups(q, s, 32).to(h.dtype)


def moe_experts_reference(x, topk_ids, topk_weights, w13, w2, spec, w13_scale=None, w2_scale=None,
                          w13_global_scale=None, w2_global_scale=None, b13=None, b2=None) -> Tensor:
    """Plain-PyTorch definition.  Computes in float32 (float64 when x is float64).

    Per (token, slot) rows are formed in a fixed order and summed over slots 0..k-1, so the
    result is deterministic.  The intermediate is rounded to x's dtype (or fp8) exactly where a
    kernel writes it to memory.
    """
    spec = MoESpec.from_str(spec) if isinstance(spec, str) else spec
    validate_moe_inputs(x, topk_ids, topk_weights, w13, w2, spec, w13_scale, w2_scale,
                        w13_global_scale, w2_global_scale, b13, b2)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    w13_f, w2_f = W.dense_expert_weights(spec, w13, w2, w13_scale, w2_scale, w13_global_scale,
                                         w2_global_scale, compute)
    T, H = x.shape
    k = topk_ids.shape[1]
    E = w13_f.shape[0]
    flat_ids = topk_ids.reshape(-1).long()
    flat_w = topk_weights.reshape(-1, 1).to(compute)
    xs = round_activation(x.to(compute), spec, x.dtype) if spec.act_format != "dense" else x.to(compute)
    rows_out = torch.zeros(T * k, H, dtype=compute, device=x.device)
    for e in range(E):
        rows = (flat_ids == e).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        h13 = xs[rows // k] @ w13_f[e].T
        if b13 is not None:
            h13 = h13 + b13[e].to(compute)
        h = apply_activation(*split_gate_up(h13, spec), spec)
        if spec.weight_position == "before_down":
            h = h * flat_w[rows]
        y = round_activation(h, spec, x.dtype) @ w2_f[e].T
        if b2 is not None:
            y = y + b2[e].to(compute)
        if spec.weight_position == "after_down":
            y = y * flat_w[rows]
        rows_out[rows] = y
    out = rows_out.view(T, k, H)
    total = torch.zeros(T, H, dtype=compute, device=x.device)
    for j in range(k):
        total = total + out[:, j]
    return total.to(x.dtype)
