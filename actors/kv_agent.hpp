// The kv_agent actor: the node's KV mover (see interfaces.hpp, kv_agent_actor).
#pragma once

#include <memory>

#include <caf/actor.hpp>
#include <caf/local_actor.hpp>

#include "actors/supervisor.hpp"

namespace petrel {

namespace transport {
class kv_transfer_engine;
}

/// Spawns the kv_agent of a node over the node's engine (which outlives agent restarts, so pools
/// registered by ranks stay valid).
caf::actor spawn_kv_agent(caf::local_actor* parent, std::shared_ptr<transport::kv_transfer_engine> engine,
                          const child_context& ctx);

} // namespace petrel
