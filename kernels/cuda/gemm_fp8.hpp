// Dense fp8 block-scaled GEMM through cuBLASLt: the baseline Petrel's own kernels are measured against.
#pragma once

#include <cstdint>
#include <memory>

#include <cuda_runtime_api.h>

#include "kernels/cuda/fp8_layout.hpp"

namespace petrel::cuda {

/// One planned cuBLASLt fp8 GEMM of a fixed shape: D[m, n] (bf16) = A[m, k] (e4m3, 1x128 scales,
/// CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F) x B[n, k]^T (e4m3, 128x128 scales, BLK128x128_32F).
/// Layouts as in fp8_layout.hpp; cuBLASLt needs m % 4 == 0 (its scale leading dimension is m),
/// k % 512 == 0 (it pads weight-scale rows to 4 blocks) and n % 16 == 0. Planning picks the heuristic's best algorithm once; run() only
/// sets the pointers and launches, so it is cheap enough to time and to call in a loop.
class cublaslt_fp8_gemm_nt {
public:
  /// Creates the plan; check ok() / error() before running.
  cublaslt_fp8_gemm_nt(std::int64_t m, std::int64_t n, std::int64_t k);
  ~cublaslt_fp8_gemm_nt();
  cublaslt_fp8_gemm_nt(const cublaslt_fp8_gemm_nt&) = delete;
  cublaslt_fp8_gemm_nt& operator=(const cublaslt_fp8_gemm_nt&) = delete;

  bool ok() const;
  /// True when cuBLASLt had no algorithm for the row-major order and the plan writes D as [n, m]
  /// (activation as cuBLAS's A). Same FLOPs and bytes; callers that need [m, n] must transpose.
  bool output_transposed() const;
  const std::string& error() const;

  /// Enqueues the GEMM on `stream`. `a_scales` is [k/128][m], `b_scales` [ceil(n/128)][k/128].
  kernel_status run(const void* a_fp8, const float* a_scales, const void* b_fp8, const float* b_scales,
                    void* d_bf16, cudaStream_t stream);

private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

/// cuBLASLt's version as loaded at run time (e.g. 130100 for 13.1.0).
std::size_t cublaslt_version();

} // namespace petrel::cuda
