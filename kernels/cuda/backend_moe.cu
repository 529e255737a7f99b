// cuda backend, MoE: noaux_tc grouped top-k routing, deterministic scatter-add, device-side permutation.
// Routing is one block per token (latency bound, tiny). The scatter-add and the permutation sort (row, i) pairs
// with CUB's stable radix sort so that every destination row sums its sources in increasing i, as the cpu
// reference does: results are bitwise reproducible run to run (no float atomics).
#include <climits>
#include <cmath>

#include <cub/device/device_radix_sort.cuh>

#include "kernels/cuda/cuda_backend_internal.cuh"

namespace petrel::kernels::cudabe {
namespace {

// -- routing -------------------------------------------------------------------------------------------------

struct arg_best {
  float v;
  int i;
};

__device__ __forceinline__ bool better(float v, int i, float bv, int bi) { return v > bv || (v == bv && i < bi); }

__global__ void route_kernel(const float* __restrict__ logits, int64_t rows, int64_t ld, const float* __restrict__ bias,
                             int E, int G, int topk_group, int top_k, bool norm, float scaling,
                             int32_t* __restrict__ ids, float* __restrict__ weights) {
  extern __shared__ float smem[];
  float* sig = smem;            // [E]
  float* choice = smem + E;     // [E]
  __shared__ float group_score[32];
  __shared__ int keep[32];
  __shared__ arg_best warp_best[32];
  __shared__ int chosen[32];
  const int per_group = E / G;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int64_t t = blockIdx.x; t < rows; t += gridDim.x) {
    const float* l = logits + t * ld;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
      const float s = 1.0f / (1.0f + expf(-l[e]));
      sig[e] = s;
      choice[e] = s + (bias ? bias[e] : 0.0f);
    }
    __syncthreads();
    // A group's score: the sum of its two best biased scores (its only one with one expert per group).
    if (threadIdx.x < G) {
      const int g = threadIdx.x;
      float best = -INFINITY, second = -INFINITY;
      for (int e = g * per_group; e < (g + 1) * per_group; ++e) {
        const float c = choice[e];
        if (c > best) {
          second = best;
          best = c;
        } else if (c > second) {
          second = c;
        }
      }
      group_score[g] = per_group >= 2 ? best + second : best;
    }
    __syncthreads();
    // Keep the topk_group best groups, lower index first on ties (a stable sort's order).
    if (threadIdx.x == 0) {
      for (int g = 0; g < G; ++g) keep[g] = 0;
      for (int k = 0; k < topk_group; ++k) {
        int bi = -1;
        float bv = -INFINITY;
        for (int g = 0; g < G; ++g)
          if (!keep[g] && (bi < 0 || group_score[g] > bv)) {
            bi = g;
            bv = group_score[g];
          }
        keep[bi] = 1;
      }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x)
      if (!keep[e / per_group]) choice[e] = -INFINITY;
    __syncthreads();
    // top_k rounds of a block argmax (larger value first, then lower index).
    for (int k = 0; k < top_k; ++k) {
      float bv = -INFINITY;
      int bi = INT_MAX;
      for (int e = threadIdx.x; e < E; e += blockDim.x) {
        bool taken = false;
        for (int j = 0; j < k; ++j) taken |= chosen[j] == e;
        if (!taken && better(choice[e], e, bv, bi)) {
          bv = choice[e];
          bi = e;
        }
      }
      for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (better(ov, oi, bv, bi)) {
          bv = ov;
          bi = oi;
        }
      }
      if (lane == 0) warp_best[warp] = {bv, bi};
      __syncthreads();
      if (threadIdx.x == 0) {
        arg_best b = warp_best[0];
        for (int w = 1; w < warps; ++w)
          if (better(warp_best[w].v, warp_best[w].i, b.v, b.i)) b = warp_best[w];
        chosen[k] = b.i;
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      float sum = 0.0f;
      for (int k = 0; k < top_k; ++k) sum += sig[chosen[k]];
      const float nrm = norm ? 1.0f / (sum + 1e-20f) : 1.0f;
      for (int k = 0; k < top_k; ++k) {
        ids[t * top_k + k] = chosen[k];
        weights[t * top_k + k] = sig[chosen[k]] * nrm * scaling;
      }
    }
    __syncthreads();
  }
}

// -- stable sort of (key, index) pairs ------------------------------------------------------------------------

size_t align256(size_t b) { return (b + 255) / 256 * 256; }

int key_bits(int64_t max_key) {
  int b = 1;
  while ((int64_t(1) << b) <= max_key) ++b;
  return b;
}

size_t cub_sort_bytes(int64_t n) {
  size_t t = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, t, static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
                                  static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), int(n), 0, 32);
  return t;
}

size_t sort_temp_bytes(int64_t n) { return 3 * align256(sizeof(int32_t) * size_t(n)) + align256(cub_sort_bytes(n)); }

__global__ void iota_kernel(int32_t* v, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    v[i] = int32_t(i);
}

// Sorts keys[0..n) (each < 2^bits) with their indices, stably; returns sorted keys and indices inside temp.
void sort_with_index(const int32_t* keys, int64_t n, int bits, void* temp, int32_t** keys_out, int32_t** idx_out,
                     cudaStream_t s) {
  char* p = static_cast<char*>(temp);
  const size_t arr = align256(sizeof(int32_t) * size_t(n));
  int32_t* ko = reinterpret_cast<int32_t*>(p);
  int32_t* vi = reinterpret_cast<int32_t*>(p + arr);
  int32_t* vo = reinterpret_cast<int32_t*>(p + 2 * arr);
  void* cub_temp = p + 3 * arr;
  size_t cub_bytes = cub_sort_bytes(n);
  iota_kernel<<<grid_1d(n, 256), 256, 0, s>>>(vi, n);
  check_launch("sort(iota)");
  check(cub::DeviceRadixSort::SortPairs(cub_temp, cub_bytes, keys, ko, vi, vo, int(n), 0, bits, s), "sort(radix)");
  *keys_out = ko;
  *idx_out = vo;
}

__device__ int64_t lower_bound_dev(const int32_t* a, int64_t n, int32_t key) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (a[mid] < key)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// One block per destination row: its sources, in increasing index, added one after the other.
__global__ void scatter_add_sorted_kernel(const float* __restrict__ src, int64_t lds, const float* __restrict__ w,
                                          const int32_t* __restrict__ keys, const int32_t* __restrict__ idx, int64_t n,
                                          float* dst, int64_t ldd, int64_t dst_rows, int64_t cols) {
  for (int64_t r = blockIdx.x; r < dst_rows; r += gridDim.x) {
    const int64_t a = lower_bound_dev(keys, n, int32_t(r)), b = lower_bound_dev(keys, n, int32_t(r + 1));
    if (a == b) continue;
    float* d = dst + r * ldd;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      float acc = d[c];
      for (int64_t p = a; p < b; ++p) {
        const int64_t i = idx[p];
        const float wi = w ? w[i] : 1.0f;
        acc = __fadd_rn(acc, __fmul_rn(wi, src[i * lds + c]));
      }
      d[c] = acc;
    }
  }
}

__global__ void permute_offsets_kernel(const int32_t* __restrict__ keys, int64_t n, int64_t E, int32_t* offsets) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e <= E; e += int64_t(gridDim.x) * blockDim.x)
    offsets[e] = int32_t(e == E ? n : lower_bound_dev(keys, n, int32_t(e)));
}

__global__ void permute_rows_kernel(const int32_t* __restrict__ idx, int64_t n, int64_t top_k,
                                    const float* __restrict__ w, int32_t* rows, float* pw) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < n; p += int64_t(gridDim.x) * blockDim.x) {
    const int32_t i = idx[p];
    rows[p] = int32_t(i / top_k);
    if (pw) pw[p] = w[i];
  }
}


// -- grouped expert GEMM over permuted rows (device-side offsets: graph-safe) ------------------------------------
// C[r, :] = A[r, :] * W_e^T for every row r of expert e (rows offsets[e] .. offsets[e+1]), W_e [N, K] row-major.
// 64x64 output tiles, K in steps of 16 staged transposed in shared memory, 4x4 outputs per thread (SIMT fp32).
// A tile whose rows straddle experts is computed once per expert it touches, writing only that expert's rows.
constexpr int kGM = 64, kGN = 64, kGK = 16;

__global__ void __launch_bounds__(256) grouped_gemm_nt_kernel(const float* __restrict__ A, int64_t lda,
                                                              const float* const* __restrict__ W,
                                                              const int32_t* __restrict__ offsets, int E, int N, int K,
                                                              float* __restrict__ C, int64_t ldc) {
  __shared__ float As[kGK][kGM + 4];
  __shared__ float Ws[kGK][kGN + 4];
  const int m0 = blockIdx.y * kGM, n0 = blockIdx.x * kGN;
  const int total = offsets[E];
  if (m0 >= total) return;
  const int m1 = min(m0 + kGM, total);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  // First expert whose range reaches past m0.
  int lo = 0, hi = E;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (offsets[mid + 1] <= m0)
      lo = mid + 1;
    else
      hi = mid;
  }
  for (int e = lo; e < E && offsets[e] < m1; ++e) {
    const int r0 = max(m0, offsets[e]), r1 = min(m1, offsets[e + 1]);
    if (r0 >= r1) continue;
    const float* We = W[e];
    float acc[4][4] = {};
    for (int k0 = 0; k0 < K; k0 += kGK) {
      for (int f = threadIdx.x; f < kGM * kGK; f += 256) {
        const int i = f / kGK, kk = f % kGK, r = m0 + i, k = k0 + kk;
        As[kk][i] = (r >= r0 && r < r1 && k < K) ? A[int64_t(r) * lda + k] : 0.0f;
        const int n = n0 + i;
        Ws[kk][i] = (n < N && k < K) ? We[int64_t(n) * K + k] : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kGK; ++kk) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          a[i] = As[kk][ty * 4 + i];
          b[i] = Ws[kk][tx * 4 + i];
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = m0 + ty * 4 + i;
      if (r < r0 || r >= r1) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int n = n0 + tx * 4 + j;
        if (n < N) C[int64_t(r) * ldc + n] = acc[i][j];
      }
    }
  }
}

__global__ void grouped_silu_mul_kernel(const float* gu, int64_t ldg, const int32_t* __restrict__ offsets, int E,
                                        int64_t inter, float* out, int64_t ldo) {
  const int64_t rows = offsets[E];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* g = gu + r * ldg;
    for (int64_t i = threadIdx.x; i < inter; i += blockDim.x) {
      const float gi = g[i];
      out[r * ldo + i] = gi / (1.0f + expf(-gi)) * g[inter + i];
    }
  }
}

} // namespace

void launch_route_noaux_tc(const mat_view& logits, const float* bias, const route_params& p, int32_t* ids, float* w,
                           cudaStream_t s) {
  const int G = p.n_group < 1 ? 1 : p.n_group;
  int threads = (p.num_experts + 31) / 32 * 32;
  if (threads < 64) threads = 64;
  if (threads > 1024) threads = 1024;
  const unsigned grid = unsigned(logits.rows < 65535 * 8 ? logits.rows : 65535 * 8);
  route_kernel<<<grid, threads, 2 * sizeof(float) * size_t(p.num_experts), s>>>(
      logits.data, logits.rows, logits.ld, bias, p.num_experts, G, p.topk_group, p.top_k, p.norm_topk_prob,
      p.routed_scaling_factor, ids, w);
  check_launch("route_noaux_tc");
}

size_t scatter_add_temp_bytes(int64_t n) { return sort_temp_bytes(n); }

void launch_scatter_add_rows(const mat_view& src, const int32_t* rows, const float* w, int64_t n, const mat_view& dst,
                             void* temp, size_t, cudaStream_t s) {
  int32_t *keys = nullptr, *idx = nullptr;
  sort_with_index(rows, n, key_bits(dst.rows), temp, &keys, &idx, s);
  const int threads = src.cols >= 1024 ? 512 : src.cols >= 256 ? 256 : 64;
  const unsigned grid = unsigned(dst.rows < 65535 * 16 ? (dst.rows < 1 ? 1 : dst.rows) : 65535 * 16);
  scatter_add_sorted_kernel<<<grid, threads, 0, s>>>(src.data, src.ld, w, keys, idx, n, dst.data, dst.ld, dst.rows,
                                                     src.cols);
  check_launch("scatter_add_rows");
}

size_t moe_permute_temp_bytes(int64_t n) { return sort_temp_bytes(n); }

void launch_moe_permute(const int32_t* topk_ids, const float* topk_w, int64_t tokens, int64_t top_k,
                        int64_t num_experts, int32_t* offsets, int32_t* perm_rows, float* perm_w, void* temp,
                        cudaStream_t s) {
  const int64_t n = tokens * top_k;
  if (n == 0) {
    check(cudaMemsetAsync(offsets, 0, sizeof(int32_t) * size_t(num_experts + 1), s), "moe_permute(offsets)");
    return;
  }
  int32_t *keys = nullptr, *idx = nullptr;
  sort_with_index(topk_ids, n, key_bits(num_experts), temp, &keys, &idx, s);
  permute_offsets_kernel<<<grid_1d(num_experts + 1, 256), 256, 0, s>>>(keys, n, num_experts, offsets);
  check_launch("moe_permute(offsets)");
  permute_rows_kernel<<<grid_1d(n, 256), 256, 0, s>>>(idx, n, top_k, topk_w, perm_rows, topk_w ? perm_w : nullptr);
  check_launch("moe_permute(rows)");
}

void launch_grouped_expert_ffn(const int32_t* offsets, int64_t E, const float* const* gate_up_w,
                               const float* const* down_w, int64_t hidden, int64_t inter, int64_t max_rows,
                               const mat_view& x, float* gu, float* act, const mat_view& y, cudaStream_t s) {
  const unsigned mt = unsigned((max_rows + kGM - 1) / kGM);
  grouped_gemm_nt_kernel<<<dim3(unsigned((2 * inter + kGN - 1) / kGN), mt), 256, 0, s>>>(
      x.data, x.ld, gate_up_w, offsets, int(E), int(2 * inter), int(hidden), gu, 2 * inter);
  check_launch("grouped_expert_ffn(gate_up)");
  grouped_silu_mul_kernel<<<unsigned(max_rows < 65535 ? (max_rows < 1 ? 1 : max_rows) : 65535), 256, 0, s>>>(
      gu, 2 * inter, offsets, int(E), inter, act, inter);
  check_launch("grouped_expert_ffn(silu_mul)");
  grouped_gemm_nt_kernel<<<dim3(unsigned((hidden + kGN - 1) / kGN), mt), 256, 0, s>>>(
      act, inter, down_w, offsets, int(E), int(hidden), int(inter), y.data, y.ld);
  check_launch("grouped_expert_ffn(down)");
}

} // namespace petrel::kernels::cudabe
