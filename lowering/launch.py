"""Triton launches of a call plan through the compiled kernel's own launcher.

``kernel[grid](*args, **kwargs)`` binds the arguments, computes Triton's specialisation key (16-byte
alignment of pointers, ints equal to 1 or divisible by 16, dtypes, constexpr values), looks the
compiled kernel up and launches it: 18-26 µs of host time per launch on the H100 machine's CPU,
against 9-13 µs through the ``CompiledKernel`` it returns (benchmarks/NOTES.md, "Host time per
call, part two").  A call plan (lowering/moe.py: ``_call_plan``) is keyed on everything Triton
specialises on -- its inputs' shapes, strides, dtypes and 16-byte alignment, from which every int
argument and every internal buffer's offset follows (the caching allocator hands out 512-byte
aligned blocks) -- so each launch site of a plan compiles to one kernel: the first launch goes
through the JIT and keeps what it returns, later ones go straight to it with the arguments bound
in the kernel's signature order (constexprs and defaults included, as the JIT passes them).
Under the interpreter, or where the JIT returns no compiled kernel, every launch takes the JIT.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def _compiled_kernel_class():
    try:
        from triton.compiler.compiler import CompiledKernel
    except ImportError:  # pragma: no cover - a triton without it: the JIT path only
        return None
    return CompiledKernel


def _is_compiled(obj, kernel) -> bool:
    """A compiled kernel whose launcher takes every parameter of ``kernel`` (the JIT's convention)."""
    cls = _compiled_kernel_class()
    if cls is None or not isinstance(obj, cls):
        return False
    signature = getattr(getattr(obj, "src", None), "signature", None)
    return signature is None or len(signature) == len(kernel.arg_names)


class _Site:
    __slots__ = ("kernel", "compiled", "n_positional", "tail")

    def __init__(self, kernel, compiled, n_positional: int, kwargs: dict):
        self.kernel, self.compiled, self.n_positional = kernel, compiled, n_positional
        # the parameters after the positional ones: (name, default or a marker that it must be given)
        self.tail = [(p.name, p.default if p.has_default else _REQUIRED) for p in kernel.params[n_positional:]]
        missing = [name for name, default in self.tail if default is _REQUIRED and name not in kwargs]
        if missing:
            raise TypeError(f"{kernel.fn.__name__}: no value for {missing}")


_REQUIRED = object()


class PlannedLaunches:
    """The launch sites of one call plan.  ``launch(site, kernel, grid, args, kwargs)`` runs
    ``kernel[grid](*args, **kwargs)``, the first time through the JIT, then through the compiled
    kernel it returned (same site, same kernel, as many positional arguments)."""

    __slots__ = ("sites",)

    def __init__(self):
        self.sites: dict = {}

    def launch(self, site: str, kernel, grid: tuple, args: tuple, kwargs: dict) -> None:
        found = self.sites.get(site)
        if found is not None and found.kernel is kernel and found.n_positional == len(args):
            grid3 = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)  # it reads three
            found.compiled[grid3](*args, *[kwargs[name] if name in kwargs else default
                                           for name, default in found.tail])
            return
        compiled = kernel[grid](*args, **kwargs)
        if _is_compiled(compiled, kernel):
            self.sites[site] = _Site(kernel, compiled, len(args), kwargs)


def jit_launch(site: str, kernel, grid: tuple, args: tuple, kwargs: dict) -> None:
    """``PlannedLaunches.launch`` without a plan: every launch through the JIT."""
    kernel[grid](*args, **kwargs)
