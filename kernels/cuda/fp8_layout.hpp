// Constants and data layouts shared by Petrel's fp8 CUDA kernels (quant, gemm_fp8, grouped_gemm_fp8).
// Plain C++: included from .cu files and from host code alike; never includes CAF.
//
// Layouts (all row-major, K innermost for every fp8 operand: the "nt" GEMM form D = A x B^T):
//   activations A   fp8 e4m3 [rows, K]
//   A scales        float   [K/128][scale_ld(rows)]  -- one scale per (row, 128-wide K block), stored
//                   K-block major with the rows contiguous ("transposed"), so that the 128 scales a
//                   128-row tile needs for one K block are one 512-byte TMA box, and so that it is the
//                   layout cuBLASLt's CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F expects when rows % 4 == 0.
//   weights B       fp8 e4m3 [groups, N, K]
//   B scales        float   [groups, ceil(N/128), K/128] (DeepSeek's weight_scale_inv, row-major)
//   output D        bf16    [rows, N]
// Quantisation of activations: per (row, 128-block) amax floored at 1e-4, scale = amax / 448, q = x / scale.
#pragma once

#include <cstdint>
#include <string>

namespace petrel::cuda {

// -- constants --------------------------------------------------------------------------

/// Width of a quantisation block along K, and the side of a weight scale block.
constexpr int fp8_block = 128;
/// Largest finite e4m3 magnitude.
constexpr float fp8_e4m3_max = 448.0f;
/// Floor of a block's amax before it becomes a scale (avoids dividing by zero on all-zero blocks).
constexpr float fp8_amax_floor = 1e-4f;

// -- layout helpers ---------------------------------------------------------------------

/// Leading dimension (in floats) of the activation scale matrix for `rows` rows: rounded up to 4 so
/// that every K block's row of scales starts 16-byte aligned (a TMA requirement).
constexpr std::int64_t fp8_scale_ld(std::int64_t rows) { return (rows + 3) / 4 * 4; }

/// Number of floats in the activation scale matrix of a [rows, k] activation.
constexpr std::int64_t fp8_act_scale_count(std::int64_t rows, std::int64_t k) {
  return (k / fp8_block) * fp8_scale_ld(rows);
}

/// Number of floats in the weight scale tensor of `groups` [n, k] weights.
constexpr std::int64_t fp8_weight_scale_count(std::int64_t groups, std::int64_t n, std::int64_t k) {
  return groups * ((n + fp8_block - 1) / fp8_block) * (k / fp8_block);
}

// -- status -----------------------------------------------------------------------------

/// Result of a host wrapper: empty message means success. Bad shapes and CUDA errors come back
/// as a message naming the argument, never as a crash.
struct kernel_status {
  std::string message;
  bool ok() const { return message.empty(); }
  static kernel_status success() { return {}; }
  static kernel_status failure(std::string why) { return kernel_status{std::move(why)}; }
};

} // namespace petrel::cuda
