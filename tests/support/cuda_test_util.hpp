// Test support for the CUDA suites: is a GPU there, and host-side bf16 conversions (round to nearest even),
// shared by tests/unit/test_cuda_*.cpp. Only included where PETREL_HAVE_CUDA is defined.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>

namespace petrel::test {

/// True when a CUDA device can be used; the GPU suites skip their cases otherwise.
inline bool gpu_available() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

/// float -> bf16 bits, rounding to nearest even (what the kernels' __float2bfloat16 does for finite values).
inline std::uint16_t float_to_bf16(float v) {
  std::uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits += 0x7FFF + ((bits >> 16) & 1);
  return static_cast<std::uint16_t>(bits >> 16);
}

inline float bf16_to_float(std::uint16_t b) {
  const std::uint32_t bits = static_cast<std::uint32_t>(b) << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

} // namespace petrel::test
