// A `petrel chaos` scenario: a cluster, a load, a timeline of faults and the expectations that
// must hold. Loaded once from YAML and validated (errors name FILE:LINE and the fix).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "runtime/cluster_config.hpp"

namespace petrel {

struct chaos_load {
  int requests = 50;
  int concurrency = 8;
  int input_min = 16, input_max = 64;
  int output_min = 8, output_max = 32;
  double temperature = 0.0;
  duration_ms request_timeout{120'000};
  duration_ms duration{0}; // > 0: stop issuing new requests after this long (soak runs)
};

/// One fault on the timeline. kinds: kill (actor), kill_node (node), stall (node, for),
/// delay (from->to, ms, for), drop (from->to, prob, for), partition (a, b, for), slow (actor, factor, for),
/// corrupt (from->to, prob, for: flips bytes of shipped KV pages after their checksums were taken).
struct chaos_event {
  duration_ms at{0};
  std::string kind;
  std::string actor;      // kill, slow: "NODE/CHILD", "GROUP/rankN" or "prefill|decode/rankN"
  std::string node;       // kill_node, stall
  std::string from, to;   // delay, drop, corrupt: the link from->to; partition: between from and to
  std::string what = "kv_transfer";
  double prob = 1.0;
  double factor = 1.0;
  duration_ms ms{0};
  duration_ms length{0};  // "for"
  int line = 0;
};

struct chaos_expect {
  std::optional<int> lost, failed, mismatched;
  std::optional<bool> outputs_match_fault_free;
  std::optional<duration_ms> max_recovery;
  /// At least one KV page arrived corrupted and was caught by its checksum (proves a corrupt fault
  /// really corrupted something, rather than passing because it missed every shipment).
  std::optional<bool> kv_corrupt_detected;
};

struct chaos_scenario {
  std::string source;
  uint64_t seed = 1;
  std::string cluster; // path of the cluster.yaml (resolved against the scenario's directory)
  chaos_load load;
  std::vector<chaos_event> events;
  chaos_expect expect;
};

/// Loads and validates a scenario. Throws config_error ("FILE:LINE: ...").
chaos_scenario load_chaos_scenario(const std::string& file);
chaos_scenario parse_chaos_scenario(const std::string& yaml_text, const std::string& name,
                                    const std::string& base_dir = ".");

/// Resolves an actor name of a scenario to (node, child) within `cfg`: "d0/rank0", "decode0/rank1"
/// (the group's ranks in order), "decode/rank1" (the first decode group). Throws config_error.
std::pair<std::string, std::string> resolve_chaos_actor(const cluster_config& cfg, const std::string& actor);

} // namespace petrel
