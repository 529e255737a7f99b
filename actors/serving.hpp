// The head's serving actors: gateway, router, prefill and decode schedulers. They run in the head
// process under a `service_supervisor`, reach each other by name through it, and reach ranks and
// kv_agents in node processes through the head (whereis NODE CHILD).
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include <caf/actor.hpp>
#include <caf/local_actor.hpp>

#include "actors/interfaces.hpp"
#include "actors/supervisor.hpp"
#include "runtime/cluster_config.hpp"

namespace petrel {

/// What every serving actor is given at start.
struct service_context {
  std::shared_ptr<const cluster_config> cfg;
  head_actor head;
  std::shared_ptr<std::atomic<uint16_t>> gateway_port; // the gateway publishes its bound port here
};

/// Child names under the service supervisor.
inline std::string prefill_scheduler_name(const std::string& group) { return "prefill/" + group; }
inline std::string decode_scheduler_name(const std::string& group) { return "decode/" + group; }
inline std::string eplb_rebalancer_name(const std::string& group) { return "eplb/" + group; }
inline const char* router_name = "router";
inline const char* gateway_name = "gateway";

/// The child specs of the service supervisor, in start order: schedulers, router, gateway.
std::vector<child_spec> service_children(const service_context& sc);

caf::actor spawn_prefill_scheduler(caf::local_actor* parent, const service_context& sc, const group_section& group,
                                   const child_context& ctx);
caf::actor spawn_decode_scheduler(caf::local_actor* parent, const service_context& sc, const group_section& group,
                                  const child_context& ctx);
caf::actor spawn_router(caf::local_actor* parent, const service_context& sc, const child_context& ctx);
/// One per expert-parallel group (ep_size > 1): see eplb_rebalancer_actor in interfaces.hpp.
caf::actor spawn_eplb_rebalancer(caf::local_actor* parent, const service_context& sc, const group_section& group,
                                 const child_context& ctx);
caf::actor spawn_gateway(caf::local_actor* parent, const service_context& sc, const child_context& ctx);

/// The head process's serving metrics (one registry per process).
namespace metrics {
struct serving_metrics;
}
metrics::serving_metrics& serving_metrics();

/// Tokens processed per group (petrel_group_tokens_total{group, kind=input|output}): what
/// `petrel status` turns into per-group throughput.
void count_group_tokens(const std::string& group, const char* kind, double tokens);

} // namespace petrel
