"""Run-time builds of the project's CUDA kernels through NVRTC.

``torch.cuda._compile_kernel`` (PyTorch's own runtime-compiler wrapper) compiles a source with its
``#define``s prepended, once per (device, file, kernel, variant): no nvcc and no build step at
install.  The kernels it returns launch with ``cuLaunchKernel`` on the stream they are given, so
they need no host sync and are CUDA-graph capturable.  ``unavailable_reason`` says, once per
device, why the CUDA kernels cannot run there, and ``why_not`` adds the user's switch
(``config.cuda_decode``); callers then keep their Triton paths.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Optional

import torch

CUDA_DIR = Path(__file__).parent


@functools.lru_cache(maxsize=None)
def build(device_index: int, source: str, kernel_name: str, defines: tuple):
    """The kernel ``kernel_name`` of ``cuda/<source>`` compiled with ``defines`` for this device."""
    compile_kernel = getattr(torch.cuda, "_compile_kernel", None)
    if compile_kernel is None:
        raise RuntimeError(f"torch {torch.__version__} has no torch.cuda._compile_kernel (NVRTC)")
    src = "".join(f"#define {k} {v}\n" for k, v in defines) + (CUDA_DIR / source).read_text()
    with torch.cuda.device(device_index):
        return compile_kernel(src, kernel_name, cuda_include_dirs=[str(CUDA_DIR)])


@functools.lru_cache(maxsize=None)
def unavailable_reason(device_index: int) -> Optional[str]:
    """None when the CUDA decode kernels can run on this device (a probe build, tried once per
    device), else why not."""
    if torch.cuda.get_device_capability(device_index) < (8, 0):
        return "needs sm_80 (bf16 mma.sync)"
    try:
        build(device_index, "fp4_decode_mma.cu", "fp4_decode_mma", (("NV", 0), ("WARPS", 8)))
    except Exception as e:  # noqa: BLE001 -- any build failure means: keep the Triton path
        return f"NVRTC build failed: {type(e).__name__}: {str(e)[:200]}"
    return None


def min_ctas(max_registers: int, warps: int) -> int:
    """The ``MIN_CTAS`` define (``__launch_bounds__``' minimum of resident CTAs per SM) that caps a
    thread of a ``warps``-warp CTA at ``max_registers`` (an SM holds 64 K); 1 (no cap) for 0."""
    return 65536 // (max_registers * 32 * warps) if max_registers else 1


def why_not(device_index: int) -> Optional[str]:
    """None when the CUDA decode kernels may run now on this device, else why not."""
    from .. import config

    if not config.cuda_decode:
        return "config.cuda_decode is off (INDUCTOR_MOE_CUDA_DECODE=0)"
    return unavailable_reason(device_index)


class _LaunchAttr(ctypes.Structure):  # CUlaunchAttribute: id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int), ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttr)), ("num_attrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_PDL_ATTR = _LaunchAttr(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)  # read by the driver at each launch
_DIM3 = ctypes.c_uint * 3


@functools.lru_cache(maxsize=None)
def _launch_kernel_ex():
    """The driver's cuLaunchKernelEx, looked up once: torch's _get_gpu_runtime_library() opens a new
    CDLL object per call (a class built each time), which cost more host time than the launch."""
    from torch.cuda._utils import _get_gpu_runtime_library

    return _get_gpu_runtime_library().cuLaunchKernelEx


def launch(kernel, grid, block, args, stream, pdl: bool = False) -> None:
    """Launch a kernel from ``build`` on ``stream``; arguments as ``torch.cuda._compile_kernel``
    passes them (tensors as pointers, ints as C int, floats as double).  ``pdl``: with the
    programmatic-serialization attribute, so the kernel may start while the previous one finishes
    (its ``griddepcontrol.wait`` holds it until that kernel's results are visible)."""
    if not pdl:
        kernel(grid=grid, block=block, args=args, stream=stream)
        return
    from torch.cuda._utils import _check_cuda

    keep = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else
            ctypes.c_int(a) if isinstance(a, int) else ctypes.c_double(a) for a in args]
    params = (ctypes.c_void_p * len(keep))(*[ctypes.addressof(v) for v in keep])
    cfg = _LaunchConfig(_DIM3(*grid), _DIM3(*block), 0, ctypes.c_void_p(stream.cuda_stream),
                        ctypes.pointer(_PDL_ATTR), 1)
    _check_cuda(_launch_kernel_ex()(ctypes.byref(cfg), kernel.func, params, None))
