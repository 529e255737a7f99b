// Every message type that Petrel's actors exchange, declared once, with `inspect` and a type ID.
// Nodes are processes, so everything below except the block marked local-only must serialise.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <caf/actor.hpp>
#include <caf/atom.hpp>
#include <caf/error.hpp>
#include <caf/meta/type_name.hpp>
#include <caf/type_id.hpp>

namespace petrel {

// -- errors ----------------------------------------------------------------------------------

/// Petrel's error codes, carried as caf::error with category atom("petrel").
enum class petrel_errc : uint8_t {
  none = 0,
  stale_epoch,        // a message or transfer addressed an incarnation that no longer exists
  no_such_child,      // a supervisor has no child of that name
  escalated,          // a supervisor exceeded its restart intensity and gave up
  node_exited,        // a node process ended
  node_unreachable,   // a node process stopped answering (heartbeat) or lost its connection
  bad_request,        // a client request failed validation
  overloaded,         // admission control refused the request (queue full)
  aborted,            // the client went away or cancelled
  migration_limit,    // a request was re-prefilled too many times
  kv_transfer_failed, // a KV transfer failed or timed out
  rank_failed,        // a forward pass failed
  shutting_down,
};

const char* to_string(petrel_errc code);

caf::error make_error(petrel_errc code, std::string context = {});

/// Renders any caf::error, Petrel's own included, for people.
std::string describe(const caf::error& err);

// -- supervision and cluster status ---------------------------------------------------------

/// One supervised child as its supervisor sees it.
struct child_status {
  std::string name;
  std::string state;     // running | restarting | stopped | failed
  uint64_t epoch = 0;    // incarnation currently (or last) running
  uint32_t restarts = 0; // restarts since the supervisor started
  std::string detail;    // e.g. the last exit reason, or a rank's device
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, child_status& x) {
  return f(caf::meta::type_name("petrel.child_status"), x.name, x.state, x.epoch, x.restarts, x.detail);
}

/// One node process as the head sees it, with its children.
struct node_status {
  std::string name;
  std::string group;
  std::string state; // starting | running | restarting | failed | stopped
  uint64_t epoch = 0;
  uint32_t restarts = 0;
  int32_t pid = 0;
  std::vector<child_status> children;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, node_status& x) {
  return f(caf::meta::type_name("petrel.node_status"), x.name, x.group, x.state, x.epoch, x.restarts, x.pid,
           x.children);
}

struct cluster_status {
  std::string cluster;
  std::string state; // running | escalated | stopping
  int32_t head_pid = 0;
  uint16_t gateway_port = 0;
  std::vector<node_status> nodes;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, cluster_status& x) {
  return f(caf::meta::type_name("petrel.cluster_status"), x.cluster, x.state, x.head_pid, x.gateway_port, x.nodes);
}

/// A node process announces itself to the head once its supervisor runs.
struct node_hello {
  std::string node;
  uint64_t epoch = 0;
  int32_t pid = 0;
  caf::actor supervisor; // the node's node_supervisor
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, node_hello& x) {
  return f(caf::meta::type_name("petrel.node_hello"), x.node, x.epoch, x.pid, x.supervisor);
}

} // namespace petrel

// -- type IDs and atoms ------------------------------------------------------------------------

CAF_BEGIN_TYPE_ID_BLOCK(petrel, caf::first_custom_type_id)

CAF_ADD_TYPE_ID(petrel, (petrel::child_status))
CAF_ADD_TYPE_ID(petrel, (petrel::node_status))
CAF_ADD_TYPE_ID(petrel, (petrel::cluster_status))
CAF_ADD_TYPE_ID(petrel, (petrel::node_hello))

CAF_END_TYPE_ID_BLOCK(petrel)

namespace petrel {

// Atoms (CAF 0.17: at most 10 characters). Each names one verb of the protocol in interfaces.hpp.
using whereis_atom = caf::atom_constant<caf::atom("whereis")>;
using children_atom = caf::atom_constant<caf::atom("children")>;
using restart_atom = caf::atom_constant<caf::atom("restart")>;
using kill_atom = caf::atom_constant<caf::atom("kill")>;
using stop_atom = caf::atom_constant<caf::atom("stop")>;
using status_atom = caf::atom_constant<caf::atom("status")>;
using hello_atom = caf::atom_constant<caf::atom("hello")>;
using ping_atom = caf::atom_constant<caf::atom("ping")>;
using pong_atom = caf::atom_constant<caf::atom("pong")>;
using exited_atom = caf::atom_constant<caf::atom("exited")>;
using tick_atom = caf::atom_constant<caf::atom("tick")>;
using epoch_atom = caf::atom_constant<caf::atom("epoch")>;

} // namespace petrel
