#include "actors/node_children.hpp"

#include <caf/all.hpp>

#include "actors/rank.hpp"

namespace petrel {

std::vector<child_spec> node_children(const cluster_config& cfg, const node_section& node, uint64_t) {
  std::vector<child_spec> out;
  for (size_t i = 0; i < node.ranks.size(); ++i) {
    rank_config rc;
    rc.node = node.name;
    rc.index = static_cast<int>(i);
    rc.device = node.ranks[i].device;
    out.push_back(child_spec{"rank" + std::to_string(i), restart_type::permanent,
                             [rc](caf::local_actor* parent, const child_context& ctx) {
                               return spawn_rank(parent, rc, ctx);
                             },
                             "rank " + std::to_string(i) + " on " + node.ranks[i].device});
  }
  (void)cfg;
  return out;
}

} // namespace petrel
