// The head-side stand-in of one node process (see node_proxy.cpp).
#pragma once

#include <chrono>
#include <string>

#include <caf/actor.hpp>
#include <caf/local_actor.hpp>

#include "actors/interfaces.hpp"

namespace petrel {

struct node_proxy_config {
  std::string node;
  std::string group;
  std::string config_path; // absolute path of cluster.yaml, handed to the node process
  std::string head_host;
  int head_port = 0;
  std::string log_path;    // the node process's stdout and stderr are appended here
  std::chrono::milliseconds register_timeout{30'000};
  std::chrono::milliseconds stop_timeout{5'000};
  std::chrono::milliseconds heartbeat{500}; // probe period; two missed probes (3 periods each) = dead
};

/// Starts the node process for incarnation `epoch` and returns its proxy.
caf::actor spawn_node_proxy(caf::local_actor* parent, node_proxy_config cfg, uint64_t epoch);

} // namespace petrel
