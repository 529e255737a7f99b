// Internal to the cuda backend: error classification and the launchers of backend_*.cu.
// Every launcher only enqueues work on `s` and checks the launch; the op wrappers in cuda_backend.cu validate.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "runtime/backend.hpp"

namespace petrel::kernels::cudabe {

/// True for errors after which the CUDA context is unusable (they stay set for the process's lifetime).
bool is_sticky(cudaError_t e);
/// Throws cuda_error / cuda_oom_error for a recoverable error; ends the process for a sticky one.
void check(cudaError_t e, const char* op);
/// check(cudaGetLastError()) after a launch.
void check_launch(const char* op);

inline unsigned grid_1d(int64_t n, int threads, int64_t cap = 65535LL * 32) {
  int64_t g = (n + threads - 1) / threads;
  if (g < 1) g = 1;
  return unsigned(g > cap ? cap : g);
}

// -- backend_elementwise.cu ----------------------------------------------------------------------
void launch_embedding(const int32_t* ids, int64_t n, const float* table, int64_t hidden, float* out, cudaStream_t s);
void launch_rmsnorm(const mat_view& x, const float* w, float eps, const mat_view& out, cudaStream_t s);
void launch_add_inplace(const mat_view& x, const mat_view& y, cudaStream_t s);
void launch_silu_mul(const mat_view& gu, int64_t inter, const mat_view& out, cudaStream_t s);
void launch_rope_cos_sin(const int32_t* pos, int64_t n, const float* inv_freq, int64_t rope_dim, float af,
                         float* cs, cudaStream_t s);
void launch_rope_interleaved(const mat_view& x, int64_t heads, int64_t head_stride, int64_t offset, int64_t rope_dim,
                             const float* cs, cudaStream_t s);
void launch_kv_copy(const kv_pool_geometry& pool, int32_t layer, const int32_t* slots, int64_t n, const mat_view& rows,
                    bool store, cudaStream_t s);
/// dst[dst_idx ? dst_idx[i] : i] = src[src_idx ? src_idx[i] : i] for i < n (cols = src.cols).
void launch_copy_rows(const mat_view& src, const int32_t* src_idx, const mat_view& dst, const int32_t* dst_idx,
                      int64_t n, cudaStream_t s);
void launch_scale_mat(const mat_view& c, float beta, cudaStream_t s);

/// Temp bytes launch_scatter_add_rows needs for n rows.
size_t scatter_add_temp_bytes(int64_t n);
/// dst[rows[i]] += w[i] * src[i], in increasing i per destination row (deterministic), via a stable sort of rows.
void launch_scatter_add_rows(const mat_view& src, const int32_t* rows, const float* w, int64_t n, const mat_view& dst,
                             void* temp, size_t temp_bytes, cudaStream_t s);

// -- backend_attention.cu --------------------------------------------------------------------------
void launch_mla_prefill(const mat_view& q, const mat_view& kv, const mat_view& k_pe, const mat_view& out, int64_t heads,
                        int64_t nope, int64_t rope, int64_t v_dim, int64_t start, float scale, cudaStream_t s);
/// Splits the decode work of (batch, heads, max_ctx) over SMs; returns the workspace floats it needs.
struct decode_plan {
  int splits = 1;
  int64_t chunk = 0; // tokens per split (multiple of the tile)
  size_t workspace_floats = 0;
};
decode_plan plan_mla_decode(int64_t batch, int64_t heads, int64_t kv_lora, int64_t max_ctx, int sms);
void launch_mla_decode(const kv_pool_geometry& pool, int32_t layer, const decode_attention_batch& b,
                       const mat_view& q_abs, const mat_view& out_lat, int64_t heads, int64_t kv_lora, float scale,
                       const decode_plan& plan, float* workspace, cudaStream_t s);

// -- backend_moe.cu ----------------------------------------------------------------------------------
void launch_route_noaux_tc(const mat_view& logits, const float* bias, const route_params& p, int32_t* ids, float* w,
                           cudaStream_t s);
size_t moe_permute_temp_bytes(int64_t n);
void launch_moe_permute(const int32_t* topk_ids, const float* topk_w, int64_t tokens, int64_t top_k,
                        int64_t num_experts, int32_t* offsets, int32_t* perm_rows, float* perm_w, void* temp,
                        cudaStream_t s);

/// The routed experts' FFN over expert-sorted rows with device-side offsets (see cuda_backend::grouped_expert_ffn).
void launch_grouped_expert_ffn(const int32_t* offsets, int64_t E, const float* const* gate_up_w,
                               const float* const* down_w, int64_t hidden, int64_t inter, int64_t max_rows,
                               const mat_view& x, float* gu, float* act, const mat_view& y, cudaStream_t s);

} // namespace petrel::kernels::cudabe
