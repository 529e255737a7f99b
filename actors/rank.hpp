// The rank actor: one per GPU or CPU worker (see interfaces.hpp, rank_actor).
#pragma once

#include <memory>
#include <string>

#include <caf/actor.hpp>
#include <caf/local_actor.hpp>

#include "actors/supervisor.hpp"

namespace petrel {

namespace transport {
class kv_transfer_engine;
}

struct rank_config {
  std::string node;
  std::string group;
  int index = 0;          // index within the node
  std::string device = "cpu";
  std::string model_path; // checkpoint directory (or the directory of the dummy config)
  bool dummy = false;
  std::string backend = "cpu";
  int kv_pages = 256;
  int page_size = 16;
  int threads = 1;        // host math threads
  int max_context = 0;
  // Expert parallelism (ep_size > 1): this rank is rank `ep_index` of its group's EP group.
  int ep_size = 1;
  int ep_index = 0;
  std::string ep_mode = "normal";
  bool two_batch_overlap = false;
  bool fp8_experts = false;
  int rebalance_every = 0;
  int redundant_experts = 0;
  std::string init_expert_location;
  std::string expert_exchange = "inproc"; // inproc (ranks of one process) | ucx (ranks in several processes) |
                                          // cuda_ipc or nccl (rows through the GPU data plane; control inproc or ucx)
  bool ep_spans_processes = false;        // the group's ranks live in more than one node process
  /// The dispatch/combine rows move through the GPU data plane (cuda_ipc or nccl), not the transport.
  bool rows_on_gpu() const { return expert_exchange == "cuda_ipc" || expert_exchange == "nccl"; }
  int ep_device_max_tokens = 1024;        // cuda_ipc: most tokens per rank and micro-batch the GPU buffers hold
  std::string net_devices;                // UCX_NET_DEVICES for the ucx exchange ("" = UCX's default)
  /// The node's KV engine: the rank registers its pool there so peers can write into it.
  std::shared_ptr<transport::kv_transfer_engine> kv_engine;
};

/// Spawns a detached rank actor for incarnation `ctx.epoch`. It loads the model in its own thread;
/// a load failure ends it with an error (the supervisor's restart policy applies).
caf::actor spawn_rank(caf::local_actor* parent, const rank_config& cfg, const child_context& ctx);

} // namespace petrel
