// MoE expert GEMMs for decode (few tokens) with FP4 weights and bf16 activations, on the decode
// MMA core (fp4_mma_core.cuh):
//   fp4_moe_gate_up: inter[q, :] = glu(x[q / top_k] @ W13[e]^T + b13[e]) (* w[q] before down)
//   fp4_moe_down:    rows[q, :]  = (inter[q] @ W2[e]^T + b2[e]) (* w[q] after down)
// for every (token, slot) pair q = t * top_k + j with e = ids[q] in [0, E); the deterministic
// combine (templates/moe_combine.py) then sums rows over slots.  The same [N, I] intermediate and
// [N, H] per-pair rows as the Triton pipeline, rounded to bf16 at the same places.
//
// Launched with PDL: gate_up waits for the previous kernel before reading anything, then lets down
// launch; down finds its pairs while gate_up finishes and waits before reading inter.
// Two ways to find a CTA's pairs (BLOCKS):
//   0 (decode, a few dozen pairs): grid (column tiles, pairs), no routing pass.  The CTA of pair p
//     reads ids, exits unless p is the first pair routed to its expert (the "leader"), and otherwise
//     takes every pair routed to that expert as the MMA's tokens, 8 * NT at a time, so each expert's
//     weight tile is read and decoded once per call however many tokens chose it.
//   1 (hundreds of pairs, where a scan per CTA would cost more than a routing pass): grid (column
//     tiles, blocks of the align kernel, templates/moe_align.py, BLOCK_M pairs of one expert each).
// Ids outside [0, E) are skipped either way (their rows are never written; the combine skips them).
//
// fp4_moe_gate_up runs two row groups per 16 intermediate columns (RG = 2 * COL_GROUPS): their gate
// rows and their up rows, so the GLU of a column meets both halves in one thread after the split-K
// sum.
// Weights: W [E, rows, K/2] uint8 with contiguous rows (strides in bytes: w_se, w_sn), scales
// [E, rows, K/32] e8m0 or [E, rows, K/16] e4m3 (s_se, s_sn), NVFP4 global scales [E] (or [E, 2]:
// gate's and up's, GATE_UP_GSCALES).  K % 32 == 0, 16-byte aligned rows (checked by the host).

#ifndef STAGE
#define STAGE 1         // the kernel this build holds: 1 fp4_moe_gate_up (RG must be 2), 2 fp4_moe_down
#endif
#ifndef COL_GROUPS
#define COL_GROUPS 1    // fp4_moe_gate_up: 16-column groups per CTA (their gate and up rows share the activations)
#endif
#ifndef IDS_64
#define IDS_64 1        // topk_ids int64 (else int32)
#endif
#ifndef TW_T
#define TW_T 2          // topk_weights: 0 bf16, 1 fp16, 2 fp32
#endif
#ifndef GLU
#define GLU 0           // 0 silu (with slope alpha), 1 gelu (erf), 2 gelu (tanh)
#endif
#ifndef HAS_LIMIT
#define HAS_LIMIT 0
#endif
#ifndef INTERLEAVED
#define INTERLEAVED 0   // W13 rows: 0 [gate | up], 1 gate even / up odd
#endif
#ifndef INTER_F32  // gate_up stores the intermediate in fp32 (for a rounding pass before down: fp8_mx32)
#define INTER_F32 0
#endif
#ifndef WEIGHT_BEFORE_DOWN
#define WEIGHT_BEFORE_DOWN 0
#endif
#ifndef HAS_BIAS
#define HAS_BIAS 0
#endif
#ifndef HAS_GSCALE
#define HAS_GSCALE 0
#endif
#ifndef GATE_UP_GSCALES
#define GATE_UP_GSCALES 0
#endif
#ifndef MAX_PAIRS
#define MAX_PAIRS 256   // pairs (T * top_k) one call may have; the host checks
#endif
#ifndef BLOCKS
#define BLOCKS 0        // 1: the CTAs take the align kernel's blocks (see above)
#endif
#ifndef BLOCK_M
#define BLOCK_M 8       // pairs per align block (BLOCKS = 1; at most MAX_PAIRS)
#endif
#ifndef MIN_CTAS
#define MIN_CTAS 1      // __launch_bounds__' minimum of resident CTAs per SM: caps the registers
#endif

#include "fp4_mma_core.cuh"

#if IDS_64
typedef long long id_t;
#else
typedef int id_t;
#endif
#if TW_T == 2
typedef float tw_t;
#else
typedef u16 tw_t;
#endif

__device__ __forceinline__ float routing_weight(const tw_t* tw, int q) {
#if TW_T == 2
  return tw[q];
#elif TW_T == 1
  return half_float(tw[q]);
#else
  return bf16_float(tw[q]);
#endif
}

// Pairs routed to expert e, in pair order, into members[]; their number, or -1 when a pair before
// p also chose e (that pair's CTA does the work).  Every thread of the CTA calls this.
__device__ int routed_pairs(const id_t* __restrict__ ids, int n_pairs, int p, id_t e, int* members) {
  __shared__ int warp_counts[WARPS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  bool earlier = false;
  for (int i = threadIdx.x; i < p; i += WARPS * 32) earlier |= ids[i] == e;
  if (__syncthreads_or(earlier)) return -1;
  int count = 0;
  for (int start = p; start < n_pairs; start += WARPS * 32) {
    const int i = start + threadIdx.x;
    const bool mine = i < n_pairs && ids[i] == e;
    const u32 ballot = __ballot_sync(0xFFFFFFFFu, mine);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int before = count, total = count;
#pragma unroll
    for (int v = 0; v < WARPS; ++v) {
      before += v < warp ? warp_counts[v] : 0;
      total += warp_counts[v];
    }
    if (mine) members[before + __popc(ballot & ((1u << lane) - 1u))] = i;
    count = total;
    __syncthreads();
  }
  return count;
}

// This CTA's expert (e) and its pairs in members[0 .. count); returns count, or -1 where the CTA has
// nothing to do (CTA-uniform).  BLOCKS: route is the align kernel's int32 scratch -- expert_count [E],
// expert_start [E], sorted_ids [max_blocks * BLOCK_M], block_expert [max_blocks] -- and blockIdx.y
// its block; else blockIdx.y is a pair and the CTA scans ids (routed_pairs).
__device__ __forceinline__ int cta_pairs(const id_t* __restrict__ ids, int n_pairs, int E, const int* __restrict__ route,
                                         int max_blocks, int* members, int& e) {
#if BLOCKS
  const int b = blockIdx.y;
  e = route[2 * E + max_blocks * BLOCK_M + b];
  if (e < 0 || e >= E) return -1;
  // the block's ids are read beside its count, not after it (rows past the count are never used)
  const int id = threadIdx.x < BLOCK_M ? route[2 * E + b * BLOCK_M + threadIdx.x] : 0;
  const int count = min(BLOCK_M, route[e] - (b * BLOCK_M - route[E + e]));
  if (threadIdx.x < count) members[threadIdx.x] = id;
  if (BLOCK_M > WARPS * 32)  // blocks of more pairs than threads: the rest after the count
    for (int i = threadIdx.x + WARPS * 32; i < count; i += WARPS * 32) members[i] = route[2 * E + b * BLOCK_M + i];
  __syncthreads();
  return count;
#else
  const int p = blockIdx.y;
  const id_t id = ids[p];
  if (id < 0 || id >= E) return -1;
  e = (int)id;
  return routed_pairs(ids, n_pairs, p, id, members);
#endif
}

__device__ __forceinline__ float glu(float gate, float up, float alpha, float limit, float up_offset) {
#if HAS_LIMIT
  gate = fminf(gate, limit);
  up = fminf(fmaxf(up, -limit), limit);
#endif
#if GLU == 0
  const float act = gate / (1.0f + expf(-alpha * gate));
#elif GLU == 1
  const float act = 0.5f * gate * (1.0f + erff(gate * 0.70710678118654752f));
#else
  const float act = 0.5f * gate * (1.0f + tanhf(0.7978845608028654f * (gate + 0.044715f * gate * gate * gate)));
#endif
  return act * (up + up_offset);
}

// Pointers of this thread's weight rows (rows[r][h]) of expert e, at K = kb.
__device__ __forceinline__ void point_rows(const u8* w, const u8* scales, int w_se, int w_sn, int s_se, int s_sn, int e, const int (&rows)[RG][2], const bool (&ok)[RG][2],
                                           int kb, const u8* (&wp)[RG][2], const u8* (&sp)[RG][2]) {
#pragma unroll
  for (int r = 0; r < RG; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const long long row = ok[r][h] ? rows[r][h] : 0;
      wp[r][h] = w + (long long)e * w_se + row * w_sn + (kb >> 1);
      sp[r][h] = scales + (long long)e * s_se + row * s_sn + (kb >> (NV ? 4 : 5));
    }
}

// Split-K partial sums (in `partial`, summed by warp_sum after a __syncthreads) of this CTA's rows
// of expert e times the activations of pairs members[base .. base + 8 * NT) (fewer past `count`):
// pair q's activation row is act[(q / pairs_per_row) * ld].
__device__ __forceinline__ void stash_pair_partials(float* partial, const u8* w, const u8* scales, int w_se, int w_sn,
                                                    int s_se, int s_sn, int e, const int (&rows)[RG][2],
                                                    const bool (&row_ok)[RG][2], const u16* act, int ld,
                                                    int pairs_per_row, const int* members, int base, int count,
                                                    int K, int kb, int warp, int lane) {
  const u8* wp[RG][2];
  const u8* sp[RG][2];
  point_rows(w, scales, w_se, w_sn, s_se, s_sn, e, rows, row_ok, kb, wp, sp);
  const u16* xp[NT];
  bool tok_ok[NT];
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    const int m = base + n * 8 + (lane >> 2);
    tok_ok[n] = m < count;
    xp[n] = act + (long long)(tok_ok[n] ? members[m] / pairs_per_row : 0) * ld + kb;
  }
  float acc[RG][NT][4];
  zero_acc(acc);
  fp4_mma_k_loop(acc, wp, sp, row_ok, xp, tok_ok, kb, K, warp);
  stash_partials(partial, acc, warp, lane);
}

// gate_up tile: inter[q, col0 .. col0 + 16 * COL_GROUPS) for every pair q in members[0 .. count) (all routed to
// expert e).  Ends with a __syncthreads (partial and members may be reused right after).
__device__ __forceinline__ void gate_up_tile(float* partial, const int* members, int count, int e, int col0,
                                             const u16* __restrict__ x, int ldx, int top_k, const tw_t* __restrict__ tw,
                                             const u8* __restrict__ w, const u8* __restrict__ scales,
                                             const float* __restrict__ gscale, const bias_t* __restrict__ bias,
                                             u16* __restrict__ inter, int H, int I, int w_se, int w_sn, int s_se,
                                             int s_sn, int b_se, float alpha, float limit, float up_offset) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int kb = warp * 128 * VEC + t * 32 * VEC;
  int rows[RG][2];
  bool row_ok[RG][2];
#pragma unroll
  for (int r = 0; r < RG; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // row group 2c: the gate rows of columns col0 + 16c .., 2c + 1: their up rows
      const int col = col0 + 16 * (r >> 1) + g + 8 * h;
      const bool up = r & 1;
      row_ok[r][h] = col < I;
      rows[r][h] = INTERLEAVED ? 2 * col + up : col + (up ? I : 0);
    }
  float alpha_gate = NV ? 512.0f : 1.0f, alpha_up = alpha_gate;  // NVFP4 values were decoded times 2^-9
#if HAS_GSCALE
  alpha_gate *= gscale[GATE_UP_GSCALES ? 2 * e : e];
  alpha_up *= gscale[GATE_UP_GSCALES ? 2 * e + 1 : e];
#endif

  for (int base = 0; base < count; base += 8 * NT) {
    stash_pair_partials(partial, w, scales, w_se, w_sn, s_se, s_sn, e, rows, row_ok, x, ldx, top_k, members, base,
                        count, H, kb, warp, lane);
    __syncthreads();
    // fragment entry i of group 2c (gate) and i + NT * 4 of group 2c + 1 (up) hold the same (column, pair)
    for (int j = warp; j < COL_GROUPS * NT * 4; j += WARPS) {
      const int c = j & 3, n = (j >> 2) % NT, cg = (j >> 2) / NT;
      const int i = (2 * cg * NT + n) * 4 + c;
      const int col = col0 + 16 * cg + g + 8 * (c >> 1);
      const int m = base + n * 8 + 2 * t + (c & 1);
      if (col >= I || m >= count) continue;
      float gate = warp_sum(partial, i, lane) * alpha_gate;
      float up = warp_sum(partial, i + NT * 4, lane) * alpha_up;
#if HAS_BIAS
      gate += load_float(bias + (long long)e * b_se + (INTERLEAVED ? 2 * col : col));
      up += load_float(bias + (long long)e * b_se + (INTERLEAVED ? 2 * col + 1 : I + col));
#endif
      const int q = members[m];
      float y = glu(gate, up, alpha, limit, up_offset);
#if WEIGHT_BEFORE_DOWN
      y *= routing_weight(tw, q);
#endif
#if INTER_F32
      reinterpret_cast<float*>(inter)[(long long)q * I + col] = y;
#else
      inter[(long long)q * I + col] = float_bf16(y);
#endif
    }
    __syncthreads();  // partial is reused by the next group of pairs
  }
}

// down tile: rows[q, row0 .. row0 + 16 * RG) for every pair q in members[0 .. count) (all routed
// to expert e).  Ends with a __syncthreads.
__device__ __forceinline__ void down_tile(float* partial, const int* members, int count, int e, int row0,
                                          const u16* __restrict__ inter, const tw_t* __restrict__ tw,
                                          const u8* __restrict__ w, const u8* __restrict__ scales,
                                          const float* __restrict__ gscale, const bias_t* __restrict__ bias,
                                          u16* __restrict__ rows_out, int H, int I, int w_se, int w_sn, int s_se,
                                          int s_sn, int b_se) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int kb = warp * 128 * VEC + t * 32 * VEC;
  int rows[RG][2];
  bool row_ok[RG][2];
#pragma unroll
  for (int r = 0; r < RG; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      rows[r][h] = row0 + r * 16 + g + 8 * h;
      row_ok[r][h] = rows[r][h] < H;
    }
  float alpha = NV ? 512.0f : 1.0f;
#if HAS_GSCALE
  alpha *= gscale[e];
#endif

  for (int base = 0; base < count; base += 8 * NT) {
    stash_pair_partials(partial, w, scales, w_se, w_sn, s_se, s_sn, e, rows, row_ok, inter, I, 1, members, base,
                        count, I, kb, warp, lane);
    __syncthreads();
    for (int i = warp; i < RG * NT * 4; i += WARPS) {
      const int c = i & 3, n = (i >> 2) % NT, r = (i >> 2) / NT;
      const int row = row0 + r * 16 + g + (c >> 1) * 8;
      const int m = base + n * 8 + 2 * t + (c & 1);
      if (row >= H || m >= count) continue;
      float y = warp_sum(partial, i, lane) * alpha;
#if HAS_BIAS
      y += load_float(bias + (long long)e * b_se + row);
#endif
      const int q = members[m];
#if !WEIGHT_BEFORE_DOWN
      y *= routing_weight(tw, q);
#endif
      rows_out[(long long)q * H + row] = float_bf16(y);
    }
    __syncthreads();
  }
}

#if STAGE == 1
#if RG != 2 * COL_GROUPS
#error "fp4_moe_gate_up takes the gate and the up rows of each 16-column group as two row groups (RG = 2 * COL_GROUPS)"
#endif
extern "C" __global__ void __launch_bounds__(WARPS * 32, MIN_CTAS)
fp4_moe_gate_up(const u16* __restrict__ x, const id_t* __restrict__ ids, const tw_t* __restrict__ tw,
                const u8* __restrict__ w, const u8* __restrict__ scales, const float* __restrict__ gscale,
                const bias_t* __restrict__ bias, u16* __restrict__ inter, int n_pairs, int top_k, int E, int H,
                int I, int ldx, int w_se, int w_sn, int s_se, int s_sn, int b_se, double alpha_d, double limit_d,
                double up_offset_d, const int* __restrict__ route, int max_blocks) {
  // (ints and doubles: the NVRTC launcher passes Python ints as C int and floats as double)
  __shared__ float partial[PARTIAL_FLOATS];
  __shared__ int members[MAX_PAIRS];
  pdl_wait();  // ids (or the align kernel's blocks) and x come from earlier kernels
  pdl_launch_dependents();
  int e;
  const int count = cta_pairs(ids, n_pairs, E, route, max_blocks, members, e);
  if (count < 0) return;
  gate_up_tile(partial, members, count, e, blockIdx.x * 16 * COL_GROUPS, x, ldx, top_k, tw, w, scales, gscale, bias,
               inter, H, I, w_se, w_sn, s_se, s_sn, b_se, (float)alpha_d, (float)limit_d, (float)up_offset_d);
}

#else
extern "C" __global__ void __launch_bounds__(WARPS * 32, MIN_CTAS)
fp4_moe_down(const u16* __restrict__ inter, const id_t* __restrict__ ids, const tw_t* __restrict__ tw,
             const u8* __restrict__ w, const u8* __restrict__ scales, const float* __restrict__ gscale,
             const bias_t* __restrict__ bias, u16* __restrict__ rows_out, int n_pairs, int E, int H, int I,
             int w_se, int w_sn, int s_se, int s_sn, int b_se, const int* __restrict__ route, int max_blocks) {
  __shared__ float partial[PARTIAL_FLOATS];
  __shared__ int members[MAX_PAIRS];
  // Before waiting on gate_up (PDL): the routing only (ids, or the align kernel's blocks), final
  // before gate_up started; inter after the wait.
  int e;
  const int count = cta_pairs(ids, n_pairs, E, route, max_blocks, members, e);
  if (count < 0) return;
  pdl_wait();
  pdl_launch_dependents();
  down_tile(partial, members, count, e, blockIdx.x * 16 * RG, inter, tw, w, scales, gscale, bias, rows_out, H, I,
            w_se, w_sn, s_se, s_sn, b_se);
}

#endif
