// EPLB, per layer, in three steps (hierarchical policy):
//   1. pack expert groups onto nodes (balanced packing of group loads), so a group's experts share a node
//      and the dispatch of one token stays mostly intra-node;
//   2. inside each node, replicate the hottest expert (largest load per replica) until the node's slots are full;
//   3. pack the node's replicas onto its GPUs (balanced packing of per-replica loads).
// When groups do not divide evenly over nodes, the global policy runs the same steps with one group and
// one node, i.e. replication over all experts and packing over all GPUs.
#include "runtime/eplb.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <string>

namespace petrel::eplb {

packing balanced_packing(const std::vector<double>& items, int num_packs) {
  const int n = static_cast<int>(items.size());
  if (num_packs <= 0 || n % num_packs != 0)
    throw std::invalid_argument("balanced_packing: " + std::to_string(n) + " items do not split evenly into " +
                                std::to_string(num_packs) + " packs");
  const int per_pack = n / num_packs;
  packing out{std::vector<int>(n, 0), std::vector<int>(n, 0)};
  if (per_pack == 1) { // one item per pack: the identity, as no choice is left
    std::iota(out.pack.begin(), out.pack.end(), 0);
    return out;
  }
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return items[a] > items[b]; });
  std::vector<double> pack_load(num_packs, 0.0);
  std::vector<int> pack_items(num_packs, 0);
  for (int item : order) {
    int best = -1;
    for (int p = 0; p < num_packs; ++p) {
      if (pack_items[p] >= per_pack) continue;
      if (best < 0 || pack_load[p] < pack_load[best]) best = p;
    }
    out.pack[item] = best;
    out.rank[item] = pack_items[best];
    pack_load[best] += items[item];
    ++pack_items[best];
  }
  return out;
}

replication replicate_experts(const std::vector<double>& load, int num_physical) {
  const int n = static_cast<int>(load.size());
  if (num_physical < n)
    throw std::invalid_argument("replicate_experts: " + std::to_string(num_physical) + " slots cannot hold " +
                                std::to_string(n) + " experts");
  replication out;
  out.phy2log.resize(num_physical);
  out.replica_rank.assign(num_physical, 0);
  out.count.assign(n, 1);
  std::iota(out.phy2log.begin(), out.phy2log.begin() + n, 0);
  for (int p = n; p < num_physical; ++p) {
    int best = 0;
    double best_share = load[0] / out.count[0];
    for (int e = 1; e < n; ++e) {
      const double share = load[e] / out.count[e];
      if (share > best_share) {
        best = e;
        best_share = share;
      }
    }
    out.phy2log[p] = best;
    out.replica_rank[p] = out.count[best];
    ++out.count[best];
  }
  return out;
}

bool uses_hierarchical_policy(const eplb_shape& shape) {
  return shape.num_nodes > 0 && shape.num_groups > 0 && shape.num_groups % shape.num_nodes == 0;
}

std::string check_arguments(const expert_load_matrix& weight, const eplb_shape& s) {
  if (weight.empty()) return "the load has no layers";
  const size_t num_logical = weight[0].size();
  if (num_logical == 0) return "layer 0 of the load has no experts";
  for (size_t l = 0; l < weight.size(); ++l) {
    if (weight[l].size() != num_logical)
      return "layer " + std::to_string(l) + " has " + std::to_string(weight[l].size()) + " experts, layer 0 has " +
             std::to_string(num_logical);
    for (size_t e = 0; e < num_logical; ++e)
      if (!std::isfinite(weight[l][e]) || weight[l][e] < 0)
        return "load[" + std::to_string(l) + "][" + std::to_string(e) + "] = " + std::to_string(weight[l][e]) +
               " is not a finite non-negative number";
  }
  const int L = static_cast<int>(num_logical);
  if (s.num_replicas <= 0) return "replicas must be positive (got " + std::to_string(s.num_replicas) + ")";
  if (s.num_groups <= 0) return "groups must be positive (got " + std::to_string(s.num_groups) + ")";
  if (s.num_nodes <= 0) return "nodes must be positive (got " + std::to_string(s.num_nodes) + ")";
  if (s.num_gpus <= 0) return "gpus must be positive (got " + std::to_string(s.num_gpus) + ")";
  if (s.num_replicas % s.num_gpus != 0)
    return "replicas (" + std::to_string(s.num_replicas) + ") must be divisible by gpus (" +
           std::to_string(s.num_gpus) + ")";
  if (s.num_gpus % s.num_nodes != 0)
    return "gpus (" + std::to_string(s.num_gpus) + ") must be divisible by nodes (" + std::to_string(s.num_nodes) +
           ")";
  if (s.num_replicas < L)
    return "replicas (" + std::to_string(s.num_replicas) + ") must be at least the number of experts (" +
           std::to_string(L) + ")";
  if (uses_hierarchical_policy(s)) {
    // Only the hierarchical policy splits experts into groups; the global one treats them as a single group.
    if (L % s.num_groups != 0)
      return "experts (" + std::to_string(L) + ") must be divisible by groups (" + std::to_string(s.num_groups) +
             ") for the hierarchical policy";
    // Each node gets num_groups/num_nodes whole groups, so L/num_nodes experts, into num_replicas/num_nodes slots.
    if (s.num_replicas / s.num_nodes < L / s.num_nodes)
      return "each node has " + std::to_string(s.num_replicas / s.num_nodes) + " slots but holds " +
             std::to_string(L / s.num_nodes) + " experts";
  }
  return {};
}

namespace {

struct layer_result {
  std::vector<int> phy2log;
  std::vector<int> phyrank;
  std::vector<int> logcnt;
};

layer_result rebalance_layer(const std::vector<double>& w, int num_replicas, int num_groups, int num_nodes,
                             int num_gpus) {
  const int L = static_cast<int>(w.size());
  const int group_size = L / num_groups;
  const int groups_per_node = num_groups / num_nodes;
  const int gpus_per_node = num_gpus / num_nodes;
  const int slots_per_gpu = num_replicas / num_gpus;
  const int log_per_node = L / num_nodes;
  const int phy_per_node = num_replicas / num_nodes;

  // Step 1: groups onto nodes. "mlog" numbers experts node-major: node n holds mlog [n*log_per_node, ...).
  std::vector<double> group_load(num_groups, 0.0);
  for (int e = 0; e < L; ++e) group_load[e / group_size] += w[e];
  const packing groups = balanced_packing(group_load, num_nodes);
  std::vector<int> mlog2log(L);
  for (int e = 0; e < L; ++e) {
    const int g = e / group_size;
    const int mlog = (groups.pack[g] * groups_per_node + groups.rank[g]) * group_size + e % group_size;
    mlog2log[mlog] = e;
  }

  layer_result out{std::vector<int>(num_replicas, -1), std::vector<int>(num_replicas, 0), std::vector<int>(L, 0)};
  for (int node = 0; node < num_nodes; ++node) {
    // Step 2: replicate within the node.
    std::vector<double> node_load(log_per_node);
    for (int j = 0; j < log_per_node; ++j) node_load[j] = w[mlog2log[node * log_per_node + j]];
    const replication rep = replicate_experts(node_load, phy_per_node);

    // Step 3: the node's replicas onto its GPUs, each replica carrying an equal share of its expert's load.
    std::vector<double> replica_load(phy_per_node);
    for (int p = 0; p < phy_per_node; ++p) replica_load[p] = node_load[rep.phy2log[p]] / rep.count[rep.phy2log[p]];
    const packing gpus = balanced_packing(replica_load, gpus_per_node);
    for (int p = 0; p < phy_per_node; ++p) {
      const int slot = node * phy_per_node + gpus.pack[p] * slots_per_gpu + gpus.rank[p];
      out.phy2log[slot] = mlog2log[node * log_per_node + rep.phy2log[p]];
      out.phyrank[slot] = rep.replica_rank[p];
    }
    for (int j = 0; j < log_per_node; ++j) out.logcnt[mlog2log[node * log_per_node + j]] = rep.count[j];
  }
  return out;
}

} // namespace

expert_placement rebalance_experts(const expert_load_matrix& weight, const eplb_shape& shape) {
  if (std::string err = check_arguments(weight, shape); !err.empty()) throw std::invalid_argument("eplb: " + err);
  const bool hier = uses_hierarchical_policy(shape);
  const int groups = hier ? shape.num_groups : 1;
  const int nodes = hier ? shape.num_nodes : 1;

  expert_placement out;
  out.num_layers = static_cast<int>(weight.size());
  out.num_logical = static_cast<int>(weight[0].size());
  out.num_replicas = shape.num_replicas;
  std::vector<layer_result> layers;
  layers.reserve(weight.size());
  for (const auto& w : weight) {
    layers.push_back(rebalance_layer(w, shape.num_replicas, groups, nodes, shape.num_gpus));
    for (int c : layers.back().logcnt) out.max_replicas = std::max(out.max_replicas, c);
  }
  for (auto& lr : layers) {
    std::vector<std::vector<int>> l2p(out.num_logical, std::vector<int>(out.max_replicas, -1));
    for (int slot = 0; slot < out.num_replicas; ++slot) l2p[lr.phy2log[slot]][lr.phyrank[slot]] = slot;
    out.phy2log.push_back(std::move(lr.phy2log));
    out.logcnt.push_back(std::move(lr.logcnt));
    out.log2phy.push_back(std::move(l2p));
  }
  return out;
}

expert_placement identity_placement(int num_layers, int num_logical) {
  expert_placement out;
  out.num_layers = num_layers;
  out.num_logical = num_logical;
  out.num_replicas = num_logical;
  out.max_replicas = 1;
  std::vector<int> ids(num_logical);
  std::iota(ids.begin(), ids.end(), 0);
  std::vector<std::vector<int>> l2p(num_logical);
  for (int e = 0; e < num_logical; ++e) l2p[e] = {e};
  out.phy2log.assign(num_layers, ids);
  out.log2phy.assign(num_layers, l2p);
  out.logcnt.assign(num_layers, std::vector<int>(num_logical, 1));
  return out;
}

} // namespace petrel::eplb
