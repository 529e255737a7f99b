// Expert-load statistics for EPLB: a cheap recorder that counts routed tokens per (layer, logical expert)
// over a sliding window of steps, JSON dump/load, a seeded Zipf load generator, and the balancedness metric.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/eplb.hpp"

namespace petrel::eplb {

// -- recorder ----------------------------------------------------------------------------

/// Counts tokens routed to each (layer, logical expert) over the last `window` steps. A step is one forward
/// pass; its counts go into the ring slot of the current step and the running sum is kept up to date, so
/// recording costs one add per routed token (or per expert with record_counts) and reading the window sum
/// costs a copy. Not thread-safe: one recorder per rank, merged by the rebalancer.
class expert_load_recorder {
public:
  /// Throws std::invalid_argument unless num_layers, num_experts and window are all positive.
  expert_load_recorder(int num_layers, int num_experts, int window);

  /// Adds the routed logical expert ids of one layer (any shape flattened, e.g. [tokens x top_k]).
  /// Ids outside [0, num_experts) are counted in dropped() and otherwise ignored (padding uses -1).
  void record_topk(int layer, std::span<const int32_t> expert_ids);

  /// Adds a per-expert count vector for one layer (what a dispatch kernel already computes). Size must be num_experts.
  void record_counts(int layer, std::span<const int64_t> counts);

  /// Closes the current step: the next records go into a fresh ring slot, and the oldest step leaves the window.
  void next_step();

  /// Sum over the window (the current, still-open step included): [layer][expert].
  expert_load_matrix window_load() const;

  /// Adds another recorder's window (same shape) into this one's current step, e.g. to merge ranks.
  void merge_window_of(const expert_load_recorder& other);

  int num_layers() const { return num_layers_; }
  int num_experts() const { return num_experts_; }
  int window() const { return window_; }
  int64_t steps_recorded() const { return steps_; }
  int64_t dropped() const { return dropped_; }

  /// {"format":"petrel.expert_load.v1","num_layers","num_experts","window","steps_recorded","head",
  ///  "windows":[[[...]]] (ring slots), "load":[[...]] (the window sum, what EPLB consumes)}.
  nlohmann::json to_json() const;
  /// Inverse of to_json; throws std::invalid_argument naming the bad field.
  static expert_load_recorder from_json(const nlohmann::json& j);

private:
  int64_t& cell(int slot, int layer, int expert) {
    return ring_[(static_cast<size_t>(slot) * num_layers_ + layer) * num_experts_ + expert];
  }
  void check_layer(int layer) const;

  int num_layers_, num_experts_, window_;
  int head_ = 0; // ring slot of the open step
  int64_t steps_ = 0, dropped_ = 0;
  std::vector<int64_t> ring_; // [window][layer][expert]
  std::vector<int64_t> sum_;  // [layer][expert], always the sum over the ring
};

/// Reads an expert load from JSON in any of these forms: [[per-expert load, layer 0], [layer 1], ...];
/// {"weight": [[...]]}; or a recorder dump (uses its "load"). Throws std::invalid_argument naming what is wrong.
expert_load_matrix load_matrix_from_json(const nlohmann::json& j);

// -- synthetic load ----------------------------------------------------------------------------

/// Routing load of `tokens` tokens, each picking top_k distinct experts, where in every layer expert ranks
/// follow Zipf(s) (probability of the rank-r expert proportional to r^-s) over a per-layer random order of
/// experts. Seeded, so the same arguments always give the same matrix. s = 0 is uniform routing.
expert_load_matrix zipf_load(int num_layers, int num_experts, int top_k, int64_t tokens, double s, uint64_t seed);

// -- balancedness ------------------------------------------------------------------------------

/// Load of each GPU in one layer: each logical expert's load splits evenly over its replicas, and slot s
/// lives on GPU s * num_gpus / num_slots (GPU-major slots; uneven counts allowed, e.g. 256 experts on 72 GPUs).
std::vector<double> gpu_loads(const expert_placement& placement, const expert_load_matrix& load, int layer,
                              int num_gpus);

struct balancedness_report {
  std::vector<double> per_layer; // mean GPU load / max GPU load, per layer (1.0 = perfectly balanced)
  double mean = 1.0;             // average of per_layer
  double step_weighted = 1.0;    // sum over layers of mean load / sum of max load: the ratio ideal/actual
                                 // MoE time when every layer waits for its busiest GPU
};

/// Throws std::invalid_argument when the placement and the load disagree in shape.
balancedness_report balancedness(const expert_placement& placement, const expert_load_matrix& load, int num_gpus);

} // namespace petrel::eplb
