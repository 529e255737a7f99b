// The DeepSeek-V3 forward pass on a Backend: one batched step over many sequences.
//
// One deepseek_model per rank. forward() may be called from any thread (there is no global state); calls on
// one instance are serialised by an internal mutex. Scratch buffers grow to the largest step seen and are
// reused, so steady-state decode allocates nothing.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "runtime/backend.hpp"
#include "runtime/kv_cache.hpp"
#include "runtime/model_config.hpp"
#include "runtime/weights.hpp"

namespace petrel {

/// One sequence's slice of a step.
struct sequence_step {
  std::span<const int32_t> tokens;  // new tokens: 1 for decode, a chunk (or the whole prompt) for prefill
  int64_t start_pos = 0;            // tokens already in the cache = position of tokens[0]
  std::span<const int32_t> pages;   // page table; must cover start_pos + tokens.size() tokens
  bool all_logits = false;          // return logits for every new token, not only the last one
};

/// Logits of a step, on the host: sequence i owns rows [row_offset[i], row_offset[i+1]) of `logits`
/// (one row unless all_logits), each `vocab` floats.
struct step_result {
  int64_t vocab = 0;
  std::vector<float> logits;
  std::vector<int64_t> row_offset;

  std::span<const float> row(int64_t r) const { return {logits.data() + r * vocab, size_t(vocab)}; }
  /// Logits after the last new token of sequence i.
  std::span<const float> last(size_t i) const { return row(row_offset[i + 1] - 1); }
};

/// Routing decisions of one MoE layer for T tokens. Device arrays for backends; host copies for placement.
struct moe_routing {
  const int32_t* topk_ids = nullptr;       // backend [T, top_k]
  const float* topk_weights = nullptr;     // backend [T, top_k] (already normalised and scaled)
  const int32_t* topk_ids_host = nullptr;  // host copies of the same
  const float* topk_weights_host = nullptr;
  int64_t tokens = 0;
  int64_t top_k = 0;
};

/// THE seam for expert parallelism: computes the routed experts' combined output
///   out[t] = sum_k topk_weights[t,k] * expert_{topk_ids[t,k]}(hidden[t])
/// (out is overwritten; the shared expert is not included). The default runs every expert locally; an EP
/// implementation dispatches rows to the ranks owning the experts and combines the results.
class moe_experts {
public:
  virtual ~moe_experts() = default;
  virtual void run(int32_t layer, const mat_view& hidden, const moe_routing& routing, const mat_view& out) = 0;
};

/// All routed experts on this backend: one permutation (gather), a GEMM pair per expert on contiguous
/// rows, one weighted scatter-add.
class local_moe_experts final : public moe_experts {
public:
  local_moe_experts(backend& be, const model_config& cfg, const model_weights& w);
  void run(int32_t layer, const mat_view& hidden, const moe_routing& routing, const mat_view& out) override;

private:
  backend& be_;
  const model_config& cfg_;
  const model_weights& w_;
  std::vector<int32_t> rows_host_;
  std::vector<float> weights_host_;
  std::vector<int64_t> offsets_, cursor_;
  device_buffer rows_dev_, weights_dev_, x_, gate_up_, act_, y_;
};

class deepseek_model {
public:
  deepseek_model(model_config cfg, model_weights weights, backend& be);

  /// Loads DIR/config.json and its safetensors; with dummy = true, random weights of the full shape instead.
  /// Throws model_load_error (bad config or checkpoint, message names the file/tensor).
  static std::unique_ptr<deepseek_model> load(const std::filesystem::path& dir, backend& be, bool dummy = false,
                                              uint64_t seed = 0);

  /// One step for a batch of sequences: writes the new tokens' latent KV into their pages and returns logits.
  /// Sequences with one new token and start_pos > 0 use absorbed (decode) MLA straight from the pages; the
  /// others use the naive (prefill) form over the cached latents plus the new ones, so a prompt may be split into
  /// chunks at any point. Throws std::invalid_argument on a bad token id or a page table that is too short.
  void forward(std::span<const sequence_step> batch, kv_pool& kv, step_result& out);

  /// Tokens routed to each expert in the last forward: [num_hidden_layers][n_routed_experts], row-major
  /// (rows of dense layers are 0).
  const std::vector<int64_t>& routing_counts() const { return routing_counts_; }

  /// Replaces the routed-expert computation (expert parallelism). The default is local_moe_experts.
  void set_moe_experts(std::shared_ptr<moe_experts> e) { experts_ = std::move(e); }

  const model_config& config() const { return cfg_; }
  const model_weights& weights() const { return w_; }
  backend& be() const { return be_; }

private:
  struct scratch {
    device_buffer buf;
    float* ensure(backend& be, size_t floats);
  };
  void attention(int32_t layer, const mat_view& hn, kv_pool& kv, const mat_view& attn_out);
  void ffn(int32_t layer, const mat_view& hn, const mat_view& out);
  void mlp(const mlp_weights& m, const mat_view& x, const mat_view& out);

  model_config cfg_;
  model_weights w_;
  backend& be_;
  std::shared_ptr<moe_experts> experts_;
  std::vector<int64_t> routing_counts_;
  std::mutex mu_;
  float softmax_scale_;
  float rope_af_;

  // -- per-step plan (host) ------------------------------------------------------------------------
  struct prefill_seq {
    int64_t row0, n, start;
    int64_t ctx_slot_off; // into the ctx-slot section of ints
  };
  std::vector<prefill_seq> prefill_;
  std::vector<int32_t> decode_rows_;
  bool pure_decode_ = false;
  int64_t tokens_ = 0, max_ctx_ = 0;
  std::vector<int32_t> host_ints_;     // ids | positions | slots | decode rows | pages | offs | ctx | ctx slots
  int64_t off_ids_ = 0, off_pos_ = 0, off_slots_ = 0, off_drows_ = 0, off_pages_ = 0, off_poffs_ = 0,
          off_ctx_ = 0, off_ctx_slots_ = 0;
  std::vector<int32_t> logit_rows_;
  std::vector<int32_t> topk_ids_host_;
  std::vector<float> topk_w_host_;

  // -- scratch (backend) ---------------------------------------------------------------------------
  scratch ints_, x_, hn_, q_a_, q_, ckv_, attn_, tmp_h_, ffn_a_, ffn_b_, ffn_c_, lat_, kvb_, scores_, qd_, qabs_,
      olat_, od_, cos_sin_, topk_ids_, topk_w_, logits_dev_, final_h_;
};

} // namespace petrel
