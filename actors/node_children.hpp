// What runs inside a node process: the child specs of its node_supervisor.
#pragma once

#include <memory>
#include <vector>

#include "actors/supervisor.hpp"
#include "runtime/cluster_config.hpp"

namespace petrel {

namespace transport {
class kv_transfer_engine;
}

/// The supervised children of `node`, in start order: its kv_agent, then one rank per device.
/// `kv_engine` is the node's UCX engine; it outlives the children, so pools stay registered across
/// a kv_agent restart.
std::vector<child_spec> node_children(const cluster_config& cfg, const node_section& node,
                                      std::shared_ptr<transport::kv_transfer_engine> kv_engine);

} // namespace petrel
