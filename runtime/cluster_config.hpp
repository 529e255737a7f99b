// cluster.yaml: the topology of a Petrel cluster, loaded once and validated into one struct per
// section. Nothing reads YAML after load_cluster_config() returns. docs/cluster-yaml.md is the
// reference for every key.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace petrel {

/// A cluster.yaml problem. what() reads "FILE:LINE: what is wrong (and the fix)".
struct config_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

using duration_ms = std::chrono::milliseconds;

/// Parses "10s", "1500ms", "2m", "0.5s" (a bare number means seconds). Throws std::invalid_argument.
duration_ms parse_duration(const std::string& text);

// -- sections -------------------------------------------------------------------

struct cluster_section {
  std::string name = "petrel";
  std::string run_dir = "/tmp/petrel"; // pid files, logs and the status socket of a running cluster
};

struct model_section {
  std::string path;              // checkpoint directory (config.json + safetensors), or "dummy"
  std::string dummy_config;      // with path == "dummy": a config.json to build random weights from
  std::string served_name;       // the model name clients ask for (defaults to the directory name)
  std::string backend = "cpu";   // cpu | cuda
  int max_context = 0;           // 0: the model's max_position_embeddings
  bool share_gpus = false;       // several ranks may use one GPU (each with its own streams and memory)
  bool is_dummy() const { return path == "dummy"; }
};

struct endpoint {
  std::string host = "127.0.0.1";
  uint16_t port = 0;
};

struct rank_spec {
  std::string device = "cpu"; // cpu | cuda:N
  bool is_cuda() const { return device.rfind("cuda:", 0) == 0; }
  int cuda_index() const; // -1 for cpu
};

struct node_section {
  std::string name;
  endpoint address;            // where this node's process publishes its actors (CAF middleman)
  std::vector<rank_spec> ranks;
  int line = 0;                // for error messages that point back into the file
};

enum class group_role { prefill, decode };

struct group_section {
  std::string name;
  group_role role = group_role::prefill;
  std::vector<std::string> nodes; // node names; the group's ranks are those nodes' ranks, in order
  int ep_size = 1;                // expert-parallel width; must equal the group's rank count
  int redundant_experts = 0;      // extra physical expert slots placed by EPLB
  std::string init_expert_location; // optional placement file (phy2log JSON)
  std::string ep_mode = "normal";   // expert dispatch: normal (contiguous layout) | low_latency (masked layout)
  bool two_batch_overlap = false;   // split each rank's batch in two micro-batches around the all-to-all
  bool fp8_experts = false;         // the GPU plane runs the experts as fp8 grouped GEMMs (cuda_ipc exchange)
  int rebalance_every = 0;          // live EPLB rebalance every this many steps (0: only `petrel rebalance`)
  double rebalance_below = 0;       // the eplb_rebalancer starts one when balancedness falls below this (0: off)
  int rebalance_min_steps = 100;    // ... at most once per this many steps of the group
  // prefill
  int chunk_tokens = 256;         // chunked prefill: tokens of one prompt per step
  int max_batch_tokens = 1024;    // token budget of one prefill step across requests
  // decode
  int max_running = 32;           // running-batch slots per group
  int kv_pages = 256;             // KV pool pages per rank
  int page_size = 16;             // tokens per KV page
  int line = 0;
};

enum class restart_strategy { one_for_one, one_for_all, rest_for_one };

struct supervision_section {
  restart_strategy strategy = restart_strategy::one_for_one; // inside each node process
  int intensity = 5;                                          // at most this many restarts ...
  duration_ms period{10'000};                                 // ... within this window, else escalate
  int node_intensity = 3;                                     // node-process restarts by the head
  duration_ms node_period{30'000};
  duration_ms heartbeat{1000}; // head <-> node liveness probe; two probes unanswered for 3 periods each = dead
};

struct gateway_section {
  endpoint address{"127.0.0.1", 8080};
  int threads = 2;
  int max_queued = 256;       // requests waiting for admission before 503 + Retry-After
  int max_body_bytes = 8 << 20;
  /// When set, every request except GET /health must carry `Authorization: Bearer <key>` (401
  /// otherwise). api_key_env names an environment variable to read it from, so it stays out of files.
  std::string api_key;
  std::string api_key_env;
};

struct transport_section {
  std::string kv_tls = "tcp";        // UCX transports for KV pages: tcp detects dead peers; shm does not
  duration_ms kv_timeout{10'000};    // a KV transfer that takes longer fails (never hangs)
  std::string expert_exchange = "auto"; // auto | inproc | ucx | cuda_ipc | nccl (per group: expert_exchange_for)
  endpoint head{"127.0.0.1", 0};     // the head process's CAF port (0: pick a free one)
  /// Every KV page carries a CRC32C from the sender, checked on the decode node before the request
  /// runs; a mismatch is a retry. "auto" and "on" are on (GPU pools are checksummed on their GPU), "off" is off.
  bool kv_checksum = true;
  /// UCX_NET_DEVICES for the KV engines: which interfaces the UCX tcp transport listens and connects on.
  /// Resolved at load: "auto" is "lo" when every node runs on a loopback address and kv_tls uses tcp
  /// (so the unauthenticated UCX listener is not reachable from the network), else UCX's default (empty: all).
  std::string kv_net_devices;
  /// How KV pages move between GPU pools: "auto" copies GPU to GPU through CUDA IPC when both nodes are on one
  /// host (NVLink between GPUs) and stages through pinned host memory and UCX otherwise; "staged" always stages;
  /// "ipc" only copies through CUDA IPC (no host mirrors).
  std::string kv_gpu_path = "auto";
  /// Resolved at load: whether GPU pools get a pinned host mirror for the staged path. "staged": yes; "ipc": no
  /// (a transfer CUDA IPC cannot make fails with a clear error); "auto": only when the nodes are not all on one host.
  bool kv_gpu_mirror = false;
};

/// Who may join the cluster (docs/reliability.md, "Who may join").
struct security_section {
  /// The CAF links (head <-> nodes <-> CLI clients) use TLS, and every peer needs a certificate of the
  /// CA derived from the cluster secret. false: plain TCP, any local process may connect (debugging only).
  bool tls = true;
  /// The cluster secret (>= 16 bytes, mode 0600, owned by the user). Empty: the head makes a fresh one
  /// at every launch in RUN_DIR/CLUSTER/secret. Set it when nodes run on other hosts (distribute the file).
  std::string secret_file;
};

/// The whole validated cluster.yaml.
struct cluster_config {
  std::string source;          // the file it was loaded from
  cluster_section cluster;
  model_section model;
  gateway_section gateway;
  supervision_section supervision;
  transport_section transport;
  security_section security;
  std::vector<node_section> nodes;
  std::vector<group_section> groups;

  const node_section* find_node(const std::string& name) const;
  const group_section* find_group(const std::string& name) const;
  /// The groups a node serves (a node belongs to exactly one group).
  const group_section* group_of(const std::string& node) const;
  std::vector<const group_section*> groups_with(group_role role) const;
  /// How group `g`'s ranks exchange tokens: transport.expert_exchange, with "auto" resolved for this group:
  /// cuda_ipc for cuda ranks all on one host, none two on one GPU in one process (gpu_shared_in_process), else ucx
  /// when the group spans node processes, else inproc.
  std::string expert_exchange_for(const group_section& g) const;
  /// "" or which node runs two of group `g`'s ranks on one GPU (one process, so one CUDA context).
  std::string gpu_shared_in_process(const group_section& g) const;
};

/// Loads and validates FILE. Relative model paths resolve against the file's directory.
/// Throws config_error with "FILE:LINE: ..." on any problem.
cluster_config load_cluster_config(const std::string& file);

/// Same, from text (for tests); `name` is used in error messages.
cluster_config parse_cluster_config(const std::string& yaml_text, const std::string& name,
                                    const std::string& base_dir = ".");

const char* to_string(restart_strategy s);
const char* to_string(group_role r);

} // namespace petrel
