// Entry points of the processes of a Petrel cluster. The CLI (tools/) calls these; they hide CAF.
//
// - The head (`petrel launch`) runs the cluster_supervisor, which supervises one node_proxy per
//   node; each proxy starts and watches one node process. The head is published on a CAF port and
//   writes a run file (RUN_DIR/CLUSTER/head.json) so that `petrel status` and `petrel stop` find it.
// - A node process (`petrel node`) runs a node_supervisor over that node's actors and registers it
//   with the head.
#pragma once

#include <functional>
#include <optional>
#include <string>

#include "runtime/cluster_config.hpp"

namespace petrel {

/// Where a running cluster can be reached; the content of its run file.
struct run_file {
  std::string cluster;
  int head_pid = 0;
  std::string head_host = "127.0.0.1";
  int head_port = 0;
  std::string gateway_host = "127.0.0.1";
  int gateway_port = 0;
  std::string config; // absolute path of the cluster.yaml it runs
  bool tls = false;             // the head's port speaks TLS (security.tls)
  std::string secret_file;      // where the cluster secret is, for clients of a TLS head
};

std::string run_file_path(const cluster_config& cfg);
std::optional<run_file> read_run_file(const std::string& path);

/// True while the head that wrote `run` still runs (an exited, unreaped head counts as gone).
bool cluster_running(const run_file& run);

struct head_options {
  std::string config_path;
  /// Called once the head is up (run file written); for tests and for the CLI's banner.
  std::function<void(const run_file&)> on_ready;
};

/// Runs the head in the calling thread until the cluster stops (petrel stop, SIGINT/SIGTERM) or its
/// supervisor escalates. Returns the process exit code: 0 after a clean stop, 1 after escalation.
int run_head(const cluster_config& cfg, const head_options& opts);

struct node_options {
  std::string config_path;
  std::string node;
  std::string head_host;
  int head_port = 0;
  uint64_t epoch = 0;
};

/// Runs one node process until it is told to stop, its head goes away or its supervisor
/// escalates. Returns 0, or 3 after escalation.
int run_node(const cluster_config& cfg, const node_options& opts);

/// Renders the live actor tree of the cluster that `run` describes: as a table, or JSON.
/// Returns the exit code (1 when the cluster does not answer).
int print_cluster_status(const run_file& run, bool json, std::string& out);

/// A fault for `petrel chaos` (or an operator) to inject into a running cluster.
struct fault_request {
  std::string kind;   // kill (node+child) | kill_node | slow (node+child rank) | delay | drop | partition | corrupt
  std::string node;   // target node; for link faults the sending node
  std::string child;  // kill, slow: "rank0", "kv_agent", ...
  std::string peer;   // link faults: the receiving node
  double factor = 1.0;
  double prob = 1.0;
  int64_t delay_ms = 0;
  int64_t duration_ms = 0;
  uint64_t seed = 0;
};

/// Injects `f` through the head. Returns 0 once the target accepted it, else 1 with the reason in `out`.
/// kill answers the killed epoch, kill_node the killed pid (in `out`).
int inject_fault(const run_file& run, const fault_request& f, std::string& out);

/// Asks expert-parallel group `group` for a live EPLB rebalance at its next step. Returns 0 with the ranks'
/// EP statistics (a JSON array) in `out`, else 1 (2 for a group that is not expert-parallel) with the reason.
int request_rebalance(const run_file& run, const std::string& group, std::string& out);

/// Asks the cluster to stop and waits until its head process is gone. Returns the exit code.
int stop_cluster(const run_file& run, std::chrono::milliseconds timeout, std::string& out);

} // namespace petrel
