// Every Petrel actor's typed interface, in one place: a reader learns the whole protocol here.
// Message types live in actors/messages.hpp. Shared protocols are declared once and mixed in.
#pragma once

#include <string>
#include <vector>

#include <caf/typed_actor.hpp>

#include "actors/messages.hpp"

namespace petrel {

// -- shared protocols ------------------------------------------------------------------------

/// Liveness: every long-lived actor answers a ping with its epoch, so a peer can tell a live
/// incarnation from a replaced one.
using liveness_protocol = caf::typed_actor<
    /// Answers the epoch of the running incarnation.
    caf::replies_to<ping_atom>::with<pong_atom, uint64_t>>;

// -- supervision -----------------------------------------------------------------------------

/// The SUPERVISOR actor interface (node_supervisor inside each node process, cluster_supervisor
/// in the head). Children are reached by stable name, never by a handle kept across restarts.
using supervisor_actor = caf::typed_actor<
    /// Answers the current handle and epoch of the child `name`, or no_such_child.
    caf::replies_to<whereis_atom, std::string>::with<caf::actor, uint64_t>,
    /// Answers the status of every child, in start order.
    caf::replies_to<children_atom>::with<std::vector<child_status>>,
    /// Restarts child `name` if it still runs incarnation `epoch` (stale_epoch otherwise);
    /// answers the new epoch once the new incarnation runs. Not counted against the intensity.
    caf::replies_to<restart_atom, std::string, uint64_t>::with<uint64_t>,
    /// Kills child `name` as a crash would (fault injection); answers the epoch that was killed.
    /// The restart policy then applies as for any crash.
    caf::replies_to<kill_atom, std::string>::with<uint64_t>,
    /// Terminates the children in reverse start order, then the supervisor itself.
    caf::replies_to<stop_atom>::with<caf::ok_atom>>;

/// The HEAD actor interface: the entry point of a running cluster for node processes and for
/// `petrel status` / `petrel stop`. Published on the head's CAF port.
using head_actor = caf::typed_actor<
    /// A node process registers its node_supervisor; answers ok, or stale_epoch when another
    /// incarnation of that node has been started since.
    caf::replies_to<hello_atom, node_hello>::with<caf::ok_atom>,
    /// Answers the live actor tree: nodes, their children, states, epochs and restart counts.
    caf::replies_to<status_atom>::with<cluster_status>,
    /// Kills a node's process (SIGKILL) as a crash would; answers its pid. For fault injection.
    caf::replies_to<kill_atom, std::string>::with<int32_t>,
    /// Stops every node process and then the head; answers once the nodes are gone.
    caf::replies_to<stop_atom>::with<caf::ok_atom>>;

/// The NODE PROXY actor interface: the head-side stand-in of one node process, supervised by the
/// cluster_supervisor. It lives exactly as long as its process and its connection.
using node_proxy_actor = caf::typed_actor<
    /// The node process of this incarnation registered (forwarded by the head).
    caf::replies_to<hello_atom, node_hello>::with<caf::ok_atom>,
    /// Answers this node's status including its node_supervisor's children.
    caf::replies_to<status_atom>::with<node_status>,
    /// SIGKILLs the process; answers its pid.
    caf::replies_to<kill_atom>::with<int32_t>,
    /// The reaper saw the process exit with this wait status.
    caf::reacts_to<exited_atom, int32_t, int32_t>,
    /// Periodic liveness probe of the node.
    caf::reacts_to<tick_atom>>;

// -- serving ------------------------------------------------------------------------------------

/// The RANK actor interface: one per GPU (or CPU worker). Detached (own thread), because it
/// blocks on its device stream and on collectives. It owns its device, weight shard and KV pool.
using rank_actor = liveness_protocol;

} // namespace petrel
