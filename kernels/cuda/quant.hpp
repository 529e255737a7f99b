// Per-token 1x128 fp8 e4m3 activation quantisation (host wrapper; kernel in quant.cu).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "kernels/cuda/fp8_layout.hpp"

namespace petrel::cuda {

/// Quantises bf16 activations x [rows, k] (row-major, k % 128 == 0) to fp8 e4m3 x_fp8 [rows, k] and
/// float scales [k/128][fp8_scale_ld(rows)] (see fp8_layout.hpp). Scale = max(amax, 1e-4) / 448 per
/// 128-wide block of a row; q = x / scale, rounded to nearest even and saturated to +-448.
/// Memory-bound: reads 2 bytes and writes 1 byte (+ 4/128) per element.
kernel_status quantize_bf16_to_fp8_1x128(const void* x_bf16, std::int64_t rows, std::int64_t k,
                                         void* x_fp8, float* scales, cudaStream_t stream);

} // namespace petrel::cuda
