#include "runtime/cluster_config.hpp"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>

#include <yaml-cpp/yaml.h>

namespace petrel {

namespace fs = std::filesystem;

duration_ms parse_duration(const std::string& text) {
  if (text.empty())
    throw std::invalid_argument("empty duration");
  size_t pos = 0;
  double value = 0;
  try {
    value = std::stod(text, &pos);
  } catch (const std::exception&) {
    throw std::invalid_argument("'" + text + "' is not a duration (write e.g. 500ms, 10s, 2m)");
  }
  std::string unit = text.substr(pos);
  double ms = 0;
  if (unit.empty() || unit == "s")
    ms = value * 1000;
  else if (unit == "ms")
    ms = value;
  else if (unit == "m" || unit == "min")
    ms = value * 60'000;
  else if (unit == "us")
    ms = value / 1000;
  else
    throw std::invalid_argument("'" + text + "' has unknown unit '" + unit + "' (use ms, s or m)");
  if (!(ms >= 0) || !std::isfinite(ms))
    throw std::invalid_argument("'" + text + "' must be a non-negative duration");
  return duration_ms{static_cast<int64_t>(std::llround(ms))};
}

int rank_spec::cuda_index() const {
  return is_cuda() ? std::stoi(device.substr(5)) : -1;
}

const char* to_string(restart_strategy s) {
  switch (s) {
    case restart_strategy::one_for_one: return "one_for_one";
    case restart_strategy::one_for_all: return "one_for_all";
    case restart_strategy::rest_for_one: return "rest_for_one";
  }
  return "?";
}

const char* to_string(group_role r) {
  return r == group_role::prefill ? "prefill" : "decode";
}

const node_section* cluster_config::find_node(const std::string& name) const {
  for (auto& n : nodes)
    if (n.name == name)
      return &n;
  return nullptr;
}

const group_section* cluster_config::find_group(const std::string& name) const {
  for (auto& g : groups)
    if (g.name == name)
      return &g;
  return nullptr;
}

const group_section* cluster_config::group_of(const std::string& node) const {
  for (auto& g : groups)
    if (std::find(g.nodes.begin(), g.nodes.end(), node) != g.nodes.end())
      return &g;
  return nullptr;
}

std::vector<const group_section*> cluster_config::groups_with(group_role role) const {
  std::vector<const group_section*> out;
  for (auto& g : groups)
    if (g.role == role)
      out.push_back(&g);
  return out;
}

namespace {

// -- a small schema walker: every error names file:line, unknown keys are refused -------------

class reader {
public:
  explicit reader(std::string file) : file_(std::move(file)) {}

  [[noreturn]] void fail(const YAML::Node& at, const std::string& what) const {
    int line = at.IsDefined() && at.Mark().line >= 0 ? at.Mark().line + 1 : 0;
    fail_line(line, what);
  }
  [[noreturn]] void fail_line(int line, const std::string& what) const {
    std::ostringstream os;
    os << file_;
    if (line > 0)
      os << ":" << line;
    os << ": " << what;
    throw config_error(os.str());
  }

  int line_of(const YAML::Node& n) const { return n.Mark().line >= 0 ? n.Mark().line + 1 : 0; }

  /// Refuses keys of `map` outside `known`, suggesting the closest known key.
  void only_keys(const YAML::Node& map, const std::string& where, std::initializer_list<const char*> known) const {
    if (!map.IsMap())
      fail(map, where + " must be a mapping");
    for (auto it = map.begin(); it != map.end(); ++it) {
      auto key = it->first.as<std::string>();
      bool ok = false;
      for (auto* k : known)
        ok |= key == k;
      if (ok)
        continue;
      std::string best;
      size_t best_d = 99;
      for (auto* k : known) {
        size_t d = edit_distance(key, k);
        if (d < best_d) {
          best_d = d;
          best = k;
        }
      }
      std::string hint = best_d <= 3 ? " (did you mean '" + best + "'?)" : "";
      std::string list;
      for (auto* k : known)
        list += std::string(list.empty() ? "" : ", ") + k;
      fail(it->first, "unknown key '" + key + "' in " + where + hint + "; known keys: " + list);
    }
  }

  template <class T>
  T scalar(const YAML::Node& n, const std::string& what) const {
    if (!n.IsScalar())
      fail(n, what + " must be a scalar value");
    try {
      return n.as<T>();
    } catch (const YAML::Exception&) {
      fail(n, what + " has the wrong type ('" + n.Scalar() + "')");
    }
  }

  template <class T>
  void opt(const YAML::Node& map, const char* key, T& out, const std::string& where) const {
    auto n = map[key];
    if (n.IsDefined() && !n.IsNull())
      out = scalar<T>(n, where + "." + key);
  }

  void opt_int(const YAML::Node& map, const char* key, int& out, const std::string& where, int lo,
               int hi = 1 << 30) const {
    auto n = map[key];
    if (!n.IsDefined() || n.IsNull())
      return;
    long long v = scalar<long long>(n, where + "." + key);
    if (v < lo || v > hi)
      fail(n, where + "." + key + " = " + std::to_string(v) + " is out of range [" + std::to_string(lo) + ", " +
                  std::to_string(hi) + "]");
    out = static_cast<int>(v);
  }

  void opt_duration(const YAML::Node& map, const char* key, duration_ms& out, const std::string& where) const {
    auto n = map[key];
    if (!n.IsDefined() || n.IsNull())
      return;
    try {
      out = parse_duration(scalar<std::string>(n, where + "." + key));
    } catch (const std::invalid_argument& e) {
      fail(n, where + "." + key + ": " + e.what());
    }
  }

  void opt_endpoint(const YAML::Node& map, endpoint& out, const std::string& where) const {
    opt(map, "host", out.host, where);
    int port = out.port;
    opt_int(map, "port", port, where, 0, 65535);
    out.port = static_cast<uint16_t>(port);
  }

  const std::string& file() const { return file_; }

private:
  static size_t edit_distance(const std::string& a, const std::string& b) {
    std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
    for (size_t j = 0; j <= b.size(); ++j)
      prev[j] = j;
    for (size_t i = 1; i <= a.size(); ++i) {
      cur[0] = i;
      for (size_t j = 1; j <= b.size(); ++j)
        cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
      std::swap(prev, cur);
    }
    return prev[b.size()];
  }

  std::string file_;
};

restart_strategy parse_strategy(const reader& r, const YAML::Node& n) {
  auto s = r.scalar<std::string>(n, "supervision.strategy");
  if (s == "one_for_one")
    return restart_strategy::one_for_one;
  if (s == "one_for_all")
    return restart_strategy::one_for_all;
  if (s == "rest_for_one")
    return restart_strategy::rest_for_one;
  r.fail(n, "supervision.strategy '" + s + "' is unknown; use one_for_one, one_for_all or rest_for_one");
}

rank_spec parse_rank(const reader& r, const YAML::Node& n, const std::string& where) {
  rank_spec spec;
  if (n.IsScalar()) {
    spec.device = r.scalar<std::string>(n, where);
  } else {
    r.only_keys(n, where, {"device"});
    r.opt(n, "device", spec.device, where);
  }
  if (spec.device != "cpu") {
    bool ok = spec.device.rfind("cuda:", 0) == 0 && spec.device.size() > 5 &&
              std::all_of(spec.device.begin() + 5, spec.device.end(), ::isdigit);
    if (!ok)
      r.fail(n, where + ".device '" + spec.device + "' is not a device; use cpu or cuda:N");
  }
  return spec;
}

} // namespace

cluster_config parse_cluster_config(const std::string& yaml_text, const std::string& name,
                                    const std::string& base_dir) {
  reader r(name);
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::ParserException& e) {
    r.fail_line(e.mark.line + 1, "not valid YAML: " + e.msg);
  }
  if (!root.IsMap())
    r.fail_line(1, "the top level must be a mapping with keys model, nodes, groups (see docs/cluster-yaml.md)");
  r.only_keys(root, "the top level",
              {"cluster", "model", "gateway", "nodes", "groups", "supervision", "transport"});

  cluster_config cfg;
  cfg.source = name;

  if (auto c = root["cluster"]; c.IsDefined()) {
    r.only_keys(c, "cluster", {"name", "run_dir"});
    r.opt(c, "name", cfg.cluster.name, "cluster");
    r.opt(c, "run_dir", cfg.cluster.run_dir, "cluster");
  }

  // model
  auto m = root["model"];
  if (!m.IsDefined())
    r.fail_line(1, "missing section 'model' (add e.g. `model: {path: tests/data/fortune-moe}`)");
  r.only_keys(m, "model", {"path", "dummy_config", "name", "backend", "max_context"});
  r.opt(m, "path", cfg.model.path, "model");
  r.opt(m, "dummy_config", cfg.model.dummy_config, "model");
  r.opt(m, "name", cfg.model.served_name, "model");
  r.opt(m, "backend", cfg.model.backend, "model");
  r.opt_int(m, "max_context", cfg.model.max_context, "model", 0);
  if (cfg.model.path.empty())
    r.fail(m, "model.path is required: a checkpoint directory, or 'dummy' with model.dummy_config");
  if (cfg.model.backend != "cpu" && cfg.model.backend != "cuda")
    r.fail(m["backend"], "model.backend '" + cfg.model.backend + "' is unknown; use cpu or cuda");
  auto resolve = [&](std::string p) {
    return p.empty() || fs::path(p).is_absolute() ? p : (fs::path(base_dir) / p).lexically_normal().string();
  };
  if (cfg.model.is_dummy()) {
    if (cfg.model.dummy_config.empty())
      r.fail(m, "model.path is 'dummy' but model.dummy_config is missing: name a config.json to size the weights");
    cfg.model.dummy_config = resolve(cfg.model.dummy_config);
    if (!fs::exists(cfg.model.dummy_config))
      r.fail(m["dummy_config"], "model.dummy_config '" + cfg.model.dummy_config + "' does not exist");
  } else {
    cfg.model.path = resolve(cfg.model.path);
    if (!fs::exists(fs::path(cfg.model.path) / "config.json"))
      r.fail(m["path"], "model.path '" + cfg.model.path +
                            "' has no config.json (point it at a Hugging Face checkpoint directory)");
  }
  if (cfg.model.served_name.empty())
    cfg.model.served_name =
        cfg.model.is_dummy() ? "dummy" : fs::path(cfg.model.path).filename().string();

  // gateway
  if (auto g = root["gateway"]; g.IsDefined()) {
    r.only_keys(g, "gateway", {"host", "port", "threads", "max_queued", "max_body_bytes"});
    r.opt_endpoint(g, cfg.gateway.address, "gateway");
    r.opt_int(g, "threads", cfg.gateway.threads, "gateway", 1, 64);
    r.opt_int(g, "max_queued", cfg.gateway.max_queued, "gateway", 0);
    r.opt_int(g, "max_body_bytes", cfg.gateway.max_body_bytes, "gateway", 1024);
  }

  // supervision
  if (auto s = root["supervision"]; s.IsDefined()) {
    r.only_keys(s, "supervision",
                {"strategy", "intensity", "period", "node_intensity", "node_period", "heartbeat"});
    if (s["strategy"].IsDefined())
      cfg.supervision.strategy = parse_strategy(r, s["strategy"]);
    r.opt_int(s, "intensity", cfg.supervision.intensity, "supervision", 0);
    r.opt_duration(s, "period", cfg.supervision.period, "supervision");
    r.opt_int(s, "node_intensity", cfg.supervision.node_intensity, "supervision", 0);
    r.opt_duration(s, "node_period", cfg.supervision.node_period, "supervision");
    r.opt_duration(s, "heartbeat", cfg.supervision.heartbeat, "supervision");
    if (cfg.supervision.period.count() <= 0 || cfg.supervision.node_period.count() <= 0)
      r.fail(s, "supervision periods must be positive");
  }

  // transport
  if (auto t = root["transport"]; t.IsDefined()) {
    r.only_keys(t, "transport", {"kv_tls", "kv_timeout", "expert_exchange", "head_host", "head_port"});
    r.opt(t, "kv_tls", cfg.transport.kv_tls, "transport");
    r.opt_duration(t, "kv_timeout", cfg.transport.kv_timeout, "transport");
    r.opt(t, "expert_exchange", cfg.transport.expert_exchange, "transport");
    r.opt(t, "head_host", cfg.transport.head.host, "transport");
    int hp = 0;
    r.opt_int(t, "head_port", hp, "transport", 0, 65535);
    cfg.transport.head.port = static_cast<uint16_t>(hp);
    static const std::set<std::string> exchanges{"inproc", "ucx", "nccl"};
    if (!exchanges.count(cfg.transport.expert_exchange))
      r.fail(t["expert_exchange"], "transport.expert_exchange '" + cfg.transport.expert_exchange +
                                       "' is unknown; use inproc, ucx or nccl");
  }

  // nodes
  auto nodes = root["nodes"];
  if (!nodes.IsDefined() || !nodes.IsSequence() || nodes.size() == 0)
    r.fail(nodes.IsDefined() ? nodes : root, "'nodes' must be a non-empty list of nodes");
  std::map<std::pair<std::string, int>, std::string> used_ports;
  for (auto n : nodes) {
    node_section node;
    node.line = r.line_of(n);
    r.only_keys(n, "a node", {"name", "host", "port", "ranks"});
    r.opt(n, "name", node.name, "node");
    if (node.name.empty())
      r.fail(n, "every node needs a name");
    if (cfg.find_node(node.name))
      r.fail(n, "node '" + node.name + "' is defined twice");
    std::string where = "node '" + node.name + "'";
    r.opt_endpoint(n, node.address, where);
    auto ranks = n["ranks"];
    if (!ranks.IsDefined())
      r.fail(n, where + " has no ranks (write e.g. `ranks: [cpu]` or `ranks: [{device: cuda:0}]`)");
    if (ranks.IsScalar()) {
      int count = r.scalar<int>(ranks, where + ".ranks");
      if (count < 1 || count > 64)
        r.fail(ranks, where + ".ranks must be between 1 and 64");
      node.ranks.assign(count, rank_spec{});
    } else if (ranks.IsSequence()) {
      for (size_t i = 0; i < ranks.size(); ++i)
        node.ranks.push_back(parse_rank(r, ranks[i], where + ".ranks[" + std::to_string(i) + "]"));
      if (node.ranks.empty())
        r.fail(ranks, where + ".ranks is empty");
    } else {
      r.fail(ranks, where + ".ranks must be a count or a list of devices");
    }
    if (node.address.port != 0) {
      auto key = std::make_pair(node.address.host, int(node.address.port));
      if (used_ports.count(key))
        r.fail(n["port"], where + " uses port " + std::to_string(node.address.port) + ", already taken by node '" +
                              used_ports[key] + "'");
      used_ports[key] = node.name;
    }
    if (node.address.port != 0 && node.address.port == cfg.gateway.address.port &&
        node.address.host == cfg.gateway.address.host)
      r.fail(n["port"], where + " uses the gateway's port " + std::to_string(node.address.port));
    cfg.nodes.push_back(std::move(node));
  }

  // groups
  auto groups = root["groups"];
  if (!groups.IsDefined() || !groups.IsMap())
    r.fail(groups.IsDefined() ? groups : root,
           "'groups' must be a mapping with 'prefill' and 'decode' lists (see docs/cluster-yaml.md)");
  r.only_keys(groups, "groups", {"prefill", "decode"});
  for (auto role : {group_role::prefill, group_role::decode}) {
    auto list = groups[to_string(role)];
    if (!list.IsDefined() || !list.IsSequence() || list.size() == 0)
      r.fail(list.IsDefined() ? list : groups,
             std::string("groups.") + to_string(role) + " must list at least one group");
    for (auto g : list) {
      group_section grp;
      grp.role = role;
      grp.line = r.line_of(g);
      r.only_keys(g, std::string(to_string(role)) + " group",
                  {"name", "nodes", "ep_size", "redundant_experts", "init_expert_location", "chunk_tokens",
                   "max_batch_tokens", "max_running", "kv_pages", "page_size"});
      r.opt(g, "name", grp.name, "group");
      if (grp.name.empty())
        r.fail(g, std::string("every ") + to_string(role) + " group needs a name");
      if (cfg.find_group(grp.name))
        r.fail(g, "group '" + grp.name + "' is defined twice");
      std::string where = std::string(to_string(role)) + " group '" + grp.name + "'";
      auto gn = g["nodes"];
      if (!gn.IsDefined() || !gn.IsSequence() || gn.size() == 0)
        r.fail(g, where + " needs `nodes: [...]` with at least one node");
      int rank_count = 0;
      for (auto node_name : gn) {
        auto nn = r.scalar<std::string>(node_name, where + ".nodes");
        auto* node = cfg.find_node(nn);
        if (!node)
          r.fail(node_name, where + " names unknown node '" + nn + "'");
        if (auto* other = cfg.group_of(nn))
          r.fail(node_name, where + " names node '" + nn + "', which already belongs to group '" + other->name +
                                "' (a node serves one group)");
        if (std::find(grp.nodes.begin(), grp.nodes.end(), nn) != grp.nodes.end())
          r.fail(node_name, where + " names node '" + nn + "' twice");
        grp.nodes.push_back(nn);
        rank_count += static_cast<int>(node->ranks.size());
      }
      grp.ep_size = rank_count;
      r.opt_int(g, "ep_size", grp.ep_size, where, 1, 1024);
      if (grp.ep_size != rank_count)
        r.fail(g["ep_size"], where + " has ep_size " + std::to_string(grp.ep_size) + " but its nodes have " +
                                 std::to_string(rank_count) + " ranks; set ep_size: " + std::to_string(rank_count));
      r.opt_int(g, "redundant_experts", grp.redundant_experts, where, 0, 4096);
      r.opt(g, "init_expert_location", grp.init_expert_location, where);
      if (!grp.init_expert_location.empty()) {
        grp.init_expert_location = resolve(grp.init_expert_location);
        if (!fs::exists(grp.init_expert_location))
          r.fail(g["init_expert_location"], where + ".init_expert_location '" + grp.init_expert_location +
                                                "' does not exist");
      }
      r.opt_int(g, "chunk_tokens", grp.chunk_tokens, where, 1, 1 << 20);
      r.opt_int(g, "max_batch_tokens", grp.max_batch_tokens, where, 1, 1 << 22);
      r.opt_int(g, "max_running", grp.max_running, where, 1, 1 << 16);
      r.opt_int(g, "kv_pages", grp.kv_pages, where, 1, 1 << 24);
      r.opt_int(g, "page_size", grp.page_size, where, 1, 4096);
      if (grp.max_batch_tokens < grp.chunk_tokens)
        r.fail(g, where + ": max_batch_tokens (" + std::to_string(grp.max_batch_tokens) +
                      ") must be at least chunk_tokens (" + std::to_string(grp.chunk_tokens) + ")");
      cfg.groups.push_back(std::move(grp));
    }
  }
  for (auto& n : cfg.nodes)
    if (!cfg.group_of(n.name))
      r.fail_line(n.line, "node '" + n.name + "' belongs to no group; list it under groups.prefill or groups.decode");
  for (auto& n : cfg.nodes)
    for (auto& rk : n.ranks)
      if (rk.is_cuda() && cfg.model.backend != "cuda")
        r.fail_line(n.line, "node '" + n.name + "' has a " + rk.device + " rank but model.backend is '" +
                                cfg.model.backend + "'; set model.backend: cuda");
  return cfg;
}

cluster_config load_cluster_config(const std::string& file) {
  std::ifstream in(file);
  if (!in)
    throw config_error(file + ": cannot open the file (does it exist?)");
  std::stringstream ss;
  ss << in.rdbuf();
  auto base = fs::absolute(fs::path(file)).parent_path().string();
  return parse_cluster_config(ss.str(), file, base);
}

} // namespace petrel
