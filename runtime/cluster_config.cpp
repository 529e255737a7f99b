#include "runtime/cluster_config.hpp"
#include "runtime/ep.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <type_traits>

#include <yaml-cpp/yaml.h>

#include "runtime/model_config.hpp"
#include "runtime/yaml_reader.hpp"

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
  // "10 s" is as clear as "10s": allow blanks between the number and its unit.
  unit.erase(0, std::min(unit.find_first_not_of(" \t"), unit.size()));
  double ms = 0;
  if (unit.empty() || unit == "s")
    ms = value * 1000;
  else if (unit == "ms")
    ms = value;
  else if (unit == "m" || unit == "min")
    ms = value * 60'000;
  else if (unit == "h")
    ms = value * 3'600'000;
  else if (unit == "us")
    ms = value / 1000;
  else
    throw std::invalid_argument("'" + text + "' has unknown unit '" + unit + "' (use us, ms, s, m or h)");
  if (!(ms >= 0) || !std::isfinite(ms))
    throw std::invalid_argument("'" + text + "' must be a non-negative duration");
  // More than a year is a typo, and it would overflow the clocks that add it to now().
  if (ms > 365.0 * 24 * 3'600'000)
    throw std::invalid_argument("'" + text + "' is longer than a year");
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

namespace {
bool loopback_host(const std::string& h) { return h == "localhost" || h == "::1" || h.rfind("127.", 0) == 0; }
/// Hosts compare by this key: every loopback spelling is one host.
std::string host_key(const std::string& h) { return loopback_host(h) ? std::string("127.0.0.1") : h; }
} // namespace

std::string cluster_config::expert_exchange_for(const group_section& g) const {
  if (transport.expert_exchange != "auto") return transport.expert_exchange;
  bool one_host = true;
  const node_section* first = g.nodes.empty() ? nullptr : find_node(g.nodes.front());
  for (const auto& nn : g.nodes)
    if (const node_section* n = find_node(nn); n && first && host_key(n->address.host) != host_key(first->address.host))
      one_host = false;
  if (model.backend == "cuda" && one_host && gpu_shared_in_process(g).empty()) return "cuda_ipc";
  return g.nodes.size() > 1 ? "ucx" : "inproc";
}

std::string cluster_config::gpu_shared_in_process(const group_section& g) const {
  for (const auto& nn : g.nodes) {
    const node_section* n = find_node(nn);
    if (!n) continue;
    for (size_t i = 0; i < n->ranks.size(); ++i)
      for (size_t j = i + 1; j < n->ranks.size(); ++j)
        if (n->ranks[i].is_cuda() && n->ranks[i].device == n->ranks[j].device)
          return "node '" + n->name + "' runs ranks " + std::to_string(i) + " and " + std::to_string(j) + " on " +
                 n->ranks[i].device;
  }
  return {};
}

std::vector<const group_section*> cluster_config::groups_with(group_role role) const {
  std::vector<const group_section*> out;
  for (auto& g : groups)
    if (g.role == role)
      out.push_back(&g);
  return out;
}

namespace {


/// Names end up in paths (RUN_DIR/CLUSTER/NODE.log) and on command lines (`petrel node --node NAME`).
bool is_valid_name(const std::string& s) {
  if (s.empty() || s.size() > 64 || s[0] == '.' || s[0] == '-')
    return false;
  return std::all_of(s.begin(), s.end(),
                     [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == '.'; });
}

using reader = petrel::yaml_reader;

/// The fixed ports of the cluster, so that two listeners never ask for the same one.
class port_table {
public:
  /// The owner of a fixed port that clashes with host:port, or "" (port 0 never clashes).
  std::string clash(const std::string& host, uint16_t port) const {
    if (port == 0)
      return "";
    for (auto& e : entries_)
      if (e.port == port && (same_host(e.host, host)))
        return e.owner;
    return "";
  }
  void add(const std::string& host, uint16_t port, std::string owner) {
    if (port != 0)
      entries_.push_back({host, port, std::move(owner)});
  }

private:
  static bool wildcard(const std::string& h) { return h == "0.0.0.0" || h == "::" || h == "*"; }
  static std::string canonical(const std::string& h) { return h == "localhost" ? "127.0.0.1" : h; }
  static bool same_host(const std::string& a, const std::string& b) {
    return wildcard(a) || wildcard(b) || canonical(a) == canonical(b);
  }
  struct entry {
    std::string host;
    uint16_t port;
    std::string owner;
  };
  std::vector<entry> entries_;
};

rank_spec parse_rank(const reader& r, const YAML::Node& n, const std::string& where) {
  rank_spec spec;
  if (n.IsMap()) {
    r.only_keys(n, where, {"device"}, 0);
    r.opt_string(n, "device", spec.device, where);
  } else {
    spec.device = r.scalar<std::string>(n, where);
  }
  if (spec.device != "cpu") {
    // cuda:N with N a plain number below 1024 (so that cuda_index() cannot overflow).
    bool ok = spec.device.rfind("cuda:", 0) == 0 && spec.device.size() > 5 && spec.device.size() <= 9 &&
              std::all_of(spec.device.begin() + 5, spec.device.end(), ::isdigit) &&
              std::stoi(spec.device.substr(5)) < 1024;
    if (!ok)
      r.fail(n, where + " device '" + spec.device + "' is not a device; use cpu or cuda:N (N = 0..1023)");
  }
  return spec;
}

// UCX transport names (UCX_TLS) that Petrel accepts in transport.kv_tls.
const std::vector<std::string> ucx_transports{
    "all",  "tcp",    "shm",  "sm",   "posix", "sysv", "cma",     "knem",      "xpmem",    "self",
    "mm",   "ib",     "rc",   "rc_v", "rc_x",  "ud",   "ud_v",    "ud_x",      "dc",       "dc_x",
    "cuda", "cuda_copy", "cuda_ipc", "gdr_copy", "rocm", "rocm_copy", "rocm_ipc"};

} // namespace

cluster_config parse_cluster_config(const std::string& yaml_text, const std::string& name,
                                    const std::string& base_dir) {
  reader r(name);
  YAML::Node root;
  try {
    // yaml-cpp 0.7's LoadAll can loop forever on some malformed text (a stray ',': upstream issue
    // 1040, found by fuzz_cluster_config), so parse one document and find a second one by its
    // marker: a line "---" (or "--- ...") after content.
    root = YAML::Load(yaml_text);
    std::istringstream lines(yaml_text);
    std::string line;
    bool content = false;
    for (int n = 1; std::getline(lines, line); ++n) {
      auto first = line.find_first_not_of(" \t\r");
      if (first == std::string::npos || line[first] == '#')
        continue;
      bool marker = line.rfind("---", 0) == 0 && (line.size() == 3 || line[3] == ' ' || line[3] == '\t' || line[3] == '\r');
      if (marker && content) {
        auto rest = line.substr(3);
        auto next_content = rest.find_first_not_of(" \t\r");
        std::string after;
        for (std::string l2; std::getline(lines, l2);)
          if (l2.find_first_not_of(" \t\r") != std::string::npos && l2[l2.find_first_not_of(" \t\r")] != '#')
            after = l2;
        if (next_content != std::string::npos || !after.empty())
          r.fail_line(n, "a second YAML document starts here ('---'); a cluster.yaml holds one");
        break;
      }
      content |= !marker;
    }
  } catch (const YAML::ParserException& e) {
    r.fail_line(e.mark.line >= 0 ? e.mark.line + 1 : 0, "not valid YAML: " + e.msg);
  }
  if (!root.IsMap())
    r.fail_line(std::max(1, reader::line_of(root)),
                "the top level must be a mapping with the sections model, nodes and groups (see docs/cluster-yaml.md)");
  r.only_keys(root, "the top level", {"cluster", "model", "gateway", "nodes", "groups", "supervision", "transport", "security"},
              1);

  cluster_config cfg;
  cfg.source = name;
  auto section_line = [&](const char* key) { return reader::key_line(root, key); };
  // Relative paths resolve against the directory of the file, so every process (and `petrel status`
  // run from elsewhere) finds the same checkpoint and the same run directory.
  auto resolve = [&](std::string p) {
    return p.empty() || fs::path(p).is_absolute() ? p : (fs::path(base_dir) / p).lexically_normal().string();
  };

  if (auto c = root["cluster"]; c.IsDefined() && !c.IsNull()) {
    r.only_keys(c, "cluster", {"name", "run_dir"}, section_line("cluster"));
    r.opt_string(c, "name", cfg.cluster.name, "cluster");
    r.opt_string(c, "run_dir", cfg.cluster.run_dir, "cluster");
    cfg.cluster.run_dir = resolve(cfg.cluster.run_dir);
    if (!is_valid_name(cfg.cluster.name))
      r.fail(c["name"], "cluster.name '" + cfg.cluster.name +
                            "' is not a valid name; use letters, digits, '_', '-' and '.' (it names a directory)");
  }

  // model
  auto m = root["model"];
  if (!m.IsDefined())
    r.fail_line(1, "missing section 'model' (add e.g. `model: {path: tests/data/fortune-moe}`)");
  r.only_keys(m, "model", {"path", "dummy_config", "name", "backend", "max_context", "share_gpus"},
              section_line("model"));
  r.opt_string(m, "path", cfg.model.path, "model");
  r.opt_string(m, "dummy_config", cfg.model.dummy_config, "model");
  r.opt_string(m, "name", cfg.model.served_name, "model");
  r.opt_choice(m, "backend", cfg.model.backend, "model", {"cpu", "cuda"});
  r.opt_int(m, "max_context", cfg.model.max_context, "model", 0);
  if (auto sg = m["share_gpus"]; sg.IsDefined() && !sg.IsNull())
    cfg.model.share_gpus = r.scalar<bool>(sg, "model.share_gpus");
  if (cfg.model.path.empty())
    r.fail_line(section_line("model"),
                "model.path is required: a checkpoint directory, or 'dummy' with model.dummy_config");
  std::error_code ec;
  if (cfg.model.is_dummy()) {
    if (cfg.model.dummy_config.empty())
      r.fail_key(m, "path",
                 "model.path is 'dummy' but model.dummy_config is missing: name a config.json to size the weights");
    cfg.model.dummy_config = resolve(cfg.model.dummy_config);
    // A checkpoint directory works as well as its config.json.
    if (fs::is_directory(cfg.model.dummy_config, ec))
      cfg.model.dummy_config = (fs::path(cfg.model.dummy_config) / "config.json").string();
    if (!fs::is_regular_file(cfg.model.dummy_config, ec))
      r.fail(m["dummy_config"], "model.dummy_config '" + cfg.model.dummy_config + "' does not exist");
    // The ranks and the gateway read DIR/config.json of the dummy config's directory.
    if (fs::path(cfg.model.dummy_config).filename() != "config.json")
      r.fail(m["dummy_config"], "model.dummy_config '" + cfg.model.dummy_config +
                                    "' must be a file named config.json (or the directory holding one); "
                                    "put it in a directory of its own, e.g. configs/deepseek-v3/config.json");
  } else {
    cfg.model.path = resolve(cfg.model.path);
    if (!fs::is_regular_file(fs::path(cfg.model.path) / "config.json", ec))
      r.fail(m["path"], "model.path '" + cfg.model.path +
                            "' has no config.json (point it at a Hugging Face checkpoint directory)");
  }
  // The model's own config must load too: a broken config.json would otherwise only fail in every
  // rank and in the gateway, over and over, until the supervisors give up.
  model_config mcfg;
  try {
    mcfg = model_config::load(cfg.model.is_dummy() ? fs::path(cfg.model.dummy_config)
                                                   : fs::path(cfg.model.path) / "config.json");
  } catch (const std::exception& e) {
    r.fail(m[cfg.model.is_dummy() ? "dummy_config" : "path"], std::string("the model's config.json does not load: ") + e.what());
  }
  if (cfg.model.served_name.empty())
    cfg.model.served_name = cfg.model.is_dummy() ? "dummy" : fs::path(cfg.model.path).filename().string();
  const bool cuda = cfg.model.backend == "cuda";

  port_table ports;

  // gateway
  if (auto g = root["gateway"]; g.IsDefined() && !g.IsNull()) {
    r.only_keys(g, "gateway", {"host", "port", "threads", "max_queued", "max_body_bytes", "api_key", "api_key_env"},
                section_line("gateway"));
    r.opt_string(g, "api_key", cfg.gateway.api_key, "gateway");
    r.opt_string(g, "api_key_env", cfg.gateway.api_key_env, "gateway");
    if (!cfg.gateway.api_key.empty() && !cfg.gateway.api_key_env.empty())
      r.fail_key(g, "api_key", "gateway.api_key and gateway.api_key_env exclude each other; keep one");
    r.opt_endpoint(g, cfg.gateway.address, "gateway");
    r.opt_int(g, "threads", cfg.gateway.threads, "gateway", 1, 64);
    r.opt_int(g, "max_queued", cfg.gateway.max_queued, "gateway", 0);
    r.opt_int(g, "max_body_bytes", cfg.gateway.max_body_bytes, "gateway", 1024);
  }
  ports.add(cfg.gateway.address.host, cfg.gateway.address.port, "the gateway");

  // supervision
  if (auto s = root["supervision"]; s.IsDefined() && !s.IsNull()) {
    r.only_keys(s, "supervision", {"strategy", "intensity", "period", "node_intensity", "node_period", "heartbeat"},
                section_line("supervision"));
    std::string strategy = to_string(cfg.supervision.strategy);
    r.opt_choice(s, "strategy", strategy, "supervision", {"one_for_one", "one_for_all", "rest_for_one"});
    cfg.supervision.strategy = strategy == "one_for_all"    ? restart_strategy::one_for_all
                               : strategy == "rest_for_one" ? restart_strategy::rest_for_one
                                                            : restart_strategy::one_for_one;
    r.opt_int(s, "intensity", cfg.supervision.intensity, "supervision", 0, 1000);
    r.opt_duration(s, "period", cfg.supervision.period, "supervision", true);
    r.opt_int(s, "node_intensity", cfg.supervision.node_intensity, "supervision", 0, 1000);
    r.opt_duration(s, "node_period", cfg.supervision.node_period, "supervision", true);
    r.opt_duration(s, "heartbeat", cfg.supervision.heartbeat, "supervision", true);
  }

  // transport
  if (auto t = root["transport"]; t.IsDefined() && !t.IsNull()) {
    r.only_keys(t, "transport", {"kv_tls", "kv_timeout", "expert_exchange", "head_host", "head_port", "kv_checksum",
                 "kv_net_devices", "kv_gpu_path"},
                section_line("transport"));
    r.opt_string(t, "kv_tls", cfg.transport.kv_tls, "transport");
    r.opt_choice(t, "kv_gpu_path", cfg.transport.kv_gpu_path, "transport", {"auto", "staged", "ipc"});
    {
      // UCX_TLS syntax: a comma-separated list, optionally led by '^' (= every transport but these).
      std::string list = cfg.transport.kv_tls;
      if (!list.empty() && list[0] == '^')
        list.erase(0, 1);
      std::stringstream ss(list);
      std::string tl;
      bool any = false;
      while (std::getline(ss, tl, ',')) {
        any = true;
        if (std::find(ucx_transports.begin(), ucx_transports.end(), tl) == ucx_transports.end())
          r.fail(t["kv_tls"], "transport.kv_tls names '" + tl + "', which is not a UCX transport" +
                                  did_you_mean(tl, ucx_transports) + "; use e.g. tcp (detects dead peers) or shm");
      }
      if (!any || list.back() == ',')
        r.fail(t["kv_tls"], "transport.kv_tls '" + cfg.transport.kv_tls +
                                "' is not a list of UCX transports; use e.g. tcp or tcp,shm");
    }
    r.opt_duration(t, "kv_timeout", cfg.transport.kv_timeout, "transport", true);
    r.opt_choice(t, "expert_exchange", cfg.transport.expert_exchange, "transport",
                 {"auto", "inproc", "ucx", "cuda_ipc", "nccl"});
    if ((cfg.transport.expert_exchange == "nccl" || cfg.transport.expert_exchange == "cuda_ipc") && !cuda)
      r.fail(t["expert_exchange"], "transport.expert_exchange '" + cfg.transport.expert_exchange +
                                       "' needs model.backend: cuda; with the cpu backend use inproc or ucx");
    r.opt_string(t, "head_host", cfg.transport.head.host, "transport");
    int hp = cfg.transport.head.port;
    r.opt_int(t, "head_port", hp, "transport", 0, 65535);
    cfg.transport.head.port = static_cast<uint16_t>(hp);
    if (auto owner = ports.clash(cfg.transport.head.host, cfg.transport.head.port); !owner.empty())
      r.fail(t["head_port"], "transport.head_port " + std::to_string(hp) + " is already taken by " + owner +
                                 "; pick another port or 0 (any free port)");
  }
  ports.add(cfg.transport.head.host, cfg.transport.head.port, "the head (transport.head_port)");
  {
    std::string checksum = "auto";
    if (auto t = root["transport"]; t.IsDefined() && !t.IsNull())
      r.opt_choice(t, "kv_checksum", checksum, "transport", {"auto", "on", "off"});
    // auto and on: checksums with either backend (GPU pools are checksummed on their GPU).
    cfg.transport.kv_checksum = checksum != "off";
  }
  std::string net_devices = "auto";
  if (auto t = root["transport"]; t.IsDefined() && !t.IsNull()) {
    r.opt_string(t, "kv_net_devices", net_devices, "transport");
    bool plain = std::all_of(net_devices.begin(), net_devices.end(), [](char c) {
      return std::isalnum(static_cast<unsigned char>(c)) || c == ',' || c == ':' || c == '_' || c == '-' || c == '.';
    });
    if (!plain)
      r.fail(t["kv_net_devices"], "transport.kv_net_devices '" + net_devices +
                                      "' is not a list of network devices; use e.g. lo, eth0 or mlx5_0:1 (comma-"
                                      "separated), all, or auto");
  }

  // security
  if (auto s = root["security"]; s.IsDefined() && !s.IsNull()) {
    r.only_keys(s, "security", {"tls", "secret_file"}, section_line("security"));
    if (auto t = s["tls"]; t.IsDefined() && !t.IsNull())
      cfg.security.tls = r.scalar<bool>(t, "security.tls");
    r.opt_string(s, "secret_file", cfg.security.secret_file, "security");
    cfg.security.secret_file = resolve(cfg.security.secret_file);
    if (!cfg.security.tls && !cfg.security.secret_file.empty())
      r.fail(s["secret_file"], "security.secret_file is set but security.tls is false; the secret is only used "
                               "with TLS: remove one of the two");
  }

  // nodes
  auto nodes = root["nodes"];
  if (!nodes.IsDefined())
    r.fail_line(1, "missing section 'nodes' (add e.g. `nodes: [{name: n0, ranks: [cpu]}]`)");
  if (!nodes.IsSequence() || nodes.size() == 0)
    r.fail_line(reader::value_line(root, "nodes"), "'nodes' must be a non-empty list of nodes");
  // Which node already uses a GPU, by host: nodes that share a host must not share a GPU.
  std::map<std::pair<std::string, std::string>, std::string> gpu_owner;
  for (auto n : nodes) {
    node_section node;
    node.line = reader::line_of(n);
    r.only_keys(n, "a node", {"name", "host", "port", "ranks"}, 0);
    r.opt_string(n, "name", node.name, "node");
    if (node.name.empty())
      r.fail(n, "every node needs a name (add `name: n0`)");
    if (!is_valid_name(node.name))
      r.fail(n["name"], "node name '" + node.name + "' is not valid; use letters, digits, '_', '-' and '.'");
    if (auto* first = cfg.find_node(node.name))
      r.fail(n["name"], "node '" + node.name + "' is defined twice (first on line " + std::to_string(first->line) +
                            "); node names must be unique");
    std::string where = "node '" + node.name + "'";
    r.opt_endpoint(n, node.address, where);
    auto ranks = n["ranks"];
    if (!ranks.IsDefined() || ranks.IsNull())
      r.fail_key(n, "ranks", where + " has no ranks (write e.g. `ranks: [cpu]` or `ranks: [cuda:0, cuda:1]`)");
    int count = 0;
    if (ranks.IsScalar() && !YAML::convert<int>::decode(ranks, count)) {
      // `ranks: cuda:0` is one rank, as if written `ranks: [cuda:0]`.
      auto spec = parse_rank(r, ranks, where + " rank 0");
      if (spec.is_cuda() != cuda)
        r.fail(ranks, where + " rank 0 is on " + spec.device + " but model.backend is '" + cfg.model.backend +
                          "'; " + (cuda ? "give it a GPU (cuda:N)" : "set model.backend: cuda"));
      node.ranks.push_back(spec);
    } else if (ranks.IsScalar()) {
      if (count < 1 || count > 64)
        r.fail(ranks, where + ".ranks = " + std::to_string(count) + " is out of range [1, 64]");
      // A count means that many ranks on the backend's devices: cpu, or cuda:0 .. cuda:N-1.
      for (int i = 0; i < count; ++i)
        node.ranks.push_back(rank_spec{cuda ? "cuda:" + std::to_string(i) : "cpu"});
    } else if (ranks.IsSequence()) {
      if (ranks.size() == 0)
        r.fail(ranks, where + ".ranks is empty; list at least one device");
      if (ranks.size() > 64)
        r.fail(ranks, where + " has " + std::to_string(ranks.size()) + " ranks; at most 64");
      std::map<std::string, int> seen_devices;
      for (size_t i = 0; i < ranks.size(); ++i) {
        auto item = ranks[i];
        auto spec = parse_rank(r, item, where + " rank " + std::to_string(i));
        if (spec.is_cuda() && !cuda)
          r.fail(item, where + " rank " + std::to_string(i) + " is on " + spec.device + " but model.backend is '" +
                           cfg.model.backend + "'; set model.backend: cuda");
        if (!spec.is_cuda() && cuda)
          r.fail(item, where + " rank " + std::to_string(i) +
                           " is on cpu but model.backend is 'cuda'; give it a GPU (cuda:N)");
        if (spec.is_cuda() && seen_devices.count(spec.device) && !cfg.model.share_gpus)
          r.fail(item, where + " lists " + spec.device + " twice (ranks " +
                           std::to_string(seen_devices[spec.device]) + " and " + std::to_string(i) +
                           "); one rank per GPU (or set model.share_gpus: true)");
        seen_devices[spec.device] = static_cast<int>(i);
        node.ranks.push_back(spec);
      }
    } else {
      r.fail(ranks, where + ".ranks must be a count or a list of devices");
    }
    for (size_t i = 0; i < node.ranks.size(); ++i) {
      if (!node.ranks[i].is_cuda())
        continue;
      auto host = node.address.host == "localhost" ? "127.0.0.1" : node.address.host;
      auto key = std::make_pair(host, node.ranks[i].device);
      if (auto it = gpu_owner.find(key); it != gpu_owner.end() && !cfg.model.share_gpus)
        r.fail_key(n, "ranks", where + " rank " + std::to_string(i) + " uses " + node.ranks[i].device + " on host " +
                                   host + ", which " + it->second +
                                   " already uses; nodes on one host need different GPUs (list them: "
                                   "`ranks: [cuda:4, cuda:5]`, or set model.share_gpus: true)");
      gpu_owner[key] = where;
    }
    if (auto owner = ports.clash(node.address.host, node.address.port); !owner.empty())
      r.fail(n["port"], where + " uses port " + std::to_string(node.address.port) + ", already taken by " + owner +
                            "; pick another port or 0 (any free port)");
    ports.add(node.address.host, node.address.port, where);
    cfg.nodes.push_back(std::move(node));
  }

  // groups
  auto groups = root["groups"];
  if (!groups.IsDefined())
    r.fail_line(1, "missing section 'groups' (add `groups: {prefill: [...], decode: [...]}`)");
  r.only_keys(groups, "groups", {"prefill", "decode"}, section_line("groups"));
  const std::vector<std::string> common_keys{"name",     "nodes",     "ep_size", "redundant_experts",
                                             "init_expert_location", "ep_mode", "two_batch_overlap", "fp8_experts",
                                             "rebalance_every", "rebalance_below", "rebalance_min_steps",
                                             "kv_pages", "page_size"};
  for (auto role : {group_role::prefill, group_role::decode}) {
    const std::string role_name = to_string(role);
    auto list = groups[role_name];
    if (!list.IsDefined())
      r.fail_line(section_line("groups"), "groups." + role_name + " is missing; list at least one " + role_name +
                                              " group (Petrel serves with separate prefill and decode groups)");
    if (!list.IsSequence() || list.size() == 0)
      r.fail_line(reader::value_line(groups, role_name),
                  "groups." + role_name + " must be a list of at least one group (`- name: ...`)");
    auto keys = common_keys;
    if (role == group_role::prefill)
      keys.insert(keys.end(), {"chunk_tokens", "max_batch_tokens"});
    else
      keys.insert(keys.end(), {"max_running"});
    for (auto g : list) {
      group_section grp;
      grp.role = role;
      grp.line = reader::line_of(g);
      r.only_keys(g, role_name + " group", keys, 0);
      r.opt_string(g, "name", grp.name, "group");
      if (grp.name.empty())
        r.fail(g, "every " + role_name + " group needs a name (add `name: " + role_name + "0`)");
      if (!is_valid_name(grp.name))
        r.fail(g["name"], "group name '" + grp.name + "' is not valid; use letters, digits, '_', '-' and '.'");
      if (auto* first = cfg.find_group(grp.name))
        r.fail(g["name"], "group '" + grp.name + "' is defined twice (first on line " +
                              std::to_string(first->line) + "); group names must be unique");
      std::string where = role_name + " group '" + grp.name + "'";
      auto gn = g["nodes"];
      if (!gn.IsDefined() || gn.IsNull())
        r.fail_key(g, "nodes", where + " needs `nodes: [...]` with at least one node");
      if (!gn.IsSequence() || gn.size() == 0)
        r.fail(gn, where + " needs `nodes: [...]` with at least one node");
      int rank_count = 0;
      for (auto node_name : gn) {
        auto nn = r.scalar<std::string>(node_name, where + ".nodes");
        auto* node = cfg.find_node(nn);
        if (!node)
          r.fail(node_name, where + " names unknown node '" + nn + "'" + [&] {
            std::vector<std::string> names;
            for (auto& n : cfg.nodes)
              names.push_back(n.name);
            return did_you_mean(nn, names) + "; the nodes are " + join(names);
          }());
        if (std::find(grp.nodes.begin(), grp.nodes.end(), nn) != grp.nodes.end())
          r.fail(node_name, where + " names node '" + nn + "' twice");
        if (auto* other = cfg.group_of(nn))
          r.fail(node_name, where + " names node '" + nn + "', which already belongs to " + to_string(other->role) +
                                " group '" + other->name + "' (a node serves one group)");
        grp.nodes.push_back(nn);
        rank_count += static_cast<int>(node->ranks.size());
      }
      grp.ep_size = rank_count;
      r.opt_int(g, "ep_size", grp.ep_size, where, 1, 1024);
      if (grp.ep_size != rank_count)
        r.fail(g["ep_size"], where + " has ep_size " + std::to_string(grp.ep_size) + " but its nodes have " +
                                 std::to_string(rank_count) + (rank_count == 1 ? " rank" : " ranks") + "; set ep_size: " + std::to_string(rank_count) +
                                 " (or leave it out)");
      if (gn.size() > 1 && cfg.transport.expert_exchange == "inproc")
        r.fail(gn, where + " spans " + std::to_string(gn.size()) +
                       " node processes, but transport.expert_exchange 'inproc' stays inside one process; set "
                       "transport.expert_exchange: " + (cuda ? "cuda_ipc" : "ucx"));
      r.opt_int(g, "redundant_experts", grp.redundant_experts, where, 0, 4096);
      r.opt_string(g, "init_expert_location", grp.init_expert_location, where);
      if (!grp.init_expert_location.empty()) {
        grp.init_expert_location = resolve(grp.init_expert_location);
        if (!fs::is_regular_file(grp.init_expert_location, ec))
          r.fail(g["init_expert_location"], where + ".init_expert_location '" + grp.init_expert_location +
                                                "' does not exist");
      }
      r.opt_choice(g, "ep_mode", grp.ep_mode, where, {"normal", "low_latency"});
      if (auto tbo = g["two_batch_overlap"]; tbo.IsDefined() && !tbo.IsNull())
        grp.two_batch_overlap = r.scalar<bool>(tbo, where + ".two_batch_overlap");
      if (auto f8 = g["fp8_experts"]; f8.IsDefined() && !f8.IsNull()) {
        grp.fp8_experts = r.scalar<bool>(f8, where + ".fp8_experts");
        if (grp.fp8_experts && !cuda)
          r.fail(f8, where + ".fp8_experts needs model.backend: cuda (the experts run as fp8 grouped GEMMs on the GPU "
                             "data plane)");
      }
      r.opt_int(g, "rebalance_every", grp.rebalance_every, where, 0, 1 << 30);
      if (auto rb = g["rebalance_below"]; rb.IsDefined() && !rb.IsNull()) {
        grp.rebalance_below = r.scalar<double>(rb, where + ".rebalance_below");
        if (!(grp.rebalance_below >= 0 && grp.rebalance_below <= 1))
          r.fail(rb, where + ".rebalance_below = " + rb.Scalar() +
                         " is out of range [0, 1] (a balancedness: mean / max expert load per rank; 0 turns it off)");
      }
      r.opt_int(g, "rebalance_min_steps", grp.rebalance_min_steps, where, 1, 1 << 30);
      r.opt_int(g, "chunk_tokens", grp.chunk_tokens, where, 1, 1 << 20);
      r.opt_int(g, "max_batch_tokens", grp.max_batch_tokens, where, 1, 1 << 22);
      r.opt_int(g, "max_running", grp.max_running, where, 1, 1 << 16);
      r.opt_int(g, "kv_pages", grp.kv_pages, where, 1, 1 << 24);
      r.opt_int(g, "page_size", grp.page_size, where, 1, 4096);
      if (role == group_role::prefill && grp.max_batch_tokens < grp.chunk_tokens)
        r.fail_line(reader::key_line(g, "max_batch_tokens") ? reader::key_line(g, "max_batch_tokens")
                                                            : reader::value_line(g, "chunk_tokens"),
                    where + ": max_batch_tokens (" + std::to_string(grp.max_batch_tokens) +
                        ") must be at least chunk_tokens (" + std::to_string(grp.chunk_tokens) +
                        "), or no chunk fits in a step");
      if (grp.ep_size > 1) {
        // The expert placement must fit the model and the group now, not in every rank at start.
        try {
          auto placement =
              ep::starting_placement(mcfg, grp.ep_size, grp.redundant_experts, grp.init_expert_location);
          for (const char* key : {"rebalance_every", "rebalance_below"})
            if ((grp.rebalance_every > 0 || grp.rebalance_below > 0) && g[key].IsDefined() &&
                placement.num_slots % grp.ep_size != 0)
              r.fail(g[key], where + "." + key + " needs the " + std::to_string(placement.num_slots) +
                                 " expert slots to divide evenly over the " + std::to_string(grp.ep_size) +
                                 " ranks; set redundant_experts so that experts + redundant_experts does");
        } catch (const std::invalid_argument& e) {
          const char* key = grp.init_expert_location.empty() ? "redundant_experts" : "init_expert_location";
          r.fail(g[key].IsDefined() ? g[key] : g, where + ": expert placement: " + e.what());
        }
      }
      cfg.groups.push_back(std::move(grp));
    }
  }
  for (auto& n : cfg.nodes)
    if (!cfg.group_of(n.name))
      r.fail_line(n.line, "node '" + n.name + "' belongs to no group; list it under groups.prefill or groups.decode");
  auto loopback = loopback_host;
  // transport.kv_gpu_path: GPU pools need a pinned host mirror (as large as the pool) only when KV may have to be
  // staged, i.e. when nodes may sit on different hosts. "auto" pins none when every node is on one host.
  {
    bool same_host = std::all_of(cfg.nodes.begin(), cfg.nodes.end(), [&](const node_section& n) {
      return host_key(n.address.host) == host_key(cfg.nodes.front().address.host);
    });
    const auto& path = cfg.transport.kv_gpu_path;
    cfg.transport.kv_gpu_mirror = path == "staged" || (path == "auto" && !same_host);
    // transport.expert_exchange cuda_ipc: the ranks of an EP group map each other's GPU buffers, so they share a host.
    if (cfg.transport.expert_exchange == "cuda_ipc")
      for (const auto& g : cfg.groups) {
        if (g.ep_size < 2) continue;
        // Two ranks of the group on one GPU in one process share a CUDA context: a rank whose receive kernel spins
        // for its peer then holds up the peer's first launch of a kernel its libraries load lazily (cuBLAS loads
        // its kernels on first use; loading waits for the context's running kernels), a deadlock until the
        // bounded wait fails the step. Measured on the H100; docs/gpu-expert-exchange.md.
        if (const std::string shared = cfg.gpu_shared_in_process(g); !shared.empty())
          r.fail_line(g.line, "group '" + g.name + "': " + shared + " in one process, but with transport."
                              "expert_exchange 'cuda_ipc' a rank spinning on the GPU for its peer blocks that peer's "
                              "lazy kernel loads in the shared CUDA context (a deadlock until device_timeout_s); give "
                              "each rank of a GPU-sharing group its own node process, or use inproc or ucx");
        for (const auto& nn : g.nodes) {
          const node_section* a = cfg.find_node(nn);
          const node_section* b = cfg.find_node(g.nodes.front());
          if (a && b && host_key(a->address.host) != host_key(b->address.host))
            r.fail_line(g.line, "group '" + g.name + "' has nodes on hosts '" + b->address.host + "' and '" +
                                    a->address.host + "', but transport.expert_exchange 'cuda_ipc' maps GPU memory "
                                    "between the ranks of one host; keep an EP group on one host");
        }
      }
  }
  // fp8_experts is a feature of the cuda_ipc plane.
  for (const auto& g : cfg.groups)
    if (g.fp8_experts && (g.ep_size < 2 || cfg.expert_exchange_for(g) != "cuda_ipc"))
      r.fail_line(g.line, "group '" + g.name + "' sets fp8_experts, which runs on the GPU expert exchange of an "
                              "expert-parallel group; this group " +
                              (g.ep_size < 2 ? std::string("has ep_size 1")
                                             : "exchanges through '" + cfg.expert_exchange_for(g) + "'") +
                              " (use ep_size > 1 with transport.expert_exchange auto or cuda_ipc)");
  // transport.expert_exchange nccl: NCCL refuses two ranks of one communicator on one GPU.
  if (cfg.transport.expert_exchange == "nccl")
    for (const auto& g : cfg.groups) {
      if (g.ep_size < 2) continue;
      std::map<std::string, std::string> owner; // host + device -> node
      for (const auto& nn : g.nodes) {
        const node_section* n = cfg.find_node(nn);
        if (!n) continue;
        for (const auto& rs : n->ranks) {
          const std::string key = host_key(n->address.host) + "/" + rs.device;
          auto [it, fresh] = owner.emplace(key, n->name);
          if (!fresh) {
            r.fail_line(g.line, "group '" + g.name + "' puts two ranks on " + rs.device + " of host '" +
                                    n->address.host + "' (nodes '" + it->second + "' and '" + n->name +
                                    "'), but transport.expert_exchange 'nccl' needs a GPU per rank (NCCL refuses two "
                                    "ranks of one communicator on one GPU); give each rank its own device or use "
                                    "cuda_ipc");
            break;
          }
        }
      }
    }
  // transport.kv_net_devices: "auto" keeps a one-host cluster's UCX listeners on loopback.
  if (net_devices == "auto") {
    bool one_host = std::all_of(cfg.nodes.begin(), cfg.nodes.end(),
                                [&](const node_section& n) { return loopback(n.address.host); });
    bool tcp = cfg.transport.kv_tls.find("tcp") != std::string::npos && cfg.transport.kv_tls[0] != '^';
    cfg.transport.kv_net_devices = one_host && tcp ? "lo" : "";
  } else {
    cfg.transport.kv_net_devices = net_devices == "all" ? "" : net_devices;
  }
  return cfg;
}

cluster_config load_cluster_config(const std::string& file) {
  std::error_code ec;
  if (fs::is_directory(file, ec))
    throw config_error(file + ": is a directory; name the cluster.yaml file inside it");
  std::ifstream in(file);
  if (!in)
    throw config_error(file + ": cannot open the file (does it exist?)");
  std::stringstream ss;
  ss << in.rdbuf();
  auto base = fs::absolute(fs::path(file)).parent_path().string();
  return parse_cluster_config(ss.str(), file, base);
}

} // namespace petrel
