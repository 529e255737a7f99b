// The rank actor: one per GPU or CPU worker (see interfaces.hpp, rank_actor).
#pragma once

#include <string>

#include <caf/actor.hpp>
#include <caf/local_actor.hpp>

#include "actors/supervisor.hpp"

namespace petrel {

struct rank_config {
  std::string node;
  int index = 0;
  std::string device = "cpu";
};

/// Spawns a detached rank actor for incarnation `ctx.epoch`.
caf::actor spawn_rank(caf::local_actor* parent, const rank_config& cfg, const child_context& ctx);

} // namespace petrel
