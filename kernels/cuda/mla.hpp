// MLA attention kernels (sm_90a): absorbed decode over the paged bf16 latent cache, and naive-form
// causal prefill. Plain C++ host wrappers (kernels in mla_decode.cu and mla_prefill.cu); never includes CAF.
//
// Layouts (all row-major, bf16 unless noted):
//   decode q        [batch, heads, 576]          latent-absorbed q_nope (512) | roped q_pe (64)
//   kv_cache        [num_pages, 64, 576]         RMSNorm'd latent c_kv (512) | roped k_pe (64); V = first 512
//   block_table     int32 [batch, block_table_ld] page ids of each sequence, in token order
//   seqlens         int32 [batch]                 tokens of each sequence (1..max_seqlen)
//   decode out      [batch, heads, 512]
//   prefill q / k   [total, heads, 192]          nope (128) | rope (64); sequences packed (varlen)
//   prefill v / out [total, heads, 128]
// Expected bounds: decode is memory-bound (each KV byte is read once per head block, 128 heads share it);
// prefill is compute-bound (tensor cores).
#pragma once

#include <cstddef>

#include <cuda_runtime_api.h>

#include "kernels/cuda/fp8_layout.hpp" // kernel_status

namespace petrel::cuda {

constexpr int mla_latent_dim = 512, mla_rope_dim = 64, mla_qk_dim = 576, mla_page_size = 64;
/// Head dims of the naive-form prefill (DeepSeek-V3: qk_nope 128 + qk_rope 64, v_head 128).
constexpr int mla_prefill_qk_dim = 192, mla_prefill_v_dim = 128;

/// Bytes of workspace mla_decode_bf16 needs (split-KV partial results + combine) for this shape on the current device.
std::size_t mla_decode_workspace_bytes(int batch, int heads, int max_seqlen);

/// Absorbed MLA decode over a paged bf16 latent cache (one layer).
///   q            [batch, heads, 576] bf16: latent-absorbed q_nope (512) | roped q_pe (64)
///   kv_cache     [num_pages, 64, 576] bf16: RMSNorm'd latent (512) | roped k_pe (64); values = the first 512
///   block_table  [batch, block_table_ld] int32 page ids (device)
///   seqlens      [batch] int32 tokens of each sequence (>= 1, <= max_seqlen) (device)
///   out          [batch, heads, 512] bf16 = softmax(q.k * softmax_scale) . v
/// Split-KV across SMs for small batches, then a combine. The launch shape depends only on
/// (batch, heads, max_seqlen), never on seqlens' values, so it is safe inside a CUDA graph.
kernel_status mla_decode_bf16(const void* q, const void* kv_cache, const int* block_table, int block_table_ld,
                              const int* seqlens, int batch, int heads, int max_seqlen, float softmax_scale,
                              void* out, void* workspace, std::size_t workspace_bytes, cudaStream_t stream);

/// Naive-form causal MLA prefill, flash-style, varlen. q [total_q, heads, 192] bf16 (nope 128 | rope 64),
/// k [total_k, heads, 192], v [total_k, heads, 128], cu_seqlens_q/k [num_seqs + 1] device int32.
/// Query i of sequence s sits at position len_k(s) - len_q(s) + i and sees keys 0..that position.
/// out [total_q, heads, 128] bf16.
kernel_status mla_prefill_bf16(const void* q, const void* k, const void* v, const int* cu_seqlens_q,
                               const int* cu_seqlens_k, int num_seqs, int max_seqlen_q, int max_seqlen_k,
                               int heads, float softmax_scale, void* out, cudaStream_t stream);

} // namespace petrel::cuda
