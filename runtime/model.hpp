// The DeepSeek-V3 forward pass on a Backend: one batched step over many sequences.
//
// One deepseek_model per rank. forward() may be called from any thread (there is no global state); calls on
// one instance are serialised by an internal mutex. Scratch buffers grow to the largest step seen and are
// reused, so steady-state decode allocates nothing. forward_ops() is the same pass written as a coroutine with
// yield points around the expert all-to-all (expert parallelism and two-batch overlap, runtime/ep.hpp).
#pragma once

#include <algorithm>
#include <coroutine>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <utility>
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
///
/// The staged form (dispatch_start -> expert_compute -> combine_finish) is what deepseek_model::forward_ops
/// calls, with a yield point after each of the first two stages, so that another micro-batch can compute while
/// this one's dispatch or combine is in flight (two-batch overlap). `slot` (0 or 1) names the micro-batch; the
/// stages of one slot come in order, those of two slots interleave. `hidden` and the routing arrays stay valid
/// and unchanged until combine_finish of the same slot returns. The defaults keep the arguments and call run()
/// in combine_finish, so an implementation that only overrides run() works everywhere.
class moe_experts {
public:
  virtual ~moe_experts() = default;
  virtual void run(int32_t layer, const mat_view& hidden, const moe_routing& routing, const mat_view& out) = 0;

  virtual void dispatch_start(int slot, int32_t layer, const mat_view& hidden, const moe_routing& routing) {
    staged_[size_t(slot)] = {layer, hidden, routing};
  }
  virtual void expert_compute(int /*slot*/) {}
  virtual void combine_finish(int slot, const mat_view& out) {
    const staged_call& c = staged_[size_t(slot)];
    run(c.layer, c.hidden, c.routing, out);
  }

private:
  struct staged_call {
    int32_t layer = 0;
    mat_view hidden;
    moe_routing routing;
  };
  staged_call staged_[2];
};

/// A forward pass as a C++20 coroutine: resume() runs it up to its next yield point (a dispatch or a combine
/// has just been started) or to its end. Move-only; destroying an unfinished task abandons the pass.
class forward_task {
public:
  struct promise_type {
    std::exception_ptr error;
    forward_task get_return_object() {
      return forward_task(std::coroutine_handle<promise_type>::from_promise(*this));
    }
    std::suspend_always initial_suspend() noexcept { return {}; }
    std::suspend_always final_suspend() noexcept { return {}; }
    void return_void() {}
    void unhandled_exception() { error = std::current_exception(); }
  };

  forward_task() = default;
  explicit forward_task(std::coroutine_handle<promise_type> h) : h_(h) {}
  forward_task(forward_task&& o) noexcept : h_(std::exchange(o.h_, {})) {}
  forward_task& operator=(forward_task&& o) noexcept {
    if (this != &o) {
      if (h_) h_.destroy();
      h_ = std::exchange(o.h_, {});
    }
    return *this;
  }
  forward_task(const forward_task&) = delete;
  forward_task& operator=(const forward_task&) = delete;
  ~forward_task() {
    if (h_) h_.destroy();
  }

  bool done() const { return !h_ || h_.done(); }
  /// Runs to the next yield point; rethrows what the pass threw.
  void resume() {
    if (done()) return;
    h_.resume();
    if (h_.promise().error) std::rethrow_exception(std::exchange(h_.promise().error, nullptr));
  }
  /// Runs to the end (no overlap).
  void run_to_end() {
    while (!done()) resume();
  }

private:
  std::coroutine_handle<promise_type> h_;
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

struct forward_scratch; // per-call plan and scratch buffers (model.cpp)

class deepseek_model {
public:
  deepseek_model(model_config cfg, model_weights weights, backend& be);
  ~deepseek_model();

  /// Loads DIR/config.json and its safetensors; with dummy = true, random weights of the full shape instead.
  /// Throws model_load_error (bad config or checkpoint, message names the file/tensor).
  static std::unique_ptr<deepseek_model> load(const std::filesystem::path& dir, backend& be, bool dummy = false,
                                              uint64_t seed = 0);

  /// One step for a batch of sequences: writes the new tokens' latent KV into their pages and returns logits.
  /// Sequences with one new token and start_pos > 0 use absorbed (decode) MLA straight from the pages; the
  /// others use the naive (prefill) form over the cached latents plus the new ones, so a prompt may be split into
  /// chunks at any point. Throws std::invalid_argument on a bad token id or a page table that is too short.
  void forward(std::span<const sequence_step> batch, kv_pool& kv, step_result& out);

  /// The same pass as forward(), as operations with yield points (see forward_task), for two-batch overlap:
  /// `slot` (0 or 1) picks one of two independent sets of per-call scratch, so two tasks on one model may be in
  /// flight at once, each with its own sequences (same kv pool, disjoint pages). `experts` computes the routed
  /// experts through its staged methods. Unlike forward(), an empty batch still walks every layer and calls
  /// the experts with zero tokens: an EP rank without sequences must still take part in every all-to-all.
  /// Not synchronised: the caller runs tasks of one model on one thread and never together with forward().
  /// `batch`, `kv`, `out` and `experts` must outlive the task. Adds to routing_counts() (forward() clears it).
  forward_task forward_ops(std::span<const sequence_step> batch, kv_pool& kv, step_result& out, int slot,
                           moe_experts& experts);

  /// Tokens routed to each expert in the last forward: [num_hidden_layers][n_routed_experts], row-major
  /// (rows of dense layers are 0).
  const std::vector<int64_t>& routing_counts() const { return routing_counts_; }
  void clear_routing_counts() { std::fill(routing_counts_.begin(), routing_counts_.end(), 0); }

  /// Pure-decode steps of forward() through the backend's step graphs (CUDA graphs, one per batch-size bucket
  /// 1, 2, 4, ... 256 and context bound): the step uses a fixed layout (index arrays sized to the bucket, padding
  /// rows that write no KV) and a device-side MoE path (no host round trip), so it can be captured once and
  /// replayed. Used only with the local experts (never under expert parallelism) and only for batches where every
  /// sequence has one new token and start_pos > 0; everything else runs the ordinary path. On by default when the
  /// backend supports graphs (cuda), off otherwise; PETREL_DECODE_GRAPHS=0 or 1 overrides. On a backend without graphs the fixed-layout path
  /// runs eagerly only when `even_without_graphs` (tests).
  void set_decode_graphs(bool on, bool even_without_graphs = false) {
    decode_graphs_ = on;
    graphs_without_support_ = even_without_graphs;
  }
  bool decode_graphs() const { return decode_graphs_; }
  /// How the last forward() ran: 0 the ordinary path, 1 the fixed-layout path eagerly, 2 replayed from a graph.
  int last_step_mode() const { return last_step_mode_; }

  /// Replaces the routed-expert computation (expert parallelism). The default is local_moe_experts.
  void set_moe_experts(std::shared_ptr<moe_experts> e) { experts_ = std::move(e); }
  moe_experts& experts() const { return *experts_; }

  const model_config& config() const { return cfg_; }
  const model_weights& weights() const { return w_; }
  /// For expert parallelism: the rank's expert store takes the routed experts it keeps and frees the others.
  /// Never while a forward runs.
  model_weights& mutable_weights() { return w_; }
  backend& be() const { return be_; }

private:
  void plan(forward_scratch& s, std::span<const sequence_step> batch, kv_pool& kv);
  void attention(forward_scratch& s, int32_t layer, const mat_view& hn, kv_pool& kv, const mat_view& attn_out);
  /// A layer's attention half: x += o_proj(attention(rmsnorm(x))), then hn = post-attention rmsnorm(x), which is
  /// what the MLP or the MoE half reads. attn and tmp are scratch.
  void attention_block(forward_scratch& s, int32_t layer, kv_pool& kv, const mat_view& x, const mat_view& hn,
                       const mat_view& attn, const mat_view& tmp);
  void mlp(forward_scratch& s, const mlp_weights& m, const mat_view& x, const mat_view& out);
  void route(forward_scratch& s, int32_t layer, const mat_view& hn, moe_routing& r);
  void logits(forward_scratch& s, std::span<const sequence_step> batch, const mat_view& x, step_result& out);
  void size_scratch(forward_scratch& s, int64_t B, int64_t max_prefill_ctx, int64_t max_prefill_n);
  bool graph_step_fits(std::span<const sequence_step> batch, kv_pool& kv) const;
  void forward_graph(std::span<const sequence_step> batch, kv_pool& kv, step_result& out);
  void graph_step_body(forward_scratch& s, kv_pool& kv);

  model_config cfg_;
  model_weights w_;
  backend& be_;
  std::shared_ptr<moe_experts> experts_;
  std::vector<int64_t> routing_counts_;
  std::mutex mu_;
  float softmax_scale_;
  float rope_af_;
  route_params route_; // noaux_tc routing settings, from the config
  std::unique_ptr<forward_scratch> scratch_[2];
  // -- decode graphs -------------------------------------------------------------------------------
  bool decode_graphs_ = false, graphs_without_support_ = false;
  int last_step_mode_ = 0;
  std::map<uint64_t, std::unique_ptr<forward_scratch>> graph_scratch_; // per (bucket, ctx bound): never moves
  const float* graph_kv_base_ = nullptr; // the pool the graphs write (a new one drops them)
  int32_t graph_kv_page_size_ = 0;
  device_buffer expert_ptrs_;   // [layer][gate_up | down][expert] weight pointers
  device_buffer counts_dev_;    // [layer][expert] int32 routing histogram of the step
  std::vector<int32_t> counts_host_;
};

} // namespace petrel
