// cuda backend, MLA attention in fp32 (the Backend interface's precision; the bf16 sm_90a kernels are mla_*.cu).
//
// Prefill (naive form): flash-style, one block per (32 queries, head), key tiles of 32 staged in shared memory,
// online softmax in registers (each of the 8 warps owns 4 query rows and holds a row's 32 scores in its lanes),
// causal masking by position (query i sits at start + i). Compute bound on the SIMT units: ~2*(qk+v) flops per
// (q, k, head).
//
// Decode (absorbed form): one block per (16 heads, KV split, sequence). The block walks its split of the
// sequence's paged latent cache in tiles of 32 tokens staged in shared memory (row stride entry+1: no bank
// conflicts), scores against all 16 heads' absorbed queries, and accumulates the 512-wide latent output in
// registers (2 columns x 16 heads per thread). Partial (max, sum, output) go to a workspace and a combine kernel
// merges the splits. The grid depends only on (batch, heads, max_ctx): safe to capture in a CUDA graph.
#include <cmath>
#include <cstdint>

#include "kernels/cuda/cuda_backend_internal.cuh"
#include "kernels/cuda/fp8_warp_quant.cuh"

namespace petrel::kernels::cudabe {
namespace {

using petrel::cuda::warp_max;
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// One row's online-softmax update over a tile of 32 keys, one per lane (warp-uniform `active`: the row exists):
// p = this lane's probability (0 where !valid), alpha = the rescale of the row's running output. The tile must
// hold a valid key wherever m_run is still -inf, so that the new maximum is finite.
__device__ __forceinline__ void online_softmax_step(float s, bool valid, bool active, float& m_run, float& l_run, float& p,
                                                    float& alpha) {
  const float mt = warp_max(valid ? s : -INFINITY);
  p = 0.0f;
  alpha = 1.0f;
  if (active) {
    const float m_new = fmaxf(m_run, mt);
    p = valid ? expf(s - m_new) : 0.0f;
    alpha = expf(m_run - m_new);
    m_run = m_new;
    l_run = l_run * alpha + warp_sum(p);
  }
}

// R dot products q_r . k over n floats (q_r = q + r * qstride), all from shared memory. With V4 every operand is
// 16-byte aligned and n % 4 == 0: one 128-bit load of k serves R rows (k rows padded by 4 floats, so a quarter
// warp's 128-bit loads hit distinct banks); otherwise scalar (k rows padded by 1).
template <int R, bool V4>
__device__ __forceinline__ void dot_rows(const float* q, int qstride, const float* k, int n, float (&out)[R]) {
#pragma unroll
  for (int r = 0; r < R; ++r) out[r] = 0.0f;
  if constexpr (V4) {
    for (int d = 0; d < n; d += 4) {
      const float4 kv = *reinterpret_cast<const float4*>(k + d);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float4 qv = *reinterpret_cast<const float4*>(q + r * qstride + d);
        out[r] = fmaf(qv.x, kv.x, out[r]);
        out[r] = fmaf(qv.y, kv.y, out[r]);
        out[r] = fmaf(qv.z, kv.z, out[r]);
        out[r] = fmaf(qv.w, kv.w, out[r]);
      }
    }
  } else {
    for (int d = 0; d < n; ++d) {
      const float kv = k[d];
#pragma unroll
      for (int r = 0; r < R; ++r) out[r] = fmaf(q[r * qstride + d], kv, out[r]);
    }
  }
}

// acc[i][cc] = acc[i][cc] * alpha[i] + sum_j Pt[j][i] * V[j][c_cc] for 16 rows i; Pt rows `pstride` apart (16
// contiguous probabilities read as four 128-bit broadcasts), V rows `vstride` apart, columns c = c0 + cc * cstep.
template <int TILE>
__device__ __forceinline__ void accumulate_pv(float (&acc)[16][2], const float* alpha, const float* Pt, int pstride,
                                              const float* V, int vstride, int cols, int c0, int cstep) {
#pragma unroll
  for (int cc = 0; cc < 2; ++cc) {
    const int c = c0 + cc * cstep;
    if (c >= cols) break;
#pragma unroll
    for (int i = 0; i < 16; ++i) acc[i][cc] *= alpha[i];
    for (int j = 0; j < TILE; ++j) {
      const float v = V[j * vstride + c];
      const float4* p4 = reinterpret_cast<const float4*>(Pt + j * pstride);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float4 p = p4[q];
        acc[4 * q + 0][cc] = fmaf(p.x, v, acc[4 * q + 0][cc]);
        acc[4 * q + 1][cc] = fmaf(p.y, v, acc[4 * q + 1][cc]);
        acc[4 * q + 2][cc] = fmaf(p.z, v, acc[4 * q + 2][cc]);
        acc[4 * q + 3][cc] = fmaf(p.w, v, acc[4 * q + 3][cc]);
      }
    }
  }
}

// -- prefill ---------------------------------------------------------------------------------------------------

constexpr int kPQ = 32, kPK = 32, kPThreads = 256; // queries per block, keys per tile, threads (8 warps)

// Scores: warp w owns query rows w, w+8, w+16, w+24 (lane = key). P.V: thread t owns rows 16*(t/128) .. +16 and
// columns t%128 (+128 when v_dim > 128). With V4, tiles are staged with 128-bit loads, one warp per key row.
template <bool V4>
__global__ void __launch_bounds__(kPThreads) mla_prefill_kernel(
    const float* __restrict__ q, int64_t ldq, const float* __restrict__ kv, int64_t ldkv, const float* __restrict__ kpe,
    int64_t ldpe, float* __restrict__ out, int64_t ldo, int n, int nope, int rope, int vd, int64_t start, float scale) {
  extern __shared__ float4 sm4[];
  float* sm = reinterpret_cast<float*>(sm4);
  const int qk = nope + rope, kvw = nope + vd, kstride = qk + (V4 ? 4 : 1);
  float* Qs = sm;                   // [kPQ][qk]
  float* Ks = Qs + kPQ * qk;        // [kPK][kstride]
  float* Vs = Ks + kPK * kstride;   // [kPK][vd]
  float* Pt = Vs + kPK * vd;        // [kPK][kPQ] (transposed probabilities)
  float* alpha_s = Pt + kPQ * kPK;  // [kPQ]
  const int h = blockIdx.y, q0 = blockIdx.x * kPQ, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int rows = min(kPQ, n - q0);
  const int rh = tid / 128, c0 = tid % 128; // P.V role
  for (int f = tid; f < kPQ * qk; f += kPThreads) {
    const int i = f / qk, d = f % qk;
    Qs[f] = i < rows ? q[int64_t(q0 + i) * ldq + int64_t(h) * qk + d] : 0.0f;
  }
  float m_run[4], l_run[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    m_run[r] = -INFINITY;
    l_run[r] = 0.0f;
  }
  float acc[16][2];
#pragma unroll
  for (int i = 0; i < 16; ++i) acc[i][0] = acc[i][1] = 0.0f;
  const int64_t kend = start + q0 + rows; // keys needed by the last row of the block
  for (int64_t k0 = 0; k0 < kend; k0 += kPK) {
    __syncthreads(); // previous tile fully consumed
    if constexpr (V4) {
      const int nope4 = nope / 4, qk4 = qk / 4, vd4 = vd / 4;
      for (int j = warp; j < kPK; j += kPThreads / 32) {
        const int64_t key = k0 + j;
        const bool in = key < kend;
        const float4* krow = reinterpret_cast<const float4*>(kv + key * ldkv + int64_t(h) * kvw);
        const float4* prow = reinterpret_cast<const float4*>(kpe + key * ldpe);
        for (int d4 = lane; d4 < qk4; d4 += 32) {
          float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
          if (in) v = d4 < nope4 ? krow[d4] : prow[d4 - nope4];
          *reinterpret_cast<float4*>(Ks + j * kstride + 4 * d4) = v;
        }
        for (int c4 = lane; c4 < vd4; c4 += 32) {
          float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
          if (in) v = krow[nope4 + c4];
          *reinterpret_cast<float4*>(Vs + j * vd + 4 * c4) = v;
        }
      }
    } else {
      for (int f = tid; f < kPK * qk; f += kPThreads) {
        const int j = f / qk, d = f % qk;
        const int64_t key = k0 + j;
        float v = 0.0f;
        if (key < kend) v = d < nope ? kv[key * ldkv + int64_t(h) * kvw + d] : kpe[key * ldpe + (d - nope)];
        Ks[j * kstride + d] = v;
      }
      for (int f = tid; f < kPK * vd; f += kPThreads) {
        const int j = f / vd, c = f % vd;
        const int64_t key = k0 + j;
        Vs[f] = key < kend ? kv[key * ldkv + int64_t(h) * kvw + nope + c] : 0.0f;
      }
    }
    __syncthreads();
    float sc[4];
    dot_rows<4, V4>(Qs + warp * qk, 8 * qk, Ks + lane * kstride, qk, sc);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int i = warp + 8 * r;
      const float s = sc[r] * scale;
      const int64_t key = k0 + lane;
      const bool valid = i < rows && key <= start + q0 + i;
      float p, alpha;
      online_softmax_step(s, valid, i < rows, m_run[r], l_run[r], p, alpha); // key 0 is valid in the first tile
      Pt[lane * kPQ + i] = p;
      if (lane == 0) alpha_s[i] = alpha;
    }
    __syncthreads();
    accumulate_pv<kPK>(acc, alpha_s + 16 * rh, Pt + 16 * rh, kPQ, Vs, vd, vd, c0, 128);
  }
  // Row sums live in the owning warp; publish them.
  __syncthreads();
#pragma unroll
  for (int r = 0; r < 4; ++r)
    if (lane == 0) alpha_s[warp + 8 * r] = l_run[r];
  __syncthreads();
#pragma unroll
  for (int cc = 0; cc < 2; ++cc) {
    const int c = c0 + cc * 128;
    if (c >= vd) break;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int row = 16 * rh + i;
      if (row < rows) out[int64_t(q0 + row) * ldo + int64_t(h) * vd + c] = acc[i][cc] / alpha_s[row];
    }
  }
}

// -- decode ----------------------------------------------------------------------------------------------------

constexpr int kDH = 16, kDT = 32, kDThreads = 256; // heads per block, tokens per tile, threads (8 warps)

template <bool V4>
__global__ void __launch_bounds__(kDThreads) mla_decode_partial_kernel(
    const float* __restrict__ base, int64_t floats_per_page, int page_size, int entry, int layer,
    const int32_t* __restrict__ pages, const int32_t* __restrict__ page_offsets, const int32_t* __restrict__ ctx_lens,
    const float* __restrict__ q, int64_t ldq, int heads, int kv_lora, float scale, int64_t chunk, int splits,
    float* __restrict__ ws_out, float* __restrict__ ws_ml) {
  extern __shared__ float4 sm4[];
  float* sm = reinterpret_cast<float*>(sm4);
  const int estride = entry + (V4 ? 4 : 1);
  float* Qs = sm;                    // [kDH][entry]
  float* Ks = Qs + kDH * entry;      // [kDT][estride]
  float* Pt = Ks + kDT * estride;    // [kDT][kDH] (transposed probabilities)
  float* alpha_s = Pt + kDH * kDT;   // [kDH]
  const int h0 = blockIdx.x * kDH, split = blockIdx.y, b = blockIdx.z;
  const int hg = min(kDH, heads - h0);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t ctx = ctx_lens[b];
  const int64_t t_begin = int64_t(split) * chunk, t_end = min(ctx, t_begin + chunk);
  const int32_t* pt = pages + page_offsets[b];
  const float* qb = q + int64_t(b) * ldq + int64_t(h0) * entry;
  for (int f = tid; f < kDH * entry; f += kDThreads) Qs[f] = f < hg * entry ? qb[f] : 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};
  float acc[kDH][2];
#pragma unroll
  for (int i = 0; i < kDH; ++i) acc[i][0] = acc[i][1] = 0.0f;
  for (int64_t t0 = t_begin; t0 < t_end; t0 += kDT) {
    __syncthreads();
    if constexpr (V4) {
      const int e4 = entry / 4;
      for (int f = tid; f < kDT * e4; f += kDThreads) {
        const int j = f / e4, d = (f % e4) * 4;
        const int64_t t = t0 + j;
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (t < t_end) {
          const int64_t page = pt[t / page_size];
          v = *reinterpret_cast<const float4*>(
              base + page * floats_per_page + (int64_t(layer) * page_size + t % page_size) * entry + d);
        }
        *reinterpret_cast<float4*>(Ks + j * estride + d) = v;
      }
    } else {
      for (int f = tid; f < kDT * entry; f += kDThreads) {
        const int j = f / entry, d = f % entry;
        const int64_t t = t0 + j;
        float v = 0.0f;
        if (t < t_end) {
          const int64_t page = pt[t / page_size];
          v = base[page * floats_per_page + (int64_t(layer) * page_size + t % page_size) * entry + d];
        }
        Ks[j * estride + d] = v;
      }
    }
    __syncthreads();
    // Scores: warp w owns heads w and w+8; lane = token in the tile.
    float sc[2];
    dot_rows<2, V4>(Qs + warp * entry, 8 * entry, Ks + lane * estride, entry, sc);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int h = warp + 8 * r;
      const float s = sc[r] * scale;
      const bool valid = h < hg && t0 + lane < t_end;
      float p, alpha;
      online_softmax_step(s, valid, h < hg, m_run[r], l_run[r], p, alpha); // the tile's first token is valid
      Pt[lane * kDH + h] = p;
      if (lane == 0) alpha_s[h] = alpha;
    }
    __syncthreads();
    accumulate_pv<kDT>(acc, alpha_s, Pt, kDH, Ks, estride, kv_lora, tid, kDThreads);
  }
  // Partials: ws_out [b][split][head][kv_lora], ws_ml [b][split][head][2] (max, sum); an empty split has sum 0.
  const int64_t slot = (int64_t(b) * splits + split) * heads + h0;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int h = warp + 8 * r;
    if (h < hg && lane == 0) {
      ws_ml[(slot + h) * 2] = m_run[r];
      ws_ml[(slot + h) * 2 + 1] = l_run[r];
    }
  }
#pragma unroll
  for (int cc = 0; cc < 2; ++cc) {
    const int c = tid + cc * kDThreads;
    if (c >= kv_lora) break;
#pragma unroll
    for (int i = 0; i < kDH; ++i)
      if (i < hg) ws_out[(slot + i) * kv_lora + c] = acc[i][cc];
  }
}

__global__ void mla_decode_combine_kernel(const float* __restrict__ ws_out, const float* __restrict__ ws_ml, int heads,
                                          int kv_lora, int splits, float* __restrict__ out, int64_t ldo) {
  const int h = blockIdx.x, b = blockIdx.y;
  float mx = -INFINITY;
  for (int s = 0; s < splits; ++s) {
    const int64_t slot = (int64_t(b) * splits + s) * heads + h;
    if (ws_ml[slot * 2 + 1] > 0.0f) mx = fmaxf(mx, ws_ml[slot * 2]);
  }
  float den = 0.0f;
  for (int s = 0; s < splits; ++s) {
    const int64_t slot = (int64_t(b) * splits + s) * heads + h;
    const float l = ws_ml[slot * 2 + 1];
    if (l > 0.0f) den += expf(ws_ml[slot * 2] - mx) * l;
  }
  const float inv = 1.0f / den;
  for (int c = threadIdx.x; c < kv_lora; c += blockDim.x) {
    float num = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const int64_t slot = (int64_t(b) * splits + s) * heads + h;
      const float l = ws_ml[slot * 2 + 1];
      if (l > 0.0f) num += expf(ws_ml[slot * 2] - mx) * ws_out[slot * kv_lora + c];
    }
    out[int64_t(b) * ldo + int64_t(h) * kv_lora + c] = num * inv;
  }
}

size_t prefill_smem(int qk, int vd, bool v4) {
  return sizeof(float) * size_t(kPQ * qk + kPK * (qk + (v4 ? 4 : 1)) + kPK * vd + kPQ * kPK + kPQ);
}
size_t decode_smem(int entry, bool v4) {
  return sizeof(float) * size_t(kDH * entry + kDT * (entry + (v4 ? 4 : 1)) + kDH * kDT + kDH);
}

void raise_smem_limit(const void* fn, size_t bytes, const char* op) {
  if (bytes <= 48 * 1024) return;
  check(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)), op);
}

} // namespace

void launch_mla_prefill(const mat_view& q, const mat_view& kv, const mat_view& k_pe, const mat_view& out, int64_t heads,
                        int64_t nope, int64_t rope, int64_t v_dim, int64_t start, float scale, cudaStream_t s) {
  auto aligned = [](const void* p, int64_t ld) { return reinterpret_cast<uintptr_t>(p) % 16 == 0 && ld % 4 == 0; };
  const bool v4 = nope % 4 == 0 && rope % 4 == 0 && v_dim % 4 == 0 && aligned(q.data, q.ld) &&
                  aligned(kv.data, kv.ld) && aligned(k_pe.data, k_pe.ld);
  const size_t smem = prefill_smem(int(nope + rope), int(v_dim), v4);
  auto kernel = v4 ? &mla_prefill_kernel<true> : &mla_prefill_kernel<false>;
  raise_smem_limit(reinterpret_cast<const void*>(kernel), smem, "mla_prefill_attention(smem)");
  dim3 grid(unsigned((q.rows + kPQ - 1) / kPQ), unsigned(heads));
  kernel<<<grid, kPThreads, smem, s>>>(q.data, q.ld, kv.data, kv.ld, k_pe.data, k_pe.ld, out.data, out.ld, int(q.rows),
                                       int(nope), int(rope), int(v_dim), start, scale);
  check_launch("mla_prefill_attention");
}

decode_plan plan_mla_decode(int64_t batch, int64_t heads, int64_t kv_lora, int64_t max_ctx, int sms) {
  decode_plan p;
  const int64_t head_groups = (heads + kDH - 1) / kDH, base = batch * head_groups;
  const int64_t tiles = (max_ctx + kDT - 1) / kDT;
  int64_t splits = (2 * int64_t(sms) + base - 1) / base; // about two blocks per SM
  const int64_t max_splits = (tiles + 1) / 2;              // at least two tiles per split
  if (splits > max_splits) splits = max_splits;
  if (splits < 1) splits = 1;
  p.chunk = (tiles + splits - 1) / splits * kDT;
  p.splits = int((max_ctx + p.chunk - 1) / p.chunk);
  p.workspace_floats = size_t(batch) * size_t(p.splits) * size_t(heads) * size_t(kv_lora + 2);
  return p;
}

void launch_mla_decode(const kv_pool_geometry& pool, int32_t layer, const decode_attention_batch& b,
                       const mat_view& q_abs, const mat_view& out_lat, int64_t heads, int64_t kv_lora, float scale,
                       const decode_plan& plan, float* workspace, cudaStream_t s) {
  // 128-bit loads need 16-byte aligned entries: entry % 4 == 0 and an aligned pool and query.
  const bool v4 = pool.entry_floats % 4 == 0 && reinterpret_cast<uintptr_t>(pool.base) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(q_abs.data) % 16 == 0 && q_abs.ld % 4 == 0;
  const size_t smem = decode_smem(pool.entry_floats, v4);
  auto kernel = v4 ? &mla_decode_partial_kernel<true> : &mla_decode_partial_kernel<false>;
  raise_smem_limit(reinterpret_cast<const void*>(kernel), smem, "mla_decode_attention(smem)");
  float* ws_out = workspace;
  float* ws_ml = workspace + size_t(b.batch) * size_t(plan.splits) * size_t(heads) * size_t(kv_lora);
  dim3 grid(unsigned((heads + kDH - 1) / kDH), unsigned(plan.splits), unsigned(b.batch));
  kernel<<<grid, kDThreads, smem, s>>>(pool.base, pool.floats_per_page(), pool.page_size, pool.entry_floats, layer,
                                       b.pages, b.page_offsets, b.ctx_lens, q_abs.data, q_abs.ld, int(heads),
                                       int(kv_lora), scale, plan.chunk, plan.splits, ws_out, ws_ml);
  check_launch("mla_decode_attention(partial)");
  mla_decode_combine_kernel<<<dim3(unsigned(heads), unsigned(b.batch)), 128, 0, s>>>(
      ws_out, ws_ml, int(heads), int(kv_lora), plan.splits, out_lat.data, out_lat.ld);
  check_launch("mla_decode_attention(combine)");
}

} // namespace petrel::kernels::cudabe
