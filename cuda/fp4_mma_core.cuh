// Core of the FP4 decode MMA kernels (fp4_decode_mma.cu: one GEMM; fp4_moe_decode.cu: the MoE
// expert GEMMs): e2m1 decode in registers, mma.sync fed straight from 16-byte weight loads, and the
// split-K loop over a warp's K steps.  Rows and tokens arrive as per-thread pointers, so a kernel
// can point its row groups at any weight rows (an expert's gate and up rows) and its tokens at any
// activation rows (the tokens routed to that expert).
//
// The trick is that the K order inside an MMA is free as long as A and B agree.  A warp works on
// 16 weight rows (g = lane / 4 and g + 8) and 128 K per step; thread t = lane % 4 loads bytes
// [16t, 16t + 16) of each of its two rows -- 32 consecutive K values, one MXFP4 scale block (two
// NVFP4 blocks).  Each 32-bit word of that load (8 codes v0..v7) feeds two m16n8k16 MMAs: the
// byte-pair decode below yields bf16x2 registers (v0, v2), (v1, v3), (v4, v6), (v5, v7), which
// become the thread's A slots {2t, 2t+1} and {2t+8, 2t+9}; the thread's B slots take the
// activations at the same K positions, re-paired from one 16-byte load of X with byte permutes.
// Tokens are the MMA's N (8 per tile, two tiles for M > 8).
//
// Decode (exact): a nibble's sign is moved to bf16 bit 15 and its 3 magnitude bits to bits 6..8,
// where they read as value * 2^-126 (exponent e, mantissa m: 2^(e-127) * (1 + m/2), or the
// subnormal m * 2^-127 for e = 0).  One bf16x2 FMA then multiplies by 2^126 * block scale:
//   MXFP4 block byte s <= 128: 2^(s-1), the exact value.  Larger s (scales >= 4, and NaN 255)
//     would overflow that multiplier: such steps multiply by 2^126, then by 2^(s-127) (a warp-uniform
//     branch, taken only when some scale of the step needs it).
//   NVFP4: scale * 2^117 (e4m3 <= 448 < 2^9, so it never overflows); the values come out
//     as value * 2^-9 and the epilogue multiplies by 2^9 * global scale.
// Every product is exact in bf16 (e2m1 has 2 significant bits, e4m3 4); the MMA accumulates fp32.
//
// Split-K over the CTA's warps (warp w takes steps w, w + WARPS, ...), each warp issuing the loads
// of UNROLL steps before any of their math; VEC 16-byte loads per row and step (a step is 128 * VEC
// K).  With PIPE the warp also issues the next UNROLL steps' loads before that math, so its loads
// stay in flight through the math: 5-25% faster for the GEMM at up to 8 tokens.  More bytes in
// flight alone (a cp.async ring with 3-8 steps, whole tiles bulk-copied to shared memory) and ~40%
// fewer instructions (a post-scaled f16 decode) were not faster on the H100 (benchmarks/NOTES_fp4.md).
// Per-step bookkeeping is kept off the hot loop: running pointers, and the offset of a scale byte
// inside its aligned word fixed per row.  Partial sums meet in shared memory and are added in warp
// order (bitwise deterministic).  Grid: one CTA per 16 * RG weight rows.

#ifndef NV
#define NV 0          // 0: MXFP4 (e8m0 per 32), 1: NVFP4 (e4m3 per 16, global scale)
#endif
#ifndef RG
#define RG 1          // 16-row groups per warp (activation fragments reused across them)
#endif
#ifndef NT
#define NT 1          // 8-token MMA tiles (2 for M > 8)
#endif
#ifndef WARPS
#define WARPS 4
#endif
#ifndef UNROLL
#define UNROLL 2      // K steps whose loads are in flight together, per warp
#endif
#ifndef VEC
#define VEC 1         // 16-byte weight loads per row and step (32 * VEC K values per thread)
#endif
#ifndef PIPE
#define PIPE 0        // 1: next group's loads issued before the current group's math
#endif
#ifndef BIAS_T
#define BIAS_T 0      // 0 bf16, 1 fp16, 2 fp32
#endif

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#if BIAS_T == 2
typedef float bias_t;
#else
typedef u16 bias_t;
#endif

__device__ __forceinline__ uint4 load_stream(const u8* p) {
  // weights are read once: do not keep them in L1
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

__device__ __forceinline__ u32 fma_bf16x2(u32 a, u32 b, u32 c) {
  u32 d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// bf16 bits of value * 2^-126 for the low and high nibbles of the bytes picked by `sel`
#define NEG_ZERO2 0x80008000u
__device__ __forceinline__ void e2m1_raw_pairs(u32 w, u32 sel, u32& lo, u32& hi) {
  u32 t = __byte_perm(w, 0, sel);  // the two bytes -> the high byte of each 16-bit half
  lo = ((t << 4) & 0x80008000u) | ((t >> 2) & 0x01C001C0u);
  hi = (t & 0x80008000u) | ((t >> 6) & 0x01C001C0u);
}

// word (8 codes v0..v7) -> bf16x2 (v0, v2), (v1, v3), (v4, v6), (v5, v7), each times mult
__device__ __forceinline__ void decode_word(u32 w, u32 mult, u32 p[4]) {
  u32 a, b, c, d;
  e2m1_raw_pairs(w, 0x1404, a, b);
  e2m1_raw_pairs(w, 0x3424, c, d);
  p[0] = fma_bf16x2(a, mult, NEG_ZERO2);
  p[1] = fma_bf16x2(b, mult, NEG_ZERO2);
  p[2] = fma_bf16x2(c, mult, NEG_ZERO2);
  p[3] = fma_bf16x2(d, mult, NEG_ZERO2);
}

__device__ __forceinline__ void mma_bf16(float c[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 splat(u32 bf16_bits) { return bf16_bits | (bf16_bits << 16); }

// e8m0 byte -> bf16 bits of 2^(s-127) (0 is the subnormal 2^-127, 255 NaN)
__device__ __forceinline__ u32 e8m0_bf16(u32 s) { return s == 0 ? 0x0040u : (s == 255 ? 0x7FC0u : s << 7); }

__device__ __forceinline__ float e4m3_float(u32 b) {
  u32 e = (b >> 3) & 15, m = b & 7;
  float v = e == 0 ? (float)m * 0.001953125f : __uint_as_float(((e + 120) << 23) | (m << 20));
  if ((b & 0x7F) == 0x7F) v = __uint_as_float(0x7FC00000u);
  return (b & 0x80) ? -v : v;
}

// bf16x2 multiplier of an NVFP4 block: scale * 2^117 (exact: e4m3 has 4 significant bits)
__device__ __forceinline__ u32 nv_mult(u32 b) {
  return splat(__float_as_uint(e4m3_float(b) * __uint_as_float(0x7A000000u)) >> 16);
}

__device__ __forceinline__ float bf16_float(u16 h) { return __uint_as_float(((u32)h) << 16); }
__device__ __forceinline__ float half_float(u16 h) {
  float f;
  asm("{ .reg .f16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "h"(h));
  return f;
}
__device__ __forceinline__ u16 float_bf16(float f) {
  u16 h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
__device__ __forceinline__ float load_float(const float* p) { return *p; }
__device__ __forceinline__ float load_float(const u16* p) { return BIAS_T == 1 ? half_float(*p) : bf16_float(*p); }
__device__ __forceinline__ u16 float_half(float f) {
  u16 h;
  asm("{ .reg .f16 t; cvt.rn.f16.f32 t, %1; mov.b16 %0, t; }" : "=h"(h) : "f"(f));
  return h;
}

// Programmatic Dependent Launch (sm_90+; no-ops before, and when launched without the attribute):
// wait for the previous kernel's results / let the next kernel start launching.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// One group of UNROLL K steps: the loads (advancing the running pointers) and the math.
struct StepGroup {
  uint4 wv[UNROLL][RG][2][VEC];
  u32 sc[UNROLL][RG][2];
  uint4 xv[UNROLL][NT][4 * VEC];
};

__device__ __forceinline__ void load_group(StepGroup& G, const u8* (&wp)[RG][2], const u8* (&sp)[RG][2],
                                           const bool (&row_ok)[RG][2], const u16* (&xp)[NT],
                                           const bool (&tok_ok)[NT], int& kb, int K) {
  constexpr int STEP_K = 128 * VEC;                // K per warp step
  constexpr int SCALE_BYTES = NV ? 2 * VEC : VEC;  // a thread's scale bytes per row and step
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const bool kval = kb < K;  // K % 32 == 0: a thread's 32-value blocks are all in or all out
#pragma unroll
    for (int r = 0; r < RG; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const bool v = kval && row_ok[r][h];
#pragma unroll
        for (int j = 0; j < VEC; ++j) G.wv[u][r][h][j] = v ? load_stream(wp[r][h] + 16 * j) : make_uint4(0, 0, 0, 0);
        u32 sv = 0;
        if (v) {
          if (SCALE_BYTES == 1) sv = *sp[r][h];
          else if (SCALE_BYTES == 2) sv = *(const u16*)sp[r][h];
          else sv = *(const u32*)sp[r][h];
        }
        G.sc[u][r][h] = sv;
        wp[r][h] += WARPS * STEP_K / 2;
        sp[r][h] += WARPS * STEP_K / (NV ? 16 : 32);
      }
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const bool v = kval && tok_ok[n];
#pragma unroll
      for (int q = 0; q < 4 * VEC; ++q) G.xv[u][n][q] = v ? __ldg((const uint4*)xp[n] + q) : make_uint4(0, 0, 0, 0);
      xp[n] += WARPS * STEP_K;
    }
    kb += WARPS * STEP_K;
  }
}

__device__ __forceinline__ void math_group(float (&acc)[RG][NT][4], const StepGroup& G) {
#if NV
  const bool two_step = false;
#else
  bool big = false;
#pragma unroll
  for (int u = 0; u < UNROLL; ++u)
#pragma unroll
    for (int r = 0; r < RG; ++r)
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        big |= (((G.sc[u][r][0] >> (8 * j)) & 0xFF) > 128u) | (((G.sc[u][r][1] >> (8 * j)) & 0xFF) > 128u);
  const bool two_step = __any_sync(0xFFFFFFFFu, big);
#endif

#pragma unroll
  for (int u = 0; u < UNROLL; ++u)
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      // multipliers per row and word: NVFP4 words 0-1 / 2-3 are two blocks
      u32 mult[RG][2][2], fix[RG][2];
#pragma unroll
      for (int r = 0; r < RG; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#if NV
          const u32 e = G.sc[u][r][h] >> (16 * j);
          mult[r][h][0] = nv_mult(e & 0xFF);
          mult[r][h][1] = nv_mult((e >> 8) & 0xFF);
          fix[r][h] = 0;
#else
          const u32 e = (G.sc[u][r][h] >> (8 * j)) & 0xFF;
          mult[r][h][0] = mult[r][h][1] = two_step ? 0x7E807E80u : splat((e + 126u) << 7);
          fix[r][h] = splat(e8m0_bf16(e));
#endif
        }
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        u32 b[NT][4];
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          const uint4 xx = G.xv[u][n][4 * j + q];
          b[n][0] = __byte_perm(xx.x, xx.y, 0x5410);  // (x0, x2)
          b[n][1] = __byte_perm(xx.x, xx.y, 0x7632);  // (x1, x3)
          b[n][2] = __byte_perm(xx.z, xx.w, 0x5410);  // (x4, x6)
          b[n][3] = __byte_perm(xx.z, xx.w, 0x7632);  // (x5, x7)
        }
#pragma unroll
        for (int r = 0; r < RG; ++r) {
          const uint4 a0 = G.wv[u][r][0][j], a1 = G.wv[u][r][1][j];
          const u32 w0 = q == 0 ? a0.x : q == 1 ? a0.y : q == 2 ? a0.z : a0.w;
          const u32 w1 = q == 0 ? a1.x : q == 1 ? a1.y : q == 2 ? a1.z : a1.w;
          u32 pg[4], ph[4];
          decode_word(w0, mult[r][0][q >> 1], pg);
          decode_word(w1, mult[r][1][q >> 1], ph);
          if (two_step) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              pg[i] = fma_bf16x2(pg[i], fix[r][0], NEG_ZERO2);
              ph[i] = fma_bf16x2(ph[i], fix[r][1], NEG_ZERO2);
            }
          }
#pragma unroll
          for (int n = 0; n < NT; ++n) {
            mma_bf16(acc[r][n], pg[0], ph[0], pg[1], ph[1], b[n][0], b[n][1]);
            mma_bf16(acc[r][n], pg[2], ph[2], pg[3], ph[3], b[n][2], b[n][3]);
          }
        }
      }
    }
}

// acc[r][n] += rows (r, this thread's g, g + 8) x tokens (n, this thread's g) over this warp's K steps.
// wp / sp / xp point at this thread's first values (K = kb); rows with !row_ok and tokens with
// !tok_ok read nothing and contribute zeros.  Steps are warp, warp + WARPS, ...
// PIPE: the loads of the next group are issued before the math of the current one (two groups of
// registers), so a warp keeps loads in flight through its math.
__device__ __forceinline__ void fp4_mma_k_loop(float (&acc)[RG][NT][4], const u8* (&wp)[RG][2], const u8* (&sp)[RG][2],
                                               const bool (&row_ok)[RG][2], const u16* (&xp)[NT],
                                               const bool (&tok_ok)[NT], int kb, int K, int warp) {
  constexpr int GROUP = WARPS * UNROLL;  // steps between a warp's groups
  const int nsteps = (K + 128 * VEC - 1) / (128 * VEC);
#if PIPE
  StepGroup ga, gb;
  if (warp < nsteps) load_group(ga, wp, sp, row_ok, xp, tok_ok, kb, K);
  for (int s0 = warp; s0 < nsteps; s0 += 2 * GROUP) {
    const bool more = s0 + GROUP < nsteps;
    if (more) load_group(gb, wp, sp, row_ok, xp, tok_ok, kb, K);
    math_group(acc, ga);
    if (!more) break;
    if (s0 + 2 * GROUP < nsteps) load_group(ga, wp, sp, row_ok, xp, tok_ok, kb, K);
    math_group(acc, gb);
  }
#else
  for (int s0 = warp; s0 < nsteps; s0 += GROUP) {
    StepGroup G;
    load_group(G, wp, sp, row_ok, xp, tok_ok, kb, K);
    math_group(acc, G);
  }
#endif
}

__device__ __forceinline__ void zero_acc(float (&acc)[RG][NT][4]) {
#pragma unroll
  for (int r = 0; r < RG; ++r)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[r][n][c] = 0.0f;
}

// Split-K partial sums of the CTA's warps, added in warp order (bitwise deterministic).
// stash_partials, __syncthreads, then warp_sum(i) for fragment entry i = (r * NT + n) * 4 + c.
#define PARTIAL_FLOATS (WARPS * RG * NT * 4 * 32)
__device__ __forceinline__ void stash_partials(float* partial, const float (&acc)[RG][NT][4], int warp, int lane) {
#pragma unroll
  for (int r = 0; r < RG; ++r)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int c = 0; c < 4; ++c) partial[(warp * RG * NT * 4 + (r * NT + n) * 4 + c) * 32 + lane] = acc[r][n][c];
}

__device__ __forceinline__ float warp_sum(const float* partial, int i, int lane) {
  float y = 0.0f;
#pragma unroll
  for (int v = 0; v < WARPS; ++v) y += partial[(v * RG * NT * 4 + i) * 32 + lane];
  return y;
}
