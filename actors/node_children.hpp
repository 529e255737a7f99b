// What runs inside a node process: the child specs of its node_supervisor, by role.
#pragma once

#include <vector>

#include "actors/supervisor.hpp"
#include "runtime/cluster_config.hpp"

namespace petrel {

/// The supervised children of `node`: its ranks, and the group-level actors (scheduler, kv_agent)
/// on the first node of its group.
std::vector<child_spec> node_children(const cluster_config& cfg, const node_section& node, uint64_t node_epoch);

} // namespace petrel
