// Petrel's own fp8 block-scaled GEMMs for sm_90a (wgmma + TMA): dense and grouped (MoE experts).
// All compute D[bf16] = A[e4m3, 1x128 scales] x B[e4m3, 128x128 scales]^T ("nt": both K-major), with
// fp32 accumulation promoted per 128-wide K block. Layouts: fp8_layout.hpp. Design: docs/cuda-kernels.md.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "kernels/cuda/fp8_layout.hpp"

namespace petrel::cuda {

/// Dense: D[m, n] = A[m, k] x B[n, k]^T. a_scales [k/128][fp8_scale_ld(m)], b_scales [ceil(n/128)][k/128].
/// Any m >= 0; n % 8 == 0; k % 128 == 0.
kernel_status fp8_gemm_nt(const void* a_fp8, const float* a_scales, std::int64_t m, const void* b_fp8,
                          const float* b_scales, std::int64_t n, std::int64_t k, void* d_bf16, cudaStream_t stream);

/// Grouped, contiguous layout (prefill / normal dispatch): the rows of all experts are stacked in
/// A[m_total, k]; every expert's rows start at a multiple of 128 and are padded to it.
/// m_indices[m_total] (device) holds each row's expert id in [0, num_groups), or -1 for a padding row,
/// which is neither read into the result nor written (its row of D keeps what it held).
/// Within one 128-row block all non-padding rows share one expert, and a block whose first row is
/// padding is padding throughout. B is [num_groups, n, k], b_scales [num_groups, ceil(n/128), k/128],
/// a_scales [k/128][fp8_scale_ld(m_total)], D [m_total, n]. m_total % 128 == 0.
kernel_status m_grouped_fp8_gemm_nt_contiguous(const void* a_fp8, const float* a_scales, std::int64_t m_total,
                                               const int* m_indices, const void* b_fp8, const float* b_scales,
                                               int num_groups, std::int64_t n, std::int64_t k, void* d_bf16,
                                               cudaStream_t stream);

/// Grouped, masked layout (decode / low-latency dispatch): A is [num_groups, max_m, k] and group g uses
/// its first masked_m[g] rows (masked_m lives on the device, 0 <= masked_m[g] <= max_m). The launch
/// shape depends only on num_groups, max_m, n, k, never on the counts, so the call is safe to capture
/// in a CUDA graph and replay with new counts. a_scales [k/128][fp8_scale_ld(num_groups * max_m)]
/// (A viewed as [num_groups * max_m, k]), D [num_groups, max_m, n]; rows at or past a group's count
/// are not written.
kernel_status m_grouped_fp8_gemm_nt_masked(const void* a_fp8, const float* a_scales, int num_groups,
                                           std::int64_t max_m, const int* masked_m, const void* b_fp8,
                                           const float* b_scales, std::int64_t n, std::int64_t k, void* d_bf16,
                                           cudaStream_t stream);

/// Tile configuration the launcher would choose (for benchmarks and docs): block N and pipeline stages.
struct grouped_gemm_config {
  int block_m = 128;
  int block_n = 128;
  int stages = 0;
  int ctas = 0;
  int tiles = 0;
};
/// `m_blocks` = number of 128-row blocks the launch covers (masked: groups * ceil(max_m / 128)).
grouped_gemm_config grouped_gemm_config_for(std::int64_t m_blocks, std::int64_t n);

/// Forces the tile width (64 or 128) of every following launch; 0 restores the automatic choice.
/// For tests and benchmarks that must exercise both kernels; not thread-safe.
void set_grouped_gemm_block_n_override(int block_n);

/// Paired promotion (default on): for 64/128-wide tiles, promote K blocks two at a time so one block's
/// wgmmas overlap the other's promotion. Off = one block at a time. For tests and benchmarks.
void set_grouped_gemm_paired_promotion(bool enabled);

} // namespace petrel::cuda
