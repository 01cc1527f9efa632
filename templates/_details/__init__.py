"""``@triton.jit`` kernels behind the host modules in ``templates/`` (one file per kernel family)."""
