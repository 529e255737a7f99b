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
//  * That kernel (v1) is the default. The seesaw kernel below (v2: the warpgroups alternate pages, one's
//    softmax meant to overlap the other's matrix work; with page-wise or box-wise waits, optionally in 2-CTA
//    clusters with multicast loads) is correct but was 4-75% slower on the H100, because its hand-over
//    chain per page is as long as v1's (docs/mla-kernels.md); it stays selectable with PETREL_MLA_DECODE.
#include "kernels/cuda/mla.hpp"

#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
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
  const std::uint8_t* kv;  // the cache, for L2 prefetches
  int l2_prefetch;         // pages to prefetch into L2 ahead of the TMA loads (0: none)
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
/// Asks L2 to fetch page `page_id` (72 KiB, contiguous) now, so that its TMA load later hits L2. Two shared-
/// memory stages cap the KV bytes a CTA has in flight; L2 prefetches raise that without shared memory.
__device__ __forceinline__ void prefetch_page_l2(const decode_params& p, int page_id) {
  const std::uint8_t* src = p.kv + static_cast<std::size_t>(page_id) * tile_bytes;
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src), "r"(tile_bytes) : "memory");
}

/// Prefetches for a CTA that has just issued the TMA load of page i (first call with i = 0 covers 1 .. D).
__device__ __forceinline__ void prefetch_ahead(const decode_params& p, const int* pages, int i, int n) {
  if (p.l2_prefetch <= 0) return;
  if (i == 0) {
    for (int k = stages; k <= min(p.l2_prefetch + stages - 1, n - 1); ++k) prefetch_page_l2(p, pages[k]);
  } else if (i >= stages && i + p.l2_prefetch < n) {
    prefetch_page_l2(p, pages[i + p.l2_prefetch]);
  }
}

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

// v1: warpgroup 0 computes S and the softmax of every page, warpgroup 1 only its half of P V.
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
    prefetch_ahead(p, pages, 0, n);
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
        prefetch_ahead(p, pages, i + stages, n);
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

// v2 ("seesaw"): the two warpgroups alternate pages. Warpgroup w owns the pages i with i % 2 == w, which
// always land in KV stage w. For its own page it computes S = Q K^T, the online softmax (taking the running
// row maximum that the other warpgroup left after page i - 1 in shared memory), hands P (bf16) to the other
// warpgroup in the page's rope chunk (dead once S is done, so no extra buffer), and does its half of O with
// P from registers; for the other warpgroup's page it only does its half of O with P from shared memory.
// The intent: one warpgroup's softmax and hand-over overlap the other's S, the tensor work is split evenly
// (36 + 16 + 16 k16-steps of 64 x 64 per page pair each), and each page's 9 boxes complete on their own
// mbarriers, so S can start on the first 64 columns while the rest are still arriving. Measured (H100,
// docs/mla-kernels.md): slower than v1. A warpgroup must release page j - 1 (its P V of the other's page)
// before it may wait for page j, or every load chains behind the previous one; and then S of page j + 1
// starts only after the hand-over of page j, so the chain per page (hand-over, P V, S, softmax) is no
// shorter than v1's, with more barriers in it.
// Per page i, in program order, both warpgroups apply O = O * 2^(M_{i-1} - M_i) + P_i V_i with the same
// running maxima M, so the two halves of O and the two partial row sums stay consistent.
namespace v2 {
constexpr int off_q = 0;
constexpr int off_kv = off_q + tile_bytes;
constexpr int off_m = off_kv + stages * tile_bytes; // 64 floats: running row maximum after the latest page
constexpr int off_l = off_m + 256;                  // 2 x 64 floats: each warpgroup's row sums
constexpr int off_bar = off_l + 512;                // full[stages][qk_chunks], empty[stages]
constexpr int smem_used = off_bar + (stages * qk_chunks + stages) * 8;
constexpr int smem_bytes = smem_used + 1024;
static_assert(smem_bytes <= 227 * 1024, "v2 decode shared memory exceeds the sm_90 limit");
// named barriers: page published by warpgroup w (1 + w), warpgroup-internal (3 + w)
constexpr int bar_pub = 1, bar_wg = 3;
} // namespace v2

// chunk_wait: S waits for each 64-column box just before its four wgmmas (else for the whole page first).
// multicast: launched as clusters of the 2 head blocks of a sequence; each CTA loads every other box of a page
// and multicasts it to both, so a page crosses L2 -> SM once for both. A stage is refilled only when both
// CTAs have released it (each warp arrives on the `empty` barriers of both CTAs).
template <bool chunk_wait, bool multicast>
__global__ void __launch_bounds__(threads, 1)
mla_decode_seesaw_kernel(const __grid_constant__ CUtensorMap kv_map, const decode_params p) {
  extern __shared__ std::uint8_t smem_raw[];
  std::uint8_t* smem = reinterpret_cast<std::uint8_t*>((reinterpret_cast<std::uintptr_t>(smem_raw) + 1023) & ~std::uintptr_t(1023));
  std::uint8_t* s_q = smem + v2::off_q;
  std::uint8_t* s_kv = smem + v2::off_kv;
  float* s_m = reinterpret_cast<float*>(smem + v2::off_m);
  float* s_l = reinterpret_cast<float*>(smem + v2::off_l);
  std::uint64_t* full = reinterpret_cast<std::uint64_t*>(smem + v2::off_bar); // [stage * qk_chunks + chunk]
  std::uint64_t* empty = full + stages * qk_chunks;

  const int tid = threadIdx.x;
  const int w = tid / 128;
  const int wtid = tid % 128;
  const int warp = wtid / 32;
  const int lane = tid % 32;
  const int hb = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
  const int head0 = hb * head_block;

  const int seqlen = p.seqlens[b];
  const int tiles = seqlen > 0 ? (seqlen + page - 1) / page : 0;
  const int per_split = (tiles + p.num_splits - 1) / p.num_splits;
  const int t_begin = split * per_split;
  const int n = max(0, min(tiles, t_begin + per_split) - t_begin);
  const int* pages = p.block_table + static_cast<std::size_t>(b) * p.block_table_ld + t_begin;
  const int last_valid = seqlen - (tiles - 1) * page;

  if (n == 0) {
    write_empty_split(p, b, split, head0, tid);
    return;
  }

  const std::uint32_t rank = multicast ? (blockIdx.x & 1u) : 0u; // = %cluster_ctarank for clusters of (2, 1, 1)
  if (tid == 0) {
    tma_prefetch_descriptor(&kv_map);
    for (int i = 0; i < stages * qk_chunks; ++i) mbar_init(&full[i], 1);
    for (int s = 0; s < stages; ++s) mbar_init(&empty[s], multicast ? 16 : 8); // lane 0 of each warp (of both CTAs)
    fence_barrier_init();
  }
  if constexpr (multicast)
    cluster_sync(); // the peer's boxes and arrivals may only come once our barriers exist
  else
    __syncthreads();
  auto release = [&](int stage) { // lane 0 of each warp, once this warp is done with the stage's page
    mbar_arrive(&empty[stage]);
    if constexpr (multicast) mbar_arrive_cluster(&empty[stage], rank ^ 1u);
  };

  auto issue_tile = [&](int i) {
    const int stage = i % stages;
    const int page_id = pages[i];
#pragma unroll
    for (int c = 0; c < qk_chunks; ++c) {
      mbar_arrive_expect_tx(&full[stage * qk_chunks + c], chunk_bytes);
      if constexpr (multicast) {
        if ((c & 1) == static_cast<int>(rank))
          tma_load_2d_multicast(&kv_map, s_kv + stage * tile_bytes + c * chunk_bytes, &full[stage * qk_chunks + c], c * 64,
                                page_id * page, 0x3);
      } else {
        tma_load_2d(&kv_map, s_kv + stage * tile_bytes + c * chunk_bytes, &full[stage * qk_chunks + c], c * 64, page_id * page);
      }
    }
  };
  if (tid == 0) {
    for (int i = 0; i < min(n, stages); ++i) issue_tile(i);
    if (rank == 0) prefetch_ahead(p, pages, 0, n);
  }

  {
    constexpr int vec_per_row = mla_qk_dim / 8;
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

  // Fragment layout as in v1: rows r0 and r0 + 8, columns 8j + 2 * quad + {0, 1}.
  const int r0 = 16 * warp + lane / 4;
  const int quad = lane % 4;
  float o[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}; // running row maximum (log2 domain) after the latest page
  float row_sum[2] = {0.f, 0.f};           // this thread's share of this warpgroup's own pages' sums
  std::uint8_t* kv_own = s_kv + w * tile_bytes;
  std::uint8_t* kv_other = s_kv + (1 - w) * tile_bytes;
  const int v_half = w * 4 * chunk_bytes; // this warpgroup's 256 V columns: chunks 4w .. 4w + 3

  for (int j = w; j <= n; j += 2) {
    const bool own = j < n;
    // (1) the other warpgroup's page j - 1: rescale to its maximum, O_half += P V_half (P from shared memory)
    if (j >= 1) {
      named_bar_sync(v2::bar_pub + (1 - w), threads);
      float scale[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float m_new = s_m[r0 + 8 * h];
        scale[h] = exp2f(m_run[h] - m_new); // m_run = -inf before the first page: 0
        m_run[h] = m_new;
        row_sum[h] *= scale[h];
      }
#pragma unroll
      for (int i = 0; i < 128; ++i) o[i] *= scale[(i >> 1) & 1];
      const std::uint32_t ph = ((j - 1) / 2) & 1;
#pragma unroll
      for (int c = 0; c < 4; ++c) mbar_wait(&full[(1 - w) * qk_chunks + 4 * w + c], ph); // complete already
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_m64n256k16_ss_kmn(o, desc_k_major(kv_other + 8 * chunk_bytes + kk * 32),
                                desc_mn_major(kv_other + v_half + kk * 16 * 128, chunk_bytes), 1);
      wgmma_commit();
      // Release page j - 1 now, before waiting for page j: page j + 1's load waits for this release, so
      // holding it until page j has landed would chain every load behind the previous one.
      wgmma_wait<0>();
      fence_registers(o);
      if (lane == 0) release(1 - w);
    }
    if (own) {
      // (2) S = Q K^T of our page j, chunk by chunk as its boxes land
      const std::uint32_t ph = (j / 2) & 1;
      float s[32];
#pragma unroll
      for (int i = 0; i < 32; ++i) s[i] = 0.f;
      if constexpr (!chunk_wait) {
#pragma unroll
        for (int c = 0; c < qk_chunks; ++c) mbar_wait(&full[w * qk_chunks + c], ph);
      }
      wgmma_fence();
#pragma unroll
      for (int c = 0; c < qk_chunks; ++c) {
        if constexpr (chunk_wait) mbar_wait(&full[w * qk_chunks + c], ph);
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
          wgmma_m64n64k16_ss_kk(s, desc_k_major(s_q + c * chunk_bytes + kk * 32), desc_k_major(kv_own + c * chunk_bytes + kk * 32),
                                (c | kk) != 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_registers(s);

      // (3) online softmax against the running maximum after page j - 1
      const bool partial = (t_begin + j == tiles - 1) && last_valid < page;
      const int valid = partial ? last_valid : page;
      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        const int col = 8 * (i / 4) + 2 * quad + (i & 1);
        s[i] = col < valid ? s[i] * p.scale_log2 : -INFINITY;
        tile_max[(i >> 1) & 1] = fmaxf(tile_max[(i >> 1) & 1], s[i]);
      }
      float alpha[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
        tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
        const float m_new = fmaxf(m_run[h], tile_max[h]);
        alpha[h] = exp2f(m_run[h] - m_new);
        m_run[h] = m_new;
        row_sum[h] *= alpha[h];
      }
      std::uint32_t pa[4][4];
#pragma unroll
      for (int i = 0; i < 32; i += 2) {
        const int h = (i >> 1) & 1;
        const float p0 = exp2f(s[i] - m_run[h]);
        const float p1 = exp2f(s[i + 1] - m_run[h]);
        row_sum[h] += p0 + p1;
        const int nb = i / 4;
        pa[nb / 2][h + 2 * (nb % 2)] = pack_bf16x2(p0, p1);
      }
      // (4) publish: the maximum, P into the (now dead) rope chunk of our stage, zeroed V rows past the end
      if (quad == 0) {
        s_m[r0] = m_run[0];
        s_m[r0 + 8] = m_run[1];
      }
      std::uint8_t* s_p = kv_own + 8 * chunk_bytes;
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const int col = 16 * kk + 2 * quad;
        *reinterpret_cast<std::uint32_t*>(s_p + chunk_offset(r0, col)) = pa[kk][0];
        *reinterpret_cast<std::uint32_t*>(s_p + chunk_offset(r0 + 8, col)) = pa[kk][1];
        *reinterpret_cast<std::uint32_t*>(s_p + chunk_offset(r0, col + 8)) = pa[kk][2];
        *reinterpret_cast<std::uint32_t*>(s_p + chunk_offset(r0 + 8, col + 8)) = pa[kk][3];
      }
      if (partial) {
        for (int idx = wtid; idx < (page - valid) * (mla_latent_dim / 8); idx += 128) {
          const int r = valid + idx / (mla_latent_dim / 8), u = idx % (mla_latent_dim / 8);
          *reinterpret_cast<uint4*>(kv_own + (u / 8) * chunk_bytes + chunk_offset(r, (u % 8) * 8)) = make_uint4(0, 0, 0, 0);
        }
      }
      fence_proxy_async();
      named_bar_arrive(v2::bar_pub + w, threads);
      if (partial) named_bar_sync(v2::bar_wg + w, 128); // our own zeroed V rows, before our wgmma reads them

      // (5) O_half = O_half * alpha + P V_half (P from registers)
#pragma unroll
      for (int i = 0; i < 128; ++i) o[i] *= alpha[(i >> 1) & 1];
      fence_registers(pa);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_m64n256k16_rs_mn(o, pa[kk], desc_mn_major(kv_own + v_half + kk * 16 * 128, chunk_bytes), 1);
      wgmma_commit();
      wgmma_wait<0>();
      fence_registers(o);
      if (lane == 0) release(w);
      if (wtid == 0 && j + stages < n) {
        // the other warpgroup (and with multicast the peer CTA) is done with page j too
        if constexpr (multicast)
          mbar_wait_cluster(&empty[w], ph);
        else
          mbar_wait(&empty[w], ph);
        issue_tile(j + stages);
        if (rank == 0) prefetch_ahead(p, pages, j + stages, n);
      }
      __syncwarp();
    }
  }

  // No box or arrival from the peer may target this CTA after it exits.
  if constexpr (multicast) cluster_sync();

  // ---- epilogue: the two warpgroups' row sums, normalise, store this warpgroup's 256 columns ----
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
  }
  if (quad == 0) {
    s_l[w * 64 + r0] = row_sum[0];
    s_l[w * 64 + r0 + 8] = row_sum[1];
  }
  __syncthreads();
  const int col0 = w * 256;
  const std::size_t row_base = static_cast<std::size_t>(b) * p.heads;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = r0 + 8 * h;
    const int head = head0 + r;
    if (head >= p.heads) continue;
    const float l = s_l[r] + s_l[64 + r];
    const float inv = l > 0.f ? 1.f / l : 0.f;
    if (p.num_splits == 1) {
      __nv_bfloat16* dst = p.out + (row_base + head) * mla_latent_dim + col0;
#pragma unroll
      for (int i = 0; i < 32; ++i)
        *reinterpret_cast<std::uint32_t*>(dst + 8 * i + 2 * quad) = pack_bf16x2(o[4 * i + 2 * h] * inv, o[4 * i + 2 * h + 1] * inv);
    } else {
      const std::size_t prow = static_cast<std::size_t>(split) * p.batch * p.heads + row_base + head;
      float* dst = p.partial_o + prow * mla_latent_dim + col0;
#pragma unroll
      for (int i = 0; i < 32; ++i)
        *reinterpret_cast<float2*>(dst + 8 * i + 2 * quad) = make_float2(o[4 * i + 2 * h] * inv, o[4 * i + 2 * h + 1] * inv);
      if (w == 0 && quad == 0) p.partial_lse[prow] = l > 0.f ? m_run[h] + log2f(l) : -INFINITY;
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

  // Kernel choice (docs/mla-kernels.md). The default is v1, the fastest on the H100 (2026-11-23 runs). The seesaw
  // variants stay selectable through PETREL_MLA_DECODE, read on every call so that a benchmark can switch:
  // v2 (seesaw, S waits box by box), v2page (seesaw, S waits for the whole page), v2mc (v2 in clusters of the
  // two head blocks with multicast page loads; plain v2 when the head blocks do not pair up). Any other value
  // (or none) is v1. PETREL_MLA_DECODE_PREFETCH=N adds L2 prefetches N pages ahead (default 0: they made every
  // variant slower).
  const char* variant = std::getenv("PETREL_MLA_DECODE");
  auto selected = [&](const char* name) { return variant && std::strcmp(variant, name) == 0; };
  const int head_blocks = (heads + head_block - 1) / head_block;
  const bool use_multicast = selected("v2mc") && head_blocks % 2 == 0;
  const bool use_page_wait = selected("v2page");
  const bool use_chunk_wait = selected("v2") || (selected("v2mc") && !use_multicast);
  const bool use_v1 = !use_multicast && !use_page_wait && !use_chunk_wait;
  const cudaError_t attr_err = use_v1          ? raise_smem_limit_once<mla_decode_kernel>(smem_bytes)
                               : use_page_wait ? raise_smem_limit_once<mla_decode_seesaw_kernel<false, false>>(v2::smem_bytes)
                               : use_multicast ? raise_smem_limit_once<mla_decode_seesaw_kernel<true, true>>(v2::smem_bytes)
                                               : raise_smem_limit_once<mla_decode_seesaw_kernel<true, false>>(v2::smem_bytes);
  if (attr_err != cudaSuccess) return kernel_status::failure(who + ": cannot raise the shared-memory limit: " + cudaGetErrorString(attr_err));

  decode_params p{};
  p.q = static_cast<const __nv_bfloat16*>(q);
  p.kv = static_cast<const std::uint8_t*>(kv_cache);
  p.l2_prefetch = 0;
  if (const char* pf = std::getenv("PETREL_MLA_DECODE_PREFETCH")) p.l2_prefetch = std::max(0, std::min(64, std::atoi(pf)));
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
  if (use_v1)
    mla_decode_kernel<<<grid, threads, smem_bytes, stream>>>(kv_map, p);
  else if (use_page_wait)
    mla_decode_seesaw_kernel<false, false><<<grid, threads, v2::smem_bytes, stream>>>(kv_map, p);
  else if (use_chunk_wait)
    mla_decode_seesaw_kernel<true, false><<<grid, threads, v2::smem_bytes, stream>>>(kv_map, p);
  else {
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = grid;
    cfg.blockDim = dim3(threads);
    cfg.dynamicSmemBytes = v2::smem_bytes;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = 2;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    const cudaError_t launch_err = cudaLaunchKernelEx(&cfg, mla_decode_seesaw_kernel<true, true>, kv_map, p);
    if (launch_err != cudaSuccess) return kernel_status::failure(who + ": cluster launch failed: " + cudaGetErrorString(launch_err));
  }
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
