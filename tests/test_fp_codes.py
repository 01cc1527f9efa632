"""The packed e2m1 -> bf16 decoder and the bf16 scale converters (templates/_details/fp_codes.py),
exhaustively: every byte (both nibbles) times every e8m0 scale byte and every e4m3 scale, against
``inductor_moe.formats``.

GPU: the inline PTX.  CPU: the interpreter fallback, in a subprocess (TRITON_INTERPRET must be set
before triton decorates the kernels, and other test modules import triton first).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from inductor_moe.formats import E2M1_VALUES
from inductor_moe.templates._details.fp_codes import e2m1_pairs_to_bf16, e8m0_to_bf16, mul_bf16


@triton.jit
def decode_kernel(p_ptr, s_ptr, lo_ptr, hi_ptr, NV: tl.constexpr):
    """[256 bytes, 256 scale bytes]: lo/hi[b, s] = e2m1(low/high nibble of b) * scale(s)."""
    b = tl.arange(0, 256)
    s = tl.arange(0, 256)
    packed = tl.load(p_ptr + b)[:, None] + tl.zeros([256, 256], dtype=tl.uint8)
    if NV:
        scale = tl.load(s_ptr + s).to(tl.float32).to(tl.bfloat16)
    else:
        scale = e8m0_to_bf16(tl.load(s_ptr + s).to(tl.int32))
    lo, hi = e2m1_pairs_to_bf16(packed)
    offs = b[:, None] * 256 + s[None, :]
    tl.store(lo_ptr + offs, mul_bf16(lo, scale[None, :]))
    tl.store(hi_ptr + offs, mul_bf16(hi, scale[None, :]))


def _run_decoder(device: str) -> dict:
    """Mismatches per format.  The interpreter (CPU) casts e4m3 NaN codes to finite values and
    flushes bf16 subnormals, so there those two cases are left to the GPU test."""
    interpreted = device == "cpu"
    codes = torch.arange(256, dtype=torch.uint8, device=device)
    e2m1 = E2M1_VALUES.double()
    result = {}
    for nv in (False, True):
        if nv:  # every finite e4m3 scale (0x7f / 0xff are NaN)
            scales = codes.view(torch.float8_e4m3fn)
            ref_scale = scales.double()
        else:
            scales = codes
            ref_scale = torch.where(codes == 255, float("nan"), torch.exp2(codes.double() - 127))
        lo = torch.empty((256, 256), dtype=torch.bfloat16, device=device)
        hi = torch.empty_like(lo)
        decode_kernel[(1,)](codes, scales, lo, hi, NV=nv)
        c = codes.cpu().long()
        ref_scale = ref_scale.cpu()
        want_lo = e2m1[c & 15][:, None] * ref_scale[None, :]
        want_hi = e2m1[c >> 4][:, None] * ref_scale[None, :]
        bad = 0
        for got, want in ((lo, want_lo), (hi, want_hi)):
            got = got.cpu().double()
            want = want.cpu()
            checked = want.isnan() | (want.abs() < 3.3e38)  # exact in bf16 unless past its range
            if interpreted:
                normal = ~ref_scale.isnan() & (ref_scale.abs() >= 2.0 ** -126)
                checked &= normal[None, :] & ((want.abs() >= 2.0 ** -126) | (want == 0))
            same = (got.isnan() & want.isnan()) | ((got == want) & (torch.signbit(got) == torch.signbit(want)))
            bad += int((checked & ~same).sum())
        result["nvfp4" if nv else "mxfp4"] = bad
    return result


def _main():
    print("RESULT " + json.dumps(_run_decoder("cpu")), flush=True)


@pytest.mark.gpu
def test_gpu_packed_decoder_is_exact_for_every_byte_and_scale():
    assert _run_decoder("cuda") == {"mxfp4": 0, "nvfp4": 0}


def test_interpreted_decoder_is_exact_for_every_byte_and_scale():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                          timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stderr[-3000:]
    assert json.loads(lines[-1][7:]) == {"mxfp4": 0, "nvfp4": 0}


if __name__ == "__main__":
    _main()
