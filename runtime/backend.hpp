// The Backend interface: every op the DeepSeek-V3 forward pass needs, on memory the backend allocates.
//
// All pointers passed to an op are backend pointers (device_buffer::data() or views into them), including
// the int32 index arrays (token ids, positions, slot ids, page tables): the model uploads them with
// copy_to_device first. Only copy_to_device / copy_to_host take host pointers. Ops are asynchronous with
// respect to the host on device backends; copy_to_host and synchronize() wait. One backend instance is used
// by one thread at a time (one per rank).
//
// Layout conventions (row-major, fp32 unless said otherwise):
//   linear weights       [out_features, in_features] as in Hugging Face checkpoints
//   latent KV entry      [kv_lora_rank | qk_rope_head_dim] = RMSNorm(c_kv) then interleaved-roped k_pe
//   KV pool              page-major: page p = [layer][slot][entry]  (see runtime/kv_cache.hpp)
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "runtime/tensor.hpp"

namespace petrel {

/// Geometry of a paged latent KV pool, as the attention ops see it.
struct kv_pool_geometry {
  float* base = nullptr;      // backend pointer to page 0
  int32_t num_layers = 0;
  int32_t page_size = 0;      // tokens per page
  int32_t entry_floats = 0;   // kv_lora_rank + qk_rope_head_dim
  int32_t num_pages = 0;

  int64_t floats_per_page() const { return int64_t(num_layers) * page_size * entry_floats; }
  /// Entry of token slot `slot` (0..page_size) of page `page` in layer `layer`.
  float* entry(int32_t page, int32_t layer, int32_t slot) const {
    return base + int64_t(page) * floats_per_page() + (int64_t(layer) * page_size + slot) * entry_floats;
  }
};

/// A decode batch for absorbed MLA: sequence b reads ctx_lens[b] tokens through its page table
/// pages[page_offsets[b] .. page_offsets[b+1]). All arrays are backend int32 arrays.
struct decode_attention_batch {
  const int32_t* pages = nullptr;
  const int32_t* page_offsets = nullptr; // batch + 1 entries
  const int32_t* ctx_lens = nullptr;     // batch entries, each >= 1 (includes the new token)
  int32_t batch = 0;
  int32_t max_ctx = 0;                   // max of ctx_lens (host-known, sizes the scratch)
};

/// Parameters of noaux_tc routing (DeepSeek-V3): see DESIGN.md "Reference semantics".
struct route_params {
  int32_t num_experts = 0;
  int32_t n_group = 1;
  int32_t topk_group = 1;
  int32_t top_k = 1;
  bool norm_topk_prob = true;
  float routed_scaling_factor = 1.0f;
};

class backend {
public:
  virtual ~backend() = default;

  // -- identity ------------------------------------------------------------------------------------
  virtual std::string name() const = 0;
  /// Worker threads for host-side math (OpenBLAS on cpu); ignored where meaningless.
  virtual void set_num_threads(int threads) = 0;

  // -- memory --------------------------------------------------------------------------------------
  /// Allocates `bytes` (64-byte aligned at least), zero-filled.
  virtual device_buffer allocate(size_t bytes) = 0;
  virtual void deallocate(void* ptr, size_t bytes) = 0;
  virtual void copy_to_device(void* dst, const void* host_src, size_t bytes) = 0;
  virtual void copy_to_host(void* host_dst, const void* src, size_t bytes) = 0;
  virtual void copy_device(void* dst, const void* src, size_t bytes) = 0;
  virtual void fill_zero(void* dst, size_t bytes) = 0;
  virtual void synchronize() = 0;
  /// A function the backend calls every so often while its host waits for the device (synchronize, copies to the
  /// host), on the waiting thread; it may throw to abandon the wait (the exception leaves the backend call). An EP
  /// rank whose GPU waits on peers uses it to hear of a peer's failure. Empty: none. Backends that never wait for a
  /// device ignore it.
  virtual void set_wait_hook(std::function<void()> hook) { (void)hook; }
  /// Makes the calling thread use this backend's device (CUDA: cudaSetDevice). A thread that drives the backend
  /// after another constructed it calls this first; in-process groups with a GPU per rank need it.
  virtual void bind_thread() {}

  // -- dense math ----------------------------------------------------------------------------------
  /// C[M,N] = alpha * op(A) * op(B) + beta * C, row-major with leading dimensions; op(X) = X or X^T.
  /// fp32 in, fp32 accumulate, fp32 out.
  virtual void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                    int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) = 0;
  /// y[rows, out] = x[rows, in] * W^T for a Hugging Face weight W[out, in] (contiguous).
  void linear(const mat_view& x, const float* w, const mat_view& y) {
    gemm(false, true, x.rows, y.cols, x.cols, 1.0f, x.data, x.ld, w, x.cols, 0.0f, y.data, y.ld);
  }

  /// out[t] = table[ids[t]] for t < n (table [vocab, hidden]).
  virtual void embedding(const int32_t* ids, int64_t n, const float* table, int64_t hidden, float* out) = 0;
  /// out = x / rms(x) * weight per row (out may alias x).
  virtual void rmsnorm(const mat_view& x, const float* weight, float eps, const mat_view& out) = 0;
  /// dst = src elementwise (same shapes, any leading dimensions).
  virtual void copy_mat(const mat_view& src, const mat_view& dst) = 0;
  /// x += y elementwise (same shapes).
  virtual void add_inplace(const mat_view& x, const mat_view& y) = 0;
  /// out[r, i] = silu(gate_up[r, i]) * gate_up[r, inter + i], i < inter.
  virtual void silu_mul(const mat_view& gate_up, int64_t inter, const mat_view& out) = 0;

  /// cos_sin[r] = (cos(pos_r * inv_freq[i]) * attention_factor for i < half, then the sins likewise),
  /// half = rope_dim / 2, pos_r = positions[r]. Computed once per forward, used by every layer.
  virtual void rope_cos_sin(const int32_t* positions, int64_t n, const float* inv_freq, int64_t rope_dim,
                            float attention_factor, float* cos_sin) = 0;
  /// Interleaved RoPE in place: in every row r and head h, the rope_dim floats at
  /// x.data + r*x.ld + h*head_stride + offset rotate as adjacent pairs (2i, 2i+1) with cos_sin[r] (above).
  virtual void rope_interleaved(const mat_view& x, int64_t heads, int64_t head_stride, int64_t offset,
                                int64_t rope_dim, const float* cos_sin) = 0;

  // -- MLA attention -------------------------------------------------------------------------------
  /// Writes n latent entries src[i] (entry_floats wide) to the pool at layer `layer`,
  /// slot slots[i] = page * page_size + slot_in_page. A negative slot skips its row (padding rows of a
  /// fixed-layout decode step).
  virtual void kv_store(const kv_pool_geometry& pool, int32_t layer, const int32_t* slots, int64_t n,
                        const mat_view& src) = 0;
  /// Reads n entries back: dst[i] = pool entry at slots[i].
  virtual void kv_gather(const kv_pool_geometry& pool, int32_t layer, const int32_t* slots, int64_t n,
                         const mat_view& dst) = 0;

  /// Naive (prefill) MLA for one sequence: n queries at positions start..start+n-1 attend causally to
  /// keys 0..ctx-1 (ctx = start + n).
  ///   q    [n, heads*(nope+rope)]        roped q_pe in the last rope floats of each head
  ///   kv   [ctx, heads*(nope+v)]         k_nope then value per head (kv_b_proj of the latent)
  ///   k_pe [ctx, rope] (ld any)          shared roped key part
  ///   out  [n, heads*v]
  /// scratch must hold n*ctx floats.
  virtual void mla_prefill_attention(const mat_view& q, const mat_view& kv, const mat_view& k_pe,
                                     const mat_view& out, int64_t heads, int64_t nope, int64_t rope,
                                     int64_t v_dim, int64_t start, float scale, float* scratch) = 0;

  /// Absorbed (decode) MLA: one query per sequence, attending to its paged latent cache.
  ///   q_abs    [batch, heads*entry]  per head: q_nope*W_UK (kv_lora floats) then roped q_pe (rope floats)
  ///   out_lat  [batch, heads*kv_lora] softmax-weighted sum of the cached normed latents
  /// scratch must hold heads*max_ctx floats.
  virtual void mla_decode_attention(const kv_pool_geometry& pool, int32_t layer, const decode_attention_batch& b,
                                    const mat_view& q_abs, const mat_view& out_lat, int64_t heads,
                                    int64_t kv_lora, float scale, float* scratch) = 0;

  // -- MoE -----------------------------------------------------------------------------------------
  /// noaux_tc routing: logits [T, num_experts] -> topk_ids [T, top_k] (int32), topk_weights [T, top_k].
  virtual void route_noaux_tc(const mat_view& logits, const float* correction_bias, const route_params& p,
                              int32_t* topk_ids, float* topk_weights) = 0;
  /// dst[i] = src[rows[i]] for i < n.
  virtual void gather_rows(const mat_view& src, const int32_t* rows, int64_t n, const mat_view& dst) = 0;
  /// dst[rows[i]] = src[i] for i < n.
  virtual void scatter_rows(const mat_view& src, const int32_t* rows, int64_t n, const mat_view& dst) = 0;
  /// dst[rows[i]] += weights[i] * src[i] for i < n, in order (rows may repeat); weights == nullptr means 1.
  virtual void scatter_add_rows(const mat_view& src, const int32_t* rows, const float* weights, int64_t n,
                                const mat_view& dst) = 0;

  // -- graph-safe decode (no host round trip inside a step) ----------------------------------------
  /// True when run_step_graph captures and replays CUDA graphs (cuda); false: steps run eagerly (cpu).
  virtual bool supports_graphs() const { return false; }
  /// Fault injection (`petrel chaos`, kind gpu_fault): makes the device fail the way a faulting kernel does, so that
  /// the backend's handling of a sticky error runs for real (cuda: a kernel traps, the context is lost, the process
  /// exits with the sticky-error code and its supervisor restarts it). Backends without a device throw
  /// std::invalid_argument.
  virtual void inject_device_fault() {
    throw std::invalid_argument("backend '" + name() + "' has no device to fault (gpu_fault needs a cuda rank)");
  }
  /// Runs `step` (device work only: no copy_to_host / copy_to_device inside) as a graph keyed by `key` where the
  /// backend supports it (cuda: first call eager, second captures and replays, later calls replay); otherwise
  /// runs it. Returns true when it ran from a graph.
  virtual bool run_step_graph(uint64_t /*key*/, const std::function<void()>& step) {
    step();
    return false;
  }
  /// Drops every step graph (their buffers or the backend's workspaces were reallocated).
  virtual void clear_step_graphs() {}
  /// Groups the (token, k) pairs of topk_ids [tokens, top_k] by expert, stably (the host counting sort of
  /// local_moe_experts): expert_offsets [num_experts + 1], perm_rows [tokens*top_k] (token row of each permuted
  /// row), perm_weights [tokens*top_k] (its routing weight; skipped when topk_weights is nullptr).
  virtual void moe_permute(const int32_t* topk_ids, const float* topk_weights, int64_t tokens, int64_t top_k,
                           int64_t num_experts, int32_t* expert_offsets, int32_t* perm_rows, float* perm_weights) = 0;
  /// Expert FFN over permuted rows with backend-side offsets: y[r] = W_down,e (silu(W_gate,e x[r]) * W_up,e x[r])
  /// for rows r of expert e (expert_offsets as above). gate_up_w / down_w are backend arrays of num_experts weight
  /// pointers ([2*inter, hidden] and [hidden, inter]); max_rows bounds the rows; gu [max_rows, 2*inter] and
  /// act [max_rows, inter] are scratch.
  virtual void grouped_expert_ffn(const int32_t* expert_offsets, int64_t num_experts, const float* const* gate_up_w,
                                  const float* const* down_w, int64_t hidden, int64_t inter, int64_t max_rows,
                                  const mat_view& x, float* gu, float* act, const mat_view& y) = 0;
  /// Routing histogram: counts[topk_ids[i]] += 1 for i < n with i / top_k < *valid_tokens (a backend int32; the
  /// rows after it are padding).
  virtual void expert_histogram(const int32_t* topk_ids, int64_t n, int64_t top_k, const int32_t* valid_tokens,
                                int32_t* counts) = 0;
};

/// Creates a backend by name: "cpu" (always), "cuda" (when built with CUDA).
/// Throws std::invalid_argument naming the backend when it is unknown or not built in.
std::unique_ptr<backend> make_backend(const std::string& name);
/// CUDA devices this process sees (0 in a build without CUDA).
int cuda_device_count();
/// The backend of rank `rank` of an in-process group: `name`, except "cuda:each", which spreads the ranks over
/// the visible GPUs (rank r on cuda:(r % count)).
std::string rank_backend_name(const std::string& name, int rank);

/// Makes `b` hold at least `bytes`, reallocating (contents not kept) to the larger of `bytes` and 1.5x its size, so
/// that buffers sized per step stop reallocating once the steps stop growing.
inline void grow_buffer(backend& be, device_buffer& b, size_t bytes) {
  if (b.bytes() < bytes) b = be.allocate(std::max(bytes, b.bytes() * 3 / 2));
}

inline void device_buffer::release() {
  if (ptr_ && owner_) owner_->deallocate(ptr_, bytes_);
  ptr_ = nullptr;
  bytes_ = 0;
  owner_ = nullptr;
}

} // namespace petrel
