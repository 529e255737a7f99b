// Full-size checking helpers for the fp8 GEMMs: random inputs, a tiled fp32 reference GEMM and an
// error reduction. Bound: the reference is a plain CUDA-core fp32 GEMM (a few TFLOPS), fine for checks.
#include "kernels/cuda/fp8_reference.hpp"

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cmath>
#include <string>

namespace petrel::cuda {
namespace {

// -- constants --------------------------------------------------------------------------
constexpr int ref_tile = 64;  // 64 x 64 outputs per CTA, 4 x 4 per thread
constexpr int ref_k = 32;

// -- device helpers ---------------------------------------------------------------------
__device__ __forceinline__ std::uint64_t mix(std::uint64_t x) {
  x ^= x >> 33; x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return x;
}
__device__ __forceinline__ float uniform01(std::uint64_t i, std::uint64_t seed) {
  return static_cast<float>(mix(i * 0x9E3779B97F4A7C15ull + seed) >> 40) * (1.0f / 16777216.0f);
}
__device__ __forceinline__ float fp8_to_float(std::uint8_t v) {
  __nv_fp8_e4m3 x;
  x.__x = v;
  return static_cast<float>(x);
}

// -- kernels ----------------------------------------------------------------------------
__global__ void fill_bf16_kernel(__nv_bfloat16* x, std::int64_t count, std::int64_t row_len, std::uint64_t seed) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const float magnitude = 0.25f * exp2f(4.0f * uniform01(i / row_len, seed ^ 0xabcdefull));
    x[i] = __float2bfloat16((2.0f * uniform01(i, seed) - 1.0f) * magnitude);
  }
}

__global__ void fill_fp8_kernel(std::uint8_t* w, std::int64_t count, std::uint64_t seed) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const float v = (2.0f * uniform01(i, seed) - 1.0f) * 440.0f;
    w[i] = __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
  }
}

__global__ void fill_float_kernel(float* s, std::int64_t count, float lo, float hi, std::uint64_t seed) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    s[i] = lo + (hi - lo) * uniform01(i, seed);
}

__global__ void __launch_bounds__(256)
reference_kernel(const std::uint8_t* __restrict__ a, const float* __restrict__ sa, std::int64_t rows, std::int64_t ld,
                 const std::uint8_t* __restrict__ b, const float* __restrict__ sb, int n, int k,
                 const int* __restrict__ row_group, const int* __restrict__ block_group, float* __restrict__ ref) {
  __shared__ float as[ref_k][ref_tile + 1];
  __shared__ float bs[ref_k][ref_tile + 1];
  const std::int64_t row0 = static_cast<std::int64_t>(blockIdx.y) * ref_tile;
  const int col0 = blockIdx.x * ref_tile;
  const int g = block_group[blockIdx.y];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int k_blocks = k / fp8_block;
  const int n_scale_blocks = (n + fp8_block - 1) / fp8_block;
  float acc[4][4] = {};
  if (g >= 0) {
    for (int k0 = 0; k0 < k; k0 += ref_k) {
      const int kb = k0 / fp8_block;
      for (int i = threadIdx.x; i < ref_tile * ref_k; i += 256) {
        const int r = i / ref_k, kk = i % ref_k;
        const std::int64_t row = row0 + r;
        as[kk][r] = row < rows ? fp8_to_float(a[row * k + k0 + kk]) * sa[kb * ld + row] : 0.0f;
        const int col = col0 + r;
        bs[kk][r] = col < n ? fp8_to_float(b[(static_cast<std::int64_t>(g) * n + col) * k + k0 + kk]) *
                                  sb[(static_cast<std::int64_t>(g) * n_scale_blocks + col / fp8_block) * k_blocks + kb]
                            : 0.0f;
      }
      __syncthreads();
#pragma unroll 4
      for (int kk = 0; kk < ref_k; ++kk) {
        float av[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) { av[i] = as[kk][ty * 4 + i]; bv[i] = bs[kk][tx * 4 + i]; }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      }
      __syncthreads();
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const std::int64_t row = row0 + ty * 4 + i;
    if (row >= rows) continue;
    const bool valid = row_group[row] >= 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int col = col0 + tx * 4 + j;
      if (col < n) ref[row * n + col] = valid ? acc[i][j] : 0.0f;
    }
  }
}

__device__ __forceinline__ void atomic_max_nonneg(double* addr, double v) {
  // Non-negative doubles order like their bit patterns as signed 64-bit integers.
  atomicMax(reinterpret_cast<unsigned long long*>(addr), static_cast<unsigned long long>(__double_as_longlong(v)));
}

__global__ void compare_kernel(const __nv_bfloat16* __restrict__ d, const float* __restrict__ ref, std::int64_t rows,
                               std::int64_t n, const int* __restrict__ row_group, double* sums /* [4] */,
                               unsigned long long* non_finite) {
  double err2 = 0, ref2 = 0, max_err = 0, max_ref = 0;
  unsigned long long bad = 0;
  const std::int64_t total = rows * n;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    if (row_group[i / n] < 0) continue;
    const float x = __bfloat162float(d[i]);
    const float r = ref[i];
    if (!isfinite(x)) { ++bad; continue; }
    const double e = static_cast<double>(x) - r;
    err2 += e * e;
    ref2 += static_cast<double>(r) * r;
    max_err = fmax(max_err, fabs(e));
    max_ref = fmax(max_ref, fabs(static_cast<double>(r)));
  }
  for (int o = 16; o > 0; o >>= 1) {
    err2 += __shfl_xor_sync(0xffffffffu, err2, o);
    ref2 += __shfl_xor_sync(0xffffffffu, ref2, o);
    max_err = fmax(max_err, __shfl_xor_sync(0xffffffffu, max_err, o));
    max_ref = fmax(max_ref, __shfl_xor_sync(0xffffffffu, max_ref, o));
    bad += __shfl_xor_sync(0xffffffffu, bad, o);
  }
  if (threadIdx.x % 32 == 0) {
    atomicAdd(&sums[0], err2);
    atomicAdd(&sums[1], ref2);
    atomic_max_nonneg(&sums[2], max_err);
    atomic_max_nonneg(&sums[3], max_ref);
    atomicAdd(non_finite, bad);
  }
}

__global__ void transpose_kernel(const std::uint16_t* __restrict__ src, std::int64_t rows, std::int64_t cols,
                                 std::uint16_t* __restrict__ dst) {
  __shared__ std::uint16_t tile[32][33];
  const std::int64_t r0 = static_cast<std::int64_t>(blockIdx.y) * 32, c0 = static_cast<std::int64_t>(blockIdx.x) * 32;
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    const std::int64_t r = r0 + i, c = c0 + threadIdx.x;
    if (r < rows && c < cols) tile[i][threadIdx.x] = src[r * cols + c];
  }
  __syncthreads();
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    const std::int64_t c = c0 + i, r = r0 + threadIdx.x;
    if (r < rows && c < cols) dst[c * rows + r] = tile[threadIdx.x][i];
  }
}

kernel_status last_error(const char* who) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return kernel_status::failure(std::string(who) + ": " + cudaGetErrorString(err));
  return kernel_status::success();
}

constexpr int fill_grid = 132 * 8;

} // namespace

kernel_status fill_random_bf16(void* x, std::int64_t count, std::int64_t row_len, std::uint64_t seed, cudaStream_t stream) {
  if (count <= 0) return kernel_status::success();
  fill_bf16_kernel<<<fill_grid, 256, 0, stream>>>(static_cast<__nv_bfloat16*>(x), count, row_len > 0 ? row_len : 1, seed);
  return last_error("fill_random_bf16");
}

kernel_status fill_random_fp8(void* w, std::int64_t count, std::uint64_t seed, cudaStream_t stream) {
  if (count <= 0) return kernel_status::success();
  fill_fp8_kernel<<<fill_grid, 256, 0, stream>>>(static_cast<std::uint8_t*>(w), count, seed);
  return last_error("fill_random_fp8");
}

kernel_status fill_random_float(float* s, std::int64_t count, float lo, float hi, std::uint64_t seed, cudaStream_t stream) {
  if (count <= 0) return kernel_status::success();
  fill_float_kernel<<<fill_grid, 256, 0, stream>>>(s, count, lo, hi, seed);
  return last_error("fill_random_float");
}

kernel_status reference_fp8_gemm_nt(const void* a_fp8, const float* a_scales, std::int64_t rows, const void* b_fp8,
                                    const float* b_scales, std::int64_t n, std::int64_t k, const int* row_group,
                                    const int* block_group, float* ref, cudaStream_t stream) {
  if (rows <= 0) return kernel_status::success();
  if (k % fp8_block != 0) return kernel_status::failure("reference_fp8_gemm_nt: k must be a multiple of 128");
  const dim3 grid(static_cast<unsigned>((n + ref_tile - 1) / ref_tile), static_cast<unsigned>((rows + ref_tile - 1) / ref_tile));
  reference_kernel<<<grid, 256, 0, stream>>>(static_cast<const std::uint8_t*>(a_fp8), a_scales, rows, fp8_scale_ld(rows),
                                            static_cast<const std::uint8_t*>(b_fp8), b_scales, static_cast<int>(n),
                                            static_cast<int>(k), row_group, block_group, ref);
  return last_error("reference_fp8_gemm_nt");
}

kernel_status transpose_bf16(const void* src, std::int64_t rows, std::int64_t cols, void* dst, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return kernel_status::success();
  const dim3 grid(static_cast<unsigned>((cols + 31) / 32), static_cast<unsigned>((rows + 31) / 32));
  transpose_kernel<<<grid, dim3(32, 8), 0, stream>>>(static_cast<const std::uint16_t*>(src), rows, cols,
                                                      static_cast<std::uint16_t*>(dst));
  return last_error("transpose_bf16");
}

kernel_status compare_bf16_to_reference(const void* d_bf16, const float* ref, std::int64_t rows, std::int64_t n,
                                        const int* row_group, gemm_error* out, cudaStream_t stream) {
  double* sums = nullptr;
  if (cudaMalloc(&sums, 4 * sizeof(double) + sizeof(unsigned long long)) != cudaSuccess)
    return kernel_status::failure("compare_bf16_to_reference: cudaMalloc failed");
  auto* bad = reinterpret_cast<unsigned long long*>(sums + 4);
  cudaMemsetAsync(sums, 0, 4 * sizeof(double) + sizeof(unsigned long long), stream);
  compare_kernel<<<fill_grid, 256, 0, stream>>>(static_cast<const __nv_bfloat16*>(d_bf16), ref, rows, n, row_group, sums, bad);
  double host[4] = {};
  unsigned long long host_bad = 0;
  cudaMemcpyAsync(host, sums, sizeof(host), cudaMemcpyDeviceToHost, stream);
  cudaMemcpyAsync(&host_bad, bad, sizeof(host_bad), cudaMemcpyDeviceToHost, stream);
  const cudaError_t err = cudaStreamSynchronize(stream);
  cudaFree(sums);
  if (err != cudaSuccess) return kernel_status::failure(std::string("compare_bf16_to_reference: ") + cudaGetErrorString(err));
  out->rel_l2 = host[1] > 0 ? std::sqrt(host[0] / host[1]) : std::sqrt(host[0]);
  out->max_abs_err = host[2];
  out->max_abs_ref = host[3];
  out->non_finite = static_cast<std::int64_t>(host_bad);
  return kernel_status::success();
}

} // namespace petrel::cuda
