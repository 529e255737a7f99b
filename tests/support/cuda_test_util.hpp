// Test support for the CUDA suites: is a GPU there, and host-side bf16 and fp8 e4m3 conversions (round to nearest even),
// shared by tests/unit/test_cuda_*.cpp. Only included where PETREL_HAVE_CUDA is defined.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

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

/// fp8 e4m3 code -> float (NaN for the one NaN code; no infinities in e4m3).
inline float e4m3_to_float(std::uint8_t code) {
  const int sign = code >> 7, exponent = (code >> 3) & 0xF, mantissa = code & 7;
  if (exponent == 0xF && mantissa == 7) return NAN;
  const float magnitude = exponent == 0 ? std::ldexp(static_cast<float>(mantissa), -9)
                                        : std::ldexp(1.0f + mantissa / 8.0f, exponent - 7);
  return sign ? -magnitude : magnitude;
}

/// float -> fp8 e4m3: round to nearest, ties to even, saturating at 448 (what __NV_SATFINITE does).
inline std::uint8_t float_to_e4m3(float v) {
  static const std::vector<float> positive = [] {
    std::vector<float> t(0x7F);
    for (int c = 0; c < 0x7F; ++c) t[c] = e4m3_to_float(static_cast<std::uint8_t>(c));
    return t;
  }();
  const std::uint8_t sign = std::signbit(v) ? 0x80 : 0;
  const float a = std::fabs(v);
  if (a >= 448.0f) return sign | 0x7E;
  const auto it = std::lower_bound(positive.begin(), positive.end(), a);
  const int hi = static_cast<int>(it - positive.begin());
  if (hi == 0) return sign;
  const int lo = hi - 1;
  const float dlo = a - positive[lo], dhi = positive[hi] - a;
  const int code = dlo < dhi ? lo : dhi < dlo ? hi : (lo % 2 == 0 ? lo : hi);
  return sign | static_cast<std::uint8_t>(code);
}

} // namespace petrel::test
