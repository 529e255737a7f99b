// Plain fp32 CUDA-core references for the MLA kernels, and a device random fill (checks and benchmarks only).
// Same layouts as mla.hpp; outputs are fp32. One CTA per output row, no tiling: slow but obviously right.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "kernels/cuda/mla.hpp"

namespace petrel::cuda {

/// out_f32 [batch, heads, 512] = softmax(q.k * scale) . v over the paged cache (see mla_decode_bf16).
kernel_status mla_decode_reference_f32(const void* q, const void* kv_cache, const int* block_table, int block_table_ld,
                                       const int* seqlens, int batch, int heads, int max_seqlen, float softmax_scale,
                                       float* out_f32, cudaStream_t stream);

/// out_f32 [total_q, heads, 128]: causal naive-form attention (see mla_prefill_bf16).
kernel_status mla_prefill_reference_f32(const void* q, const void* k, const void* v, const int* cu_seqlens_q,
                                        const int* cu_seqlens_k, int num_seqs, int max_seqlen_q, int max_seqlen_k,
                                        int heads, float softmax_scale, float* out_f32, cudaStream_t stream);

/// Fills `count` bf16 values with uniform random numbers in [-scale, scale) from a counter hash of `seed`.
kernel_status mla_fill_random_bf16(void* dst, std::size_t count, std::uint64_t seed, float scale, cudaStream_t stream);

/// Copies `bytes` (a multiple of 16) from src to dst with a plain grid-stride 16-byte copy kernel: the HBM
/// ceiling that benchmarks measure next to their kernels (bytes read + bytes written).
kernel_status mla_bench_copy(void* dst, const void* src, std::size_t bytes, cudaStream_t stream);

} // namespace petrel::cuda
