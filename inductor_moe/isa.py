"""``python -m inductor_moe.isa``: compile every Triton template ahead of time for sm_90a and
sm_100a and print the MMA instruction kinds in its PTX, one line per template and target.

Needs no GPU and no ptxas: the pipeline stops at PTX (stages ttir -> ttgir -> llir -> ptx) with
the PTX ISA version given explicitly.  Templates register themselves: every module in
``inductor_moe.templates`` may expose ``ISA_SPECS``, a list of
``(label, kernel, signature, constexprs, options)``; ``options["expect_sm100"] = "block_scale"``
marks a template whose sm_100a PTX must hold tcgen05 block-scaled MMA (``--check`` fails
otherwise); ``options["only_arch"]`` (with ``"why_only"``) a template built for that target only
(the Hopper warp-specialised Gluon kernels), listed as not built on the others;
``options["divisible_by_16"]`` the arguments the JIT specialises so; the other options go to the
compiler.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import re
import sys
from dataclasses import dataclass

TARGETS = (90, 100)
PTX_VERSION = 87  # PTX ISA 8.7 (CUDA 12.8): the first with sm_100a


@dataclass
class IsaResult:
    label: str
    arch: int
    mma_kinds: tuple  # sorted unique instruction kinds found in the PTX
    ptx: str = ""
    error: str = ""
    expect: str = ""  # "block_scale": sm_100a must show tcgen05 block-scaled MMA
    not_built: str = ""  # why the template has no build for this target

    @property
    def block_scaled_tcgen05(self) -> bool:
        return any(k.startswith("tcgen05.mma") and "block_scale" in k for k in self.mma_kinds)

    def line(self) -> str:
        target = f"sm_{self.arch}a"
        if self.error:
            return f"{self.label:60s} {target:8s} ERROR {self.error}"
        if self.not_built:
            return f"{self.label:60s} {target:8s} not built ({self.not_built})"
        return f"{self.label:60s} {target:8s} {', '.join(self.mma_kinds) or 'no MMA'}"


def mma_kinds(ptx: str) -> tuple:
    """The MMA instruction kinds in a PTX text, e.g. ``tcgen05.mma kind::mxf4.block_scale``."""
    kinds = set()
    for line in ptx.splitlines():
        s = re.sub(r"^@!?%\w+\s+", "", line.strip())  # drop a predicate guard
        if s.startswith("tcgen05.mma"):
            m = re.match(r"tcgen05\.mma(\.ws)?(\.cta_group::\d)?(\.kind::[\w]+)?(\.block_scale)?", s)
            kind = "tcgen05.mma" + (f" kind::{m.group(3)[7:]}" if m.group(3) else "") + \
                   (".block_scale" if m.group(4) or ".block_scale" in s.split()[0] else "")
            kinds.add(kind)
        elif s.startswith("wgmma.mma_async"):
            m = re.match(r"wgmma\.mma_async\.(?:sp\.)?sync\.aligned\.m\d+n\d+k\d+\.(\w+)\.(\w+)(?:\.(\w+))?", s)
            kinds.add("wgmma" + (f" {'.'.join(g for g in m.groups() if g)}" if m else ""))
        elif s.startswith("mma.sync"):
            kinds.add("mma.sync")
    return tuple(sorted(kinds))


@dataclass(frozen=True)
class LoopStats:
    """What one iteration of an innermost PTX loop that issues MMAs does besides the MMAs.  The
    FP4 tiles that decode in registers rely on ``shared_vector_stores == 0``: a register tile
    written to shared memory (``st.shared.v2`` / ``.v4`` of 16-bit or wider elements, ``stmatrix``)
    in the K loop is a layout conversion of the decoded weight through shared memory
    (benchmarks/NOTES_fp4.md); a few scale bytes moved that way (``st.shared.v2.b8``) are not."""

    label: str
    mma: int  # wgmma.mma_async and mma.sync
    barriers: int  # bar.sync: CTA-wide
    shared_vector_stores: int
    global_loads: int  # synchronous ld.global
    async_copies: int  # cp.async
    shuffles: int
    prefetches: int = 0  # prefetch.global


def mma_loops(ptx: str) -> list:
    """LoopStats of every innermost loop (a label and the branch back to it) that issues MMAs."""
    lines = ptx.splitlines()
    starts = {}
    for i, line in enumerate(lines):
        m = re.match(r"^(\$L__BB\d+_\d+):", line)
        if m:
            starts[m.group(1)] = i
    loops = []
    for i, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if m and starts.get(m.group(1), i) < i:
            loops.append((m.group(1), starts[m.group(1)], i))
    found = []
    for label, lo, hi in loops:
        if any(lo < lo2 and hi2 <= hi for _, lo2, hi2 in loops if (lo2, hi2) != (lo, hi)):
            continue  # holds another loop: not innermost
        body = "\n".join(line.split("//")[0] for line in lines[lo:hi + 1])
        count = lambda pattern: len(re.findall(pattern, body))  # noqa: E731
        mma = count(r"\bwgmma\.mma_async") + count(r"\bmma\.sync")
        if mma:
            found.append(LoopStats(label, mma, count(r"\bbar\.sync"),
                                   count(r"\bst\.shared\.v[24]\.[bfsu](?:16|32|64)\b") + count(r"\bstmatrix"),
                                   count(r"\bld\.global"), count(r"\bcp\.async\.c[ag]"), count(r"\bshfl\."),
                                   count(r"\bprefetch\.global")))
    return found


def optional_arguments(kernel) -> dict:
    """{name: None} for the kernel's arguments that default to None (the expert GEMMs' ``w_desc``):
    left out at a launch they are compile-time None, and so they are compiled here."""
    return {name: None for name, p in inspect.signature(kernel.fn).parameters.items() if p.default is None}


def auto_signature(kernel, pointers: dict, constexprs: dict, floats=()) -> dict:
    """A signature for ``kernel``: ``pointers`` maps pointer args to types ("*bf16"); ``floats``
    names fp32 scalars; arguments defaulting to None are constexpr None; every other
    non-constexpr argument is an i32."""
    sig = {}
    optional = optional_arguments(kernel)
    for name in kernel.arg_names:
        if name in constexprs or name in optional:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name.endswith("_ptr"):
            sig[name] = "*i32"
        else:
            sig[name] = "fp32" if name in floats else "i32"
    return sig


def discover_specs():
    """[(module name, spec)] over every module of ``inductor_moe.templates`` with ISA_SPECS."""
    from . import templates

    from .lowering.moe import isa_specs

    lowering_specs = isa_specs()  # templates whose compile-time arguments the lowering builds
    found, missing = [], []
    for info in sorted(pkgutil.iter_modules(templates.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{templates.__name__}.{info.name}")
        specs = getattr(module, "ISA_SPECS", None)
        if specs is None:
            specs = lowering_specs.get(info.name)
        if specs is None:
            if any(getattr(v, "__module__", None) == module.__name__
                   and type(v).__name__ in ("JITFunction", "GluonJITFunction") for v in vars(module).values()):
                missing.append(info.name)
            continue
        found += [(info.name, spec) for spec in specs]
    return found, missing


def compile_to_ptx(kernel, signature: dict, constexprs: dict, arch: int, options: dict | None = None,
                   divisible_by_16: tuple = ()) -> str:
    """Run Triton's NVIDIA pipeline up to PTX for ``sm_{arch}a`` (no GPU, no ptxas).
    ``divisible_by_16``: arguments the JIT would specialise as multiples of 16 (pointers, strides)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton._C.libtriton import ir

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible_by_16}
    source = ASTSource
    if type(kernel).__name__ == "GluonJITFunction":
        from triton.experimental.gluon._runtime import GluonASTSource as source
    src = source(fn=kernel, signature=signature, constexprs=_constexpr_keys(kernel, constexprs),
                 **({"attrs": attrs} if attrs else {}))
    opts = dict(options or {})
    fields = getattr(type(backend.parse_options({})), "__dataclass_fields__", {})
    if "ptx_version" in fields:
        opts.setdefault("ptx_version", PTX_VERSION)
    extra = src.parse_options() if hasattr(src, "parse_options") else {}
    options = backend.parse_options({**opts, **extra})
    metadata = {"hash": "isa", "target": target, **options.__dict__}
    stages: dict = {}
    add = backend.add_stages
    if len(inspect.signature(add).parameters) >= 3:
        add(stages, options, getattr(src, "language", None))
    else:  # pragma: no cover - older triton
        add(stages, options)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    codegen_fns = backend.get_codegen_implementation(options)
    module_map = backend.get_module_map() if hasattr(backend, "get_module_map") else {}
    params = inspect.signature(src.make_ir).parameters
    if "target" in params:
        module = src.make_ir(target, options, codegen_fns, module_map, context)
    else:  # pragma: no cover - older triton
        module = src.make_ir(options, codegen_fns, module_map, context)
    for name, stage in stages.items():
        module = stage(module, metadata)
        if name == "ptx":
            return module
    raise RuntimeError("this Triton has no ptx stage")


def _constexpr_keys(kernel, constexprs: dict) -> dict:
    """ASTSource wants constexprs keyed by (argument index,) in newer Triton versions."""
    names = kernel.arg_names
    try:
        from triton.compiler import ASTSource  # noqa: F401
        sig = inspect.signature(ASTSource.__init__)
        del sig
    except Exception:  # pragma: no cover
        pass
    return {(names.index(k),): v for k, v in {**optional_arguments(kernel), **constexprs}.items()}


def compile_all(targets=TARGETS, only: str | None = None) -> list[IsaResult]:
    specs, missing = discover_specs()
    results = []
    for module_name, (label, kernel, signature, constexprs, options) in specs:
        if only and only not in label and only not in module_name:
            continue
        options = dict(options or {})
        expect = options.pop("expect_sm100", "")
        only_arch, why_only = options.pop("only_arch", None), options.pop("why_only", "")
        divisible = options.pop("divisible_by_16", ())
        for arch in targets:
            if only_arch is not None and arch != only_arch:
                results.append(IsaResult(label, arch, (), not_built=why_only or f"sm_{only_arch} only"))
                continue
            try:
                ptx = compile_to_ptx(kernel, signature, constexprs, arch, options, divisible)
                results.append(IsaResult(label, arch, mma_kinds(ptx), ptx, expect=expect))
            except Exception as e:  # report and go on with the other templates
                while e.__cause__ is not None:  # the innermost error says what went wrong
                    e = e.__cause__
                msg = str(e).strip().splitlines()
                results.append(IsaResult(label, arch, (), error=f"{type(e).__name__}: {msg[-1] if msg else ''}"[:200]))
    for name in missing:
        if only and only not in name:
            continue
        for arch in targets:
            results.append(IsaResult(f"{name} (exposes no ISA_SPECS)", arch, ("skipped",)))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="compile templates whose label or module contains this")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 unless every template marked block_scale shows tcgen05 block-scaled MMA on sm_100a")
    parser.add_argument("--dump", metavar="DIR", help="write each PTX to DIR")
    args = parser.parse_args(argv)
    import triton

    print(f"# triton {triton.__version__}; PTX ISA {PTX_VERSION / 10:.1f}; MMA kinds per template and target")
    results = compile_all(only=args.only)
    failed = False
    for r in results:
        print(r.line())
        if args.dump and r.ptx:
            import pathlib

            path = pathlib.Path(args.dump)
            path.mkdir(parents=True, exist_ok=True)
            (path / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', r.label)}.sm_{r.arch}a.ptx").write_text(r.ptx)
        if r.expect == "block_scale" and r.arch >= 100 and not r.block_scaled_tcgen05:
            failed = True
    if args.check and failed:
        print("FAIL: a template marked block_scale has no tcgen05 block-scaled MMA on sm_100a", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
