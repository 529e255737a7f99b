// MLA naive-form causal prefill, flash-style, varlen (sm_90a: cp.async + wgmma).
//
// Layout: q / k [total, heads, 192] bf16 (nope 128 | rope 64), v / out [total, heads, 128] bf16,
//         cu_seqlens_q / cu_seqlens_k [num_seqs + 1] int32 on the device (mla.hpp).
// Bound:  compute (each K/V tile is reused by 128 queries; 2 x (192 + 128) FLOP per visible (query, key)).
//
// Design (docs/mla-kernels.md):
//  * One CTA = 128 queries of one (sequence, head); 256 threads = 2 warpgroups of 64 query rows each.
//    Grid (query blocks, heads, sequences), query blocks launched last-first so the longest causal rows
//    start first.
//  * Q (128 x 192) stays in shared memory; K (128 x 192) and V (128 x 128) tiles stream through 2 stages
//    by cp.async (16-byte pieces, rows past the sequence zero-filled), stored as 128B-swizzled chunks.
//  * Per tile and warpgroup: S = Q K^T (12 x wgmma m64n128k16), causal mask only on tiles that cross the
//    diagonal, online softmax in registers (log2 domain), O += P V (8 x wgmma m64n128k16, P from
//    registers, V read MN-major). The next tile's copies are in flight while this one computes.
#include "kernels/cuda/mla.hpp"

#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "kernels/cuda/sm90_ptx.cuh"

namespace petrel::cuda {
namespace {

using namespace sm90;

// -- constants --------------------------------------------------------------------------
constexpr int block_m = 128;                                    // queries per CTA
constexpr int block_n = 64;                                     // keys per tile
constexpr int qk_dim = mla_prefill_qk_dim;                      // 192
constexpr int v_dim = mla_prefill_v_dim;                        // 128
constexpr int qk_chunks = qk_dim / 64;                          // 3
constexpr int v_chunks = v_dim / 64;                            // 2
constexpr int q_chunk_bytes = block_m * 128;                    // 128 rows x 64 bf16
constexpr int kv_chunk_bytes = block_n * 128;                   // 64 rows x 64 bf16
constexpr int q_bytes = qk_chunks * q_chunk_bytes;              // 48 KiB
constexpr int k_bytes = qk_chunks * kv_chunk_bytes;             // 24 KiB
constexpr int v_bytes = v_chunks * kv_chunk_bytes;              // 16 KiB
constexpr int stage_bytes = k_bytes + v_bytes;
constexpr int stages = 4;                                       // tile j + 3 loads while j + 1 computes
constexpr int threads = 256;
constexpr int smem_bytes = q_bytes + stages * stage_bytes + 1024;

struct prefill_params {
  const __nv_bfloat16* q;
  const __nv_bfloat16* k;
  const __nv_bfloat16* v;
  const int* cu_q;
  const int* cu_k;
  int heads;
  float scale_log2;
  __nv_bfloat16* out;
};

// Copies rows [row0, row0 + ROWS) of one head of a [total, heads, dim] tensor into swizzled chunks;
// rows at or past `rows` are zero-filled.
template <int DIM, int ROWS>
__device__ __forceinline__ void load_rows(std::uint8_t* dst, const __nv_bfloat16* base, int heads, int head, int row0,
                                          int rows, int tid) {
  constexpr int pieces = DIM / 8; // 16-byte pieces per row
  const std::uint32_t dst_addr = smem_addr(dst);
#pragma unroll
  for (int k = 0; k < ROWS * pieces / threads; ++k) {
    const int idx = tid + k * threads;
    const int r = idx / pieces, u = idx % pieces;
    const bool ok = row0 + r < rows;
    const __nv_bfloat16* src = ok ? base + (static_cast<std::size_t>(row0 + r) * heads + head) * DIM + u * 8 : base;
    cp_async_16(dst_addr + (u / 8) * (ROWS * 128) + chunk_offset(r, (u % 8) * 8), src, ok ? 16 : 0);
  }
}

// -- kernel -----------------------------------------------------------------------------
__global__ void __launch_bounds__(threads, 1) mla_prefill_kernel(const prefill_params p) {
  extern __shared__ std::uint8_t smem_raw[];
  std::uint8_t* smem = reinterpret_cast<std::uint8_t*>((reinterpret_cast<std::uintptr_t>(smem_raw) + 1023) & ~std::uintptr_t(1023));
  std::uint8_t* s_q = smem;
  std::uint8_t* s_kv = smem + q_bytes;

  const int tid = threadIdx.x;
  const int wg = tid / 128;
  const int warp = (tid / 32) % 4;
  const int lane = tid % 32;
  const int quad = lane % 4;
  const int qb = gridDim.x - 1 - blockIdx.x;
  const int head = blockIdx.y, seq = blockIdx.z;

  const int q_start = p.cu_q[seq], len_q = p.cu_q[seq + 1] - q_start;
  const int k_start = p.cu_k[seq], len_k = p.cu_k[seq + 1] - k_start;
  const int q0 = qb * block_m;
  if (q0 >= len_q) return;
  const int offset = len_k - len_q; // position of query i is offset + i
  const int last_key = min(len_k, offset + q0 + block_m); // keys [0, last_key) are visible to some row
  const int n = last_key > 0 ? (last_key + block_n - 1) / block_n : 0;

  const __nv_bfloat16* q_seq = p.q + static_cast<std::size_t>(q_start) * p.heads * qk_dim;
  const __nv_bfloat16* k_seq = p.k + static_cast<std::size_t>(k_start) * p.heads * qk_dim;
  const __nv_bfloat16* v_seq = p.v + static_cast<std::size_t>(k_start) * p.heads * v_dim;

  auto load_tile = [&](int j) {
    if (j < n) {
      std::uint8_t* st = s_kv + (j % stages) * stage_bytes;
      load_rows<qk_dim, block_n>(st, k_seq, p.heads, head, j * block_n, len_k, tid);
      load_rows<v_dim, block_n>(st + k_bytes, v_seq, p.heads, head, j * block_n, len_k, tid);
    }
    cp_async_commit(); // one group per tile, empty past the end, so the wait counts stay fixed
  };
  load_rows<qk_dim, block_m>(s_q, q_seq, p.heads, head, q0, len_q, tid);
  for (int j = 0; j < stages - 1; ++j) load_tile(j); // group 0 also holds Q

  const int r0 = 16 * warp + lane / 4;          // row within this warpgroup's 64
  const int row_lo = q0 + wg * 64;              // first query row of this warpgroup
  const int pos0 = offset + row_lo + r0;        // positions of the thread's two rows
  const int pos1 = pos0 + 8;
  float o[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};
  float s[32];
  float alpha[2] = {1.f, 1.f};
  std::uint32_t pa_even[4][4], pa_odd[4][4]; // P fragments of tiles j (in flight) and j + 1

  const std::uint32_t q_lo = static_cast<std::uint32_t>(desc_k_major(s_q + wg * 64 * 128));
  auto issue_qk = [&](int j) {
    const std::uint32_t k_lo = static_cast<std::uint32_t>(desc_k_major(s_kv + (j % stages) * stage_bytes));
#pragma unroll
    for (int c = 0; c < qk_chunks; ++c)
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_m64n64k16_ss_kk(s, desc_k_major_at(q_lo, c * q_chunk_bytes + kk * 32),
                              desc_k_major_at(k_lo, c * kv_chunk_bytes + kk * 32), (c | kk) != 0);
    wgmma_commit();
  };
  // Causal online softmax of S (tile j) into P fragments; updates row_max / row_sum and sets alpha.
  auto softmax = [&](int j, std::uint32_t(&pa)[4][4]) {
    const int key0 = j * block_n;
    const bool need_mask = key0 + block_n - 1 > offset + row_lo || key0 + block_n > len_k;
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const int h = (i >> 1) & 1;
      const int key = key0 + 8 * (i / 4) + 2 * quad + (i & 1);
      const bool visible = !need_mask || (key <= (h ? pos1 : pos0) && key < len_k);
      s[i] = visible ? s[i] * p.scale_log2 : -INFINITY;
      tile_max[h] = fmaxf(tile_max[h], s[i]);
    }
    float m_use[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
      const float m_new = fmaxf(row_max[h], tile_max[h]);
      m_use[h] = m_new == -INFINITY ? 0.f : m_new; // a row that has seen no key yet stays at zero
      alpha[h] = exp2f(row_max[h] - m_use[h]);
      row_max[h] = m_new;
      row_sum[h] *= alpha[h];
    }
#pragma unroll
    for (int i = 0; i < 32; i += 2) {
      const int h = (i >> 1) & 1;
      const float p0 = exp2f(s[i] - m_use[h]);
      const float p1 = exp2f(s[i + 1] - m_use[h]);
      row_sum[h] += p0 + p1;
      const int nb = i / 4;
      pa[nb / 2][h + 2 * (nb % 2)] = pack_bf16x2(p0, p1);
    }
  };
  // Tile j: make tile j + 1 visible, start loading tile j + 3, issue S of tile j + 1 and P V of tile j,
  // and run the softmax of tile j + 1 while P V is on the tensor cores.
  auto step = [&](int j, std::uint32_t(&pa)[4][4], std::uint32_t(&pa_next)[4][4], auto has_next_tag) {
    constexpr bool has_next = decltype(has_next_tag)::value;
    cp_async_wait<stages - 3>(); // this thread's copies of tile j + 1 landed
    fence_proxy_async();
    __syncthreads();             // everyone's copies visible; everyone is done with tile j - 1's stage
    load_tile(j + stages - 1);
    const std::uint8_t* st = s_kv + (j % stages) * stage_bytes;
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] *= alpha[(i >> 1) & 1];
    fence_registers(o);
    fence_registers(s);
    fence_registers(pa);
    wgmma_fence();
    if constexpr (has_next) issue_qk(j + 1);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      wgmma_m64n128k16_rs_mn(o, pa[kk], desc_mn_major(st + k_bytes + kk * 16 * 128, kv_chunk_bytes), 1);
    wgmma_commit();
    if constexpr (has_next) {
      wgmma_wait<1>();
      fence_registers(s);
      softmax(j + 1, pa_next);
    }
    wgmma_wait<0>();
    fence_registers(o);
  };

  if (n > 0) {
    cp_async_wait<stages - 2>(); // Q and tile 0
    fence_proxy_async();
    __syncthreads();
    wgmma_fence();
    issue_qk(0);
    wgmma_wait<0>();
    fence_registers(s);
    softmax(0, pa_even);
    int j = 0;
    for (; j + 2 < n; j += 2) {
      step(j, pa_even, pa_odd, std::true_type{});
      step(j + 1, pa_odd, pa_even, std::true_type{});
    }
    if (j + 1 < n) {
      step(j, pa_even, pa_odd, std::true_type{});
      step(j + 1, pa_odd, pa_even, std::false_type{});
    } else {
      step(j, pa_even, pa_odd, std::false_type{});
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = row_lo + r0 + 8 * h;
    if (row >= len_q) continue;
    const float inv = row_sum[h] > 0.f ? 1.f / row_sum[h] : 0.f;
    __nv_bfloat16* dst = p.out + (static_cast<std::size_t>(q_start + row) * p.heads + head) * v_dim;
#pragma unroll
    for (int i = 0; i < 16; ++i)
      *reinterpret_cast<std::uint32_t*>(dst + 8 * i + 2 * quad) = pack_bf16x2(o[4 * i + 2 * h] * inv, o[4 * i + 2 * h + 1] * inv);
  }
}

} // namespace

kernel_status mla_prefill_bf16(const void* q, const void* k, const void* v, const int* cu_seqlens_q,
                               const int* cu_seqlens_k, int num_seqs, int max_seqlen_q, int max_seqlen_k,
                               int heads, float softmax_scale, void* out, cudaStream_t stream) {
  const std::string who = "mla_prefill_bf16";
  if (num_seqs < 0 || max_seqlen_q < 0 || max_seqlen_k < 0 || heads <= 0)
    return kernel_status::failure(who + ": num_seqs, max_seqlen_q and max_seqlen_k must be >= 0 and heads positive (got num_seqs=" +
                                  std::to_string(num_seqs) + " max_seqlen_q=" + std::to_string(max_seqlen_q) + " max_seqlen_k=" +
                                  std::to_string(max_seqlen_k) + " heads=" + std::to_string(heads) + ")");
  if (num_seqs == 0 || max_seqlen_q == 0) return kernel_status::success();
  if (num_seqs > 65535 || heads > 65535) return kernel_status::failure(who + ": num_seqs and heads must be <= 65535");
  if (!q || !k || !v || !cu_seqlens_q || !cu_seqlens_k || !out) return kernel_status::failure(who + ": null pointer");
  if ((reinterpret_cast<std::uintptr_t>(q) | reinterpret_cast<std::uintptr_t>(k) | reinterpret_cast<std::uintptr_t>(v) |
       reinterpret_cast<std::uintptr_t>(out)) % 16)
    return kernel_status::failure(who + ": q, k, v and out must be 16-byte aligned");
  if (!std::isfinite(softmax_scale)) return kernel_status::failure(who + ": softmax_scale is not finite");

  const cudaError_t attr_err = raise_smem_limit_once<mla_prefill_kernel>(smem_bytes);
  if (attr_err != cudaSuccess) return kernel_status::failure(who + ": cannot raise the shared-memory limit: " + cudaGetErrorString(attr_err));

  prefill_params p{};
  p.q = static_cast<const __nv_bfloat16*>(q);
  p.k = static_cast<const __nv_bfloat16*>(k);
  p.v = static_cast<const __nv_bfloat16*>(v);
  p.cu_q = cu_seqlens_q;
  p.cu_k = cu_seqlens_k;
  p.heads = heads;
  p.scale_log2 = softmax_scale * 1.4426950408889634f;
  p.out = static_cast<__nv_bfloat16*>(out);
  const dim3 grid((max_seqlen_q + block_m - 1) / block_m, heads, num_seqs);
  mla_prefill_kernel<<<grid, threads, smem_bytes, stream>>>(p);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return kernel_status::failure(who + ": launch failed: " + cudaGetErrorString(err));
  return kernel_status::success();
}

} // namespace petrel::cuda
