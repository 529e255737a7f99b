// Every message type that Petrel's actors exchange, declared once, with `inspect` and a type ID.
// Nodes are processes, so everything below except the block marked local-only must serialise.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <caf/actor.hpp>
#include <caf/atom.hpp>
#include <caf/error.hpp>
#include <caf/meta/type_name.hpp>
#include <caf/type_id.hpp>
#include <caf/allowed_unsafe_message_type.hpp>

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
  kv_corrupt,         // KV pages arrived with bytes that differ from the sender's (checksum mismatch)
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


// -- serving: the request path ---------------------------------------------------------------

/// Sampling settings as they travel with a request. Sampling is stateless per step: the token at
/// output position i is drawn with seed (seed, i), so a migrated request continues reproducibly.
struct sampling_spec {
  float temperature = 0.0f; // <= 0: greedy
  int32_t top_k = 0;
  float top_p = 1.0f;
  uint64_t seed = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, sampling_spec& x) {
  return f(caf::meta::type_name("petrel.sampling_spec"), x.temperature, x.top_k, x.top_p, x.seed);
}

/// A validated request as the router sees it (the gateway did the HTTP and JSON part).
struct serve_request {
  uint64_t rid = 0;
  std::vector<int32_t> prompt;
  int32_t max_new_tokens = 16;
  sampling_spec sampling;
  std::vector<int32_t> stop_ids; // the engine ends the request after emitting one of these
  std::vector<int32_t> emitted;  // tokens already streamed to the client (a resubmission after a router restart)
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, serve_request& x) {
  return f(caf::meta::type_name("petrel.serve_request"), x.rid, x.prompt, x.max_new_tokens, x.sampling, x.stop_ids,
           x.emitted);
}

/// New tokens of one request, in order (router -> gateway, decode/prefill -> router).
/// `finished` ends the stream; a non-empty `error` ends it with a failure.
struct token_event {
  uint64_t rid = 0;
  std::vector<int32_t> ids;
  bool finished = false;
  std::string error;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, token_event& x) {
  return f(caf::meta::type_name("petrel.token_event"), x.rid, x.ids, x.finished, x.error);
}

/// Where a request's KV goes: pages pre-allocated on one decode rank's pool.
struct kv_destination {
  uint64_t rid = 0;
  std::string decode_group;
  std::string node;                // the decode rank's node (fault injection targets links by node)
  uint32_t rank = 0;               // index of the rank within its decode group
  uint64_t rank_epoch = 0;         // the incarnation that owns the pool
  std::vector<int32_t> pages;      // destination pages, in token order
  std::vector<uint8_t> pool;       // kv_pool_descriptor::to_bytes() of the destination pool
  uint64_t page_bytes = 0;
  caf::actor decode_scheduler;     // tell it kv_ready once the pages are there
  bool checksum = false;           // the sender sends a kv_digest; the decode side checks it (transport.kv_checksum)
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, kv_destination& x) {
  return f(caf::meta::type_name("petrel.kv_destination"), x.rid, x.decode_group, x.node, x.rank, x.rank_epoch, x.pages,
           x.pool, x.page_bytes, x.decode_scheduler, x.checksum);
}

/// router -> decode_scheduler: reserve KV for a request of `tokens` (prompt + tokens already emitted)
/// that may still generate `max_new_tokens`.
struct decode_admission {
  uint64_t rid = 0;
  std::vector<int32_t> tokens;
  int32_t max_new_tokens = 0;
  int32_t generated = 0; // tokens emitted before (after a migration)
  sampling_spec sampling;
  std::vector<int32_t> stop_ids;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, decode_admission& x) {
  return f(caf::meta::type_name("petrel.decode_admission"), x.rid, x.tokens, x.max_new_tokens, x.generated,
           x.sampling, x.stop_ids);
}

/// router -> prefill_scheduler: compute the KV of `tokens`, sample the next token, ship the KV.
struct prefill_job {
  uint64_t rid = 0;
  std::vector<int32_t> tokens;
  int32_t generated = 0; // output position of the token this prefill samples
  sampling_spec sampling;
  kv_destination destination;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, prefill_job& x) {
  return f(caf::meta::type_name("petrel.prefill_job"), x.rid, x.tokens, x.generated, x.sampling, x.destination);
}

/// One sequence's part of a forward step on a rank.
struct step_item {
  uint64_t rid = 0;
  std::vector<int32_t> tokens;  // new tokens (a prefill chunk, or the one decode token)
  int64_t start_pos = 0;        // tokens already in the cache
  std::vector<int32_t> pages;   // page table covering start_pos + tokens.size()
  bool sample = true;           // sample a token after the last new token
  int32_t position = 0;         // output position of that token (seeds the sampler)
  sampling_spec sampling;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, step_item& x) {
  return f(caf::meta::type_name("petrel.step_item"), x.rid, x.tokens, x.start_pos, x.pages, x.sample, x.position,
           x.sampling);
}

/// scheduler -> rank: one forward step (a prefill batch or a decode batch), fenced by epoch.
struct forward_step {
  uint64_t epoch = 0;
  std::vector<step_item> items;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, forward_step& x) {
  return f(caf::meta::type_name("petrel.forward_step"), x.epoch, x.items);
}

/// rank -> scheduler: the sampled token of each item (-1 where sample was false).
struct step_output {
  std::vector<int32_t> tokens;
  double seconds = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, step_output& x) {
  return f(caf::meta::type_name("petrel.step_output"), x.tokens, x.seconds);
}

/// What a rank tells its scheduler about itself once it runs.
struct rank_info {
  uint64_t epoch = 0;
  std::string node;
  int32_t index = 0;
  int32_t num_pages = 0;
  int32_t page_size = 0;
  uint64_t page_bytes = 0;
  uint64_t pool_id = 0;        // the pool's id within its node's KV engine
  std::vector<uint8_t> pool;   // kv_pool_descriptor bytes: where peers may write
  int32_t vocab = 0;
  int32_t max_context = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, rank_info& x) {
  return f(caf::meta::type_name("petrel.rank_info"), x.epoch, x.node, x.index, x.num_pages, x.page_size,
           x.page_bytes, x.pool_id, x.pool, x.vocab, x.max_context);
}

/// prefill_scheduler -> kv_agent: push pages of a local pool to a destination, then notify.
struct kv_shipment {
  uint64_t transfer_id = 0;
  uint64_t epoch = 0;              // the destination rank's epoch (fencing)
  uint64_t src_pool_id = 0;
  std::vector<int32_t> src_pages;
  uint64_t page_bytes = 0;
  kv_destination destination;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, kv_shipment& x) {
  return f(caf::meta::type_name("petrel.kv_shipment"), x.transfer_id, x.epoch, x.src_pool_id, x.src_pages,
           x.page_bytes, x.destination);
}

/// kv_agent -> prefill_scheduler: how a shipment went (times in seconds).
struct kv_receipt {
  uint64_t transfer_id = 0;
  uint64_t bytes = 0;
  double bootstrap = 0;  // connecting to the destination engine (0 when already connected)
  double transfer = 0;   // puts + flush + notify
  bool local_copy = false;
  std::string path; // ucx | local | cuda_ipc | staged (see petrel_kv_transfers_total)
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, kv_receipt& x) {
  return f(caf::meta::type_name("petrel.kv_receipt"), x.transfer_id, x.bytes, x.bootstrap, x.transfer,
           x.local_copy, x.path);
}

/// prefill_scheduler -> decode_scheduler: the KV of `rid` is in place; `first_token` was sampled.
struct kv_ready {
  uint64_t rid = 0;
  int32_t first_token = 0;
  uint64_t rank_epoch = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, kv_ready& x) {
  return f(caf::meta::type_name("petrel.kv_ready"), x.rid, x.first_token, x.rank_epoch);
}

/// kv_agent (sender) -> decode_scheduler: the CRC32C of every page of a shipment, computed from the
/// source pages before the put. Sent before the transfer starts, on the same link as the receipt
/// that leads to kv_ready, so it reaches the decode scheduler first.
struct kv_digest {
  uint64_t rid = 0;
  uint64_t rank_epoch = 0;         // the destination incarnation
  std::vector<int32_t> pages;      // destination pages, in the order of `crc`
  uint64_t page_bytes = 0;
  std::vector<uint32_t> crc;       // CRC32C (Castagnoli) of each page's bytes
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, kv_digest& x) {
  return f(caf::meta::type_name("petrel.kv_digest"), x.rid, x.rank_epoch, x.pages, x.page_bytes, x.crc);
}

/// decode_scheduler -> the kv_agent of the destination node: recompute the CRC32C of pages that
/// landed in a pool of this node and compare them with the sender's.
struct kv_check {
  std::vector<uint8_t> pool;       // kv_pool_descriptor bytes of the destination pool
  uint64_t page_bytes = 0;
  std::vector<int32_t> pages;
  std::vector<uint32_t> crc;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, kv_check& x) {
  return f(caf::meta::type_name("petrel.kv_check"), x.pool, x.page_bytes, x.pages, x.crc);
}

/// rank -> scheduler, phase 1 of forming an EP group: the rank's expert-exchange address for `generation`
/// (its UCX worker address; empty for the in-process exchange, which needs none), and from rank 0 of a group on the
/// NCCL exchange the NCCL unique id its communicator will be created from (empty otherwise).
struct ep_endpoint {
  uint64_t generation = 0;
  std::vector<uint8_t> address;
  std::vector<uint8_t> bootstrap;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, ep_endpoint& x) {
  return f(caf::meta::type_name("petrel.ep_endpoint"), x.generation, x.address, x.bootstrap);
}

/// scheduler -> every rank, phase 2: all ranks' addresses, indexed by rank within the group, and rank 0's bootstrap
/// (the NCCL unique id; empty unless the group uses the NCCL exchange).
struct ep_peers {
  uint64_t generation = 0;
  std::vector<std::vector<uint8_t>> addresses;
  std::vector<uint8_t> bootstrap;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, ep_peers& x) {
  return f(caf::meta::type_name("petrel.ep_peers"), x.generation, x.addresses, x.bootstrap);
}

/// A request failed somewhere on its path; the router decides (migrate, or fail the client).
struct request_failure {
  uint64_t rid = 0;
  std::string where;  // e.g. "prefill0/rank0"
  std::string reason;
  bool retryable = true;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, request_failure& x) {
  return f(caf::meta::type_name("petrel.request_failure"), x.rid, x.where, x.reason, x.retryable);
}

/// A fault to inject (petrel chaos). kinds: "slow" (a rank's steps take `factor` times as long),
/// "delay" (KV shipments to `peer` node wait `delay_ms` first), "drop" (KV shipments to `peer` fail
/// with probability `prob`), "partition" (every KV shipment to `peer` fails). Each lasts `duration_ms`.
struct fault_spec {
  std::string kind;
  std::string peer;
  double factor = 1.0;
  double prob = 1.0;
  int64_t delay_ms = 0;
  int64_t duration_ms = 0;
  uint64_t seed = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, fault_spec& x) {
  return f(caf::meta::type_name("petrel.fault_spec"), x.kind, x.peer, x.factor, x.prob, x.delay_ms, x.duration_ms,
           x.seed);
}

/// A scheduler's load, for the router's least-loaded choice and for metrics.
struct group_load {
  std::string group;
  int32_t queued = 0;
  int32_t running = 0;
  int32_t free_pages = 0;
  int32_t total_pages = 0;
  int32_t ranks_up = 0;
  int32_t ranks = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, group_load& x) {
  return f(caf::meta::type_name("petrel.group_load"), x.group, x.queued, x.running, x.free_pages, x.total_pages,
           x.ranks_up, x.ranks);
}

} // namespace petrel

// -- local-only messages ------------------------------------------------------------------------
// These carry pointers into one process and must never cross a process boundary: CAF is told they
// are unsafe, so serialising one fails loudly instead of sending garbage.

namespace petrel {
namespace transport {
class response_stream;
}

/// An HTTP request handed from a server thread to the gateway actor, with the stream to answer on.
struct http_call {
  std::string method;
  std::string path;
  std::string body;
  std::string authorization; // the Authorization header, for the optional API key
  std::shared_ptr<transport::response_stream> out;
};

} // namespace petrel

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(petrel::http_call)

// -- type IDs and atoms ------------------------------------------------------------------------

CAF_BEGIN_TYPE_ID_BLOCK(petrel, caf::first_custom_type_id)

CAF_ADD_TYPE_ID(petrel, (petrel::child_status))
CAF_ADD_TYPE_ID(petrel, (petrel::node_status))
CAF_ADD_TYPE_ID(petrel, (petrel::cluster_status))
CAF_ADD_TYPE_ID(petrel, (petrel::node_hello))
CAF_ADD_TYPE_ID(petrel, (petrel::sampling_spec))
CAF_ADD_TYPE_ID(petrel, (petrel::serve_request))
CAF_ADD_TYPE_ID(petrel, (petrel::token_event))
CAF_ADD_TYPE_ID(petrel, (petrel::kv_destination))
CAF_ADD_TYPE_ID(petrel, (petrel::decode_admission))
CAF_ADD_TYPE_ID(petrel, (petrel::prefill_job))
CAF_ADD_TYPE_ID(petrel, (petrel::step_item))
CAF_ADD_TYPE_ID(petrel, (petrel::forward_step))
CAF_ADD_TYPE_ID(petrel, (petrel::step_output))
CAF_ADD_TYPE_ID(petrel, (petrel::rank_info))
CAF_ADD_TYPE_ID(petrel, (petrel::kv_shipment))
CAF_ADD_TYPE_ID(petrel, (petrel::kv_receipt))
CAF_ADD_TYPE_ID(petrel, (petrel::kv_ready))
CAF_ADD_TYPE_ID(petrel, (petrel::request_failure))
CAF_ADD_TYPE_ID(petrel, (petrel::group_load))
CAF_ADD_TYPE_ID(petrel, (petrel::fault_spec))
CAF_ADD_TYPE_ID(petrel, (petrel::kv_digest))
CAF_ADD_TYPE_ID(petrel, (petrel::kv_check))
CAF_ADD_TYPE_ID(petrel, (petrel::ep_endpoint))
CAF_ADD_TYPE_ID(petrel, (petrel::ep_peers))

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
using submit_atom = caf::atom_constant<caf::atom("submit")>;
using admit_atom = caf::atom_constant<caf::atom("admit")>;
using prefill_atom = caf::atom_constant<caf::atom("prefill")>;
using forward_atom = caf::atom_constant<caf::atom("forward")>;
using info_atom = caf::atom_constant<caf::atom("info")>;
using ship_atom = caf::atom_constant<caf::atom("ship")>;
using ready_atom = caf::atom_constant<caf::atom("ready")>;
using tokens_atom = caf::atom_constant<caf::atom("tokens")>;
using failed_atom = caf::atom_constant<caf::atom("failed")>;
using abort_atom = caf::atom_constant<caf::atom("abort")>;
using load_atom = caf::atom_constant<caf::atom("load")>;
using release_atom = caf::atom_constant<caf::atom("release")>;
using fault_atom = caf::atom_constant<caf::atom("fault")>;
using beat_atom = caf::atom_constant<caf::atom("beat")>;
using digest_atom = caf::atom_constant<caf::atom("digest")>;
using verify_atom = caf::atom_constant<caf::atom("verify")>;
using rebuild_atom = caf::atom_constant<caf::atom("rebuild")>;
using rebalance_atom = caf::atom_constant<caf::atom("rebalance")>;

} // namespace petrel
