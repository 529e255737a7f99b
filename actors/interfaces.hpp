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
    caf::replies_to<stop_atom>::with<caf::ok_atom>,
    /// Resolves child `child` of node `node` (e.g. "rank0", "kv_agent"): its handle and epoch.
    caf::replies_to<whereis_atom, std::string, std::string>::with<caf::actor, uint64_t>,
    /// Kills child `child` of node `node` as a crash would; answers the killed epoch.
    caf::replies_to<kill_atom, std::string, std::string>::with<uint64_t>,
    /// Injects a fault into child `child` of node `node` (a rank: slow; a kv_agent: delay, drop,
    /// partition); answers ok once the child accepted it.
    caf::replies_to<fault_atom, std::string, std::string, fault_spec>::with<caf::ok_atom>,
    /// A live expert rebalance of group `group` (its scheduler forwards it to the group's ranks); answers
    /// the ranks' EP statistics as JSON.
    caf::replies_to<rebalance_atom, std::string>::with<std::string>>;

/// The EPLB REBALANCER actor interface: one per expert-parallel group, in the head under the service
/// supervisor. It watches the group's balancedness (petrel_eplb_balancedness) and triggers live rebalances,
/// on command or when balancedness falls below the group's `rebalance_below`.
using eplb_rebalancer_actor = caf::typed_actor<
    /// A live rebalance of the group now (at its next step); answers the ranks' EP statistics (JSON array).
    caf::replies_to<rebalance_atom>::with<std::string>,
    /// Internal: the periodic look at the group's statistics.
    caf::reacts_to<tick_atom>>;

/// The NODE PROXY actor interface: the head-side stand-in of one node process, supervised by the
/// cluster_supervisor. It lives exactly as long as its process and its connection.
using node_proxy_actor = caf::typed_actor<
    /// The node process of this incarnation registered (forwarded by the head).
    caf::replies_to<hello_atom, node_hello>::with<caf::ok_atom>,
    /// Answers this node's status including its node_supervisor's children.
    caf::replies_to<status_atom>::with<node_status>,
    /// SIGKILLs the process; answers its pid.
    caf::replies_to<kill_atom>::with<int32_t>,
    /// Kills child `child` of the node's supervisor as a crash would; answers the killed epoch.
    caf::replies_to<kill_atom, std::string>::with<uint64_t>,
    /// Heartbeat: probes the node's supervisor; a node that misses two probes in a row (stopped,
    /// hung, partitioned) is SIGKILLed and restarted.
    caf::reacts_to<beat_atom>,
    /// The reaper saw the process exit with this wait status.
    caf::reacts_to<exited_atom, int32_t, int32_t>,
    /// Periodic liveness probe of the node.
    caf::reacts_to<tick_atom>,
    /// Resolves a child of the node's supervisor (forwarded to it).
    caf::replies_to<whereis_atom, std::string>::with<caf::actor, uint64_t>>;

// -- serving ------------------------------------------------------------------------------------

/// The RANK actor interface: one per GPU (or CPU worker). Detached (own thread), because it
/// blocks on its device stream and on collectives. It owns its device, weights and KV pool.
using rank_actor = liveness_protocol::extend<
    /// Answers the rank's KV geometry and the descriptor of its registered KV pool.
    caf::replies_to<info_atom>::with<rank_info>,
    /// Runs one forward step (prefill chunks and/or decode tokens) and answers the sampled tokens.
    /// A step stamped with another incarnation's epoch is refused (stale_epoch).
    caf::replies_to<forward_atom, forward_step>::with<step_output>,
    /// Fault injection: "slow" stretches every step by `factor` for `duration_ms`.
    caf::replies_to<fault_atom, fault_spec>::with<caf::ok_atom>,
    /// Expert parallelism, forming the group at `generation` (the scheduler sends both phases to every rank).
    /// Phase 1: drop the old EP state, open this generation's exchange endpoint, answer its address.
    caf::replies_to<rebuild_atom, uint64_t>::with<ep_endpoint>,
    /// Phase 2: connect to every peer's address and split the model by the placement; answers once the rank
    /// can step.
    caf::replies_to<rebuild_atom, ep_peers>::with<caf::ok_atom>,
    /// Expert parallelism: answers the rank's EP statistics as JSON; with `true`, first asks for a live EPLB
    /// rebalance at the next step boundary.
    caf::replies_to<rebalance_atom, bool>::with<std::string>>;

/// The KV AGENT actor interface: one per node process. Owns the node's UCX KV-transfer engine
/// (its progress thread) and moves pages: put, flush, then an active-message notice.
using kv_agent_actor = liveness_protocol::extend<
    /// Pushes the pages of a local pool to the destination; answers once the data is visible
    /// there, or fails (peer lost, timeout, refused descriptor). Never hangs: every transfer has a
    /// deadline.
    caf::replies_to<ship_atom, kv_shipment>::with<kv_receipt>,
    /// Internal: the engine's progress thread reports transfer `id` done (error text empty on success).
    caf::reacts_to<ship_atom, uint64_t, kv_receipt, std::string>,
    /// Recomputes the CRC32C of pages that landed in a pool of this node and compares them with
    /// the sender's; answers ok, or kv_corrupt naming the first page that differs.
    caf::replies_to<verify_atom, kv_check>::with<caf::ok_atom>,
    /// Fault injection on shipments to one peer node: "delay", "drop", "partition" or "corrupt".
    caf::replies_to<fault_atom, fault_spec>::with<caf::ok_atom>>;

/// The PREFILL SCHEDULER actor interface: one per prefill group (runs in the head process, so its
/// queue survives node crashes). Chunked prefill with a token budget, batched across requests.
using prefill_scheduler_actor = caf::typed_actor<
    /// Queues a prefill; answers ok at once. The outcome goes to the decode scheduler (kv_ready)
    /// and, for failures, to the router (request_failure).
    caf::replies_to<prefill_atom, prefill_job>::with<caf::ok_atom>,
    /// Drops a request and frees its pages.
    caf::reacts_to<abort_atom, uint64_t>,
    /// Answers the group's load.
    caf::replies_to<load_atom>::with<group_load>,
    /// Expert parallelism: every rank's EP statistics as a JSON array (an error when the group is not
    /// expert-parallel); with `true`, a live rebalance of the group's experts at its next step first.
    caf::replies_to<rebalance_atom, bool>::with<std::string>,
    /// Periodic housekeeping: resolve ranks that are down, expire stale reservations.
    caf::reacts_to<tick_atom>>;

/// The DECODE SCHEDULER actor interface: one per decode group (in the head process). Pre-allocates
/// KV pages, admits transferred requests, runs continuous batching with one step per rank.
using decode_scheduler_actor = caf::typed_actor<
    /// Reserves pages for the request on one rank (DP attention); answers the destination, or
    /// overloaded when no rank has room.
    caf::replies_to<admit_atom, decode_admission>::with<kv_destination>,
    /// The request's KV arrived: it joins the running batch (after its pages pass the checksum).
    caf::reacts_to<ready_atom, kv_ready>,
    /// The sender's page checksums of a request's shipment, checked when its kv_ready comes.
    caf::reacts_to<digest_atom, kv_digest>,
    /// Drops a request (client gone, stop string matched) and frees its pages.
    caf::reacts_to<abort_atom, uint64_t>,
    /// Answers the group's load.
    caf::replies_to<load_atom>::with<group_load>,
    /// Expert parallelism: every rank's EP statistics as a JSON array (an error when the group is not
    /// expert-parallel); with `true`, a live rebalance of the group's experts at its next step first.
    caf::replies_to<rebalance_atom, bool>::with<std::string>,
    /// Periodic housekeeping: resolve ranks that are down, expire stale reservations.
    caf::reacts_to<tick_atom>>;

/// The ROUTER actor interface (head): picks a decode and a prefill group per request, tracks each
/// request until done, streams its tokens to the submitter, and migrates requests on failure.
using router_actor = caf::typed_actor<
    /// Accepts a request (answers ok) or refuses it (overloaded: the queue is full). Tokens then
    /// flow to the submitter as (tokens_atom, token_event).
    caf::replies_to<submit_atom, serve_request>::with<caf::ok_atom>,
    /// New tokens of a request, from a scheduler.
    caf::reacts_to<tokens_atom, token_event>,
    /// A request failed on its path; the router migrates it or fails it.
    caf::reacts_to<failed_atom, request_failure>,
    /// The client went away or no longer needs the request.
    caf::reacts_to<abort_atom, uint64_t>,
    /// Answers the load of every group.
    caf::replies_to<load_atom>::with<std::vector<group_load>>,
    /// Periodic housekeeping: dispatch waiting requests, retry migrations.
    caf::reacts_to<tick_atom>>;

/// The GATEWAY actor interface (head): the HTTP listener. HTTP threads hand requests to it; the
/// router streams tokens back to it.
using gateway_actor = caf::typed_actor<
    /// An HTTP request from a server thread (local only).
    caf::reacts_to<http_call>,
    /// The client of request `rid` went away (local only, from a server thread).
    caf::reacts_to<abort_atom, uint64_t>,
    /// Tokens of a request that this gateway submitted.
    caf::reacts_to<tokens_atom, token_event>,
    /// Periodic housekeeping (metrics gauges).
    caf::reacts_to<tick_atom>>;

} // namespace petrel
