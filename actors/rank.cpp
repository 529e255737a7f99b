#include "actors/rank.hpp"

#include <caf/all.hpp>

namespace petrel {

namespace {

struct rank_state {
  static inline const char* name = "petrel.rank";
  rank_config config;
  epoch_fence fence;
};

rank_actor::behavior_type rank_impl(rank_actor::stateful_pointer<rank_state> self, rank_config cfg, uint64_t epoch) {
  self->state.config = std::move(cfg);
  self->state.fence.epoch = epoch;
  return {
      [self](ping_atom) { return caf::make_result(pong_atom::value, self->state.fence.epoch); },
  };
}

} // namespace

caf::actor spawn_rank(caf::local_actor* parent, const rank_config& cfg, const child_context& ctx) {
  return caf::actor_cast<caf::actor>(parent->spawn<caf::detached>(rank_impl, cfg, ctx.epoch));
}

} // namespace petrel
