// An Erlang/OTP-style supervisor, written once and used for every supervised child in Petrel:
// the actors inside a node process (node_supervisor) and the node processes themselves (the head's
// cluster_supervisor supervises one node_proxy per process).
//
// Semantics (as in OTP):
// - strategies one_for_one, one_for_all, rest_for_one;
// - restart types permanent (always restarted), transient (restarted after an abnormal exit),
//   temporary (never restarted, removed after it exits);
// - restart intensity: more than `intensity` restarts within `period` makes the supervisor terminate
//   its children and exit with petrel_errc::escalated, so its parent decides;
// - every incarnation of a child carries an epoch, unique and increasing across the supervisor's
//   children. Clients resolve children by name (whereis) and stamp messages with the epoch; a child
//   refuses messages stamped with an epoch that is not its own (see epoch_fence).
#pragma once

#include <chrono>
#include <functional>
#include <string>
#include <vector>

#include <caf/actor.hpp>
#include <caf/local_actor.hpp>

#include "actors/interfaces.hpp"
#include "runtime/cluster_config.hpp"

namespace petrel {

enum class restart_type { permanent, transient, temporary };

const char* to_string(restart_type t);

/// What a child is told about itself when it starts.
struct child_context {
  std::string name;
  uint64_t epoch = 0;
  supervisor_actor supervisor;
};

/// How to start one child. `start` spawns it (from the supervisor's context) and returns its handle;
/// throwing or returning an invalid handle counts as a failed start.
struct child_spec {
  std::string name;
  restart_type restart = restart_type::permanent;
  std::function<caf::actor(caf::local_actor* parent, const child_context& ctx)> start;
  std::string detail; // shown in status (e.g. "rank 0 on cpu")
};

struct supervisor_spec {
  std::string name = "supervisor";
  restart_strategy strategy = restart_strategy::one_for_one;
  int intensity = 5;
  std::chrono::milliseconds period{10'000};
  uint64_t epoch_base = 0; // epochs of children start above this (node epochs use node_epoch << 32)
  std::chrono::milliseconds retry_delay{200}; // wait before retrying a child whose start failed
  std::vector<child_spec> children;
};

/// Spawns a supervisor that starts `spec.children` in order.
supervisor_actor spawn_supervisor(caf::actor_system& sys, supervisor_spec spec);

/// Epoch fencing for a child: refuses messages stamped with another incarnation's epoch.
struct epoch_fence {
  uint64_t epoch = 0;
  /// Returns an error to answer with when `stamped` is not this incarnation's epoch.
  caf::error check(uint64_t stamped) const;
};

} // namespace petrel
