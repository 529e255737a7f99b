// The cpu backend: reference implementations of every Backend op on host memory, fp32 throughout.
// GEMMs go through OpenBLAS (cblas_sgemm); everything else is plain loops (memory bound at these sizes).
#pragma once

#include "runtime/backend.hpp"

namespace petrel::kernels {

class cpu_backend final : public backend {
public:
  /// OpenBLAS's thread count is process-wide. Unless OPENBLAS_NUM_THREADS is set, a new cpu backend sets it to 1:
  /// Petrel's CPU models are tiny and several ranks share the cores, where extra BLAS threads only contend.
  cpu_backend();
  std::string name() const override { return "cpu"; }
  void set_num_threads(int threads) override;

  device_buffer allocate(size_t bytes) override;
  void deallocate(void* ptr, size_t bytes) override;
  void copy_to_device(void* dst, const void* host_src, size_t bytes) override;
  void copy_to_host(void* host_dst, const void* src, size_t bytes) override;
  void copy_device(void* dst, const void* src, size_t bytes) override;
  void fill_zero(void* dst, size_t bytes) override;
  void synchronize() override {}

  void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
            const float* b, int64_t ldb, float beta, float* c, int64_t ldc) override;
  void embedding(const int32_t* ids, int64_t n, const float* table, int64_t hidden, float* out) override;
  void rmsnorm(const mat_view& x, const float* weight, float eps, const mat_view& out) override;
  void copy_mat(const mat_view& src, const mat_view& dst) override;
  void add_inplace(const mat_view& x, const mat_view& y) override;
  void silu_mul(const mat_view& gate_up, int64_t inter, const mat_view& out) override;
  void rope_cos_sin(const int32_t* positions, int64_t n, const float* inv_freq, int64_t rope_dim,
                    float attention_factor, float* cos_sin) override;
  void rope_interleaved(const mat_view& x, int64_t heads, int64_t head_stride, int64_t offset, int64_t rope_dim,
                        const float* cos_sin) override;

  void kv_store(const kv_pool_geometry& pool, int32_t layer, const int32_t* slots, int64_t n,
                const mat_view& src) override;
  void kv_gather(const kv_pool_geometry& pool, int32_t layer, const int32_t* slots, int64_t n,
                 const mat_view& dst) override;
  void mla_prefill_attention(const mat_view& q, const mat_view& kv, const mat_view& k_pe, const mat_view& out,
                             int64_t heads, int64_t nope, int64_t rope, int64_t v_dim, int64_t start, float scale,
                             float* scratch) override;
  void mla_decode_attention(const kv_pool_geometry& pool, int32_t layer, const decode_attention_batch& b,
                            const mat_view& q_abs, const mat_view& out_lat, int64_t heads, int64_t kv_lora,
                            float scale, float* scratch) override;

  void route_noaux_tc(const mat_view& logits, const float* correction_bias, const route_params& p,
                      int32_t* topk_ids, float* topk_weights) override;
  void gather_rows(const mat_view& src, const int32_t* rows, int64_t n, const mat_view& dst) override;
  void scatter_rows(const mat_view& src, const int32_t* rows, int64_t n, const mat_view& dst) override;
  void scatter_add_rows(const mat_view& src, const int32_t* rows, const float* weights, int64_t n,
                        const mat_view& dst) override;

  void moe_permute(const int32_t* topk_ids, const float* topk_weights, int64_t tokens, int64_t top_k,
                   int64_t num_experts, int32_t* expert_offsets, int32_t* perm_rows, float* perm_weights) override;
  void grouped_expert_ffn(const int32_t* expert_offsets, int64_t num_experts, const float* const* gate_up_w,
                          const float* const* down_w, int64_t hidden, int64_t inter, int64_t max_rows,
                          const mat_view& x, float* gu, float* act, const mat_view& y) override;
  void expert_histogram(const int32_t* topk_ids, int64_t n, int64_t top_k, const int32_t* valid_tokens,
                        int32_t* counts) override;
};

} // namespace petrel::kernels
