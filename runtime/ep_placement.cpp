// Expert placement of an EP group: validation, the JSON `petrel eplb` writes, and the initial placement.
// Kept apart from runtime/ep.cpp (the EP rank) so that light users such as cluster.yaml validation link
// only this and runtime/eplb.cpp.
#include "runtime/ep.hpp"

#include <algorithm>
#include <fstream>
#include <numeric>
#include <stdexcept>

namespace petrel::ep {

int moe_layer_count(const model_config& cfg) {
  int n = 0;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) n += cfg.is_moe_layer(l) ? 1 : 0;
  return n;
}

// -- placement -------------------------------------------------------------------------------------

void ep_placement::index() {
  log2phy.assign(phy2log.size(), std::vector<std::vector<int32_t>>(size_t(num_logical)));
  for (size_t l = 0; l < phy2log.size(); ++l)
    for (int s = 0; s < int(phy2log[l].size()); ++s) log2phy[l][size_t(phy2log[l][size_t(s)])].push_back(s);
}

eplb::expert_placement ep_placement::to_eplb() const {
  eplb::expert_placement p;
  p.num_layers = num_layers();
  p.num_logical = num_logical;
  p.num_replicas = num_slots;
  for (size_t l = 0; l < phy2log.size(); ++l) {
    p.phy2log.emplace_back(phy2log[l].begin(), phy2log[l].end());
    std::vector<std::vector<int>> l2p;
    std::vector<int> cnt;
    for (const auto& reps : log2phy[l]) {
      l2p.emplace_back(reps.begin(), reps.end());
      cnt.push_back(int(reps.size()));
      p.max_replicas = std::max(p.max_replicas, int(reps.size()));
    }
    p.log2phy.push_back(std::move(l2p));
    p.logcnt.push_back(std::move(cnt));
  }
  for (auto& layer : p.log2phy)
    for (auto& reps : layer) reps.resize(size_t(p.max_replicas), -1);
  return p;
}

std::string check_placement(const std::vector<std::vector<int32_t>>& phy2log, const model_config& cfg, int num_ranks,
                            bool require_divisible) {
  const int layers = moe_layer_count(cfg), E = int(cfg.n_routed_experts);
  if (num_ranks < 1) return "the EP group needs at least one rank";
  if (int(phy2log.size()) != layers)
    return "phy2log has " + std::to_string(phy2log.size()) + " layers but the model has " + std::to_string(layers) +
           " MoE layers";
  if (layers == 0) return "";
  const size_t S = phy2log[0].size();
  for (size_t l = 0; l < phy2log.size(); ++l) {
    if (phy2log[l].size() != S)
      return "phy2log layer " + std::to_string(l) + " has " + std::to_string(phy2log[l].size()) +
             " slots but layer 0 has " + std::to_string(S);
    std::vector<int> seen(size_t(E), 0);
    for (size_t s = 0; s < S; ++s) {
      const int32_t e = phy2log[l][s];
      if (e < 0 || e >= E)
        return "phy2log[" + std::to_string(l) + "][" + std::to_string(s) + "] = " + std::to_string(e) +
               " is not an expert id of this model (0.." + std::to_string(E - 1) + ")";
      seen[size_t(e)]++;
    }
    for (int e = 0; e < E; ++e)
      if (!seen[size_t(e)])
        return "phy2log layer " + std::to_string(l) + " places no replica of expert " + std::to_string(e);
  }
  if (int(S) < num_ranks)
    return std::to_string(S) + " slots cannot be spread over " + std::to_string(num_ranks) + " ranks";
  if (require_divisible && S % size_t(num_ranks) != 0)
    return std::to_string(S) + " slots per layer do not divide evenly over " + std::to_string(num_ranks) +
           " ranks (EPLB places the same number of slots on every rank)";
  return "";
}

ep_placement placement_from_json(const nlohmann::json& j, const model_config& cfg, int num_ranks) {
  if (!j.is_object() || !j.contains("phy2log"))
    throw std::invalid_argument("expected a JSON object with \"phy2log\": [[...], ...] (what `petrel eplb` prints)");
  const auto& rows = j.at("phy2log");
  if (!rows.is_array()) throw std::invalid_argument("\"phy2log\" must be an array of per-layer arrays");
  std::vector<std::vector<int32_t>> p2l;
  for (size_t l = 0; l < rows.size(); ++l) {
    if (!rows[l].is_array()) throw std::invalid_argument("phy2log[" + std::to_string(l) + "] is not an array");
    std::vector<int32_t> row;
    for (size_t s = 0; s < rows[l].size(); ++s) {
      const auto& v = rows[l][s];
      if (!v.is_number_integer())
        throw std::invalid_argument("phy2log[" + std::to_string(l) + "][" + std::to_string(s) + "] is not an integer");
      const int64_t x = v.get<int64_t>();
      if (x < INT32_MIN || x > INT32_MAX)
        throw std::invalid_argument("phy2log[" + std::to_string(l) + "][" + std::to_string(s) + "] is out of range");
      row.push_back(int32_t(x));
    }
    p2l.push_back(std::move(row));
  }
  if (std::string err = check_placement(p2l, cfg, num_ranks, true); !err.empty()) throw std::invalid_argument(err);
  ep_placement p;
  p.num_ranks = num_ranks;
  p.num_logical = int(cfg.n_routed_experts);
  p.num_slots = p2l.empty() ? int(cfg.n_routed_experts) : int(p2l[0].size());
  p.phy2log = std::move(p2l);
  p.index();
  return p;
}

ep_placement placement_from_file(const std::string& path, const model_config& cfg, int num_ranks) {
  std::ifstream in(path);
  if (!in) throw std::invalid_argument(path + ": cannot open the expert placement file");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw std::invalid_argument(path + ": not valid JSON: " + e.what());
  }
  try {
    return placement_from_json(j, cfg, num_ranks);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(path + ": " + e.what());
  }
}

ep_placement initial_placement(const model_config& cfg, int num_ranks, int redundant) {
  const int layers = moe_layer_count(cfg), E = int(cfg.n_routed_experts);
  if (num_ranks < 1) throw std::invalid_argument("the EP group needs at least one rank");
  if (redundant < 0) throw std::invalid_argument("redundant experts must be >= 0");
  ep_placement p;
  p.num_ranks = num_ranks;
  p.num_logical = E;
  p.num_slots = E + redundant;
  if (layers > 0 && p.num_slots < num_ranks)
    throw std::invalid_argument(std::to_string(p.num_slots) + " expert slots cannot be spread over " +
                                std::to_string(num_ranks) + " ranks");
  if (redundant == 0) {
    std::vector<int32_t> ids(static_cast<size_t>(E));
    std::iota(ids.begin(), ids.end(), 0);
    p.phy2log.assign(size_t(layers), ids);
  } else if (layers > 0) {
    if (p.num_slots % num_ranks != 0)
      throw std::invalid_argument(std::to_string(E) + " experts + " + std::to_string(redundant) +
                                  " redundant = " + std::to_string(p.num_slots) +
                                  " slots do not divide evenly over " + std::to_string(num_ranks) + " ranks");
    eplb::eplb_shape shape{p.num_slots, 1, 1, num_ranks};
    const eplb::expert_placement placed =
        eplb::rebalance_experts(eplb::expert_load_matrix(size_t(layers), std::vector<double>(size_t(E), 1.0)), shape);
    for (const auto& row : placed.phy2log) p.phy2log.emplace_back(row.begin(), row.end());
  }
  p.index();
  return p;
}

ep_placement starting_placement(const model_config& cfg, int num_ranks, int redundant,
                                const std::string& init_expert_location) {
  return init_expert_location.empty() ? initial_placement(cfg, num_ranks, redundant)
                                      : placement_from_file(init_expert_location, cfg, num_ranks);
}

} // namespace petrel::ep
