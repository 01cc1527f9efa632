"""The packed e2m1 -> bf16 decoder and the bf16 scale converters (templates/_details/fp_codes.py),
exhaustively: every byte (both nibbles) times every e8m0 scale byte and every e4m3 scale, against
``inductor_moe.formats``; and the scaled decoder (the scale inside the decode's multiply) for every
byte and e4m3 scale, and every e8m0 scale byte it takes (0..128, 255).

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
from inductor_moe.templates._details.fp_codes import (E4M3_DECODE_SHIFT, e2m1_pairs_to_bf16, e2m1_pairs_to_scaled_bf16,
                                                      e4m3_decode_factor, e8m0_decode_factor, e8m0_to_bf16, mul_bf16)


@triton.jit
def decode_kernel(p_ptr, s_ptr, lo_ptr, hi_ptr, NV: tl.constexpr, SCALED: tl.constexpr):
    """[256 bytes, 256 scale bytes]: lo/hi[b, s] = e2m1(low/high nibble of b) * scale(s) (SCALED and
    NV: / E4M3_DECODE_SHIFT)."""
    b = tl.arange(0, 256)
    s = tl.arange(0, 256)
    packed = tl.load(p_ptr + b)[:, None] + tl.zeros([256, 256], dtype=tl.uint8)
    offs = b[:, None] * 256 + s[None, :]
    if SCALED:
        if NV:
            factor = e4m3_decode_factor(tl.load(s_ptr + s))
        else:
            factor = e8m0_decode_factor(tl.load(s_ptr + s).to(tl.int32))
        lo, hi = e2m1_pairs_to_scaled_bf16(packed, tl.broadcast_to(factor[None, :], [256, 256]))
        tl.store(lo_ptr + offs, lo)
        tl.store(hi_ptr + offs, hi)
    else:
        if NV:
            scale = tl.load(s_ptr + s).to(tl.float32).to(tl.bfloat16)
        else:
            scale = e8m0_to_bf16(tl.load(s_ptr + s).to(tl.int32))
        lo, hi = e2m1_pairs_to_bf16(packed)
        tl.store(lo_ptr + offs, mul_bf16(lo, scale[None, :]))
        tl.store(hi_ptr + offs, mul_bf16(hi, scale[None, :]))


def _run_decoder(device: str) -> dict:
    """Mismatches per format, plain and scaled.  The interpreter (CPU) casts e4m3 NaN codes to
    finite values and flushes bf16 subnormals, so there those two cases are left to the GPU test."""
    interpreted = device == "cpu"
    codes = torch.arange(256, dtype=torch.uint8, device=device)
    e2m1 = E2M1_VALUES.double()
    result = {}
    for scaled in (False, True):
        for nv in (False, True):
            if nv:  # every finite e4m3 scale (0x7f / 0xff are NaN)
                scales = codes.view(torch.float8_e4m3fn)
                ref_scale = scales.double().cpu()
                if scaled:
                    ref_scale = ref_scale / E4M3_DECODE_SHIFT.value
                taken = torch.ones(256, dtype=torch.bool)
            else:
                scales = codes
                ref_scale = torch.where(codes == 255, float("nan"), torch.exp2(codes.double() - 127)).cpu()
                taken = (codes.cpu() <= 128) | (codes.cpu() == 255) if scaled else torch.ones(256, dtype=torch.bool)
            lo = torch.empty((256, 256), dtype=torch.bfloat16, device=device)
            hi = torch.empty_like(lo)
            decode_kernel[(1,)](codes, scales, lo, hi, NV=nv, SCALED=scaled)
            c = codes.cpu().long()
            want_lo = e2m1[c & 15][:, None] * ref_scale[None, :]
            want_hi = e2m1[c >> 4][:, None] * ref_scale[None, :]
            bad = 0
            for got, want in ((lo, want_lo), (hi, want_hi)):
                got = got.cpu().double()
                checked = taken[None, :] & (want.isnan() | (want.abs() < 3.3e38))  # exact unless past bf16's range
                if interpreted:
                    normal = ~ref_scale.isnan() & (ref_scale.abs() >= 2.0 ** -126)
                    checked &= normal[None, :] & ((want.abs() >= 2.0 ** -126) | (want == 0))
                same = (got.isnan() & want.isnan()) | ((got == want) & (torch.signbit(got) == torch.signbit(want)))
                bad += int((checked & ~same).sum())
            result[("scaled_" if scaled else "") + ("nvfp4" if nv else "mxfp4")] = bad
    return result


ALL_EXACT = {"mxfp4": 0, "nvfp4": 0, "scaled_mxfp4": 0, "scaled_nvfp4": 0}


def _main():
    print("RESULT " + json.dumps(_run_decoder("cpu")), flush=True)


@pytest.mark.gpu
def test_gpu_packed_decoder_is_exact_for_every_byte_and_scale():
    assert _run_decoder("cuda") == ALL_EXACT


def test_interpreted_decoder_is_exact_for_every_byte_and_scale():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                          timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stderr[-3000:]
    assert json.loads(lines[-1][7:]) == ALL_EXACT


if __name__ == "__main__":
    _main()
