"""The persistent single-launch MoE kernel (templates/moe_mega.py): when to use it, and its launch.

# T: tokens, k: experts per token, E: experts, H: hidden, I: expert intermediate size, N = T*k
``choose_mega`` is a pure function of the tile plan (testable without a GPU).  ``MegaLaunch``
takes the very arguments the launcher built for the two-launch L1 / L2 kernels and runs their
tiles in one persistent grid sized so that every program is resident at once (the kernel's
deadlock-freedom argument needs that).
"""

from __future__ import annotations

import os

import torch

from .launch import jit_launch
from .moe_plan import MoEKernelConfig

# Provisional, until measured on a GPU (benchmarks/moe.py, columns "ours bf16 mega" / "split"):
# one launch instead of two saves a launch latency and L2's drain-then-start at the L1 -> L2
# boundary, which only matters where the whole layer is a few microseconds of tiles.  So: decode
# and mid regimes only, and at most this many L1 + L2 tiles per SM in total.
MEGA_MAX_TILES_PER_SM = 8
MEGA_REGIMES = ("decode", "mid")

# per-GEMM argument names of moe_gemm1_kernel / moe_gemm2_kernel, prefixed l1_ / l2_ (L1_ / L2_ for
# constexprs) in moe_mega_kernel; every other argument is shared and must agree between the two
PER_GEMM_ARGS = ("w_ptr", "w_scale_ptr", "w_gscale_ptr", "b_ptr", "stride_we", "stride_wn", "stride_wk",
                 "stride_se", "stride_sn", "stride_sk", "stride_be", "HAS_BIAS", "BLOCK_N", "BLOCK_K", "EVEN_K")


def max_m_blocks(n_entries: int, num_experts: int, block_m: int) -> int:
    """Align's upper bound on M-blocks: every expert with entries pads to a multiple of block_m."""
    return (n_entries + min(num_experts, n_entries) * (block_m - 1)) // block_m


def mega_tiles(cfg: MoEKernelConfig, num_tokens: int, top_k: int, num_experts: int, hidden: int,
               intermediate: int) -> int:
    """L1 + L2 tiles of the persistent kernel (blocks without an expert included: they are static)."""
    blocks = max_m_blocks(num_tokens * top_k, num_experts, cfg.block_m)
    return blocks * (-(-intermediate // cfg.gemm1.block_n) + -(-hidden // cfg.gemm2.block_n))


def choose_mega(cfg: MoEKernelConfig, num_tokens: int, top_k: int, num_experts: int, hidden: int,
                intermediate: int, num_sms: int) -> bool:
    """Whether the persistent kernel should run this call (``config.mega_kernel`` is the caller's
    business).  Provisional rule, see MEGA_MAX_TILES_PER_SM."""
    if cfg.regime not in MEGA_REGIMES or num_tokens * top_k == 0:
        return False
    return mega_tiles(cfg, num_tokens, top_k, num_experts, hidden, intermediate) <= MEGA_MAX_TILES_PER_SM * num_sms


def mega_max_tokens(plan, top_k: int, num_experts: int, hidden: int, intermediate: int, num_sms: int,
                    limit: int = 4096) -> int:
    """The largest T such that every call with 1..T tokens runs the persistent kernel (0: never);
    ``plan(T)`` gives the tile config of a T-token call.  For the report only."""
    t = 0
    while t < limit and choose_mega(plan(t + 1), t + 1, top_k, num_experts, hidden, intermediate, num_sms):
        t += 1
    return t


# ------------------------------------------------------------------------------ launch

def mega_arguments(gemm1_kernel, gemm1_args: tuple, gemm1_kw: dict, gemm2_kernel, gemm2_args: tuple,
                   gemm2_kw: dict) -> dict:
    """moe_mega_kernel's keyword arguments from the two kernels' own (positional + keyword)
    arguments; fails loudly if a shared argument differs between them."""
    l1 = {**dict(zip(gemm1_kernel.arg_names, gemm1_args)), **gemm1_kw}
    l2 = {**dict(zip(gemm2_kernel.arg_names, gemm2_args)), **gemm2_kw}
    if l2.pop("WEIGHT_AFTER_DOWN") == l1["WEIGHT_BEFORE_DOWN"]:
        raise ValueError("the routing weight must apply exactly once (before or after the down projection)")
    for args in (l1, l2):  # whole K steps and whole blocks only in the persistent kernel's tile loops
        args.pop("PREFETCH_SCALES", False)  # a hint its tile loops do not take (MoEKernelConfig.fp4_prefetch_scales)
        args.pop("W_DESC_K_MAJOR", True)
        args.pop("W_SCALE_UNIFORM", False)  # a shortcut; its tile loops load fp8 scales per column
        args.pop("EXPERT_MAJOR", False)  # its tile order is its own (blocks' readiness)
        if args.pop("ROUND_INTER_MX32", False):
            raise ValueError("the persistent kernel does not run fp8_mx32 activations rounded in bf16 (swapped tiles)")
        if args.pop("w_desc", None) is not None:
            raise ValueError("the persistent kernel loads its weights with pointers (no TMA descriptors: "
                             "lowering/moe_tma.py)")
        if any([args.pop("K_HALF_TAIL", False), args.pop("TAIL_BLOCK_M", 0), args.pop("SCALES_AHEAD", False)]):
            raise ValueError("the persistent kernel runs neither half-deep K tails nor smaller tail blocks "
                             "(nor scales loaded ahead)")
    out = {}
    for prefix, args in (("l1_", l1), ("l2_", l2)):
        for name, value in args.items():
            if name in PER_GEMM_ARGS:
                out[(prefix.upper() if name.isupper() else prefix) + name] = value
            elif name in ("num_warps", "num_stages", "maxnreg"):
                continue
            elif name in out and not _same(out[name], value):
                raise ValueError(f"L1 and L2 disagree on the shared argument {name}")
            else:
                out[name] = value
    # one kernel, one setting for both tile loops: the wider warp count, the shallower pipeline
    out["num_warps"] = max(gemm1_kw["num_warps"], gemm2_kw["num_warps"])
    out["num_stages"] = min(gemm1_kw["num_stages"], gemm2_kw["num_stages"])
    return out


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                          and a.data_ptr() == b.data_ptr() and a.dtype == b.dtype)
    return a == b


_RESIDENT: dict = {}  # (device index, specialisation key) -> programs per SM


def _spec_key(kwargs: dict) -> tuple:
    """What Triton specialises the kernel on: constexpr values, dtypes, 16-byte alignment, ints == 1."""
    key = []
    for name, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            key.append((name, v.dtype, v.data_ptr() % 16 == 0))
        elif name.isupper() or name in ("num_warps", "num_stages", "launch_pdl") or isinstance(v, bool):
            key.append((name, v))
        elif isinstance(v, int):
            key.append((name, v == 1, v % 16 == 0, -2 ** 31 <= v < 2 ** 31))
        else:
            key.append((name, type(v).__name__))
    return tuple(key)


def programs_per_sm(n_regs: int, shared_bytes: int, num_warps: int, regs_per_sm: int = 65536,
                    threads_per_sm: int = 2048, shared_per_sm: int = 233472, max_per_sm: int = 16) -> int:
    """CTAs of a kernel that fit on one SM at once, rounded down where the hardware rounds up:
    registers are allocated per warp in 256s and each of the 4 SM sub-partitions holds whole
    warps; each CTA reserves 1 KiB of shared memory beside its own.  At least 1 (a kernel that
    does not fit once does not launch at all)."""
    regs_per_warp = -(-max(n_regs, 1) * 32 // 256) * 256
    by_regs = 4 * ((regs_per_sm // 4) // regs_per_warp) // num_warps
    by_threads = threads_per_sm // (32 * num_warps)
    by_shared = shared_per_sm // (shared_bytes + 1024)
    return max(1, min(by_regs, by_threads, by_shared, max_per_sm))


def _resident_programs_per_sm(kernel, kwargs: dict, device: torch.device) -> int:
    """Programs per SM for this specialisation of the kernel, from its compiled resource usage
    (compiled once per specialisation, cached)."""
    key = (device.index, _spec_key(kwargs))
    found = _RESIDENT.get(key)
    if found is None:
        try:
            compiled = kernel.warmup(grid=(1,), **kwargs)
            compiled._init_handles()
            props = torch.cuda.get_device_properties(device)
            found = programs_per_sm(
                compiled.n_regs, compiled.metadata.shared, compiled.metadata.num_warps,
                regs_per_sm=getattr(props, "regs_per_multiprocessor", 65536),
                threads_per_sm=getattr(props, "max_threads_per_multi_processor", 2048),
                shared_per_sm=getattr(props, "shared_memory_per_multiprocessor", 0) or 0)
        except AttributeError:  # a triton without these fields: one program per SM always fits
            found = 1
        _RESIDENT[key] = found
    return found


class MegaLaunch:
    """The persistent launch of one call signature, worked out once: its constexprs, which of L1's /
    L2's positional arguments feeds each of its runtime arguments, and its grid -- sized so that
    every program is resident at once (the kernel's deadlock-freedom argument needs that), from the
    compiled kernel's registers and shared memory.  Per call only the arguments are routed."""

    def __init__(self, gemm1_kernel, gemm1_args: tuple, gemm1_kw: dict, gemm2_kernel, gemm2_args: tuple,
                 gemm2_kw: dict, *, ready: torch.Tensor, max_blocks: int, num_sms: int, pdl: dict):
        from ..templates.moe_mega import moe_mega_kernel

        kwargs = mega_arguments(gemm1_kernel, gemm1_args, gemm1_kw, gemm2_kernel, gemm2_args, gemm2_kw)
        kwargs.update(max_blocks=max_blocks, **pdl)
        names1 = gemm1_kernel.arg_names[:len(gemm1_args)]
        names2 = gemm2_kernel.arg_names[:len(gemm2_args)]
        shared1 = set(names1) | set(gemm1_kw)

        def routed(prefix, name):
            return (prefix.upper() if name.isupper() else prefix) + name if name in PER_GEMM_ARGS else name

        self.from_l1 = [(i, routed("l1_", n)) for i, n in enumerate(names1)]
        self.from_l2 = [(i, routed("l2_", n)) for i, n in enumerate(names2) if n in PER_GEMM_ARGS or n not in shared1]
        per_call = {name for _, name in self.from_l1 + self.from_l2} | {"ready_ptr"}
        self.constants = {name: v for name, v in kwargs.items() if name not in per_call}
        if any(isinstance(v, torch.Tensor) for v in self.constants.values()):
            raise ValueError("a tensor among the persistent kernel's per-signature constants")
        tiles = max_blocks * (-(-kwargs["I"] // kwargs["L1_BLOCK_N"]) + -(-kwargs["H"] // kwargs["L2_BLOCK_N"]))
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            self.grid = 1  # programs run one after another: only one program walks the list in order
        else:
            kwargs["ready_ptr"] = ready  # for the compile that tells the residency; not kept
            self.grid = min(tiles, num_sms * _resident_programs_per_sm(moe_mega_kernel, kwargs, ready.device))
        self.grid = max(1, self.grid)
        self.kernel = moe_mega_kernel

    def launch(self, gemm1_args: tuple, gemm2_args: tuple, ready: torch.Tensor, launch=jit_launch) -> None:
        """``ready`` [max_blocks] int32 must have been zeroed by this call's align (ZERO_READY);
        ``launch``: a call plan's (lowering/launch.py)."""
        kwargs = dict(self.constants, ready_ptr=ready)
        for i, name in self.from_l1:
            kwargs[name] = gemm1_args[i]
        for i, name in self.from_l2:
            kwargs[name] = gemm2_args[i]
        launch("mega", self.kernel, (self.grid,), (), kwargs)


# ------------------------------------------------------------------------------ ISA listing

# (activation format, weight format) pairs listed for ``inductor_moe.isa`` at a decode call
MEGA_ISA_PAIRS = (("dense", "dense"), ("dense", "nvfp4"), ("fp8_mx32", "mxfp4"))


def mega_isa_specs() -> list:
    """[(label, kernel, signature, constexprs, options)]: the persistent kernel exactly as the
    launcher builds it for a qwen3-30b-a3b decode call (T=1, E=128, k=8, H=2048, I=768)."""
    from ..isa import auto_signature
    from ..spec import MoESpec
    from ..templates.moe_gemm1 import moe_gemm1_kernel
    from ..templates.moe_gemm2 import moe_gemm2_kernel
    from ..templates.moe_mega import moe_mega_kernel
    from .moe import gemm1_constexprs, gemm2_constexprs
    from .moe_plan import choose_moe_config

    wtypes = {"dense": ("*bf16", "*bf16"), "fp8_block128": ("*fp8e4nv", "*fp32"), "mxfp4": ("*u8", "*u8"),
              "nvfp4": ("*u8", "*fp8e4nv")}
    act_scale = {"dense": "*bf16", "fp8_block128": "*fp32", "fp8_mx32": "*u8"}
    specs = []
    for act, fmt in MEGA_ISA_PAIRS:
        spec = MoESpec(act_format=act)
        cfg = choose_moe_config(1, 8, 128, 2048, 768, fmt, 132, act_format=act)
        dot_scaled = cfg.fp4_dot_scaled and fmt == "mxfp4"
        const = mega_arguments(moe_gemm1_kernel, (), gemm1_constexprs(spec, cfg, fmt, dot_scaled, False, 2048, True),
                               moe_gemm2_kernel, (), gemm2_constexprs(spec, cfg, fmt, dot_scaled, False, 768, True))
        options = {"num_warps": const.pop("num_warps"), "num_stages": const.pop("num_stages")}
        a = "*bf16" if act == "dense" else "*fp8e4nv"
        w, s = wtypes[fmt]
        ptrs = {"x_ptr": a, "inter_ptr": a, "x_scale_ptr": act_scale[act], "inter_scale_ptr": act_scale[act],
                "topk_weights_ptr": "*fp32", "rows_out_ptr": "*bf16"}
        for p in ("l1_", "l2_"):
            ptrs.update({f"{p}w_ptr": w, f"{p}w_scale_ptr": s, f"{p}w_gscale_ptr": "*fp32", f"{p}b_ptr": "*bf16"})
        sig = auto_signature(moe_mega_kernel, ptrs, const, ("alpha", "limit", "up_offset"))
        label = f"moe_mega[{'bf16' if act == 'dense' else act} x {fmt}]"
        specs.append((label, moe_mega_kernel, sig, const, options))
    return specs
