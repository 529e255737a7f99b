// The bf16 element-wise and layout kernels a DeepSeek-V3 layer needs around its GEMMs and attention:
// RMSNorm (+ residual add, + fused 1x128 fp8 quantisation), interleaved RoPE, SwiGLU (+ fused fp8
// quantisation), noaux_tc grouped top-k routing, MoE permute into the contiguous and the masked grouped
// GEMM layouts, weighted combine, greedy sampling, and the small pieces of MLA (K/V assembly for the
// naive prefill form, latent KV-cache store, a masked softmax for the unfused fallback attention).
// Plain C++ host wrappers over kernels in layer_ops.cu; every call is asynchronous on `stream`, launches
// a grid that depends only on its shape arguments (never on device data), so it can be captured in a
// CUDA graph, and returns a kernel_status naming the bad argument instead of crashing.
// Layouts of fp8 activations and their scales: fp8_layout.hpp. All kernels are memory-bound.
#pragma once

#include <cstdint>
#include <vector>

#include <cuda_runtime_api.h>

#include "kernels/cuda/fp8_layout.hpp"

namespace petrel::cuda {

// -- normalisation ---------------------------------------------------------------------------

/// RMSNorm over rows of width n (n % 8 == 0, n <= 8192), fp32 statistics, as Hugging Face computes it:
/// y = bf16(w * bf16(v * rsqrt(mean(v^2) + eps))).
/// Input x: bf16 [rows, n] with row stride x_ld (elements; x and x_ld 16-byte aligned, x_ld % 8 == 0).
/// Residual (optional, bf16 [rows, n], stride n): add_residual -> residual = bf16(x + residual), else
/// residual = x; v is then the new residual. Without a residual v = x.
/// Outputs (at least one): out bf16 with stride out_ld (% 8 == 0); out_fp8 e4m3 [rows, n] with scales
/// [n/128][fp8_scale_ld(rows)] (n % 128 == 0): the 1x128 quantisation of the bf16 result, byte-identical to
/// quantize_bf16_to_fp8_1x128 applied to `out`.
kernel_status rmsnorm_bf16(const void* x, std::int64_t x_ld, void* residual, bool add_residual, const void* weight,
                           std::int64_t rows, int n, float eps, void* out, std::int64_t out_ld, void* out_fp8,
                           float* out_scales, cudaStream_t stream);

// -- rotary embedding ------------------------------------------------------------------------

/// Builds the RoPE table cos_sin [positions, rope_dim] on the host: row p = cos(p * inv_freq[i]) * af for
/// i < rope_dim/2, then sin(...) * af (fp32 product, as the reference). inv_freq is YaRN-corrected by the caller.
std::vector<float> rope_cos_sin_table(const std::vector<float>& inv_freq, int positions, float attention_factor);

/// Interleaved RoPE (adjacent pairs rotate, as the cpu backend): for each row r and head h,
/// out[r, h, 2i] = x0 c - x1 s, out[r, h, 2i+1] = x1 c + x0 s with x = in[r, h, 2i..2i+1] and (c, s) from
/// cos_sin[positions[r]]. in and out may alias. Element (r, h, d) lives at base + r * ld + h * head_stride + d
/// (in elements; ld, head_stride and the base offsets even). positions must be < max_pos.
kernel_status rope_interleaved_bf16(const void* in, std::int64_t in_ld, std::int64_t in_head_stride, void* out,
                                    std::int64_t out_ld, std::int64_t out_head_stride, std::int64_t rows, int heads,
                                    int rope_dim, const int* positions, const float* cos_sin, int max_pos,
                                    cudaStream_t stream);

// -- SwiGLU ------------------------------------------------------------------------------------

/// h = silu(gate) * up in fp32, rounded once to bf16, from gate_up bf16 [rows, 2n] (gate | up per row).
/// n % 128 == 0. Outputs (at least one): out bf16 [rows, n]; out_fp8 e4m3 [rows, n] + scales
/// [n/128][fp8_scale_ld(rows)] (the 1x128 quantisation of the bf16 h; this fusion saves writing and re-reading h).
/// Rows to skip (neither read nor written): row_expert[r] < 0 (contiguous layout's m_indices), or, with
/// masked_m, rows r with r % max_m >= masked_m[r / max_m] (masked layout). Both may be null.
kernel_status swiglu_bf16(const void* gate_up, std::int64_t rows, int n, void* out, void* out_fp8, float* out_scales,
                          const int* row_expert, const int* masked_m, std::int64_t max_m, cudaStream_t stream);

// -- routing -----------------------------------------------------------------------------------

/// DeepSeek-V3 noaux_tc routing, one warp per token. logits fp32 [tokens, experts] (the gate GEMM's output),
/// bias fp32 [experts] (e_score_correction_bias). s = sigmoid(logit), c = s + bias; a group's score is the sum
/// of its two largest c; the topk_group best groups are kept (the rest masked to -inf); the top_k largest c
/// among the kept experts are chosen (ties: lower expert id). weight = s at the chosen expert, divided by the
/// sum of the chosen s + 1e-20 when normalize, times scaling. Outputs topk_ids int [tokens, top_k] and
/// topk_weights fp32 [tokens, top_k], best first.
/// Limits: experts % 32 == 0 and <= 256; groups divides experts; group size >= 2, a multiple of experts/32,
/// and (group size)/(experts/32) a power of two; 1 <= topk_group <= groups; 1 <= top_k <= topk_group * group size, <= 32.
kernel_status noaux_tc_route(const float* logits, const float* bias, std::int64_t tokens, int experts, int groups,
                             int topk_group, int top_k, bool normalize, float scaling, int* topk_ids,
                             float* topk_weights, cudaStream_t stream);

// -- MoE layouts -------------------------------------------------------------------------------

/// Ints of device workspace the permute kernels need for `local_experts` experts.
std::int64_t moe_permute_workspace_ints(int local_experts);

/// Rows the contiguous layout needs at most for `pairs` routed (token, expert) pairs over `local_experts`:
/// every expert's segment is aligned to 128, so pairs + local_experts * 127, rounded up to 128.
std::int64_t moe_contiguous_capacity(std::int64_t pairs, int local_experts);

/// Permute into the contiguous grouped-GEMM layout (prefill / normal dispatch). Input: the received tokens
/// x_fp8 e4m3 [tokens, k] with scales [k/128][fp8_scale_ld(tokens)], and topk_local int [tokens, top_k]: the
/// local expert of each (token, slot) pair, or -1 when the pair is not on this rank (DeepEP's recv_topk_idx).
/// Output: a_fp8 [m_capacity, k] and a_scales [k/128][fp8_scale_ld(m_capacity)] with every expert's rows
/// starting at a multiple of 128 (experts in id order), m_indices [m_capacity] (expert id, -1 for padding
/// and unused tail rows), pair_row [tokens * top_k] (the row each pair went to, -1 when none). The order of
/// rows inside an expert's segment is unspecified (atomics). m_capacity % 128 == 0; pairs that do not fit get
/// pair_row -1 and set workspace[0] (the overflow flag) to 1. workspace: moe_permute_workspace_ints ints.
kernel_status moe_permute_contiguous(const void* x_fp8, const float* x_scales, std::int64_t tokens, int k,
                                     const int* topk_local, int top_k, int local_experts, std::int64_t m_capacity,
                                     void* a_fp8, float* a_scales, int* m_indices, int* pair_row, int* workspace,
                                     cudaStream_t stream);

/// Permute into the masked layout (decode / low-latency dispatch): a_fp8 [local_experts, max_m, k], a_scales
/// [k/128][fp8_scale_ld(local_experts * max_m)], masked_m [local_experts] (rows per expert, written here),
/// pair_row as above (row index into the [local_experts * max_m] view). Pairs past max_m are dropped
/// (pair_row -1, overflow flag workspace[0] = 1). Inputs as moe_permute_contiguous.
kernel_status moe_permute_masked(const void* x_fp8, const float* x_scales, std::int64_t tokens, int k,
                                 const int* topk_local, int top_k, int local_experts, std::int64_t max_m, void* a_fp8,
                                 float* a_scales, int* masked_m, int* pair_row, int* workspace, cudaStream_t stream);

/// Weighted combine: out[t] = bf16(sum_j w[t, j] * expert_out[pair_row[t, j]] (+ shared_out[t])), fp32 sums,
/// pairs with pair_row -1 skipped. expert_out bf16 [*, hidden], shared_out (optional) and out bf16 [tokens, hidden];
/// hidden % 8 == 0.
kernel_status moe_combine_bf16(const void* expert_out, const int* pair_row, const float* topk_weights,
                               std::int64_t tokens, int top_k, int hidden, const void* shared_out, void* out,
                               cudaStream_t stream);

// -- sampling ----------------------------------------------------------------------------------

/// Greedy sampling: ids[r] = argmax over logits bf16 [rows, vocab] (row stride ld); ties to the lower id.
kernel_status argmax_bf16(const void* logits, std::int64_t rows, int vocab, std::int64_t ld, int* ids,
                          cudaStream_t stream);

// -- MLA pieces ----------------------------------------------------------------------------------

/// Naive-form prefill inputs: from kv_b's output kvb bf16 [tokens, heads, nope + v] and the latent rows
/// latent bf16 [tokens, latent_ld] whose columns [pe_offset, pe_offset + rope) hold the roped k_pe, builds
/// k bf16 [tokens, heads, nope + rope] (k_pe shared by all heads) and v bf16 [tokens, heads, v].
/// nope, rope, v % 8 == 0.
kernel_status mla_assemble_kv_bf16(const void* kvb, const void* latent, std::int64_t latent_ld, int pe_offset,
                                   std::int64_t tokens, int heads, int nope, int rope, int v_dim, void* k, void* v,
                                   cudaStream_t stream);

/// Latent KV-cache store: cache row slots[t] (a flat slot = page * page_size + offset) of a [*, entry] bf16 cache
/// gets src[t] (bf16, stride src_ld). entry % 8 == 0; slots < 0 are skipped.
kernel_status kv_cache_store_bf16(const void* src, std::int64_t src_ld, std::int64_t tokens, const int* slots,
                                  int entry, void* cache, cudaStream_t stream);

/// In-place softmax of bf16 score rows (fp32 math) for the unfused fallback attention: row r of `rows`
/// (stride ld) is scaled by `scale`; columns j >= limit are masked to probability 0, where limit =
/// (r % causal_period) + 1 + causal_shift when causal_period > 0 (causal prefill), else valid_cols.
kernel_status masked_softmax_bf16(void* scores, std::int64_t rows, int cols, std::int64_t ld, float scale,
                                  int causal_period, int causal_shift, int valid_cols, cudaStream_t stream);

} // namespace petrel::cuda
