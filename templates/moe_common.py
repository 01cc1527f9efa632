"""Pieces shared by the MoE kernels: PDL hooks and the SwiGLU-family epilogue.

# PDL: Programmatic Dependent Launch (sm_90+).  Every MoE kernel calls ``pdl_wait()`` before
# its first global-memory access (read or write), so a kernel launched early never touches a
# buffer its predecessor still uses, and ``pdl_launch_dependents()`` once its inputs are
# consumed, so the next kernel's launch overlaps this one's tail.  Both compile to nothing
# unless USE_PDL (False under TRITON_INTERPRET and on CPU).
"""

import os

import triton
import triton.language as tl

# Under TRITON_INTERPRET (numpy), triton 3.9 computes a bf16 x bf16 tl.dot wrongly and casts
# fp32 -> bf16 by truncation; the kernels then upcast dot operands and round to nearest even
# by hand (see ``store_cast``).  Compiled kernels never take these branches.
INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")

# activation codes (constexpr ACTIVATION)
SILU, GELU, GELU_TANH = 0, 1, 2
ACTIVATION_CODES = {"silu": SILU, "gelu": GELU, "gelu_tanh": GELU_TANH}

try:  # triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents as _gdc_launch_dependents
    from triton.language.extra.cuda import gdc_wait as _gdc_wait

    HAS_GDC = True
except ImportError:  # pragma: no cover - older triton
    HAS_GDC = False


if HAS_GDC:

    @triton.jit
    def pdl_wait(USE_PDL: tl.constexpr):
        if USE_PDL:
            _gdc_wait()

    @triton.jit
    def pdl_launch_dependents(USE_PDL: tl.constexpr):
        if USE_PDL:
            _gdc_launch_dependents()

else:  # pragma: no cover

    @triton.jit
    def pdl_wait(USE_PDL: tl.constexpr):
        tl.static_assert(not USE_PDL, "this triton has no gdc_wait; launch without PDL")

    @triton.jit
    def pdl_launch_dependents(USE_PDL: tl.constexpr):
        tl.static_assert(not USE_PDL, "this triton has no gdc_launch_dependents; launch without PDL")


@triton.jit
def store_cast(x, dtype: tl.constexpr):
    """fp32 -> bf16/fp16 (for a store or an MMA operand), round to nearest even on every backend."""
    if INTERPRET:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def swiglu_epilogue(gate, up, alpha, limit, up_offset,
                    ACTIVATION: tl.constexpr, HAS_LIMIT: tl.constexpr):
    """``act(clamp(gate)) * (clamp(up) + up_offset)`` in fp32, as ``apply_activation`` defines it."""
    if HAS_LIMIT:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
    if ACTIVATION == 0:  # silu with slope alpha: g * sigmoid(alpha * g)
        act = gate * tl.sigmoid(alpha * gate)
    elif ACTIVATION == 1:  # gelu, erf form
        act = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    else:  # gelu, tanh form; tanh(z) = 2 sigmoid(2z) - 1
        z = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        act = 0.5 * gate * (2.0 * tl.sigmoid(2.0 * z))
    return act * (up + up_offset)
