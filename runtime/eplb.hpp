// EPLB: DeepSeek's expert-parallel load balancer (hierarchical + global policy), written from the
// algorithm's description. Given a per-(layer, logical expert) load, it decides how many replicas each
// logical expert gets and which physical slot (and so which GPU) holds each replica.
//
// Physical slots are numbered GPU-major: slot s lives on GPU s / (num_replicas / num_gpus).
#pragma once

#include <string>
#include <vector>

namespace petrel::eplb {

// -- inputs ------------------------------------------------------------------------------

/// The cluster shape EPLB balances for.
struct eplb_shape {
  int num_replicas = 0; // physical expert slots over the whole EP group (e.g. 288 for 256 experts + 32 redundant)
  int num_groups = 1;   // expert groups (DeepSeek-V3: 8); experts of a group are kept on one node when possible
  int num_nodes = 1;    // server nodes (intra-node links are faster)
  int num_gpus = 1;     // GPUs in the EP group; must be a multiple of num_nodes
};

/// Load per layer per logical expert: weight[layer][expert] (tokens routed, or any non-negative measure).
using expert_load_matrix = std::vector<std::vector<double>>;

// -- outputs -----------------------------------------------------------------------------

/// Where every replica lives. All vectors are indexed by layer first.
struct expert_placement {
  int num_layers = 0;
  int num_logical = 0;
  int num_replicas = 0;
  int max_replicas = 0; // the widest logcnt over all layers; log2phy rows are padded to it with -1
  std::vector<std::vector<int>> phy2log;              // [layer][slot] -> logical expert
  std::vector<std::vector<std::vector<int>>> log2phy; // [layer][logical][replica] -> slot, -1 padded
  std::vector<std::vector<int>> logcnt;               // [layer][logical] -> number of replicas (>= 1)

  int slots_per_gpu(int num_gpus) const { return num_replicas / num_gpus; }
};

// -- building blocks (exposed for tests and for the rebalancer) ---------------------------------

/// Result of balanced packing: item i goes to pack[i], at position rank[i] inside it.
struct packing {
  std::vector<int> pack;
  std::vector<int> rank;
};

/// Packs items.size() items into num_packs packs of exactly items.size()/num_packs items each: the
/// heaviest item first, each onto the lightest pack that still has room (ties: lowest pack index).
/// Requires items.size() % num_packs == 0.
packing balanced_packing(const std::vector<double>& items, int num_packs);

/// Result of replication: phy2log[p] names the logical expert of physical replica p, replica_rank[p] its
/// index among that expert's replicas, and count[e] the replica count of expert e.
struct replication {
  std::vector<int> phy2log;
  std::vector<int> replica_rank;
  std::vector<int> count;
};

/// Gives each logical expert one replica, then adds the remaining num_physical - load.size() replicas one at
/// a time, each to the expert with the largest load / count (ties: lowest expert index).
replication replicate_experts(const std::vector<double>& load, int num_physical);

// -- the policy --------------------------------------------------------------------------

/// Returns "" when the arguments are usable, else a message naming what is wrong (for the CLI and the
/// rebalancer to show the user). Checks: every layer has num_logical >= 1 loads, all finite and >= 0;
/// num_replicas divisible by num_gpus; num_gpus divisible by num_nodes; num_replicas >= num_logical; and, for
/// the hierarchical policy, num_logical divisible by num_groups and enough slots per node for its experts.
std::string check_arguments(const expert_load_matrix& weight, const eplb_shape& shape);

/// True when the hierarchical policy applies (groups divide evenly over nodes); otherwise the global
/// policy runs: all experts as one group on one node, replicas then packed over all GPUs.
bool uses_hierarchical_policy(const eplb_shape& shape);

/// Runs EPLB for every layer. Throws std::invalid_argument with check_arguments' message on bad input.
expert_placement rebalance_experts(const expert_load_matrix& weight, const eplb_shape& shape);

/// The identity placement without redundancy (expert e in slot e), as used before any rebalancing.
expert_placement identity_placement(int num_layers, int num_logical);

} // namespace petrel::eplb
