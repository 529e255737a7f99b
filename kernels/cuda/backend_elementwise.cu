// cuda backend, row-wise ops: embedding, RMSNorm, add, SwiGLU, RoPE, KV store/gather, row gathers.
// Layout: fp32 row-major views with a leading dimension (runtime/tensor.hpp). All of these are memory bound:
// one block per row (grid-stride over rows), threads over columns, coalesced; no host loops.
#include <cmath>

#include "kernels/cuda/cuda_backend_internal.cuh"

namespace petrel::kernels::cudabe {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_sum(float v) {
  __shared__ float part[32];
  __shared__ float total;
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) part[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float t = lane < int(blockDim.x >> 5) ? part[lane] : 0.0f;
    t = warp_sum(t);
    if (lane == 0) total = t;
  }
  __syncthreads();
  float r = total;
  __syncthreads(); // part/total are reused by the next call
  return r;
}

__global__ void embedding_kernel(const int32_t* __restrict__ ids, int64_t n, const float* __restrict__ table,
                                 int64_t hidden, float* __restrict__ out) {
  for (int64_t t = blockIdx.x; t < n; t += gridDim.x) {
    const float* src = table + int64_t(ids[t]) * hidden;
    float* dst = out + t * hidden;
    for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = src[i];
  }
}

__global__ void rmsnorm_kernel(const float* x, int64_t rows, int64_t cols, int64_t ldx, const float* __restrict__ w,
                               float eps, float* out, int64_t ldo) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* xr = x + r * ldx;
    float* yr = out + r * ldo;
    float ss = 0.0f;
    for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss);
    const float inv = 1.0f / sqrtf(ss / float(cols) + eps);
    // Each thread rewrites exactly the columns it read, so out may alias x.
    for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) yr[i] = w[i] * (xr[i] * inv);
  }
}

__global__ void add_kernel(float* x, int64_t rows, int64_t cols, int64_t ldx, const float* y, int64_t ldy) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x)
    for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) x[r * ldx + i] += y[r * ldy + i];
}

__global__ void scale_kernel(float* c, int64_t rows, int64_t cols, int64_t ldc, float beta) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x)
    for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) c[r * ldc + i] = beta == 0.0f ? 0.0f : beta * c[r * ldc + i];
}

__global__ void silu_mul_kernel(const float* gu, int64_t rows, int64_t ldg, int64_t inter, float* out, int64_t ldo) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* g = gu + r * ldg;
    const float* u = g + inter;
    float* o = out + r * ldo;
    for (int64_t i = threadIdx.x; i < inter; i += blockDim.x) {
      const float gi = g[i];
      o[i] = gi / (1.0f + expf(-gi)) * u[i];
    }
  }
}

__global__ void rope_cos_sin_kernel(const int32_t* __restrict__ pos, int64_t n, const float* __restrict__ inv_freq,
                                    int64_t rope_dim, float af, float* __restrict__ cs) {
  const int64_t half = rope_dim / 2, total = n * half;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < total; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = k / half, i = k % half;
    const float angle = __fmul_rn(float(pos[r]), inv_freq[i]); // the fp32 product, as the reference computes it
    cs[r * rope_dim + i] = cosf(angle) * af;
    cs[r * rope_dim + half + i] = sinf(angle) * af;
  }
}

__global__ void rope_interleaved_kernel(float* x, int64_t rows, int64_t ld, int64_t heads, int64_t head_stride,
                                        int64_t offset, int64_t rope_dim, const float* __restrict__ cs) {
  const int64_t half = rope_dim / 2, total = rows * heads * half;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < total; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = k % half, rh = k / half, h = rh % heads, r = rh / heads;
    float* p = x + r * ld + h * head_stride + offset + 2 * i;
    const float c = cs[r * rope_dim + i], s = cs[r * rope_dim + half + i];
    const float x0 = p[0], x1 = p[1];
    p[0] = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
    p[1] = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(x0, s));
  }
}

__global__ void kv_copy_kernel(float* base, int64_t floats_per_page, int32_t page_size, int32_t entry, int32_t layer,
                               const int32_t* __restrict__ slots, int64_t n, float* rows, int64_t ld, bool store) {
  for (int64_t t = blockIdx.x; t < n; t += gridDim.x) {
    const int64_t slot = slots[t];
    if (slot < 0) continue; // padding row of a fixed-layout decode step (kv_store only)
    float* e = base + (slot / page_size) * floats_per_page + (int64_t(layer) * page_size + slot % page_size) * entry;
    float* r = rows + t * ld;
    if (store)
      for (int i = threadIdx.x; i < entry; i += blockDim.x) e[i] = r[i];
    else
      for (int i = threadIdx.x; i < entry; i += blockDim.x) r[i] = e[i];
  }
}

__global__ void copy_rows_kernel(const float* src, int64_t lds, const int32_t* __restrict__ src_idx, float* dst,
                                 int64_t ldd, const int32_t* __restrict__ dst_idx, int64_t n, int64_t cols) {
  for (int64_t t = blockIdx.x; t < n; t += gridDim.x) {
    const float* s = src + (src_idx ? int64_t(src_idx[t]) : t) * lds;
    float* d = dst + (dst_idx ? int64_t(dst_idx[t]) : t) * ldd;
    for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) d[i] = s[i];
  }
}

unsigned row_grid(int64_t rows) { return unsigned(rows < 65535LL * 16 ? (rows < 1 ? 1 : rows) : 65535LL * 16); }
int col_threads(int64_t cols) { return cols >= 1024 ? 512 : cols >= 256 ? 256 : cols >= 96 ? 128 : 64; }

} // namespace

void launch_embedding(const int32_t* ids, int64_t n, const float* table, int64_t hidden, float* out, cudaStream_t s) {
  embedding_kernel<<<row_grid(n), col_threads(hidden), 0, s>>>(ids, n, table, hidden, out);
  check_launch("embedding");
}

void launch_rmsnorm(const mat_view& x, const float* w, float eps, const mat_view& out, cudaStream_t s) {
  rmsnorm_kernel<<<row_grid(x.rows), col_threads(x.cols), 0, s>>>(x.data, x.rows, x.cols, x.ld, w, eps, out.data,
                                                                   out.ld);
  check_launch("rmsnorm");
}

void launch_add_inplace(const mat_view& x, const mat_view& y, cudaStream_t s) {
  add_kernel<<<row_grid(x.rows), col_threads(x.cols), 0, s>>>(x.data, x.rows, x.cols, x.ld, y.data, y.ld);
  check_launch("add_inplace");
}

void launch_scale_mat(const mat_view& c, float beta, cudaStream_t s) {
  scale_kernel<<<row_grid(c.rows), col_threads(c.cols), 0, s>>>(c.data, c.rows, c.cols, c.ld, beta);
  check_launch("gemm(k=0)");
}

void launch_silu_mul(const mat_view& gu, int64_t inter, const mat_view& out, cudaStream_t s) {
  silu_mul_kernel<<<row_grid(gu.rows), col_threads(inter), 0, s>>>(gu.data, gu.rows, gu.ld, inter, out.data, out.ld);
  check_launch("silu_mul");
}

void launch_rope_cos_sin(const int32_t* pos, int64_t n, const float* inv_freq, int64_t rope_dim, float af, float* cs,
                         cudaStream_t s) {
  rope_cos_sin_kernel<<<grid_1d(n * (rope_dim / 2), kThreads), kThreads, 0, s>>>(pos, n, inv_freq, rope_dim, af, cs);
  check_launch("rope_cos_sin");
}

void launch_rope_interleaved(const mat_view& x, int64_t heads, int64_t head_stride, int64_t offset, int64_t rope_dim,
                             const float* cs, cudaStream_t s) {
  rope_interleaved_kernel<<<grid_1d(x.rows * heads * (rope_dim / 2), kThreads), kThreads, 0, s>>>(
      x.data, x.rows, x.ld, heads, head_stride, offset, rope_dim, cs);
  check_launch("rope_interleaved");
}

void launch_kv_copy(const kv_pool_geometry& pool, int32_t layer, const int32_t* slots, int64_t n, const mat_view& rows,
                    bool store, cudaStream_t s) {
  kv_copy_kernel<<<row_grid(n), col_threads(pool.entry_floats), 0, s>>>(
      pool.base, pool.floats_per_page(), pool.page_size, pool.entry_floats, layer, slots, n, rows.data, rows.ld, store);
  check_launch(store ? "kv_store" : "kv_gather");
}

void launch_copy_rows(const mat_view& src, const int32_t* src_idx, const mat_view& dst, const int32_t* dst_idx,
                      int64_t n, cudaStream_t s) {
  copy_rows_kernel<<<row_grid(n), col_threads(src.cols), 0, s>>>(src.data, src.ld, src_idx, dst.data, dst.ld, dst_idx,
                                                                 n, src.cols);
  check_launch(src_idx ? "gather_rows" : "scatter_rows");
}

} // namespace petrel::kernels::cudabe
