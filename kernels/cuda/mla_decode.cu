// MLA absorbed decode over the paged bf16 latent cache (sm_90a: TMA + wgmma).
//
// Layout: q [batch, heads, 576], kv_cache [pages, 64, 576] (latent 512 | rope 64; V = latent),
//         block_table int32 [batch, ld], seqlens int32 [batch], out [batch, heads, 512] (mla.hpp).
// Bound:  memory at small head counts; with 128 heads both terms are close (2,176 FLOP per KV element
//         read per head block), so the kernel has to keep HBM, L2 and the tensor cores busy at once.
//
// Design (docs/mla-kernels.md):
//  * One CTA = 64 query heads of one sequence x one split of its KV pages; 256 threads = 2 warpgroups.
//    Q (64 x 576) stays in shared memory for the whole CTA; KV tiles (one 64-token page = 72 KiB) stream
//    through 2 stages by TMA (9 boxes of 64 x 64, 128B swizzle), completing on an mbarrier.
//  * Warpgroup 0: S = Q K^T (36 x wgmma m64n64k16, both operands in shared memory), online softmax in
//    registers (log2 domain), P to shared memory for warpgroup 1, then O[:, 0:256] += P V[:, 0:256]
//    with P straight from registers (wgmma m64n256k16, V read MN-major from the same tile).
//  * Warpgroup 1: O[:, 256:512] += P V[:, 256:512] with P from shared memory; one of its threads is the
//    TMA producer. Named barriers hand P over (P ready / P free); "empty" mbarriers free a KV stage.
//  * Split-KV: grid (head blocks, splits, batch); the split count depends on (batch, heads, max_seqlen)
//    only. Each CTA takes its share of ceil(seqlen / 64) pages, read from seqlens on the device, so the
//    launch is CUDA-graph safe. With splits, partial O (fp32, normalised) and log2-sum-exp go to the
//    workspace and a combine kernel merges them.
//  * Tried on the H100 and dropped as slower (docs/mla-kernels.md, "Tried and dropped"): a "seesaw" kernel
//    (the warpgroups alternate pages), its 2-CTA multicast form, and L2 prefetches of pages ahead.
#include "kernels/cuda/mla.hpp"

#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "kernels/cuda/sm90_ptx.cuh"

namespace petrel::cuda {
namespace {

using namespace sm90;

// -- constants --------------------------------------------------------------------------
constexpr int head_block = 64;                      // query heads per CTA (wgmma M)
constexpr int page = mla_page_size;                 // KV tokens per tile
constexpr int qk_chunks = mla_qk_dim / 64;          // 9 chunks of 64 columns
constexpr int chunk_bytes = page * 128;             // 8 KiB: 64 rows x 64 bf16
constexpr int tile_bytes = qk_chunks * chunk_bytes; // 72 KiB (also the Q tile)
constexpr int stages = 2;
constexpr int threads = 256;
constexpr int max_splits = 64;

// shared-memory map (offsets from a 1024-aligned base)
constexpr int off_q = 0;
constexpr int off_kv = off_q + tile_bytes;
constexpr int off_p = off_kv + stages * tile_bytes;
constexpr int off_alpha = off_p + chunk_bytes;      // 64 floats: per-row rescale of the current tile
constexpr int off_l = off_alpha + 256;              // 64 floats: final row sums
constexpr int off_m = off_l + 256;                  // 64 floats: final row maxima (log2 domain)
constexpr int off_bar = off_m + 256;                // full[stages], empty[stages]
constexpr int smem_used = off_bar + 2 * stages * 8;
constexpr int smem_bytes = smem_used + 1024;        // alignment slack

// named barrier ids
constexpr int bar_p_ready = 1, bar_p_free = 2, bar_wg0 = 3;

struct decode_params {
  const __nv_bfloat16* q;
  const int* block_table;
  int block_table_ld;
  const int* seqlens;
  int batch;
  int heads;
  int num_splits;
  float scale_log2;       // softmax_scale * log2(e)
  __nv_bfloat16* out;     // num_splits == 1
  float* partial_o;       // [splits, batch, heads, 512]
  float* partial_lse;     // [splits, batch, heads] (log2 domain)
};

// -- kernels ----------------------------------------------------------------------------
// A split with no pages: mark it empty for the combine (or write zeros when unsplit).
__device__ __forceinline__ void write_empty_split(const decode_params& p, int b, int split, int head0, int tid) {
  for (int r = tid / 64; r < head_block; r += threads / 64) {
    const int h = head0 + r;
    if (h >= p.heads) break;
    const std::size_t row = static_cast<std::size_t>(b) * p.heads + h;
    if (p.num_splits == 1) {
      for (int c = tid % 64; c < mla_latent_dim / 2; c += 64)
        reinterpret_cast<std::uint32_t*>(p.out + row * mla_latent_dim)[c] = 0u;
    } else if (tid % 64 == 0) {
      p.partial_lse[static_cast<std::size_t>(split) * p.batch * p.heads + row] = -INFINITY;
    }
  }
}

// Warpgroup 0 computes S and the softmax of every page, warpgroup 1 only its half of P V.
__global__ void __launch_bounds__(threads, 1)
mla_decode_kernel(const __grid_constant__ CUtensorMap kv_map, const decode_params p) {
  extern __shared__ std::uint8_t smem_raw[];
  std::uint8_t* smem = reinterpret_cast<std::uint8_t*>((reinterpret_cast<std::uintptr_t>(smem_raw) + 1023) & ~std::uintptr_t(1023));
  std::uint8_t* s_q = smem + off_q;
  std::uint8_t* s_kv = smem + off_kv;
  std::uint8_t* s_p = smem + off_p;
  float* s_alpha = reinterpret_cast<float*>(smem + off_alpha);
  float* s_l = reinterpret_cast<float*>(smem + off_l);
  float* s_m = reinterpret_cast<float*>(smem + off_m);
  std::uint64_t* full = reinterpret_cast<std::uint64_t*>(smem + off_bar);
  std::uint64_t* empty = full + stages;

  const int tid = threadIdx.x;
  const int wg = tid / 128;
  const int warp = (tid / 32) % 4;
  const int lane = tid % 32;
  const int hb = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
  const int head0 = hb * head_block;

  const int seqlen = p.seqlens[b];
  const int tiles = seqlen > 0 ? (seqlen + page - 1) / page : 0;
  const int per_split = (tiles + p.num_splits - 1) / p.num_splits;
  const int t_begin = split * per_split;
  const int n = max(0, min(tiles, t_begin + per_split) - t_begin);
  const int* pages = p.block_table + static_cast<std::size_t>(b) * p.block_table_ld + t_begin;
  const int last_valid = seqlen - (tiles - 1) * page; // tokens in the sequence's last tile

  if (n == 0) {
    write_empty_split(p, b, split, head0, tid);
    return;
  }

  if (tid == 0) {
    tma_prefetch_descriptor(&kv_map);
    for (int s = 0; s < stages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 8); // lane 0 of each of the 8 warps
    }
    fence_barrier_init();
  }
  __syncthreads();

  auto issue_tile = [&](int i) {
    const int stage = i % stages;
    const int page_id = pages[i];
    mbar_arrive_expect_tx(&full[stage], tile_bytes);
#pragma unroll
    for (int c = 0; c < qk_chunks; ++c)
      tma_load_2d(&kv_map, s_kv + stage * tile_bytes + c * chunk_bytes, &full[stage], c * 64, page_id * page);
  };
  if (tid == 128) {
    for (int i = 0; i < min(n, stages); ++i) issue_tile(i);
  }

  // Q tile -> shared memory (swizzled chunks); rows past `heads` are zero.
  {
    constexpr int vec_per_row = mla_qk_dim / 8; // 72 x 16 bytes
    const uint4* q_rows = reinterpret_cast<const uint4*>(p.q + (static_cast<std::size_t>(b) * p.heads + head0) * mla_qk_dim);
#pragma unroll 6
    for (int idx = tid; idx < head_block * vec_per_row; idx += threads) {
      const int r = idx / vec_per_row, u = idx % vec_per_row;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (head0 + r < p.heads) v = __ldg(q_rows + static_cast<std::size_t>(r) * vec_per_row + u);
      *reinterpret_cast<uint4*>(s_q + (u / 8) * chunk_bytes + chunk_offset(r, (u % 8) * 8)) = v;
    }
  }
  fence_proxy_async();
  __syncthreads();

  // Accumulator fragment: thread owns rows r0 = 16 * warp + lane / 4 and r0 + 8; for each 8-column
  // block j, d[4j], d[4j+1] are (r0, 8j + 2 * (lane % 4) + {0, 1}) and d[4j+2], d[4j+3] the same for r0 + 8.
  const int r0 = 16 * warp + lane / 4;
  const int quad = lane % 4;
  float o[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}; // log2 domain
  float row_sum[2] = {0.f, 0.f};             // this thread's partial sums (quad-reduced at the end)

  if (wg == 0) {
    // ---- warpgroup 0: S, softmax, left half of O ----
    for (int i = 0; i < n; ++i) {
      const int stage = i % stages;
      std::uint8_t* kv = s_kv + stage * tile_bytes;
      mbar_wait(&full[stage], (i / stages) & 1);

      float s[32];
#pragma unroll
      for (int j = 0; j < 32; ++j) s[j] = 0.f;
      wgmma_fence();
#pragma unroll
      for (int c = 0; c < qk_chunks; ++c)
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
          wgmma_m64n64k16_ss_kk(s, desc_k_major(s_q + c * chunk_bytes + kk * 32),
                                desc_k_major(kv + c * chunk_bytes + kk * 32), (c | kk) != 0);
      wgmma_commit();
      wgmma_wait<0>();
      fence_registers(s);

      const bool partial = (t_begin + i == tiles - 1) && last_valid < page;
      const int valid = partial ? last_valid : page;
      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        const int col = 8 * (j / 4) + 2 * quad + (j & 1);
        s[j] = col < valid ? s[j] * p.scale_log2 : -INFINITY;
        tile_max[(j >> 1) & 1] = fmaxf(tile_max[(j >> 1) & 1], s[j]);
      }
      float alpha[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
        tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
        const float m_new = fmaxf(row_max[h], tile_max[h]);
        alpha[h] = exp2f(row_max[h] - m_new); // row_max = -inf on the first tile: alpha = 0
        row_max[h] = m_new;
        row_sum[h] *= alpha[h];
      }
      std::uint32_t pa[4][4]; // P as four k16 A fragments
#pragma unroll
      for (int j = 0; j < 32; j += 2) {
        const int h = (j >> 1) & 1;
        const float p0 = exp2f(s[j] - row_max[h]);
        const float p1 = exp2f(s[j + 1] - row_max[h]);
        row_sum[h] += p0 + p1;
        // n8 block nb = j / 4 holds columns 8nb..8nb+7; k16 step kk = nb / 2; register within the
        // fragment: (row half h) + 2 * (second 8 columns of the k16 step).
        const int nb = j / 4;
        pa[nb / 2][h + 2 * (nb % 2)] = pack_bf16x2(p0, p1);
      }

      if (i > 0) named_bar_sync(bar_p_free, threads); // warpgroup 1 is done reading the previous P
      if (partial) {
        // Tokens past the sequence end hold whatever the pool held (maybe NaN): zero their V rows so
        // that P = 0 really contributes nothing.
        for (int idx = tid; idx < (page - valid) * (mla_latent_dim / 8); idx += 128) {
          const int r = valid + idx / (mla_latent_dim / 8), u = idx % (mla_latent_dim / 8);
          *reinterpret_cast<uint4*>(kv + (u / 8) * chunk_bytes + chunk_offset(r, (u % 8) * 8)) = make_uint4(0, 0, 0, 0);
        }
      }
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const int col = 16 * kk + 2 * quad;
        *reinterpret_cast<std::uint32_t*>(s_p + chunk_offset(r0, col)) = pa[kk][0];
        *reinterpret_cast<std::uint32_t*>(s_p + chunk_offset(r0 + 8, col)) = pa[kk][1];
        *reinterpret_cast<std::uint32_t*>(s_p + chunk_offset(r0, col + 8)) = pa[kk][2];
        *reinterpret_cast<std::uint32_t*>(s_p + chunk_offset(r0 + 8, col + 8)) = pa[kk][3];
      }
      if (quad == 0) {
        s_alpha[r0] = alpha[0];
        s_alpha[r0 + 8] = alpha[1];
      }
      fence_proxy_async();
      named_bar_arrive(bar_p_ready, threads);
      if (partial) named_bar_sync(bar_wg0, 128); // our own zeroed V rows, before our wgmma reads them

#pragma unroll
      for (int j = 0; j < 128; ++j) o[j] *= alpha[(j >> 1) & 1];
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_m64n256k16_rs_mn(o, pa[kk], desc_mn_major(kv + kk * 16 * 128, chunk_bytes), 1);
      wgmma_commit();
      wgmma_wait<0>();
      fence_registers(o);
      if (lane == 0) mbar_arrive(&empty[stage]);
    }
    // final row statistics for both warpgroups
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
      row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
    }
    if (quad == 0) {
      s_l[r0] = row_sum[0];
      s_l[r0 + 8] = row_sum[1];
      s_m[r0] = row_max[0];
      s_m[r0 + 8] = row_max[1];
    }
  } else {
    // ---- warpgroup 1: right half of O; thread 128 is the TMA producer ----
    for (int i = 0; i < n; ++i) {
      const int stage = i % stages;
      std::uint8_t* kv = s_kv + stage * tile_bytes;
      mbar_wait(&full[stage], (i / stages) & 1);
      named_bar_sync(bar_p_ready, threads);
      const float a0 = s_alpha[r0], a1 = s_alpha[r0 + 8];
#pragma unroll
      for (int j = 0; j < 128; ++j) o[j] *= (j & 2) ? a1 : a0;
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_m64n256k16_ss_kmn(o, desc_k_major(s_p + kk * 32), desc_mn_major(kv + 4 * chunk_bytes + kk * 16 * 128, chunk_bytes), 1);
      wgmma_commit();
      wgmma_wait<0>();
      fence_registers(o);
      if (i + 1 < n) named_bar_arrive(bar_p_free, threads);
      if (lane == 0) mbar_arrive(&empty[stage]);
      if (tid == 128 && i + stages < n) {
        mbar_wait(&empty[stage], (i / stages) & 1);
        issue_tile(i + stages);
      }
      __syncwarp();
    }
  }
  __syncthreads();

  // ---- epilogue: normalise and store this warpgroup's 256 columns ----
  const int col0 = wg * 256;
  const std::size_t row_base = static_cast<std::size_t>(b) * p.heads;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = r0 + 8 * h;
    const int head = head0 + r;
    if (head >= p.heads) continue;
    const float l = s_l[r];
    const float inv = l > 0.f ? 1.f / l : 0.f;
    if (p.num_splits == 1) {
      __nv_bfloat16* dst = p.out + (row_base + head) * mla_latent_dim + col0;
#pragma unroll
      for (int j = 0; j < 32; ++j)
        *reinterpret_cast<std::uint32_t*>(dst + 8 * j + 2 * quad) = pack_bf16x2(o[4 * j + 2 * h] * inv, o[4 * j + 2 * h + 1] * inv);
    } else {
      const std::size_t prow = static_cast<std::size_t>(split) * p.batch * p.heads + row_base + head;
      float* dst = p.partial_o + prow * mla_latent_dim + col0;
#pragma unroll
      for (int j = 0; j < 32; ++j)
        *reinterpret_cast<float2*>(dst + 8 * j + 2 * quad) = make_float2(o[4 * j + 2 * h] * inv, o[4 * j + 2 * h + 1] * inv);
      if (wg == 0 && quad == 0) p.partial_lse[prow] = l > 0.f ? s_m[r] + log2f(l) : -INFINITY;
    }
  }
}

// One CTA per (sequence, head): out = sum_s w_s O_s / sum_s w_s with w_s = 2^(lse_s - max lse).
__global__ void __launch_bounds__(128)
mla_decode_combine_kernel(const float* __restrict__ partial_o, const float* __restrict__ partial_lse, int rows,
                          int num_splits, __nv_bfloat16* __restrict__ out) {
  const int row = blockIdx.x;
  __shared__ float s_w[max_splits];
  __shared__ float s_total;
  if (threadIdx.x < 32) {
    float m = -INFINITY;
    for (int s = threadIdx.x; s < num_splits; s += 32) m = fmaxf(m, partial_lse[static_cast<std::size_t>(s) * rows + row]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    float total = 0.f;
    for (int s = threadIdx.x; s < num_splits; s += 32) {
      const float lse = partial_lse[static_cast<std::size_t>(s) * rows + row];
      const float w = lse == -INFINITY ? 0.f : exp2f(lse - m);
      s_w[s] = w;
      total += w;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) total += __shfl_xor_sync(0xffffffffu, total, off);
    if (threadIdx.x == 0) s_total = total;
  }
  __syncthreads();
  const float inv = s_total > 0.f ? 1.f / s_total : 0.f;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  // Eight splits per round with their loads issued together: a dependent chain of one load per split made
  // the combine latency-bound (about half a microsecond per split).
  constexpr int unroll = 8;
  for (int s0 = 0; s0 < num_splits; s0 += unroll) {
    float4 v[unroll];
#pragma unroll
    for (int u = 0; u < unroll; ++u) {
      const int s = s0 + u;
      // Empty splits (weight 0) never wrote their partial: don't read it.
      v[u] = s < num_splits && s_w[s] != 0.f
                 ? __ldg(reinterpret_cast<const float4*>(partial_o + (static_cast<std::size_t>(s) * rows + row) * mla_latent_dim) + threadIdx.x)
                 : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int u = 0; u < unroll; ++u) {
      const float w = s0 + u < num_splits ? s_w[s0 + u] : 0.f;
      acc.x += w * v[u].x;
      acc.y += w * v[u].y;
      acc.z += w * v[u].z;
      acc.w += w * v[u].w;
    }
  }
  uint2 packed;
  packed.x = pack_bf16x2(acc.x * inv, acc.y * inv);
  packed.y = pack_bf16x2(acc.z * inv, acc.w * inv);
  reinterpret_cast<uint2*>(out + static_cast<std::size_t>(row) * mla_latent_dim)[threadIdx.x] = packed;
}

// -- host side --------------------------------------------------------------------------
// Splits per (sequence, head block): the count that minimises waves x (pages per split + a fixed cost of
// about 2 pages for the Q load, the epilogue and the combine), from the shape alone.
int pick_splits(int batch, int heads, int max_seqlen, int sms) {
  const long long ctas = static_cast<long long>(batch) * ((heads + head_block - 1) / head_block);
  const int max_tiles = std::max(1, (max_seqlen + page - 1) / page);
  int best = 1;
  double best_cost = 1e300;
  for (int s = 1; s <= std::min(max_splits, max_tiles); ++s) {
    const long long waves = (ctas * s + sms - 1) / sms;
    const double per = std::ceil(static_cast<double>(max_tiles) / s);
    const double cost = waves * (per + (s > 1 ? 2.0 : 1.0));
    if (cost < best_cost - 1e-9) { best_cost = cost; best = s; }
  }
  return best;
}

} // namespace

std::size_t mla_decode_workspace_bytes(int batch, int heads, int max_seqlen) {
  if (batch <= 0 || heads <= 0 || max_seqlen <= 0) return 0;
  const int splits = pick_splits(batch, heads, max_seqlen, sm_count());
  if (splits == 1) return 0;
  const std::size_t rows = static_cast<std::size_t>(splits) * batch * heads;
  return rows * (mla_latent_dim + 1) * sizeof(float);
}

kernel_status mla_decode_bf16(const void* q, const void* kv_cache, const int* block_table, int block_table_ld,
                              const int* seqlens, int batch, int heads, int max_seqlen, float softmax_scale,
                              void* out, void* workspace, std::size_t workspace_bytes, cudaStream_t stream) {
  const std::string who = "mla_decode_bf16";
  if (batch < 0 || heads <= 0 || max_seqlen <= 0)
    return kernel_status::failure(who + ": batch must be >= 0, heads and max_seqlen positive (got batch=" +
                                  std::to_string(batch) + " heads=" + std::to_string(heads) + " max_seqlen=" +
                                  std::to_string(max_seqlen) + ")");
  if (batch == 0) return kernel_status::success();
  const int max_pages = (max_seqlen + page - 1) / page;
  if (block_table_ld < max_pages)
    return kernel_status::failure(who + ": block_table_ld=" + std::to_string(block_table_ld) + " is smaller than the " +
                                  std::to_string(max_pages) + " pages max_seqlen=" + std::to_string(max_seqlen) + " needs");
  if (batch > 65535) return kernel_status::failure(who + ": batch=" + std::to_string(batch) + " exceeds 65535");
  if (!q || !kv_cache || !block_table || !seqlens || !out) return kernel_status::failure(who + ": null pointer");
  if ((reinterpret_cast<std::uintptr_t>(q) | reinterpret_cast<std::uintptr_t>(kv_cache) | reinterpret_cast<std::uintptr_t>(out)) % 16)
    return kernel_status::failure(who + ": q, kv_cache and out must be 16-byte aligned");
  if (!std::isfinite(softmax_scale)) return kernel_status::failure(who + ": softmax_scale is not finite");

  const int splits = pick_splits(batch, heads, max_seqlen, sm_count());
  const std::size_t need = mla_decode_workspace_bytes(batch, heads, max_seqlen);
  if (splits > 1 && (!workspace || workspace_bytes < need))
    return kernel_status::failure(who + ": workspace of " + std::to_string(workspace_bytes) + " bytes is smaller than the " +
                                  std::to_string(need) + " mla_decode_workspace_bytes() asks for");

  // The cache's page count is not part of the API: the map spans every page a 32-bit row coordinate can
  // name; only pages the block table lists are ever read.
  CUtensorMap kv_map;
  if (!encode_tma_2d(&kv_map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, kv_cache, mla_qk_dim, (1ull << 31) - page, mla_qk_dim * 2, 64,
                     page, CU_TENSOR_MAP_SWIZZLE_128B))
    return kernel_status::failure(who + ": cannot encode the kv_cache TMA descriptor");

  const cudaError_t attr_err = raise_smem_limit_once<mla_decode_kernel>(smem_bytes);
  if (attr_err != cudaSuccess) return kernel_status::failure(who + ": cannot raise the shared-memory limit: " + cudaGetErrorString(attr_err));

  decode_params p{};
  p.q = static_cast<const __nv_bfloat16*>(q);
  p.block_table = block_table;
  p.block_table_ld = block_table_ld;
  p.seqlens = seqlens;
  p.batch = batch;
  p.heads = heads;
  p.num_splits = splits;
  p.scale_log2 = softmax_scale * 1.4426950408889634f;
  p.out = static_cast<__nv_bfloat16*>(out);
  const std::size_t rows = static_cast<std::size_t>(splits) * batch * heads;
  p.partial_o = splits > 1 ? static_cast<float*>(workspace) : nullptr;
  p.partial_lse = splits > 1 ? static_cast<float*>(workspace) + rows * mla_latent_dim : nullptr;

  const dim3 grid((heads + head_block - 1) / head_block, splits, batch);
  mla_decode_kernel<<<grid, threads, smem_bytes, stream>>>(kv_map, p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return kernel_status::failure(who + ": launch failed: " + cudaGetErrorString(err));
  if (splits > 1) {
    mla_decode_combine_kernel<<<batch * heads, 128, 0, stream>>>(p.partial_o, p.partial_lse, batch * heads, splits, p.out);
    err = cudaGetLastError();
    if (err != cudaSuccess) return kernel_status::failure(who + ": combine launch failed: " + cudaGetErrorString(err));
  }
  return kernel_status::success();
}

} // namespace petrel::cuda
