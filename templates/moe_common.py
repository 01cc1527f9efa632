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
def expert_block_of_program(block_expert_ptr, expert_start_ptr, expert_count_ptr, num_n,
                            BLOCK_M: tl.constexpr, EXPERT_MAJOR: tl.constexpr, USE_PDL: tl.constexpr):
    """(M-block, N tile, expert or -1 past the last used block) of this program of an expert GEMM
    grid; waits for the predecessor kernel (PDL) before its first read.  N tiles go fastest, or
    with EXPERT_MAJOR, inside each expert's range of programs, its M-blocks: expert e's blocks
    [b0, b0 + nb) own programs [b0 * num_n, (b0 + nb) * num_n) either way, and programs start in id
    order, so then an expert's blocks read each weight tile together and all but the first read hit
    in L2 (N fastest puts them num_n programs apart: at gpt-oss T = 4096, 13% of w13 was read twice
    from DRAM; benchmarks/NOTES.md, "An expert's M-blocks side by side")."""
    pid = tl.program_id(0)
    b = pid // num_n
    pdl_wait(USE_PDL)
    e = tl.load(block_expert_ptr + b)
    pid_m = b
    pid_n = pid % num_n
    if EXPERT_MAJOR:  # nested: `EXPERT_MAJOR and e >= 0` failed to build where the default was left (AOT)
        if e >= 0:
            first = tl.load(expert_start_ptr + e) // BLOCK_M
            nb = tl.cdiv(tl.load(expert_count_ptr + e), BLOCK_M)
            local = pid - first * num_n
            pid_m = first + local % nb
            pid_n = local // nb
    return pid_m, pid_n, e


@triton.jit
def k_loop_steps(k_main, BLOCK_K: tl.constexpr, AT_LEAST_ONE: tl.constexpr):
    """Steps of BLOCK_K in a K loop over [0, k_main).  AT_LEAST_ONE (the swapped FP4 tiles; k_main > 0:
    K > 0, and K_HALF_TAIL only after a whole step, moe_plan.k_half_tail): max(steps, 1), so the
    compiler knows the loop body runs.
    Otherwise the loop gets a zero-trip path that zeroes the accumulator registers outside the
    loop, which ptxas takes for non-wgmma writes inside a wgmma pipeline stage: it then serialises
    every wgmma of the kernel (ptxas C7515; a wait for each 64x16 MMA before the next)."""
    steps = tl.cdiv(k_main, BLOCK_K)
    if AT_LEAST_ONE:
        steps = tl.maximum(steps, 1)
    return steps


@triton.jit
def expert_row_end(expert_start_ptr, expert_count_ptr, e):
    """One past expert e's last sorted row (its blocks are padded: rows from here on are not its)."""
    return tl.load(expert_start_ptr + e) + tl.load(expert_count_ptr + e)


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


# ------------------------------------------------------------------------------ fp8 activations
# ACT_FORMAT (constexpr): 0 dense (bf16/fp16 activations), 1 e4m3 with one fp32 scale per row per
# 128 (amax / 448, 1.0 for an all-zero group), 2 e4m3 with one e8m0 scale per row per 32
# (2^ceil(log2(amax / 448)), stored as its byte).  Numerics as formats.quantize_fp8_per_token /
# quantize_fp8_mx32 define them; the fp32 values are quantised (never a bf16-rounded copy).
ACT_DENSE, ACT_FP8_BLOCK128, ACT_FP8_MX32 = 0, 1, 2
ACT_FORMAT_CODES = {"dense": ACT_DENSE, "fp8_block128": ACT_FP8_BLOCK128, "fp8_mx32": ACT_FP8_MX32}
ACT_GROUPS = {ACT_FP8_BLOCK128: 128, ACT_FP8_MX32: 32}


@triton.jit
def round_e4m3(x):
    """fp32 in [-448, 448] -> e4m3, round to nearest even on every backend (the interpreter's
    cast rounds ties away; there the value is first rounded to the e4m3 grid by hand)."""
    if INTERPRET:
        bits = x.to(tl.int32, bitcast=True)
        e = tl.maximum((bits >> 23) & 0xFF, 121)  # below 2^-6 e4m3 is subnormal: step 2^-9
        ulp = ((e - 3) << 23).to(tl.float32, bitcast=True)  # 2^(exponent - 3)
        magic = ulp * 12582912.0  # 1.5 * 2^23 ulps: the fp32 add rounds to a multiple of ulp (RNE)
        x = (x + magic) - magic
    return x.to(tl.float8e4nv)


@triton.jit
def e8m0_to_fp32(byte):
    """e8m0 byte (int32) -> 2^(byte - 127) in fp32; byte 0 is 2^-127 (subnormal), 255 is NaN."""
    val = tl.where(byte == 0, 0x00400000, byte << 23).to(tl.float32, bitcast=True)
    return tl.where(byte == 255, float("nan"), val)


@triton.jit
def quantize_fp8_groups(h, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACT_FORMAT: tl.constexpr):
    """h [BLOCK_M, BLOCK_N] fp32 (masked entries already 0) -> (e4m3 [BLOCK_M, BLOCK_N],
    scales [BLOCK_M, BLOCK_N // G]: fp32 for ACT_FORMAT 1, e8m0 bytes (uint8) for 2)."""
    G: tl.constexpr = 128 if ACT_FORMAT == 1 else 32
    tl.static_assert(BLOCK_N % G == 0, "fp8 activation groups must not straddle tiles")
    hg = tl.reshape(h, [BLOCK_M, BLOCK_N // G, G])
    amax = tl.max(tl.abs(hg), axis=2)
    # a NaN makes its group's scale NaN (e8m0: 255), as the reference quantiser's amax does: the max
    # reduction and the clamp below would otherwise drop it and leave finite values
    nan_group = tl.max((hg != hg).to(tl.int32), axis=2) > 0
    if ACT_FORMAT == 1:
        scale = amax / 448.0
        scale = tl.where(scale == 0.0, 1.0, scale)
        scale = tl.where(nan_group, float("nan"), scale)
        stored = scale
    else:
        r = amax / 448.0
        bits = r.to(tl.int32, bitcast=True)
        ex = (bits >> 23) & 0xFF
        mant = bits & 0x7FFFFF
        # smallest power of two >= r, read off the bits (exact powers of two are not bumped)
        byte = tl.where(ex == 0, tl.where(mant > 0x400000, 1, 0), ex + (mant != 0).to(tl.int32))
        byte = tl.minimum(byte, 254)
        byte = tl.where(nan_group | (r != r), 255, byte)
        scale = e8m0_to_fp32(byte)
        stored = byte.to(tl.uint8)
    q = tl.minimum(tl.maximum(hg / scale[:, :, None], -448.0), 448.0)
    q = round_e4m3(tl.reshape(q, [BLOCK_M, BLOCK_N]))
    return q, stored


@triton.jit
def dequant_mx32_tile(a, a_s, BLOCK_K: tl.constexpr):
    """e4m3 [BM, BK] x e8m0 bytes [BM, BK // 32] -> bf16 (exact: 4 significant bits x a power of two)."""
    BM: tl.constexpr = a.shape[0]
    a3 = tl.reshape(a.to(tl.float32), [BM, BLOCK_K // 32, 32])
    return tl.reshape(a3 * e8m0_to_fp32(a_s.to(tl.int32))[:, :, None], [BM, BLOCK_K]).to(tl.bfloat16)


@triton.jit
def round_to_fp8_mx32(v, ROWS: tl.constexpr, COLS: tl.constexpr):
    """fp32 [ROWS, COLS] (masked entries 0) -> the same values rounded as the fp8_mx32 activations
    carry them (quantize_fp8_groups, then dequant_mx32_tile), in fp32 again: a bf16 tensor holds
    them exactly, so the bf16-activation kernels can run fp8_mx32 activations with their numerics."""
    q, s = quantize_fp8_groups(v, ROWS, COLS, 2)
    return dequant_mx32_tile(q, s, COLS).to(tl.float32)


@triton.jit
def to_mma_k_order(v, ROWS: tl.constexpr, COLS: tl.constexpr):
    """[ROWS, COLS] in K order -> the K order of the swapped FP4 tiles (COLS a multiple of 64).

    Within each 64 of K, the element at k = 16c + 8q + 4g + 2e + h moves to 32q + 16h + 8g + 2c + e.
    A tl.dot reads its register A operand (wgmma) as, per row and 16 of K, lane c of each quad
    holding k = 2c, 2c+1, 2c+8, 2c+9: in this order, that lane's values of a row are the 8
    consecutive packed weight bytes 8c..8c+7 of the 64 (both nibbles of each byte), so the
    decoded FP4 weight lands in the MMA's registers with no shuffle.  The activations go through
    the same permutation (the sum over K does not care), once: x by ``moe_kperm_kernel``, the
    intermediate by L1's epilogue."""
    v = tl.reshape(v, [ROWS, COLS // 64, 4, 2, 2, 2, 2])  # (c, q, g, e, h)
    v = tl.permute(v, (0, 1, 3, 6, 4, 2, 5))  # (q, h, g, c, e)
    return tl.reshape(v, [ROWS, COLS])


@triton.jit
def moe_kperm_kernel(x_ptr, out_ptr, T, K, stride_xt, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                     USE_PDL: tl.constexpr, ROUND_MX32: tl.constexpr = False, K_ORDER: tl.constexpr = True):
    """x [T, K] -> out [T, K] (row stride K) in ``to_mma_k_order`` (K a multiple of 64): the
    activations of L1 when its tiles run swapped.  ROUND_MX32: rounded to fp8_mx32 first
    (round_to_fp8_mx32; x bf16, or the CUDA gate_up's fp32), for fp8_mx32 activations on the swapped
    tiles; with K_ORDER off only rounded (K a multiple of 32; out may be x), for the CUDA decode
    kernels (cuda/fp4_moe.py), which take bf16."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (t[:, None] < T) & (kk[None, :] < K)
    pdl_wait(USE_PDL)
    x = tl.load(x_ptr + t.to(tl.int64)[:, None] * stride_xt + kk[None, :], mask=mask, other=0.0)
    pdl_launch_dependents(USE_PDL)
    if ROUND_MX32:
        x = store_cast(round_to_fp8_mx32(x.to(tl.float32), BLOCK_T, BLOCK_K), out_ptr.dtype.element_ty)
    if K_ORDER:
        x = to_mma_k_order(x, BLOCK_T, BLOCK_K)
    tl.store(out_ptr + t.to(tl.int64)[:, None] * K + kk[None, :], x, mask=mask)


@triton.jit
def moe_quant_act_kernel(x_ptr, q_ptr, s_ptr, T, K, stride_xt, stride_st,
                         ACT_FORMAT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                         USE_PDL: tl.constexpr):
    """x [T, K] -> e4m3 q [T, K] (row stride K) + per-row group scales s [T, cdiv(K, G)]."""
    G: tl.constexpr = 128 if ACT_FORMAT == 1 else 32
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (t[:, None] < T) & (kk[None, :] < K)
    pdl_wait(USE_PDL)
    x = tl.load(x_ptr + t.to(tl.int64)[:, None] * stride_xt + kk[None, :], mask=mask, other=0.0).to(tl.float32)
    pdl_launch_dependents(USE_PDL)
    q, s = quantize_fp8_groups(x, BLOCK_T, BLOCK_K, ACT_FORMAT)
    tl.store(q_ptr + t.to(tl.int64)[:, None] * K + kk[None, :], q, mask=mask)
    g = tl.program_id(1) * (BLOCK_K // G) + tl.arange(0, BLOCK_K // G)
    tl.store(s_ptr + t.to(tl.int64)[:, None] * stride_st + g[None, :], s,
             mask=(t[:, None] < T) & (g[None, :] < tl.cdiv(K, G)))
