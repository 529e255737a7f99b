#include "runtime/expert_load.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <stdexcept>

namespace petrel::eplb {

// -- recorder ----------------------------------------------------------------------------

expert_load_recorder::expert_load_recorder(int num_layers, int num_experts, int window)
    : num_layers_(num_layers), num_experts_(num_experts), window_(window) {
  if (num_layers <= 0 || num_experts <= 0 || window <= 0)
    throw std::invalid_argument("expert_load_recorder: layers (" + std::to_string(num_layers) + "), experts (" +
                                std::to_string(num_experts) + ") and window (" + std::to_string(window) +
                                ") must all be positive");
  ring_.assign(static_cast<size_t>(window) * num_layers * num_experts, 0);
  sum_.assign(static_cast<size_t>(num_layers) * num_experts, 0);
}

void expert_load_recorder::check_layer(int layer) const {
  if (layer < 0 || layer >= num_layers_)
    throw std::out_of_range("expert_load_recorder: layer " + std::to_string(layer) + " outside [0, " +
                            std::to_string(num_layers_) + ")");
}

void expert_load_recorder::record_topk(int layer, std::span<const int32_t> expert_ids) {
  check_layer(layer);
  int64_t* step = &cell(head_, layer, 0);
  int64_t* total = &sum_[static_cast<size_t>(layer) * num_experts_];
  for (int32_t id : expert_ids) {
    if (id < 0 || id >= num_experts_) {
      ++dropped_;
      continue;
    }
    ++step[id];
    ++total[id];
  }
}

void expert_load_recorder::record_counts(int layer, std::span<const int64_t> counts) {
  check_layer(layer);
  if (static_cast<int>(counts.size()) != num_experts_)
    throw std::invalid_argument("expert_load_recorder: count vector has " + std::to_string(counts.size()) +
                                " entries, expected " + std::to_string(num_experts_));
  int64_t* step = &cell(head_, layer, 0);
  int64_t* total = &sum_[static_cast<size_t>(layer) * num_experts_];
  for (int e = 0; e < num_experts_; ++e) {
    step[e] += counts[e];
    total[e] += counts[e];
  }
}

void expert_load_recorder::next_step() {
  ++steps_;
  head_ = (head_ + 1) % window_;
  // The slot we move into holds the oldest step: it leaves the window now.
  int64_t* old = &cell(head_, 0, 0);
  const size_t n = static_cast<size_t>(num_layers_) * num_experts_;
  for (size_t i = 0; i < n; ++i) {
    sum_[i] -= old[i];
    old[i] = 0;
  }
}

expert_load_matrix expert_load_recorder::window_load() const {
  expert_load_matrix out(num_layers_, std::vector<double>(num_experts_));
  for (int l = 0; l < num_layers_; ++l)
    for (int e = 0; e < num_experts_; ++e)
      out[l][e] = static_cast<double>(sum_[static_cast<size_t>(l) * num_experts_ + e]);
  return out;
}

void expert_load_recorder::merge_window_of(const expert_load_recorder& other) {
  if (other.num_layers_ != num_layers_ || other.num_experts_ != num_experts_)
    throw std::invalid_argument("expert_load_recorder: cannot merge a " + std::to_string(other.num_layers_) + "x" +
                                std::to_string(other.num_experts_) + " recorder into a " +
                                std::to_string(num_layers_) + "x" + std::to_string(num_experts_) + " one");
  for (int l = 0; l < num_layers_; ++l)
    record_counts(l, std::span<const int64_t>(&other.sum_[static_cast<size_t>(l) * num_experts_], num_experts_));
}

nlohmann::json expert_load_recorder::to_json() const {
  nlohmann::json windows = nlohmann::json::array();
  for (int w = 0; w < window_; ++w) {
    nlohmann::json layers = nlohmann::json::array();
    for (int l = 0; l < num_layers_; ++l) {
      const size_t base = (static_cast<size_t>(w) * num_layers_ + l) * num_experts_;
      layers.push_back(std::vector<int64_t>(ring_.begin() + base, ring_.begin() + base + num_experts_));
    }
    windows.push_back(std::move(layers));
  }
  nlohmann::json load = nlohmann::json::array();
  for (int l = 0; l < num_layers_; ++l) {
    const size_t base = static_cast<size_t>(l) * num_experts_;
    load.push_back(std::vector<int64_t>(sum_.begin() + base, sum_.begin() + base + num_experts_));
  }
  return {{"format", "petrel.expert_load.v1"},
          {"num_layers", num_layers_},
          {"num_experts", num_experts_},
          {"window", window_},
          {"steps_recorded", steps_},
          {"head", head_},
          {"dropped", dropped_},
          {"windows", std::move(windows)},
          {"load", std::move(load)}};
}

expert_load_recorder expert_load_recorder::from_json(const nlohmann::json& j) {
  auto field = [&](const char* name) -> const nlohmann::json& {
    if (!j.is_object() || !j.contains(name))
      throw std::invalid_argument(std::string("expert load dump: missing field \"") + name + "\"");
    return j.at(name);
  };
  auto integer = [&](const char* name) -> int64_t {
    const auto& v = field(name);
    if (!v.is_number_integer()) throw std::invalid_argument(std::string("expert load dump: \"") + name + "\" is not an integer");
    return v.get<int64_t>();
  };
  expert_load_recorder r(static_cast<int>(integer("num_layers")), static_cast<int>(integer("num_experts")),
                         static_cast<int>(integer("window")));
  r.steps_ = integer("steps_recorded");
  r.head_ = static_cast<int>(integer("head"));
  if (r.head_ < 0 || r.head_ >= r.window_) throw std::invalid_argument("expert load dump: \"head\" outside the window");
  if (j.contains("dropped")) r.dropped_ = integer("dropped");
  const auto& windows = field("windows");
  if (!windows.is_array() || static_cast<int>(windows.size()) != r.window_)
    throw std::invalid_argument("expert load dump: \"windows\" must hold " + std::to_string(r.window_) + " steps");
  for (int w = 0; w < r.window_; ++w) {
    const auto& layers = windows[w];
    if (!layers.is_array() || static_cast<int>(layers.size()) != r.num_layers_)
      throw std::invalid_argument("expert load dump: windows[" + std::to_string(w) + "] must hold " +
                                  std::to_string(r.num_layers_) + " layers");
    for (int l = 0; l < r.num_layers_; ++l) {
      const auto& row = layers[l];
      if (!row.is_array() || static_cast<int>(row.size()) != r.num_experts_)
        throw std::invalid_argument("expert load dump: windows[" + std::to_string(w) + "][" + std::to_string(l) +
                                    "] must hold " + std::to_string(r.num_experts_) + " counts");
      for (int e = 0; e < r.num_experts_; ++e) {
        if (!row[e].is_number_integer() || row[e].get<int64_t>() < 0)
          throw std::invalid_argument("expert load dump: windows[" + std::to_string(w) + "][" + std::to_string(l) +
                                      "][" + std::to_string(e) + "] is not a non-negative integer");
        const int64_t c = row[e].get<int64_t>();
        r.cell(w, l, e) = c;
        r.sum_[static_cast<size_t>(l) * r.num_experts_ + e] += c;
      }
    }
  }
  return r;
}

expert_load_matrix load_matrix_from_json(const nlohmann::json& j) {
  const nlohmann::json* m = &j;
  if (j.is_object()) {
    if (j.contains("weight")) m = &j.at("weight");
    else if (j.contains("load")) m = &j.at("load");
    else throw std::invalid_argument("expert load: an object needs a \"weight\" or \"load\" field");
  }
  if (!m->is_array() || m->empty())
    throw std::invalid_argument("expert load: expected a non-empty array of layers, each an array of per-expert loads");
  expert_load_matrix out;
  for (size_t l = 0; l < m->size(); ++l) {
    const auto& row = (*m)[l];
    if (!row.is_array() || row.empty())
      throw std::invalid_argument("expert load: layer " + std::to_string(l) + " is not a non-empty array");
    std::vector<double> v;
    for (size_t e = 0; e < row.size(); ++e) {
      if (!row[e].is_number())
        throw std::invalid_argument("expert load: [" + std::to_string(l) + "][" + std::to_string(e) +
                                    "] is not a number");
      v.push_back(row[e].get<double>());
    }
    if (!out.empty() && v.size() != out[0].size())
      throw std::invalid_argument("expert load: layer " + std::to_string(l) + " has " + std::to_string(v.size()) +
                                  " experts, layer 0 has " + std::to_string(out[0].size()));
    out.push_back(std::move(v));
  }
  return out;
}

// -- synthetic load ----------------------------------------------------------------------------

expert_load_matrix zipf_load(int num_layers, int num_experts, int top_k, int64_t tokens, double s, uint64_t seed) {
  if (num_layers <= 0 || num_experts <= 0 || tokens < 0 || top_k <= 0 || top_k > num_experts || !(s >= 0))
    throw std::invalid_argument("zipf_load: need layers > 0, experts > 0, 0 < top_k <= experts, tokens >= 0, s >= 0");
  std::mt19937_64 rng(seed);
  expert_load_matrix out(num_layers, std::vector<double>(num_experts, 0.0));
  std::vector<double> rank_weight(num_experts);
  for (int r = 0; r < num_experts; ++r) rank_weight[r] = std::pow(static_cast<double>(r + 1), -s);
  std::vector<int> order(num_experts);
  std::vector<int> picked(top_k);
  for (int l = 0; l < num_layers; ++l) {
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    std::vector<double> w(num_experts);
    for (int r = 0; r < num_experts; ++r) w[order[r]] = rank_weight[r];
    std::discrete_distribution<int> pick(w.begin(), w.end());
    std::vector<int64_t> counts(num_experts, 0);
    for (int64_t t = 0; t < tokens; ++t) {
      // top_k distinct experts per token: redraw duplicates (sampling without replacement).
      for (int k = 0; k < top_k; ++k) {
        auto taken = [&](int e) { return std::find(picked.begin(), picked.begin() + k, e) != picked.begin() + k; };
        int e = pick(rng);
        // Redraw duplicates a few times (cheap when the picked experts hold little mass); when they hold most
        // of it, draw from the remaining weights directly so the loop stays bounded for any s and top_k.
        for (int tries = 0; taken(e) && tries < 16; ++tries) e = pick(rng);
        if (taken(e)) {
          double rest = 0;
          for (int x = 0; x < num_experts; ++x)
            if (!taken(x)) rest += w[x];
          double u = std::uniform_real_distribution<double>(0.0, rest)(rng);
          e = -1;
          for (int x = 0; x < num_experts; ++x) {
            if (taken(x)) continue;
            e = x;
            if ((u -= w[x]) < 0) break;
          }
        }
        picked[k] = e;
        ++counts[e];
      }
    }
    for (int e = 0; e < num_experts; ++e) out[l][e] = static_cast<double>(counts[e]);
  }
  return out;
}

// -- balancedness ------------------------------------------------------------------------------

std::vector<double> gpu_loads(const expert_placement& p, const expert_load_matrix& load, int layer, int num_gpus) {
  if (layer < 0 || layer >= p.num_layers || layer >= static_cast<int>(load.size()))
    throw std::invalid_argument("gpu_loads: layer " + std::to_string(layer) + " out of range");
  if (num_gpus <= 0 || num_gpus > p.num_replicas)
    throw std::invalid_argument("gpu_loads: " + std::to_string(num_gpus) + " GPUs for " +
                                std::to_string(p.num_replicas) + " slots");
  const auto& w = load[layer];
  if (static_cast<int>(w.size()) != p.num_logical)
    throw std::invalid_argument("gpu_loads: load has " + std::to_string(w.size()) + " experts, placement " +
                                std::to_string(p.num_logical));
  std::vector<double> out(num_gpus, 0.0);
  for (int slot = 0; slot < p.num_replicas; ++slot) {
    const int e = p.phy2log[layer][slot];
    const int gpu = static_cast<int>(static_cast<int64_t>(slot) * num_gpus / p.num_replicas);
    out[gpu] += w[e] / p.logcnt[layer][e];
  }
  return out;
}

balancedness_report balancedness(const expert_placement& p, const expert_load_matrix& load, int num_gpus) {
  if (static_cast<int>(load.size()) != p.num_layers)
    throw std::invalid_argument("balancedness: load has " + std::to_string(load.size()) + " layers, placement " +
                                std::to_string(p.num_layers));
  balancedness_report r;
  double sum_mean = 0, sum_max = 0;
  for (int l = 0; l < p.num_layers; ++l) {
    const auto g = gpu_loads(p, load, l, num_gpus);
    const double mx = *std::max_element(g.begin(), g.end());
    const double mean = std::accumulate(g.begin(), g.end(), 0.0) / num_gpus;
    r.per_layer.push_back(mx > 0 ? mean / mx : 1.0);
    sum_mean += mean;
    sum_max += mx;
  }
  r.mean = std::accumulate(r.per_layer.begin(), r.per_layer.end(), 0.0) / std::max(1, p.num_layers);
  r.step_weighted = sum_max > 0 ? sum_mean / sum_max : 1.0;
  return r;
}

} // namespace petrel::eplb
