// Device-side helpers to check and benchmark the fp8 GEMMs at full size: deterministic random inputs,
// a plain fp32 reference GEMM (dequantise, multiply, no tensor cores) and an error reduction.
// The small-shape CPU reference lives in tests/unit/test_cuda_gemm.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "kernels/cuda/fp8_layout.hpp"

namespace petrel::cuda {

/// Fills bf16 x[count] with values in (-1, 1) times a per-row magnitude in [0.25, 4) (row = i / row_len),
/// deterministic in `seed`.
kernel_status fill_random_bf16(void* x, std::int64_t count, std::int64_t row_len, std::uint64_t seed, cudaStream_t stream);
/// Fills e4m3 w[count] with finite values spread over (-448, 448).
kernel_status fill_random_fp8(void* w, std::int64_t count, std::uint64_t seed, cudaStream_t stream);
/// Fills float s[count] with values in [lo, hi).
kernel_status fill_random_float(float* s, std::int64_t count, float lo, float hi, std::uint64_t seed, cudaStream_t stream);

/// Reference: ref[r, c] = sum_k dequant(A)[r, k] * dequant(B[g])[c, k] in fp32, for rows whose
/// row_group[r] = g >= 0; rows with -1 get 0. All rows of one 64-row block must share a group
/// (block_group[r / 64], -1 = whole block skipped). Layouts as in fp8_layout.hpp.
kernel_status reference_fp8_gemm_nt(const void* a_fp8, const float* a_scales, std::int64_t rows, const void* b_fp8,
                                    const float* b_scales, std::int64_t n, std::int64_t k, const int* row_group,
                                    const int* block_group, float* ref, cudaStream_t stream);

/// dst[c, r] = src[r, c] for a bf16 [rows, cols] matrix (to compare a transposed cuBLASLt result).
kernel_status transpose_bf16(const void* src, std::int64_t rows, std::int64_t cols, void* dst, cudaStream_t stream);

/// Error of a bf16 result against the fp32 reference over the rows with row_group[r] >= 0.
struct gemm_error {
  double rel_l2 = 0;        // ||d - ref|| / ||ref||
  double max_abs_err = 0;   // max |d - ref|
  double max_abs_ref = 0;   // max |ref|
  std::int64_t non_finite = 0;
  double max_rel() const { return max_abs_ref > 0 ? max_abs_err / max_abs_ref : max_abs_err; }
};
kernel_status compare_bf16_to_reference(const void* d_bf16, const float* ref, std::int64_t rows, std::int64_t n,
                                        const int* row_group, gemm_error* out, cudaStream_t stream);

} // namespace petrel::cuda
