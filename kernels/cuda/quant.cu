// Per-token 1x128 fp8 e4m3 activation quantisation.
// Layout: x bf16 [rows, K] -> q e4m3 [rows, K] + scales float [K/128][scale_ld(rows)] (fp8_layout.hpp).
// Bound: memory (3 bytes per element + scales); one warp per (row, 128-block): every lane loads
// 4 bf16 (8 bytes), so a warp reads 256 contiguous bytes and writes 128 contiguous bytes.
#include "kernels/cuda/quant.hpp"

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <string>

#include "kernels/cuda/fp8_warp_quant.cuh"

namespace petrel::cuda {
namespace {

// -- constants --------------------------------------------------------------------------
constexpr int rows_per_cta = 8; // one warp per row, 256 threads

// -- kernel -----------------------------------------------------------------------------
__global__ void __launch_bounds__(rows_per_cta * 32)
quantize_1x128_kernel(const __nv_bfloat16* __restrict__ x, std::int64_t rows, std::int64_t k,
                      std::int64_t scale_ld, std::uint8_t* __restrict__ q, float* __restrict__ scales) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * rows_per_cta + warp;
  const std::int64_t kb = blockIdx.y;
  if (row >= rows) return;
  const std::int64_t offset = row * k + kb * fp8_block + lane * 4;
  const uint2 raw = *reinterpret_cast<const uint2*>(x + offset);
  const float2 v01 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
  const float2 v23 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
  const float scale = quantize_block_1x128(make_float4(v01.x, v01.y, v23.x, v23.y), q + offset);
  if (lane == 0) scales[kb * scale_ld + row] = scale;
}

} // namespace

// -- launcher ---------------------------------------------------------------------------
kernel_status quantize_bf16_to_fp8_1x128(const void* x_bf16, std::int64_t rows, std::int64_t k,
                                         void* x_fp8, float* scales, cudaStream_t stream) {
  if (rows < 0) return kernel_status::failure("quantize_bf16_to_fp8_1x128: rows must be >= 0");
  if (k <= 0 || k % fp8_block != 0)
    return kernel_status::failure("quantize_bf16_to_fp8_1x128: k=" + std::to_string(k) + " must be a positive multiple of 128");
  if (rows == 0) return kernel_status::success();
  if (!x_bf16 || !x_fp8 || !scales) return kernel_status::failure("quantize_bf16_to_fp8_1x128: null pointer");
  const dim3 grid(static_cast<unsigned>((rows + rows_per_cta - 1) / rows_per_cta), static_cast<unsigned>(k / fp8_block));
  quantize_1x128_kernel<<<grid, rows_per_cta * 32, 0, stream>>>(static_cast<const __nv_bfloat16*>(x_bf16), rows, k,
                                                                 fp8_scale_ld(rows), static_cast<std::uint8_t*>(x_fp8), scales);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return kernel_status::failure(std::string("quantize_bf16_to_fp8_1x128: ") + cudaGetErrorString(err));
  return kernel_status::success();
}

} // namespace petrel::cuda
