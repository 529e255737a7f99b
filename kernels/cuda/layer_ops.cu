// Element-wise and layout kernels of a DeepSeek-V3 layer (see layer_ops.hpp for the contracts).
// Every kernel here is memory-bound: 16-byte loads and stores where the layout allows, fp32 arithmetic,
// one rounding to bf16 per output. fp8 quantisation follows quant.cu bit for bit (IEEE division by
// scale = max(amax, 1e-4) / 448, round to nearest even, saturate).
#include "kernels/cuda/layer_ops.hpp"

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cfloat>
#include <climits>
#include <algorithm>
#include <cmath>
#include <string>

namespace petrel::cuda {
namespace {

// -- device helpers ---------------------------------------------------------------------------

__device__ __forceinline__ void load8(const __nv_bfloat16* p, float* v) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void store8(__nv_bfloat16* p, const float* v) {
  uint4 raw;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
  *reinterpret_cast<uint4*>(p) = raw;
}

__device__ __forceinline__ float round_bf16(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

// Quantises the 8 values of this lane as part of a 128-wide block shared by 16 consecutive lanes
// (all 32 lanes of the warp must call it). Writes 8 fp8 bytes to q; returns the block's scale.
__device__ __forceinline__ float quant8_in_block16(const float* v, std::uint8_t* q, bool active) {
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[i]));
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  amax = fmaxf(amax, fp8_amax_floor);
  const float scale = amax / fp8_e4m3_max;
  if (active) {
    uint2 out;
    std::uint32_t* w = reinterpret_cast<std::uint32_t*>(&out);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const __nv_fp8x2_storage_t lo = __nv_cvt_float2_to_fp8x2(
          make_float2(__fdiv_rn(v[4 * i], scale), __fdiv_rn(v[4 * i + 1], scale)), __NV_SATFINITE, __NV_E4M3);
      const __nv_fp8x2_storage_t hi = __nv_cvt_float2_to_fp8x2(
          make_float2(__fdiv_rn(v[4 * i + 2], scale), __fdiv_rn(v[4 * i + 3], scale)), __NV_SATFINITE, __NV_E4M3);
      w[i] = static_cast<std::uint32_t>(lo) | (static_cast<std::uint32_t>(hi) << 16);
    }
    *reinterpret_cast<uint2*>(q) = out;
  }
  return scale;
}

kernel_status launched(const char* who) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return kernel_status::failure(std::string(who) + ": launch failed: " + cudaGetErrorString(err));
  return kernel_status::success();
}

bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

// -- RMSNorm ------------------------------------------------------------------------------------
// One CTA per row, 8 elements per thread (n <= 8192 -> <= 1024 threads).

__global__ void rmsnorm_kernel(const __nv_bfloat16* __restrict__ x, std::int64_t x_ld, __nv_bfloat16* residual,
                               bool add_residual, const __nv_bfloat16* __restrict__ w, int n, float eps,
                               __nv_bfloat16* out, std::int64_t out_ld, std::uint8_t* out_fp8, float* out_scales,
                               std::int64_t scale_ld) {
  __shared__ float partial[32];
  const std::int64_t row = blockIdx.x;
  const int col = threadIdx.x * 8;
  const bool active = col < n;
  float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  if (active) {
    load8(x + row * x_ld + col, v);
    if (residual) {
      __nv_bfloat16* r = residual + row * n + col;
      if (add_residual) {
        float rv[8];
        load8(r, rv);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = round_bf16(v[i] + rv[i]);
      }
      store8(r, v);
    }
  }
  float ss = 0.0f;
#pragma unroll
  for (int i = 0; i < 8; ++i) ss += v[i] * v[i];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = ss;
  __syncthreads();
  if (threadIdx.x < 32) {
    const int warps = blockDim.x / 32;
    float s = threadIdx.x < warps ? partial[threadIdx.x] : 0.0f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (threadIdx.x == 0) partial[0] = s;
  }
  __syncthreads();
  const float rstd = rsqrtf(partial[0] / static_cast<float>(n) + eps);
  float y[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  if (active) {
    float wv[8];
    load8(w + col, wv);
#pragma unroll
    for (int i = 0; i < 8; ++i) y[i] = round_bf16(wv[i] * round_bf16(v[i] * rstd));
    if (out) store8(out + row * out_ld + col, y);
  }
  if (out_fp8) {
    const float scale = quant8_in_block16(y, out_fp8 + row * n + col, active);
    if (active && threadIdx.x % 16 == 0) out_scales[static_cast<std::int64_t>(col / fp8_block) * scale_ld + row] = scale;
  }
}

// -- RoPE -----------------------------------------------------------------------------------------

__global__ void rope_kernel(const __nv_bfloat16* in, std::int64_t in_ld, std::int64_t in_hs, __nv_bfloat16* out,
                            std::int64_t out_ld, std::int64_t out_hs, std::int64_t rows, int heads, int half,
                            const int* __restrict__ positions, const float* __restrict__ cs, int max_pos) {
  const std::int64_t total = rows * heads * half;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const int pair = static_cast<int>(i % half);
    const std::int64_t rh = i / half;
    const int h = static_cast<int>(rh % heads);
    const std::int64_t r = rh / heads;
    int pos = positions[r];
    pos = pos < 0 ? 0 : (pos >= max_pos ? max_pos - 1 : pos);
    const float c = cs[static_cast<std::int64_t>(pos) * 2 * half + pair];
    const float s = cs[static_cast<std::int64_t>(pos) * 2 * half + half + pair];
    const float2 x = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(in + r * in_ld + h * in_hs + 2 * pair));
    *reinterpret_cast<__nv_bfloat162*>(out + r * out_ld + h * out_hs + 2 * pair) =
        __floats2bfloat162_rn(x.x * c - x.y * s, x.y * c + x.x * s);
  }
}

// Same rotation, 4 pairs (16 bytes) per thread: for rope_dim % 8 == 0 with 16-byte aligned rows and heads.
__global__ void rope_vec_kernel(const __nv_bfloat16* in, std::int64_t in_ld, std::int64_t in_hs, __nv_bfloat16* out,
                                std::int64_t out_ld, std::int64_t out_hs, std::int64_t rows, int heads, int half,
                                const int* __restrict__ positions, const float* __restrict__ cs, int max_pos) {
  const int quads = half / 4;
  const std::int64_t total = rows * heads * quads;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const int q = static_cast<int>(i % quads);
    const std::int64_t rh = i / quads;
    const int h = static_cast<int>(rh % heads);
    const std::int64_t r = rh / heads;
    int pos = positions[r];
    pos = pos < 0 ? 0 : (pos >= max_pos ? max_pos - 1 : pos);
    const float4 c = *reinterpret_cast<const float4*>(cs + static_cast<std::int64_t>(pos) * 2 * half + 4 * q);
    const float4 sn = *reinterpret_cast<const float4*>(cs + static_cast<std::int64_t>(pos) * 2 * half + half + 4 * q);
    float x[8], y[8];
    load8(in + r * in_ld + h * in_hs + 8 * q, x);
    const float cc[4] = {c.x, c.y, c.z, c.w}, ss[4] = {sn.x, sn.y, sn.z, sn.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      y[2 * j] = x[2 * j] * cc[j] - x[2 * j + 1] * ss[j];
      y[2 * j + 1] = x[2 * j + 1] * cc[j] + x[2 * j] * ss[j];
    }
    store8(out + r * out_ld + h * out_hs + 8 * q, y);
  }
}

// -- SwiGLU (+ fp8) ---------------------------------------------------------------------------------
// Grid (ceil(n / 2048), rows), 256 threads, 8 outputs per thread; 16 lanes form one 128-wide fp8 block.

__global__ void swiglu_kernel(const __nv_bfloat16* __restrict__ gate_up, int n, __nv_bfloat16* out, std::uint8_t* out_fp8,
                              float* out_scales, std::int64_t scale_ld, const int* row_expert, const int* masked_m,
                              std::int64_t max_m, std::int64_t row_base) {
  const std::int64_t row = row_base + blockIdx.y;
  if (row_expert && row_expert[row] < 0) return;  // whole CTA leaves together: no partial warps
  if (masked_m && row % max_m >= masked_m[row / max_m]) return;
  const int col = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
  const bool active = col < n;
  float h[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  if (active) {
    float g[8], u[8];
    load8(gate_up + row * 2 * n + col, g);
    load8(gate_up + row * 2 * n + n + col, u);
#pragma unroll
    for (int i = 0; i < 8; ++i) h[i] = round_bf16(g[i] / (1.0f + expf(-g[i])) * u[i]);
    if (out) store8(out + row * n + col, h);
  }
  if (out_fp8) {
    const float scale = quant8_in_block16(h, out_fp8 + row * n + col, active);
    if (active && threadIdx.x % 16 == 0) out_scales[static_cast<std::int64_t>(col / fp8_block) * scale_ld + row] = scale;
  }
}

// -- noaux_tc routing ---------------------------------------------------------------------------------

constexpr int route_max_per_lane = 8;

struct scored { float v; int i; float s; };

__device__ __forceinline__ scored better(scored a, scored b) {
  // larger value wins; ties to the lower index; NaN never wins
  if (b.v > a.v || (b.v == a.v && b.i < a.i)) return b;
  return a;
}

// Warp-wide best (value, index); the third field is not reduced (callers fetch it from the winner's lane).
__device__ __forceinline__ scored warp_best(scored x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    scored o{__shfl_xor_sync(0xffffffffu, x.v, off), __shfl_xor_sync(0xffffffffu, x.i, off), 0.0f};
    x = better(x, o);
  }
  return x;
}

__global__ void route_kernel(const float* __restrict__ logits, const float* __restrict__ bias, std::int64_t tokens,
                             int experts, int groups, int topk_group, int top_k, bool normalize, float scaling,
                             int* topk_ids, float* topk_weights) {
  const int lane = threadIdx.x % 32;
  const std::int64_t t = blockIdx.x * static_cast<std::int64_t>(blockDim.x / 32) + threadIdx.x / 32;
  if (t >= tokens) return;  // whole warp leaves together
  const int per_lane = experts / 32;
  const int lanes_per_group = experts / groups / per_lane;
  const int group = lane / lanes_per_group;
  float s[route_max_per_lane], c[route_max_per_lane];
#pragma unroll
  for (int i = 0; i < route_max_per_lane; ++i) {
    s[i] = 0.0f;
    c[i] = -INFINITY;
    if (i < per_lane) {
      const int e = lane * per_lane + i;
      s[i] = 1.0f / (1.0f + expf(-logits[t * experts + e]));
      c[i] = s[i] + bias[e];
    }
  }
  // group score = sum of the group's two largest c
  float a1 = -INFINITY, a2 = -INFINITY;
#pragma unroll
  for (int i = 0; i < route_max_per_lane; ++i) {
    if (i >= per_lane) break;
    if (c[i] > a1) { a2 = a1; a1 = c[i]; } else if (c[i] > a2) { a2 = c[i]; }
  }
  for (int off = 1; off < lanes_per_group; off <<= 1) {
    const float b1 = __shfl_xor_sync(0xffffffffu, a1, off), b2 = __shfl_xor_sync(0xffffffffu, a2, off);
    const float n1 = fmaxf(a1, b1), n2 = fmaxf(fminf(a1, b1), fmaxf(a2, b2));
    a1 = n1;
    a2 = n2;
  }
  const float group_score = a1 + a2;
  // keep the topk_group best groups
  bool kept = false;
  for (int g = 0; g < topk_group; ++g) {
    scored mine{kept ? -INFINITY : group_score, kept ? INT_MAX : group, 0.0f};
    const scored best = warp_best(mine);
    if (best.i == group) kept = true;
  }
  // top_k of c among the kept groups' experts
  bool taken[route_max_per_lane];
#pragma unroll
  for (int i = 0; i < route_max_per_lane; ++i) taken[i] = !(i < per_lane) || !kept;
  float sum = 0.0f;
  for (int j = 0; j < top_k; ++j) {
    scored mine{-INFINITY, INT_MAX, 0.0f};
#pragma unroll
    for (int i = 0; i < route_max_per_lane; ++i)
      if (!taken[i]) mine = better(mine, scored{c[i], lane * per_lane + i, s[i]});
    const scored best = warp_best(mine);
    // the owner lane holds the winner's unbiased score in its own candidate
    const float best_s = __shfl_sync(0xffffffffu, mine.s, best.i / per_lane);
#pragma unroll
    for (int i = 0; i < route_max_per_lane; ++i)
      if (lane * per_lane + i == best.i) taken[i] = true;
    sum += best_s;
    if (lane == j) {
      topk_ids[t * top_k + j] = best.i;
      topk_weights[t * top_k + j] = best_s;
    }
  }
  __syncwarp();
  if (lane < top_k) {
    float w = topk_weights[t * top_k + lane];
    if (normalize) w = w / (sum + 1e-20f);
    topk_weights[t * top_k + lane] = w * scaling;
  }
}

// -- MoE permute / combine ------------------------------------------------------------------------------
// workspace ints: [0] overflow flag, [1..] counts[L], offsets[L], cursors[L]

__global__ void permute_count_kernel(const int* __restrict__ topk_local, std::int64_t pairs, int local_experts,
                                     std::int64_t m_capacity, int* ws) {
  extern __shared__ int counts[];
  for (int e = threadIdx.x; e < local_experts; e += blockDim.x) counts[e] = 0;
  __syncthreads();
  for (std::int64_t p = threadIdx.x; p < pairs; p += blockDim.x) {
    const int e = topk_local[p];
    if (e >= 0 && e < local_experts) atomicAdd(&counts[e], 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int* cnt = ws + 1;
    int* off = cnt + local_experts;
    int* cur = off + local_experts;
    std::int64_t running = 0;
    int overflow = 0;
    for (int e = 0; e < local_experts; ++e) {
      cnt[e] = counts[e];
      off[e] = static_cast<int>(running);
      cur[e] = 0;
      running += (counts[e] + fp8_block - 1) / fp8_block * fp8_block;
    }
    if (running > m_capacity) overflow = 1;
    ws[0] = overflow;
  }
}

// One warp per (token, expert) pair, warps warp0, warp0 + nwarps, ...: lane 0 takes the pair's slot in its expert
// (cursor cur[e]) and row_of(e, slot) gives its row of A (-1: no room, which sets the overflow flag ws[0]); the warp
// copies the token's fp8 row and its 1x128 scales there and records the row in pair_row (-1: dropped).
template <typename RowOf>
__device__ __forceinline__ void scatter_pairs(const std::uint8_t* __restrict__ x, const float* __restrict__ xs,
                                              std::int64_t tokens, int k, const int* __restrict__ topk_local, int top_k,
                                              int local_experts, std::int64_t a_ld, std::uint8_t* a, float* as,
                                              int* pair_row, int* ws, int* cur, std::int64_t warp0, std::int64_t nwarps,
                                              RowOf row_of) {
  const int lane = threadIdx.x % 32;
  const std::int64_t pairs = tokens * top_k;
  const std::int64_t x_ld = fp8_scale_ld(tokens);
  for (std::int64_t p = warp0; p < pairs; p += nwarps) {
    const int e = topk_local[p];
    int row = -1;
    if (e >= 0 && e < local_experts && lane == 0) {
      row = row_of(e, atomicAdd(&cur[e], 1));
      if (row < 0) ws[0] = 1;
    }
    row = __shfl_sync(0xffffffffu, row, 0);
    if (lane == 0) pair_row[p] = row;
    if (row < 0) continue;
    const std::int64_t t = p / top_k;
    const uint4* src = reinterpret_cast<const uint4*>(x + t * k);
    uint4* dst = reinterpret_cast<uint4*>(a + static_cast<std::int64_t>(row) * k);
    for (int i = lane; i < k / 16; i += 32) dst[i] = src[i];
    for (int kb = lane; kb < k / fp8_block; kb += 32) as[kb * a_ld + row] = xs[kb * x_ld + t];
  }
}

// Fills m_indices for every row (grid-stride) and scatters the pairs, one warp per pair.
__global__ void permute_contiguous_kernel(const std::uint8_t* __restrict__ x, const float* __restrict__ xs,
                                          std::int64_t tokens, int k, const int* __restrict__ topk_local, int top_k,
                                          int local_experts, std::int64_t m_capacity, std::uint8_t* a, float* as,
                                          int* m_indices, int* pair_row, int* ws) {
  const int* cnt = ws + 1;
  const int* off = cnt + local_experts;
  int* cur = ws + 1 + 2 * local_experts;
  const std::int64_t tid = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  const std::int64_t nthreads = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t r = tid; r < m_capacity; r += nthreads) {
    int id = -1;
    for (int e = 0; e < local_experts; ++e)
      if (r >= off[e] && r < off[e] + cnt[e]) { id = e; break; }
    m_indices[r] = id;
  }
  scatter_pairs(x, xs, tokens, k, topk_local, top_k, local_experts, fp8_scale_ld(m_capacity), a, as, pair_row, ws, cur, tid / 32,
                nthreads / 32, [&](int e, int slot) {
                  const std::int64_t r = static_cast<std::int64_t>(off[e]) + slot;
                  return r < m_capacity ? static_cast<int>(r) : -1;
                });
}

__global__ void permute_masked_kernel(const std::uint8_t* __restrict__ x, const float* __restrict__ xs,
                                      std::int64_t tokens, int k, const int* __restrict__ topk_local, int top_k,
                                      int local_experts, std::int64_t max_m, std::uint8_t* a, float* as, int* pair_row,
                                      int* ws) {
  const std::int64_t tid = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  scatter_pairs(x, xs, tokens, k, topk_local, top_k, local_experts, fp8_scale_ld(local_experts * max_m), a, as, pair_row, ws,
                ws + 1 + 2 * local_experts, tid / 32, static_cast<std::int64_t>(gridDim.x) * blockDim.x / 32,
                [&](int e, int slot) { return slot < max_m ? static_cast<int>(e * max_m + slot) : -1; });
}

// Decode-sized inputs: count, scatter and publish the counts in one CTA (one launch instead of three).
// Phase 1 gives every pair its row with shared-memory atomics, all pairs in parallel (coalesced reads of the
// receive map); phase 2 lets each warp scan 32 pairs at a time and copy the received rows together, so the
// dependent latency per warp is a few loads, not one per pair.
constexpr int masked_fused_max_pairs = 16384;
constexpr int masked_fused_max_experts = 1024;
__global__ void __launch_bounds__(1024)
permute_masked_fused_kernel(const std::uint8_t* __restrict__ x, const float* __restrict__ xs, std::int64_t tokens, int k,
                            const int* __restrict__ topk_local, int top_k, int local_experts, std::int64_t max_m,
                            std::uint8_t* a, float* as, int* masked_m, int* pair_row, int* ws) {
  __shared__ int cursor[masked_fused_max_experts];
  __shared__ int overflow;
  for (int e = threadIdx.x; e < local_experts; e += blockDim.x) cursor[e] = 0;
  if (threadIdx.x == 0) overflow = 0;
  __syncthreads();
  const int pairs = static_cast<int>(tokens * top_k);
  for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
    const int e = topk_local[p];
    int row = -1;
    if (e >= 0 && e < local_experts) {
      const int slot = atomicAdd(&cursor[e], 1);
      if (slot < max_m) row = static_cast<int>(e * max_m + slot);
      else overflow = 1;
    }
    pair_row[p] = row;
  }
  __syncthreads();  // also orders the pair_row writes before phase 2 reads them (same CTA)
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const std::int64_t x_ld = fp8_scale_ld(tokens), a_ld = fp8_scale_ld(local_experts * max_m);
  for (int p0 = warp * 32; p0 < pairs; p0 += warps * 32) {
    const int my_row = p0 + lane < pairs ? pair_row[p0 + lane] : -1;
    unsigned rows_left = __ballot_sync(0xffffffffu, my_row >= 0);
    while (rows_left) {
      const int j = __ffs(rows_left) - 1;
      rows_left &= rows_left - 1;
      const int row = __shfl_sync(0xffffffffu, my_row, j);
      const std::int64_t t = (p0 + j) / top_k;
      const uint4* src = reinterpret_cast<const uint4*>(x + t * k);
      uint4* dst = reinterpret_cast<uint4*>(a + static_cast<std::int64_t>(row) * k);
      for (int i = lane; i < k / 16; i += 32) dst[i] = src[i];
      for (int kb = lane; kb < k / fp8_block; kb += 32) as[kb * a_ld + row] = xs[kb * x_ld + t];
    }
  }
  for (int e = threadIdx.x; e < local_experts; e += blockDim.x) {
    masked_m[e] = cursor[e] < max_m ? cursor[e] : static_cast<int>(max_m);
    ws[1 + 2 * local_experts + e] = cursor[e];
  }
  if (threadIdx.x == 0) ws[0] = overflow;
}

__global__ void masked_finish_kernel(int local_experts, std::int64_t max_m, int* masked_m, const int* ws) {
  const int* cur = ws + 1 + 2 * local_experts;
  for (int e = threadIdx.x; e < local_experts; e += blockDim.x)
    masked_m[e] = cur[e] < max_m ? cur[e] : static_cast<int>(max_m);
}

// One CTA per token; each thread owns 8 columns at a time.
__global__ void combine_kernel(const __nv_bfloat16* __restrict__ y, const int* __restrict__ pair_row,
                               const float* __restrict__ w, int top_k, int hidden, const __nv_bfloat16* shared_out,
                               __nv_bfloat16* out) {
  __shared__ int rows[32];
  __shared__ float weights[32];
  const std::int64_t t = blockIdx.x;
  if (threadIdx.x < top_k) {
    rows[threadIdx.x] = pair_row[t * top_k + threadIdx.x];
    weights[threadIdx.x] = w[t * top_k + threadIdx.x];
  }
  __syncthreads();
  for (int col = threadIdx.x * 8; col < hidden; col += blockDim.x * 8) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int j = 0; j < top_k; ++j) {
      if (rows[j] < 0) continue;
      float v[8];
      load8(y + static_cast<std::int64_t>(rows[j]) * hidden + col, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += weights[j] * v[i];
    }
    if (shared_out) {
      float v[8];
      load8(shared_out + t * hidden + col, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += v[i];
    }
    store8(out + t * hidden + col, acc);
  }
}

// -- sampling -------------------------------------------------------------------------------------------

__global__ void argmax_kernel(const __nv_bfloat16* __restrict__ logits, int vocab, std::int64_t ld, int* ids) {
  __shared__ float best_v[32];
  __shared__ int best_i[32];
  const std::int64_t row = blockIdx.x;
  float bv = -INFINITY;
  int bi = INT_MAX;
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
    const float v = __bfloat162float(logits[row * ld + j]);
    if (v > bv) { bv = v; bi = j; }  // j grows: the first maximum stays
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, off);
    if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
  }
  if (threadIdx.x % 32 == 0) { best_v[threadIdx.x / 32] = bv; best_i[threadIdx.x / 32] = bi; }
  __syncthreads();
  if (threadIdx.x < 32) {
    const int warps = blockDim.x / 32;
    bv = threadIdx.x < warps ? best_v[threadIdx.x] : -INFINITY;
    bi = threadIdx.x < warps ? best_i[threadIdx.x] : INT_MAX;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, off);
      if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    if (threadIdx.x == 0) ids[row] = bi == INT_MAX ? 0 : bi;
  }
}

// -- MLA pieces -----------------------------------------------------------------------------------------

__global__ void assemble_kv_kernel(const __nv_bfloat16* __restrict__ kvb, const __nv_bfloat16* __restrict__ latent,
                                   std::int64_t latent_ld, int pe_offset, std::int64_t tokens, int heads, int nope,
                                   int rope, int v_dim, __nv_bfloat16* k, __nv_bfloat16* v) {
  const int kvec = (nope + rope) / 8, vvec = v_dim / 8, per_head = kvec + vvec;
  const std::int64_t total = tokens * heads * per_head;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const int j = static_cast<int>(i % per_head);
    const std::int64_t th = i / per_head;  // token * heads + head
    const std::int64_t t = th / heads;
    const uint4* src;
    uint4* dst;
    if (j < kvec) {
      const int d = j * 8;
      src = d < nope ? reinterpret_cast<const uint4*>(kvb + th * (nope + v_dim) + d)
                     : reinterpret_cast<const uint4*>(latent + t * latent_ld + pe_offset + (d - nope));
      dst = reinterpret_cast<uint4*>(k + th * (nope + rope) + d);
    } else {
      const int d = (j - kvec) * 8;
      src = reinterpret_cast<const uint4*>(kvb + th * (nope + v_dim) + nope + d);
      dst = reinterpret_cast<uint4*>(v + th * v_dim + d);
    }
    *dst = *src;
  }
}

__global__ void kv_store_kernel(const __nv_bfloat16* __restrict__ src, std::int64_t src_ld, std::int64_t tokens,
                                const int* __restrict__ slots, int entry, __nv_bfloat16* cache) {
  const int vecs = entry / 8;
  const std::int64_t total = tokens * vecs;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t t = i / vecs;
    const int j = static_cast<int>(i % vecs);
    const int slot = slots[t];
    if (slot < 0) continue;
    *reinterpret_cast<uint4*>(cache + static_cast<std::int64_t>(slot) * entry + j * 8) =
        *reinterpret_cast<const uint4*>(src + t * src_ld + j * 8);
  }
}

__global__ void masked_softmax_kernel(__nv_bfloat16* s, int cols, std::int64_t ld, float scale, int causal_period,
                                      int causal_shift, int valid_cols) {
  __shared__ float red[32];
  const std::int64_t row = blockIdx.x;
  __nv_bfloat16* p = s + row * ld;
  int limit = causal_period > 0 ? static_cast<int>(row % causal_period) + 1 + causal_shift : valid_cols;
  limit = limit > cols ? cols : limit;
  float m = -INFINITY;
  for (int j = threadIdx.x; j < limit; j += blockDim.x) m = fmaxf(m, __bfloat162float(p[j]) * scale);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = m;
  __syncthreads();
  m = -INFINITY;
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) m = fmaxf(m, red[w]);
  __syncthreads();
  float sum = 0.0f;
  for (int j = threadIdx.x; j < limit; j += blockDim.x) sum += expf(__bfloat162float(p[j]) * scale - m);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = sum;
  __syncthreads();
  sum = 0.0f;
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) sum += red[w];
  const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
  for (int j = threadIdx.x; j < cols; j += blockDim.x)
    p[j] = __float2bfloat16_rn(j < limit ? expf(__bfloat162float(p[j]) * scale - m) * inv : 0.0f);
}

int grid_for(std::int64_t work, int threads) {
  const std::int64_t blocks = (work + threads - 1) / threads;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > 65536 ? 65536 : blocks));
}

} // namespace

// -- host wrappers --------------------------------------------------------------------------------------

kernel_status rmsnorm_bf16(const void* x, std::int64_t x_ld, void* residual, bool add_residual, const void* weight,
                           std::int64_t rows, int n, float eps, void* out, std::int64_t out_ld, void* out_fp8,
                           float* out_scales, cudaStream_t stream) {
  const char* who = "rmsnorm_bf16";
  if (rows < 0) return kernel_status::failure(std::string(who) + ": rows must be >= 0");
  if (n <= 0 || n % 8 != 0 || n > 8192)
    return kernel_status::failure(std::string(who) + ": n=" + std::to_string(n) + " must be a multiple of 8 in [8, 8192]");
  if (x_ld < n || x_ld % 8 != 0) return kernel_status::failure(std::string(who) + ": x_ld must be >= n and a multiple of 8");
  if (!out && !out_fp8) return kernel_status::failure(std::string(who) + ": no output (out and out_fp8 both null)");
  if (out && (out_ld < n || out_ld % 8 != 0)) return kernel_status::failure(std::string(who) + ": out_ld must be >= n and a multiple of 8");
  if (out_fp8 && (n % fp8_block != 0 || !out_scales))
    return kernel_status::failure(std::string(who) + ": fp8 output needs n % 128 == 0 and a scale buffer");
  if (rows == 0) return kernel_status::success();
  if (!x || !weight || !aligned16(x) || !aligned16(weight) || (out && !aligned16(out)) || (residual && !aligned16(residual)))
    return kernel_status::failure(std::string(who) + ": null or unaligned pointer (16-byte alignment needed)");
  const int threads = (n / 8 + 31) / 32 * 32;
  rmsnorm_kernel<<<static_cast<unsigned>(rows), threads, 0, stream>>>(
      static_cast<const __nv_bfloat16*>(x), x_ld, static_cast<__nv_bfloat16*>(residual), add_residual,
      static_cast<const __nv_bfloat16*>(weight), n, eps, static_cast<__nv_bfloat16*>(out), out_ld,
      static_cast<std::uint8_t*>(out_fp8), out_scales, fp8_scale_ld(rows));
  return launched(who);
}

std::vector<float> rope_cos_sin_table(const std::vector<float>& inv_freq, int positions, float attention_factor) {
  const std::size_t half = inv_freq.size();
  std::vector<float> t(static_cast<std::size_t>(positions) * 2 * half);
  for (int p = 0; p < positions; ++p)
    for (std::size_t i = 0; i < half; ++i) {
      const float angle = static_cast<float>(p) * inv_freq[i];
      t[p * 2 * half + i] = std::cos(angle) * attention_factor;
      t[p * 2 * half + half + i] = std::sin(angle) * attention_factor;
    }
  return t;
}

kernel_status rope_interleaved_bf16(const void* in, std::int64_t in_ld, std::int64_t in_head_stride, void* out,
                                    std::int64_t out_ld, std::int64_t out_head_stride, std::int64_t rows, int heads,
                                    int rope_dim, const int* positions, const float* cos_sin, int max_pos,
                                    cudaStream_t stream) {
  const char* who = "rope_interleaved_bf16";
  if (rows < 0 || heads <= 0 || rope_dim <= 0 || rope_dim % 2 != 0 || max_pos <= 0)
    return kernel_status::failure(std::string(who) + ": rows >= 0, heads > 0, even rope_dim > 0 and max_pos > 0 needed");
  if (in_ld % 2 || in_head_stride % 2 || out_ld % 2 || out_head_stride % 2 ||
      (reinterpret_cast<std::uintptr_t>(in) & 3u) || (reinterpret_cast<std::uintptr_t>(out) & 3u))
    return kernel_status::failure(std::string(who) + ": strides and pointers must keep bf16 pairs 4-byte aligned");
  if (rows == 0) return kernel_status::success();
  if (!in || !out || !positions || !cos_sin) return kernel_status::failure(std::string(who) + ": null pointer");
  const bool vec = rope_dim % 16 == 0 && in_ld % 8 == 0 && in_head_stride % 8 == 0 && out_ld % 8 == 0 &&
                   out_head_stride % 8 == 0 && aligned16(in) && aligned16(out) && aligned16(cos_sin);
  if (vec) {
    const std::int64_t work = rows * heads * (rope_dim / 8);
    rope_vec_kernel<<<grid_for(work, 256), 256, 0, stream>>>(static_cast<const __nv_bfloat16*>(in), in_ld, in_head_stride,
                                                             static_cast<__nv_bfloat16*>(out), out_ld, out_head_stride,
                                                             rows, heads, rope_dim / 2, positions, cos_sin, max_pos);
    return launched(who);
  }
  const std::int64_t work = rows * heads * (rope_dim / 2);
  rope_kernel<<<grid_for(work, 256), 256, 0, stream>>>(static_cast<const __nv_bfloat16*>(in), in_ld, in_head_stride,
                                                       static_cast<__nv_bfloat16*>(out), out_ld, out_head_stride, rows,
                                                       heads, rope_dim / 2, positions, cos_sin, max_pos);
  return launched(who);
}

kernel_status swiglu_bf16(const void* gate_up, std::int64_t rows, int n, void* out, void* out_fp8, float* out_scales,
                          const int* row_expert, const int* masked_m, std::int64_t max_m, cudaStream_t stream) {
  const char* who = "swiglu_bf16";
  if (rows < 0 || rows > 65535 * 1024LL) return kernel_status::failure(std::string(who) + ": rows out of range");
  if (n <= 0 || n % fp8_block != 0) return kernel_status::failure(std::string(who) + ": n=" + std::to_string(n) + " must be a positive multiple of 128");
  if (!out && !out_fp8) return kernel_status::failure(std::string(who) + ": no output");
  if (out_fp8 && !out_scales) return kernel_status::failure(std::string(who) + ": fp8 output without a scale buffer");
  if (masked_m && (max_m <= 0 || rows % max_m != 0)) return kernel_status::failure(std::string(who) + ": masked layout needs rows % max_m == 0");
  if (rows == 0) return kernel_status::success();
  if (!gate_up || !aligned16(gate_up) || (out && !aligned16(out))) return kernel_status::failure(std::string(who) + ": null or unaligned pointer");
  // CUDA grids allow 65535 in y: larger row counts (the contiguous layout of a big prefill micro-batch on the GPU
  // expert plane reaches 131k) go in launches of at most that many rows.
  for (std::int64_t base = 0; base < rows; base += 65535) {
    const dim3 grid(static_cast<unsigned>((n / 8 + 255) / 256), static_cast<unsigned>(std::min<std::int64_t>(65535, rows - base)));
    swiglu_kernel<<<grid, 256, 0, stream>>>(static_cast<const __nv_bfloat16*>(gate_up), n,
                                            static_cast<__nv_bfloat16*>(out), static_cast<std::uint8_t*>(out_fp8),
                                            out_scales, fp8_scale_ld(rows), row_expert, masked_m, max_m, base);
  }
  return launched(who);
}

kernel_status noaux_tc_route(const float* logits, const float* bias, std::int64_t tokens, int experts, int groups,
                             int topk_group, int top_k, bool normalize, float scaling, int* topk_ids,
                             float* topk_weights, cudaStream_t stream) {
  const char* who = "noaux_tc_route";
  if (tokens < 0) return kernel_status::failure(std::string(who) + ": tokens must be >= 0");
  if (experts <= 0 || experts % 32 != 0 || experts / 32 > route_max_per_lane)
    return kernel_status::failure(std::string(who) + ": experts=" + std::to_string(experts) + " must be a multiple of 32 up to 256");
  if (groups <= 0 || experts % groups != 0) return kernel_status::failure(std::string(who) + ": groups must divide experts");
  const int per_lane = experts / 32, group_size = experts / groups;
  if (group_size < 2 || group_size % per_lane != 0) return kernel_status::failure(std::string(who) + ": group size must be >= 2 and a multiple of experts/32");
  const int lanes = group_size / per_lane;
  if (lanes & (lanes - 1)) return kernel_status::failure(std::string(who) + ": lanes per group must be a power of two");
  if (topk_group < 1 || topk_group > groups) return kernel_status::failure(std::string(who) + ": topk_group out of range");
  if (top_k < 1 || top_k > 32 || top_k > topk_group * group_size) return kernel_status::failure(std::string(who) + ": top_k out of range");
  if (tokens == 0) return kernel_status::success();
  if (!logits || !bias || !topk_ids || !topk_weights) return kernel_status::failure(std::string(who) + ": null pointer");
  constexpr int warps = 4;
  route_kernel<<<static_cast<unsigned>((tokens + warps - 1) / warps), warps * 32, 0, stream>>>(
      logits, bias, tokens, experts, groups, topk_group, top_k, normalize, scaling, topk_ids, topk_weights);
  return launched(who);
}

std::int64_t moe_permute_workspace_ints(int local_experts) { return 1 + 3 * static_cast<std::int64_t>(local_experts); }

std::int64_t moe_contiguous_capacity(std::int64_t pairs, int local_experts) {
  const std::int64_t rows = pairs + static_cast<std::int64_t>(local_experts) * (fp8_block - 1);
  return (rows + fp8_block - 1) / fp8_block * fp8_block;
}

static kernel_status check_permute(const char* who, const void* x, const float* xs, std::int64_t tokens, int k,
                                   const int* topk, int top_k, int local_experts, const void* a, const float* as,
                                   const int* pair_row, const int* ws) {
  if (tokens < 0 || k <= 0 || k % fp8_block != 0) return kernel_status::failure(std::string(who) + ": tokens >= 0 and k % 128 == 0 needed");
  if (top_k < 1 || top_k > 32) return kernel_status::failure(std::string(who) + ": top_k must be in [1, 32]");
  if (local_experts < 1 || local_experts > 4096) return kernel_status::failure(std::string(who) + ": local_experts must be in [1, 4096]");
  if (tokens > 0 && (!x || !xs || !topk || !a || !as || !pair_row || !ws)) return kernel_status::failure(std::string(who) + ": null pointer");
  if (!aligned16(x) || !aligned16(a)) return kernel_status::failure(std::string(who) + ": fp8 buffers must be 16-byte aligned");
  return kernel_status::success();
}

kernel_status moe_permute_contiguous(const void* x_fp8, const float* x_scales, std::int64_t tokens, int k,
                                     const int* topk_local, int top_k, int local_experts, std::int64_t m_capacity,
                                     void* a_fp8, float* a_scales, int* m_indices, int* pair_row, int* workspace,
                                     cudaStream_t stream) {
  const char* who = "moe_permute_contiguous";
  if (auto s = check_permute(who, x_fp8, x_scales, tokens, k, topk_local, top_k, local_experts, a_fp8, a_scales,
                             pair_row, workspace); !s.ok())
    return s;
  if (m_capacity <= 0 || m_capacity % fp8_block != 0 || m_capacity > INT_MAX)
    return kernel_status::failure(std::string(who) + ": m_capacity must be a positive multiple of 128");
  if (!m_indices) return kernel_status::failure(std::string(who) + ": m_indices is null");
  permute_count_kernel<<<1, 1024, local_experts * sizeof(int), stream>>>(topk_local, tokens * top_k, local_experts,
                                                                         m_capacity, workspace);
  if (auto s = launched(who); !s.ok()) return s;
  const std::int64_t threads = std::max<std::int64_t>(tokens * top_k * 32, m_capacity);
  permute_contiguous_kernel<<<grid_for(threads, 256), 256, 0, stream>>>(
      static_cast<const std::uint8_t*>(x_fp8), x_scales, tokens, k, topk_local, top_k, local_experts, m_capacity,
      static_cast<std::uint8_t*>(a_fp8), a_scales, m_indices, pair_row, workspace);
  return launched(who);
}

kernel_status moe_permute_masked(const void* x_fp8, const float* x_scales, std::int64_t tokens, int k,
                                 const int* topk_local, int top_k, int local_experts, std::int64_t max_m, void* a_fp8,
                                 float* a_scales, int* masked_m, int* pair_row, int* workspace, cudaStream_t stream) {
  const char* who = "moe_permute_masked";
  if (auto s = check_permute(who, x_fp8, x_scales, tokens, k, topk_local, top_k, local_experts, a_fp8, a_scales,
                             pair_row, workspace); !s.ok())
    return s;
  if (max_m <= 0 || max_m * local_experts > INT_MAX) return kernel_status::failure(std::string(who) + ": max_m out of range");
  if (!masked_m || !workspace) return kernel_status::failure(std::string(who) + ": masked_m or workspace is null");
  if (tokens * top_k <= masked_fused_max_pairs && local_experts <= masked_fused_max_experts) {
    permute_masked_fused_kernel<<<1, 1024, 0, stream>>>(static_cast<const std::uint8_t*>(x_fp8), x_scales, tokens, k,
                                                        topk_local, top_k, local_experts, max_m,
                                                        static_cast<std::uint8_t*>(a_fp8), a_scales, masked_m, pair_row,
                                                        workspace);
    return launched(who);
  }
  if (cudaMemsetAsync(workspace, 0, moe_permute_workspace_ints(local_experts) * sizeof(int), stream) != cudaSuccess)
    return kernel_status::failure(std::string(who) + ": cannot clear the workspace");
  if (tokens > 0) {
    permute_masked_kernel<<<grid_for(tokens * top_k * 32, 256), 256, 0, stream>>>(
        static_cast<const std::uint8_t*>(x_fp8), x_scales, tokens, k, topk_local, top_k, local_experts, max_m,
        static_cast<std::uint8_t*>(a_fp8), a_scales, pair_row, workspace);
    if (auto s = launched(who); !s.ok()) return s;
  }
  masked_finish_kernel<<<1, 256, 0, stream>>>(local_experts, max_m, masked_m, workspace);
  return launched(who);
}

kernel_status moe_combine_bf16(const void* expert_out, const int* pair_row, const float* topk_weights,
                               std::int64_t tokens, int top_k, int hidden, const void* shared_out, void* out,
                               cudaStream_t stream) {
  const char* who = "moe_combine_bf16";
  if (tokens < 0 || top_k < 1 || top_k > 32 || hidden <= 0 || hidden % 8 != 0)
    return kernel_status::failure(std::string(who) + ": tokens >= 0, top_k in [1, 32], hidden % 8 == 0 needed");
  if (tokens == 0) return kernel_status::success();
  if (!expert_out || !pair_row || !topk_weights || !out || !aligned16(expert_out) || !aligned16(out) ||
      (shared_out && !aligned16(shared_out)))
    return kernel_status::failure(std::string(who) + ": null or unaligned pointer");
  if (tokens > INT_MAX) return kernel_status::failure(std::string(who) + ": too many tokens");
  combine_kernel<<<static_cast<unsigned>(tokens), 128, 0, stream>>>(
      static_cast<const __nv_bfloat16*>(expert_out), pair_row, topk_weights, top_k, hidden,
      static_cast<const __nv_bfloat16*>(shared_out), static_cast<__nv_bfloat16*>(out));
  return launched(who);
}

kernel_status argmax_bf16(const void* logits, std::int64_t rows, int vocab, std::int64_t ld, int* ids, cudaStream_t stream) {
  const char* who = "argmax_bf16";
  if (rows < 0 || vocab <= 0 || ld < vocab) return kernel_status::failure(std::string(who) + ": rows >= 0, vocab > 0, ld >= vocab needed");
  if (rows == 0) return kernel_status::success();
  if (!logits || !ids) return kernel_status::failure(std::string(who) + ": null pointer");
  argmax_kernel<<<static_cast<unsigned>(rows), 1024, 0, stream>>>(static_cast<const __nv_bfloat16*>(logits), vocab, ld, ids);
  return launched(who);
}

kernel_status mla_assemble_kv_bf16(const void* kvb, const void* latent, std::int64_t latent_ld, int pe_offset,
                                   std::int64_t tokens, int heads, int nope, int rope, int v_dim, void* k, void* v,
                                   cudaStream_t stream) {
  const char* who = "mla_assemble_kv_bf16";
  if (tokens < 0 || heads <= 0 || nope % 8 || rope % 8 || v_dim % 8 || latent_ld % 8 || pe_offset % 8)
    return kernel_status::failure(std::string(who) + ": dims, latent_ld and pe_offset must be multiples of 8");
  if (tokens == 0) return kernel_status::success();
  if (!kvb || !latent || !k || !v || !aligned16(kvb) || !aligned16(latent) || !aligned16(k) || !aligned16(v))
    return kernel_status::failure(std::string(who) + ": null or unaligned pointer");
  const std::int64_t work = tokens * heads * ((nope + rope + v_dim) / 8);
  assemble_kv_kernel<<<grid_for(work, 256), 256, 0, stream>>>(
      static_cast<const __nv_bfloat16*>(kvb), static_cast<const __nv_bfloat16*>(latent), latent_ld, pe_offset, tokens,
      heads, nope, rope, v_dim, static_cast<__nv_bfloat16*>(k), static_cast<__nv_bfloat16*>(v));
  return launched(who);
}

kernel_status kv_cache_store_bf16(const void* src, std::int64_t src_ld, std::int64_t tokens, const int* slots,
                                  int entry, void* cache, cudaStream_t stream) {
  const char* who = "kv_cache_store_bf16";
  if (tokens < 0 || entry <= 0 || entry % 8 || src_ld % 8 || src_ld < entry)
    return kernel_status::failure(std::string(who) + ": entry and src_ld must be multiples of 8, src_ld >= entry");
  if (tokens == 0) return kernel_status::success();
  if (!src || !slots || !cache || !aligned16(src) || !aligned16(cache)) return kernel_status::failure(std::string(who) + ": null or unaligned pointer");
  kv_store_kernel<<<grid_for(tokens * (entry / 8), 256), 256, 0, stream>>>(
      static_cast<const __nv_bfloat16*>(src), src_ld, tokens, slots, entry, static_cast<__nv_bfloat16*>(cache));
  return launched(who);
}

kernel_status masked_softmax_bf16(void* scores, std::int64_t rows, int cols, std::int64_t ld, float scale,
                                  int causal_period, int causal_shift, int valid_cols, cudaStream_t stream) {
  const char* who = "masked_softmax_bf16";
  if (rows < 0 || cols <= 0 || ld < cols) return kernel_status::failure(std::string(who) + ": rows >= 0, cols > 0, ld >= cols needed");
  if (rows == 0) return kernel_status::success();
  if (!scores || rows > INT_MAX) return kernel_status::failure(std::string(who) + ": null pointer or too many rows");
  masked_softmax_kernel<<<static_cast<unsigned>(rows), 256, 0, stream>>>(static_cast<__nv_bfloat16*>(scores), cols, ld,
                                                                        scale, causal_period, causal_shift, valid_cols);
  return launched(who);
}

} // namespace petrel::cuda
