#include "runtime/chaos_scenario.hpp"

#include <filesystem>
#include <fstream>
#include <set>

#include "runtime/yaml_reader.hpp"

namespace petrel {

namespace fs = std::filesystem;

namespace {

/// "p0->d0" -> {"p0", "d0"}.
std::pair<std::string, std::string> parse_link(const yaml_reader& r, const YAML::Node& n, const std::string& where) {
  auto text = r.scalar<std::string>(n, where);
  auto arrow = text.find("->");
  if (arrow == std::string::npos || arrow == 0 || arrow + 2 >= text.size())
    r.fail(n, where + " '" + text + "' must read FROM->TO, e.g. p0->d0");
  return {text.substr(0, arrow), text.substr(arrow + 2)};
}

duration_ms need_duration(const yaml_reader& r, const YAML::Node& map, const char* key, const std::string& where) {
  if (!map[key].IsDefined())
    r.fail(map, where + " needs '" + key + "' (a duration such as 1500ms or 2s)");
  duration_ms d{0};
  r.opt_duration(map, key, d, where, false);
  return d;
}

chaos_event parse_event(const yaml_reader& r, const YAML::Node& n, size_t index) {
  chaos_event ev;
  ev.line = r.line_of(n);
  std::string where = "events[" + std::to_string(index) + "]";
  if (!n.IsMap())
    r.fail(n, where + " must be a mapping such as {at: 2s, kill: {actor: decode/rank0}}");
  ev.at = need_duration(r, n, "at", where);
  static const std::vector<std::string> kinds{"kill",      "kill_node", "stall",  "delay",    "drop",
                                              "partition", "slow",      "corrupt", "gpu_fault"};
  std::vector<std::string> keys{"at"};
  keys.insert(keys.end(), kinds.begin(), kinds.end());
  r.only_keys(n, where, keys);
  for (auto& k : kinds)
    if (n[k].IsDefined()) {
      if (!ev.kind.empty())
        r.fail(n, where + " has two faults ('" + ev.kind + "' and '" + k + "'); write one event per fault");
      ev.kind = k;
    }
  if (ev.kind.empty())
    r.fail(n, where +
                  " names no fault; use one of kill, kill_node, stall, delay, drop, partition, slow, corrupt, gpu_fault");
  auto f = n[ev.kind];
  auto fw = where + "." + ev.kind;
  if (ev.kind == "kill" || ev.kind == "gpu_fault") {
    r.only_keys(f, fw, {"actor"});
    r.opt_string(f, "actor", ev.actor, fw);
  } else if (ev.kind == "kill_node") {
    r.only_keys(f, fw, {"node"});
    r.opt_string(f, "node", ev.node, fw);
  } else if (ev.kind == "stall") {
    r.only_keys(f, fw, {"node", "for"});
    r.opt_string(f, "node", ev.node, fw);
    ev.length = need_duration(r, f, "for", fw);
  } else if (ev.kind == "delay") {
    r.only_keys(f, fw, {"link", "ms", "for"});
    std::tie(ev.from, ev.to) = parse_link(r, f["link"], fw + ".link");
    int ms = 0;
    r.opt_int(f, "ms", ms, fw, 0, 600'000);
    ev.ms = duration_ms{ms};
    ev.length = need_duration(r, f, "for", fw);
  } else if (ev.kind == "drop") {
    r.only_keys(f, fw, {"link", "what", "prob", "for"});
    std::tie(ev.from, ev.to) = parse_link(r, f["link"], fw + ".link");
    r.opt_string(f, "what", ev.what, fw);
    if (ev.what != "kv_transfer")
      r.fail(f["what"], fw + ".what '" + ev.what + "' is not supported; use kv_transfer");
    if (f["prob"].IsDefined()) ev.prob = r.scalar<double>(f["prob"], fw + ".prob");
    if (!(ev.prob >= 0 && ev.prob <= 1))
      r.fail(f["prob"], fw + ".prob must be within [0, 1]");
    ev.length = need_duration(r, f, "for", fw);
  } else if (ev.kind == "corrupt") {
    // Flips bytes in KV pages on the link after the sender took their checksums.
    r.only_keys(f, fw, {"link", "prob", "for"});
    std::tie(ev.from, ev.to) = parse_link(r, f["link"], fw + ".link");
    if (f["prob"].IsDefined()) ev.prob = r.scalar<double>(f["prob"], fw + ".prob");
    if (!(ev.prob >= 0 && ev.prob <= 1))
      r.fail(f["prob"], fw + ".prob must be within [0, 1]");
    ev.length = need_duration(r, f, "for", fw);
  } else if (ev.kind == "partition") {
    r.only_keys(f, fw, {"between", "for"});
    auto b = f["between"];
    if (!b.IsSequence() || b.size() != 2)
      r.fail(f, fw + ".between must list two nodes, e.g. [p0, d0]");
    ev.from = r.scalar<std::string>(b[0], fw + ".between");
    ev.to = r.scalar<std::string>(b[1], fw + ".between");
    ev.length = need_duration(r, f, "for", fw);
  } else if (ev.kind == "slow") {
    r.only_keys(f, fw, {"actor", "factor", "for"});
    r.opt_string(f, "actor", ev.actor, fw);
    if (f["factor"].IsDefined()) ev.factor = r.scalar<double>(f["factor"], fw + ".factor");
    if (!(ev.factor >= 1 && ev.factor <= 1000))
      r.fail(f["factor"], fw + ".factor must be within [1, 1000]");
    ev.length = need_duration(r, f, "for", fw);
  }
  if ((ev.kind == "kill" || ev.kind == "slow" || ev.kind == "gpu_fault") && ev.actor.empty())
    r.fail(f, fw + " needs 'actor' (e.g. decode/rank0 or d0/rank0)");
  if ((ev.kind == "kill_node" || ev.kind == "stall") && ev.node.empty())
    r.fail(f, fw + " needs 'node'");
  return ev;
}

} // namespace

chaos_scenario parse_chaos_scenario(const std::string& yaml_text, const std::string& name, const std::string& base_dir) {
  yaml_reader r(name);
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::ParserException& e) {
    r.fail_line(e.mark.line + 1, "not valid YAML: " + e.msg);
  }
  if (!root.IsMap())
    r.fail_line(1, "a chaos scenario is a mapping with keys seed, cluster, load, events, expect");
  r.only_keys(root, "the scenario", {"seed", "cluster", "load", "events", "expect"});
  chaos_scenario sc;
  sc.source = name;
  if (root["seed"].IsDefined()) sc.seed = r.scalar<uint64_t>(root["seed"], "seed");
  r.opt_string(root, "cluster", sc.cluster, "scenario");
  if (sc.cluster.empty())
    r.fail_line(1, "the scenario needs `cluster: PATH` (a cluster.yaml)");
  if (!fs::path(sc.cluster).is_absolute())
    sc.cluster = (fs::path(base_dir) / sc.cluster).lexically_normal().string();
  if (!fs::exists(sc.cluster))
    r.fail(root["cluster"], "cluster '" + sc.cluster + "' does not exist");
  if (auto l = root["load"]; l.IsDefined()) {
    r.only_keys(l, "load", {"requests", "concurrency", "input_len", "output_len", "temperature", "timeout", "duration"});
    r.opt_int(l, "requests", sc.load.requests, "load", 1, 100'000);
    r.opt_int(l, "concurrency", sc.load.concurrency, "load", 1, 4096);
    for (auto [key, lo, hi] : {std::tuple{"input_len", &sc.load.input_min, &sc.load.input_max},
                               std::tuple{"output_len", &sc.load.output_min, &sc.load.output_max}}) {
      auto n = l[key];
      if (!n.IsDefined())
        continue;
      if (!n.IsSequence() || n.size() != 2)
        r.fail(n, std::string("load.") + key + " must be [MIN, MAX]");
      *lo = r.scalar<int>(n[0], std::string("load.") + key);
      *hi = r.scalar<int>(n[1], std::string("load.") + key);
      if (*lo < 1 || *hi < *lo)
        r.fail(n, std::string("load.") + key + " must satisfy 1 <= MIN <= MAX");
    }
    if (l["temperature"].IsDefined()) sc.load.temperature = r.scalar<double>(l["temperature"], "load.temperature");
    r.opt_duration(l, "timeout", sc.load.request_timeout, "load", false);
    r.opt_duration(l, "duration", sc.load.duration, "load", false);
  }
  if (auto ev = root["events"]; ev.IsDefined()) {
    if (!ev.IsSequence())
      r.fail(ev, "events must be a list");
    for (size_t i = 0; i < ev.size(); ++i)
      sc.events.push_back(parse_event(r, ev[i], i));
  }
  if (auto e = root["expect"]; e.IsDefined()) {
    r.only_keys(e, "expect",
                {"lost", "failed", "mismatched", "outputs_match_fault_free", "max_recovery", "kv_corrupt_detected"});
    auto opt_count = [&](const char* key, std::optional<int>& out) {
      if (e[key].IsDefined())
        out = r.scalar<int>(e[key], std::string("expect.") + key);
    };
    opt_count("lost", sc.expect.lost);
    opt_count("failed", sc.expect.failed);
    opt_count("mismatched", sc.expect.mismatched);
    if (e["outputs_match_fault_free"].IsDefined())
      sc.expect.outputs_match_fault_free = r.scalar<bool>(e["outputs_match_fault_free"], "expect.outputs_match_fault_free");
    if (e["kv_corrupt_detected"].IsDefined())
      sc.expect.kv_corrupt_detected = r.scalar<bool>(e["kv_corrupt_detected"], "expect.kv_corrupt_detected");
    if (e["max_recovery"].IsDefined()) {
      duration_ms d{0};
      r.opt_duration(e, "max_recovery", d, "expect", false);
      sc.expect.max_recovery = d;
    }
    if (sc.expect.outputs_match_fault_free.value_or(false) && sc.load.temperature > 0)
      r.fail(e["outputs_match_fault_free"],
             "expect.outputs_match_fault_free needs greedy decoding: set load.temperature: 0");
  }
  // Node names must exist in the cluster.
  auto cfg = load_cluster_config(sc.cluster);
  for (auto& ev : sc.events) {
    for (auto* node : {&ev.node, &ev.from, &ev.to})
      if (!node->empty() && !cfg.find_node(*node))
        r.fail_line(ev.line, "event '" + ev.kind + "' names unknown node '" + *node + "' (cluster " + sc.cluster + ")");
    if (!ev.actor.empty()) {
      try {
        resolve_chaos_actor(cfg, ev.actor);
      } catch (const config_error& err) {
        r.fail_line(ev.line, err.what());
      }
    }
  }
  return sc;
}

chaos_scenario load_chaos_scenario(const std::string& file) {
  std::ifstream in(file);
  if (!in)
    throw config_error(file + ": cannot open the scenario");
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_chaos_scenario(ss.str(), file, fs::absolute(fs::path(file)).parent_path().string());
}

std::pair<std::string, std::string> resolve_chaos_actor(const cluster_config& cfg, const std::string& actor) {
  auto slash = actor.find('/');
  if (slash == std::string::npos)
    throw config_error("actor '" + actor + "' must read NODE/CHILD, GROUP/rankN or prefill|decode/rankN");
  auto scope = actor.substr(0, slash), child = actor.substr(slash + 1);
  if (cfg.find_node(scope))
    return {scope, child};
  if (scope == "head") {
    // The head's serving actors: head/router, head/gateway, head/prefill/GROUP, head/decode/GROUP.
    if (child == "router" || child == "gateway")
      return {scope, child};
    auto sep = child.find('/');
    auto role = child.substr(0, sep);
    auto* g = sep == std::string::npos ? nullptr : cfg.find_group(child.substr(sep + 1));
    if (g && ((role == "prefill" && g->role == group_role::prefill) || (role == "decode" && g->role == group_role::decode)))
      return {scope, child};
    throw config_error("actor '" + actor + "': the head's actors are router, gateway, prefill/GROUP and decode/GROUP");
  }
  const group_section* group = cfg.find_group(scope);
  if (!group && (scope == "prefill" || scope == "decode")) {
    auto groups = cfg.groups_with(scope == "prefill" ? group_role::prefill : group_role::decode);
    group = groups.empty() ? nullptr : groups.front();
  }
  if (!group)
    throw config_error("actor '" + actor + "': '" + scope + "' is neither a node nor a group");
  if (child.rfind("rank", 0) != 0)
    throw config_error("actor '" + actor + "': within a group, name a rank as rankN");
  int index = std::stoi(child.substr(4));
  for (auto& node_name : group->nodes) {
    auto* node = cfg.find_node(node_name);
    if (index < static_cast<int>(node->ranks.size()))
      return {node_name, "rank" + std::to_string(index)};
    index -= static_cast<int>(node->ranks.size());
  }
  throw config_error("actor '" + actor + "': group '" + group->name + "' has no such rank");
}

} // namespace petrel
