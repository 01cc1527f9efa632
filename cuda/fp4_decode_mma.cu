// Decode GEMM for FP4 weights at small M: out[M, N] = act(alpha * (X @ W^T) + bias), M <= 16.
//
// X [M, K] bf16 (row stride LDX elements, 16-byte aligned rows); W [N, K/2] uint8, two e2m1 codes
// per byte (low nibble = even k), row-major and contiguous; scales [N, K/32] e8m0 (MXFP4) or
// [N, K/16] e4m3 (NVFP4, with a one-element fp32 global scale).  Compiled at run time by NVRTC
// (cuda/fp4_decode.py); the #defines below and in fp4_mma_core.cuh are set per variant by the host.
//
// Why CUDA: the weight stream must reach the tensor cores without any shuffle.  Triton decodes a
// tile into its own blocked layout and converts it to the MMA operand layout through shared
// memory, which (with the decode itself) made its small-M kernels instruction bound at 0.16-0.31 of
// the bandwidth floor (benchmarks/NOTES_fp4.md).  Here every thread loads exactly the weights its
// mma.sync A fragment needs, with one 16-byte load per row, and decodes them in registers.
// The decode and the K loop: fp4_mma_core.cuh.  Grid: one CTA per 16 * RG weight rows.

#ifndef HAS_BIAS
#define HAS_BIAS 0
#endif
#ifndef OUT_T
#define OUT_T 0       // 0 bf16, 1 fp16, 2 fp32
#endif
#ifndef ACT
#define ACT 0         // 0 none, 1 silu, 2 gelu, 3 gelu_tanh, 4 relu
#endif
#ifndef HAS_GSCALE
#define HAS_GSCALE 0
#endif
#ifndef MIN_CTAS
#define MIN_CTAS 1    // __launch_bounds__' minimum of resident CTAs per SM: caps the registers
#endif

#include "fp4_mma_core.cuh"

#if OUT_T == 2
typedef float out_t;
#else
typedef u16 out_t;  // bf16 / fp16 bits
#endif
__device__ __forceinline__ float activation(float y) {
#if ACT == 1
  return y / (1.0f + expf(-y));
#elif ACT == 2
  return 0.5f * y * (1.0f + erff(y * 0.70710678118654752f));
#elif ACT == 3
  return 0.5f * y * (1.0f + tanhf(0.7978845608028654f * (y + 0.044715f * y * y * y)));
#elif ACT == 4
  return y < 0.0f ? 0.0f : y;  // NaN stays NaN
#else
  return y;
#endif
}

extern "C" __global__ void __launch_bounds__(WARPS * 32, MIN_CTAS)
fp4_decode_mma(const u16* __restrict__ x, const u8* __restrict__ w, const u8* __restrict__ scales,
               const float* __restrict__ gscale, const bias_t* __restrict__ bias, out_t* __restrict__ out,
               int M, int N, int K, int ldx, int ldo) {
  constexpr int STEP_K = 128 * VEC;
  __shared__ float partial[PARTIAL_FLOATS];
  pdl_wait();  // launched with PDL: x (and a weight re-laid out just before) come from earlier kernels
  pdl_launch_dependents();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.x * (16 * RG);
  const long long ldw = K >> 1;
  const long long lds = NV ? (K >> 4) : (K >> 5);

  float acc[RG][NT][4];
  zero_acc(acc);

  int kb = warp * STEP_K + t * 32 * VEC;  // first K of this thread's values in its current step
  const u8* wp[RG][2];
  const u8* sp[RG][2];
  bool row_ok[RG][2];
#pragma unroll
  for (int r = 0; r < RG; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + r * 16 + g + h * 8;
      row_ok[r][h] = row < N;
      const long long rr = row_ok[r][h] ? row : 0;
      wp[r][h] = w + rr * ldw + (kb >> 1);
      sp[r][h] = scales + rr * lds + (kb >> (NV ? 4 : 5));
    }
  const u16* xp[NT];
  bool tok_ok[NT];
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    tok_ok[n] = n * 8 + g < M;
    xp[n] = x + (long long)(tok_ok[n] ? n * 8 + g : 0) * ldx + kb;
  }

  fp4_mma_k_loop(acc, wp, sp, row_ok, xp, tok_ok, kb, K, warp);

  stash_partials(partial, acc, warp, lane);
  __syncthreads();
  float alpha = NV ? 512.0f : 1.0f;  // NVFP4 values were decoded times 2^-9
#if HAS_GSCALE
  alpha *= gscale[0];
#endif
  for (int i = warp; i < RG * NT * 4; i += WARPS) {
    float y = warp_sum(partial, i, lane);
    const int c = i & 3, n = (i >> 2) % NT, r = (i >> 2) / NT;
    const int row = row0 + r * 16 + g + (c >> 1) * 8;
    const int tok = n * 8 + 2 * t + (c & 1);
    if (row >= N || tok >= M) continue;
    y *= alpha;
#if HAS_BIAS
    y += load_float(bias + row);
#endif
    y = activation(y);
#if OUT_T == 0
    out[(long long)tok * ldo + row] = float_bf16(y);
#elif OUT_T == 1
    out[(long long)tok * ldo + row] = float_half(y);
#else
    out[(long long)tok * ldo + row] = y;
#endif
  }
}
