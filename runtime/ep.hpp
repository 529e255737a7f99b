// Expert parallelism (EP) with DP attention: one ep_rank per rank of an EP group of N ranks.
//
// Each rank owns its own sequences and their KV (DP attention); attention, dense FFN layers, shared experts and the
// LM head run on every rank. The routed experts are spread over the ranks by an ep_placement: physical slots,
// GPU-major (rank r holds the contiguous slot range [slot_begin(r), slot_end(r))), redundant replicas included.
// A rank holds the weights of its own slots only (ep_expert_store).
//
// Per MoE layer, every rank (also one without tokens) takes part in two all-to-alls through its ep_transport:
//   dispatch  each token goes once to every rank owning one of its top-k experts (one physical replica is picked
//             per (token, k) from log2phy, spread by token), with its top-k slot ids;
//   compute   the rank lays the received rows out for its grouped GEMMs: the contiguous layout (normal mode, rows
//             per expert aligned to 128, -1 padding) or the masked layout (low-latency mode, fixed
//             [local experts, max_m, hidden] buffers plus a count per expert), and runs its experts;
//   combine   each (token, k) output goes back to the token's rank, which sums weight * output in k order. The
//             order never depends on the placement, so outputs do not change with EP size or rebalancing.
// The step protocol, the live rebalance and two-batch overlap are described at ep_rank. docs/expert-parallel.md
// has the whole design.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/ep_device_plane.hpp"
#include "runtime/ep_transport.hpp"
#include "runtime/eplb.hpp"
#include "runtime/expert_load.hpp"
#include "runtime/model.hpp"
#include "runtime/moe_layout.hpp"

namespace petrel::ep {

// -- placement -----------------------------------------------------------------------------------

/// Where every physical expert slot of every MoE layer lives. Layer index = MoE layer (model layer minus
/// first_k_dense_replace), as in `petrel eplb` output.
struct ep_placement {
  int num_ranks = 1;
  int num_logical = 0;
  int num_slots = 0;
  std::vector<std::vector<int32_t>> phy2log;              // [moe layer][slot] -> logical expert
  std::vector<std::vector<std::vector<int32_t>>> log2phy; // [moe layer][logical] -> its slots, ascending

  int num_layers() const { return int(phy2log.size()); }
  /// Rank r owns slots [slot_begin(r), slot_end(r)): ceil(r * S / N), so slot s lives on rank floor(s * N / S)
  /// (the GPU-major rule of runtime/eplb; equal ranges when N divides S).
  int slot_begin(int rank) const { return int((int64_t(rank) * num_slots + num_ranks - 1) / num_ranks); }
  int slot_end(int rank) const { return slot_begin(rank + 1); }
  int owner(int slot) const { return int(int64_t(slot) * num_ranks / num_slots); }
  int num_local(int rank) const { return slot_end(rank) - slot_begin(rank); }

  /// Fills log2phy from phy2log.
  void index();
  /// The same placement in runtime/eplb's form (for balancedness reports).
  eplb::expert_placement to_eplb() const;
  bool operator==(const ep_placement& o) const { return num_ranks == o.num_ranks && phy2log == o.phy2log; }
};

/// "" when phy2log fits the model and the group, else a message naming what is wrong: one row per MoE layer,
/// every row the same width S with num_logical <= S, num_ranks <= S, every id in [0, n_routed_experts), every
/// logical expert placed at least once per layer, and (require_divisible) S divisible by num_ranks.
std::string check_placement(const std::vector<std::vector<int32_t>>& phy2log, const model_config& cfg, int num_ranks,
                            bool require_divisible);

/// Reads the JSON `petrel eplb` prints ({"phy2log": [[...]], ...}; other keys ignored) and validates it with
/// check_placement (S divisible by the group size). Throws std::invalid_argument with the message.
ep_placement placement_from_json(const nlohmann::json& j, const model_config& cfg, int num_ranks);
/// The same from a file; the message names the file.
ep_placement placement_from_file(const std::string& path, const model_config& cfg, int num_ranks);

/// The placement before any load was seen: expert e in slot e when redundant == 0 (S = E need not divide by N);
/// otherwise EPLB over a uniform load with E + redundant slots (which must divide by N). Throws
/// std::invalid_argument naming the problem.
ep_placement initial_placement(const model_config& cfg, int num_ranks, int redundant);

/// The placement a group starts from: the file `init_expert_location` names (placement_from_file) when it is not
/// empty, else initial_placement with `redundant` extra slots.
ep_placement starting_placement(const model_config& cfg, int num_ranks, int redundant,
                                const std::string& init_expert_location);

/// MoE layers of the model (layers at or past first_k_dense_replace that route to experts).
int moe_layer_count(const model_config& cfg);

// -- per-rank expert weights ---------------------------------------------------------------------------

/// The routed experts one rank holds: one SwiGLU weight pair per local slot and MoE layer (a redundant replica
/// is a full copy).
struct ep_expert_store {
  std::vector<std::vector<mlp_weights>> slots; // [moe layer][local slot]
};

// -- options and statistics ----------------------------------------------------------------------

enum class ep_mode { normal, low_latency };
const char* mode_name(ep_mode m);

struct ep_options {
  ep_mode mode = ep_mode::normal;
  /// Low-latency mode: at most this many tokens per rank and micro-batch go through the masked layout
  /// (max_m = max_dispatch_tokens * N rows per local expert). A step where some rank has more (a prefill) runs
  /// in normal mode; every rank agrees through the step header.
  int max_dispatch_tokens = 128;
  /// Two-batch overlap: split each rank's batch into two micro-batches (whole sequences, cut where the token
  /// counts are closest; a lone prefill sequence is cut in the middle of its tokens); while one waits for its
  /// dispatch or combine, the other computes.
  bool two_batch_overlap = false;
  /// Live rebalance every this many steps (0: only on request_rebalance()).
  int64_t rebalance_every = 0;
  /// Steps of expert load kept for EPLB.
  int load_window = 128;
  /// EPLB shape: expert groups (0: the model's n_group when it divides the experts, else 1) and nodes.
  int eplb_groups = 0;
  int eplb_nodes = 1;
  /// Benchmarks only: rewrites the routed logical expert ids of a rank's tokens (rank, moe layer,
  /// [tokens x top_k]) before dispatch, e.g. to impose a Zipf load. Called on the rank's thread. Outputs are
  /// then meaningless.
  std::function<void(int rank, int moe_layer, std::span<int32_t> ids)> routing_override;
  /// The GPU data plane (cuda backend; every rank of the group on one host): dispatch and combine rows move
  /// between the ranks' device memory (runtime/ep_device_plane.hpp, fp8 out and bf16 back) instead of through the
  /// transport as fp32 host bytes. The transport still carries the step header, the load gather and the
  /// rebalance's weights. A step in which some micro-batch has more than device_max_tokens tokens (normal mode)
  /// moves its rows through the transport instead; every rank decides the same from the step header.
  bool device_exchange = false;
  /// What carries the plane's rows (cuda_ipc: Petrel's kernels; nccl: NCCL send/recv, the baseline) and, for nccl,
  /// rank 0's NCCL unique id (the same bytes on every rank; ep_group makes it, a served cluster carries it in the
  /// CAF ep_peers message).
  device_exchange_kind device_kind = device_exchange_kind::cuda_ipc;
  std::vector<uint8_t> device_bootstrap;
  int device_max_tokens = 512;
  /// The plane's experts in fp8 (device_plane_config::fp8_experts, opt-in); false: fp32 experts on dequantised rows.
  bool device_fp8_experts = false;
  /// Bounded wait of the GPU exchange's receives: a peer silent this long fails the step.
  double device_timeout_s = 10;
};

struct ep_stats {
  int64_t steps = 0;
  int64_t low_latency_steps = 0;
  int64_t rebalances = 0;            // placements switched
  int64_t experts_moved_in = 0;      // expert replicas this rank received through the transport
  int64_t experts_copied_local = 0;  // new replicas this rank already held
  int64_t weight_bytes_in = 0;       // bytes of expert weights received
  int64_t expert_rows = 0;           // (token, k) rows this rank's experts computed, all layers (host plane)
  int64_t device_steps = 0;          // steps whose rows went through the GPU data plane
  int64_t device_tokens_sent = 0;    // token rows this rank dispatched through it (all MoE layers)
  std::string last_rebalance_note;   // why the last request did nothing, if it did nothing
};

// -- one rank ----------------------------------------------------------------------------------------

class ep_rank;

/// The EP implementation of the model's routed-expert seam, one per rank (set on the rank's model).
class ep_moe_experts final : public moe_experts {
public:
  explicit ep_moe_experts(ep_rank& rank);
  ~ep_moe_experts() override;

  void run(int32_t layer, const mat_view& hidden, const moe_routing& routing, const mat_view& out) override;
  void dispatch_start(int slot, int32_t layer, const mat_view& hidden, const moe_routing& routing) override;
  void expert_compute(int slot) override;
  void combine_finish(int slot, const mat_view& out) override;

private:
  struct pending;
  ep_rank& rank_;
  std::unique_ptr<pending> p_[2];
};

/// One rank of an EP group. The rank actor (or the in-process ep_group) owns one; the transport is the only
/// thing that differs between ranks in one process and ranks in several.
///
/// Step protocol (collective): every rank calls step() once per step, in step order, with its own sequences
/// (an empty batch is a zero-token step that still serves the other ranks' tokens):
///   1. step header all-to-all: tokens per micro-batch, prefill or not, rebalance requested. From it every rank
///      derives the same mode (low-latency only if every micro-batch fits max_dispatch_tokens) and the same
///      rebalance decision.
///   2. a placement whose weights were started in the previous step is switched to now (step boundary).
///   3. a rebalance (every rebalance_every steps or on request, by any rank): all-gather the expert-load windows,
///      run EPLB (deterministic, so every rank computes the same placement), START the weight all-to-all (each
///      new replica comes from the lowest rank holding that expert, or is copied locally). The step runs on the
///      old placement while the weights travel; they switch at step 2 of the next step.
///   4. the forward pass, one micro-batch or two (TBO): deepseek_model::forward_ops coroutines interleaved at
///      their yield points.
/// If step() throws on any rank, it aborts the transport, so that every other rank's step throws too instead of
/// waiting forever; the group is then unusable (its supervisor restarts it).
class ep_rank {
public:
  /// Takes the model (loaded in full or with dummy weights), keeps the routed experts of this rank's slots of
  /// `placement` in its store and frees all the others. Throws std::invalid_argument when the placement does
  /// not fit the model or the transport's group, or rebalance_every > 0 with slots not divisible by the group.
  ep_rank(std::unique_ptr<deepseek_model> model, ep_placement placement, ep_transport& transport, ep_options opt);
  ~ep_rank();

  /// One collective step (see above). `out` gets this rank's logits, as deepseek_model::forward gives them.
  void step(std::span<const sequence_step> batch, kv_pool& kv, step_result& out);

  /// Whether any rank of the group had tokens in the last step (from the step header). A rank that has finished
  /// its own sequences keeps stepping while this is true: every rank then stops after the same step.
  bool group_had_tokens() const { return group_had_tokens_; }

  /// Asks for a rebalance at the next step boundary (any rank may ask; the header spreads it).
  void request_rebalance() { rebalance_requested_ = true; }

  int rank() const { return transport_.rank(); }
  int size() const { return transport_.size(); }
  const ep_placement& placement() const { return placement_; }
  const eplb::expert_load_recorder& load() const { return recorder_; }
  const ep_stats& stats() const { return stats_; }
  const ep_options& options() const { return opt_; }
  deepseek_model& model() { return *model_; }
  ep_transport& transport() { return transport_; }
  /// Slots this rank holds (local index i is global slot slot_begin + i), for tests.
  const ep_expert_store& store() const { return store_; }
  /// The GPU data plane (nullptr without options().device_exchange) and whether the last step used it.
  const device_plane* plane() const { return plane_.get(); }
  bool last_step_on_device() const { return step_device_; }

private:
  friend class ep_moe_experts;
  struct rebalance_plan;

  void prepare_rebalance();
  void finish_rebalance();
  void open_plane();
  /// Hands the plane every layer's local experts when the store changed since it last did.
  void sync_plane_experts();

  std::unique_ptr<deepseek_model> model_;
  ep_transport& transport_;
  ep_options opt_;
  ep_placement placement_;
  ep_expert_store store_;
  eplb::expert_load_recorder recorder_;
  std::shared_ptr<ep_moe_experts> experts_;
  uint64_t step_ = 0;
  ep_mode step_mode_ = ep_mode::normal;
  bool rebalance_requested_ = false;
  bool group_had_tokens_ = true;
  std::unique_ptr<rebalance_plan> pending_rebalance_;
  ep_stats stats_;
  std::unique_ptr<device_plane> plane_;
  bool plane_open_ = false;
  bool step_device_ = false;
  int64_t mb_group_tokens_[2] = {0, 0}; // tokens of the whole group per micro-batch this step (step header)
  uint64_t store_version_ = 0, plane_version_ = ~uint64_t(0); // store changes; the store the plane holds
  step_result mb_out_[2];
  sequence_step halves_[2]; // a lone prefill sequence split into two micro-batches
};

} // namespace petrel::ep
