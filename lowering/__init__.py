"""Lowerings: canonical op -> kernel plan for (arch, dtypes, shapes, config).

``register()`` installs the CUDA implementations of the canonical ops; ``describe_*`` name the
implementation a call will use, for the report, without running anything.
"""

from . import gemm, moe


def register() -> None:
    moe.register()
    gemm.register()
