// Device helpers shared by the kernels that quantise activations to fp8 1x128 (quant.cu, ep_a2a.cu's low-latency
// send, the GPU expert plane) and by others that need a warp max. One arithmetic, so every producer of fp8 rows
// writes the same bytes for the same values: amax over the 128-wide block floored at fp8_amax_floor, scale =
// amax / 448, q = x / scale with an IEEE (correctly rounded) divide, so a CPU reference doing the same fp32
// operations matches bit for bit, saturated to e4m3.
#pragma once

#include <cuda_fp8.h>

#include <cstdint>

#include "kernels/cuda/fp8_layout.hpp"

namespace petrel::cuda {

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

/// One warp quantises one 128-wide block; each lane holds its 4 consecutive elements in `v` and gets its 4 e4m3
/// bytes written to `q4` (4-byte aligned). Returns the block's scale (on every lane).
__device__ __forceinline__ float quantize_block_1x128(float4 v, std::uint8_t* q4) {
  float amax = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
  amax = fmaxf(warp_max(amax), fp8_amax_floor);
  const float scale = amax / fp8_e4m3_max;
  const __nv_fp8x2_storage_t lo =
      __nv_cvt_float2_to_fp8x2(make_float2(__fdiv_rn(v.x, scale), __fdiv_rn(v.y, scale)), __NV_SATFINITE, __NV_E4M3);
  const __nv_fp8x2_storage_t hi =
      __nv_cvt_float2_to_fp8x2(make_float2(__fdiv_rn(v.z, scale), __fdiv_rn(v.w, scale)), __NV_SATFINITE, __NV_E4M3);
  *reinterpret_cast<std::uint32_t*>(q4) = std::uint32_t(lo) | (std::uint32_t(hi) << 16);
  return scale;
}

} // namespace petrel::cuda
