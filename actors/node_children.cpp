#include "actors/node_children.hpp"

#include <algorithm>
#include <filesystem>

#include <caf/all.hpp>

#include "actors/kv_agent.hpp"
#include "actors/rank.hpp"

namespace petrel {

std::vector<child_spec> node_children(const cluster_config& cfg, const node_section& node,
                                      std::shared_ptr<transport::kv_transfer_engine> kv_engine) {
  std::vector<child_spec> out;
  out.push_back(child_spec{"kv_agent", restart_type::permanent,
                           [kv_engine](caf::local_actor* parent, const child_context& ctx) {
                             return spawn_kv_agent(parent, kv_engine, ctx);
                           },
                           "UCX " + cfg.transport.kv_tls});
  auto* group = cfg.group_of(node.name);
  for (size_t i = 0; i < node.ranks.size(); ++i) {
    rank_config rc;
    rc.node = node.name;
    rc.group = group ? group->name : "";
    rc.index = static_cast<int>(i);
    rc.device = node.ranks[i].device;
    rc.dummy = cfg.model.is_dummy();
    rc.model_path = rc.dummy ? std::filesystem::path(cfg.model.dummy_config).parent_path().string() : cfg.model.path;
    rc.backend = cfg.model.backend;
    rc.kv_pages = group ? group->kv_pages : 256;
    rc.page_size = group ? group->page_size : 16;
    rc.max_context = cfg.model.max_context;
    rc.kv_engine = kv_engine;
    if (group && group->ep_size > 1) {
      // The rank's place in its EP group: the ranks of the group's earlier nodes come first.
      int before = 0;
      for (auto& n : group->nodes) {
        if (n == node.name)
          break;
        if (auto* other = cfg.find_node(n))
          before += static_cast<int>(other->ranks.size());
      }
      rc.ep_size = group->ep_size;
      rc.ep_index = before + static_cast<int>(i);
      rc.ep_mode = group->ep_mode;
      rc.two_batch_overlap = group->two_batch_overlap;
      rc.fp8_experts = group->fp8_experts;
      rc.rebalance_every = group->rebalance_every;
      rc.redundant_experts = group->redundant_experts;
      rc.init_expert_location = group->init_expert_location;
      rc.expert_exchange = cfg.expert_exchange_for(*group);
      rc.ep_spans_processes = group->nodes.size() > 1;
      // A prefill step holds at most max_batch_tokens per rank, a decode step one token per running sequence.
      rc.ep_device_max_tokens = group->role == group_role::prefill ? group->max_batch_tokens : group->max_running;
      rc.net_devices = cfg.transport.kv_net_devices; // "lo" on one host (see transport.kv_net_devices)
    }
    out.push_back(child_spec{"rank" + std::to_string(i), restart_type::permanent,
                             [rc](caf::local_actor* parent, const child_context& ctx) {
                               return spawn_rank(parent, rc, ctx);
                             },
                             "rank " + std::to_string(i) + " on " + node.ranks[i].device});
  }
  return out;
}

} // namespace petrel
