// cluster.yaml loader: the default file, every validation rule (file, line, fix), durations, and the
// examples of docs/cluster-yaml.md.
#include <doctest/doctest.h>

#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>

#include "runtime/cluster_config.hpp"

using namespace petrel;
namespace fs = std::filesystem;

namespace {

/// A real model config (the embedded model's): the loader checks that model configs load.
std::string model_config_json() {
  std::ifstream in(std::string(PETREL_SOURCE_DIR) + "/tests/data/fortune-moe/config.json");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

/// A temporary directory holding `model/config.json`, the checkpoint that model.path must name.
struct config_dir {
  fs::path path;
  config_dir() {
    char tmpl[] = "/tmp/petrel-cfg-XXXXXX";
    path = ::mkdtemp(tmpl);
    file("model/config.json", model_config_json());
  }
  ~config_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  config_dir(const config_dir&) = delete;
  config_dir& operator=(const config_dir&) = delete;
  std::string file(const std::string& name, const std::string& content) const {
    auto p = path / name;
    fs::create_directories(p.parent_path());
    std::ofstream(p) << content;
    return p.string();
  }

  cluster_config parse(const std::string& yaml) const { return parse_cluster_config(yaml, "c.yaml", path.string()); }

  /// The config_error message for `yaml`, or "" when it loads.
  std::string error_of(const std::string& yaml) const {
    try {
      parse(yaml);
    } catch (const config_error& e) {
      return e.what();
    }
    return "";
  }
};

// Asserts that YAML fails at LINE of c.yaml with a message containing PHRASE.
#define CHECK_CONFIG_ERROR(dir, yaml, line, phrase)                                                            \
  do {                                                                                                         \
    auto msg_ = (dir).error_of(yaml);                                                                          \
    INFO("message: " << msg_);                                                                                 \
    CHECK(msg_.rfind("c.yaml:" + std::to_string(line) + ": ", 0) == 0);                                       \
    CHECK(msg_.find(phrase) != std::string::npos);                                                             \
  } while (0)

// A valid cluster on which the error cases below make one change each (lines 1-7).
const std::string base = R"(model: {path: model}
nodes:
  - {name: p0, ranks: [cpu]}
  - {name: d0, ranks: [cpu]}
groups:
  prefill: [{name: prefill0, nodes: [p0]}]
  decode: [{name: decode0, nodes: [d0]}]
)";

} // namespace

// -- durations -------------------------------------------------------------------------------------------

TEST_CASE("parse_duration reads ms, s, m, h and bare seconds") {
  CHECK(parse_duration("10s").count() == 10'000);
  CHECK(parse_duration("1500ms").count() == 1500);
  CHECK(parse_duration("2m").count() == 120'000);
  CHECK(parse_duration("2min").count() == 120'000);
  CHECK(parse_duration("1h").count() == 3'600'000);
  CHECK(parse_duration("0.5s").count() == 500);
  CHECK(parse_duration("3").count() == 3000);
  CHECK(parse_duration("10 s").count() == 10'000);
  CHECK(parse_duration("1500us").count() == 2); // rounded to the nearest ms
  CHECK(parse_duration("0").count() == 0);
}

TEST_CASE("parse_duration refuses what is not a duration, with the reason") {
  auto reason = [](const std::string& text) {
    try {
      parse_duration(text);
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("(accepted)");
  };
  CHECK(reason("10 parsecs").find("unknown unit 'parsecs'") != std::string::npos);
  CHECK(reason("5d").find("unknown unit 'd'") != std::string::npos);
  CHECK(reason("soon").find("is not a duration") != std::string::npos);
  CHECK(reason("").find("empty duration") != std::string::npos);
  CHECK(reason("-1s").find("non-negative") != std::string::npos);
  CHECK(reason("nan").find("non-negative") != std::string::npos);
  CHECK(reason("inf").find("non-negative") != std::string::npos);
  CHECK(reason("10000h").find("longer than a year") != std::string::npos);
}

// -- the default cluster.yaml ----------------------------------------------------------------------------

TEST_CASE("the default cluster.yaml loads: one prefill and one decode node on the CPU") {
  auto cfg = load_cluster_config(PETREL_SOURCE_DIR "/cluster.yaml");
  CHECK(cfg.source == PETREL_SOURCE_DIR "/cluster.yaml");
  CHECK(cfg.cluster.name == "petrel");
  CHECK(cfg.cluster.run_dir == "/tmp/petrel");
  // Relative model paths resolve against the file's directory.
  CHECK(cfg.model.path == (fs::path(PETREL_SOURCE_DIR) / "tests/data/fortune-moe").lexically_normal().string());
  CHECK(fs::exists(fs::path(cfg.model.path) / "config.json"));
  CHECK(cfg.model.served_name == "fortune-moe");
  CHECK(cfg.model.backend == "cpu");
  CHECK_FALSE(cfg.model.is_dummy());
  CHECK(cfg.model.max_context == 0);
  CHECK(cfg.gateway.address.host == "127.0.0.1");
  CHECK(cfg.gateway.address.port == 8080);
  CHECK(cfg.gateway.threads == 2);

  REQUIRE(cfg.nodes.size() == 2);
  CHECK(cfg.nodes[0].name == "p0");
  CHECK(cfg.nodes[1].name == "d0");
  for (auto& n : cfg.nodes) {
    CHECK(n.address.port == 0);
    REQUIRE(n.ranks.size() == 1);
    CHECK(n.ranks[0].device == "cpu");
    CHECK(n.ranks[0].cuda_index() == -1);
  }

  REQUIRE(cfg.groups.size() == 2);
  auto* prefill = cfg.find_group("prefill0");
  auto* decode = cfg.find_group("decode0");
  REQUIRE(prefill);
  REQUIRE(decode);
  CHECK(prefill->role == group_role::prefill);
  CHECK(prefill->nodes == std::vector<std::string>{"p0"});
  CHECK(prefill->ep_size == 1);
  CHECK(prefill->chunk_tokens == 256);
  CHECK(prefill->max_batch_tokens == 1024);
  CHECK(decode->role == group_role::decode);
  CHECK(decode->nodes == std::vector<std::string>{"d0"});
  CHECK(decode->max_running == 32);
  CHECK(decode->kv_pages == 512);
  CHECK(decode->page_size == 16);
  CHECK(cfg.group_of("p0") == prefill);
  CHECK(cfg.group_of("d0") == decode);
  CHECK(cfg.group_of("x") == nullptr);
  CHECK(cfg.groups_with(group_role::decode) == std::vector<const group_section*>{decode});

  CHECK(cfg.supervision.strategy == restart_strategy::one_for_one);
  CHECK(cfg.supervision.intensity == 5);
  CHECK(cfg.supervision.period == duration_ms{10'000});
  CHECK(cfg.supervision.node_intensity == 3);
  CHECK(cfg.supervision.node_period == duration_ms{30'000});
  CHECK(cfg.supervision.heartbeat == duration_ms{1000});
  CHECK(cfg.transport.kv_tls == "tcp");
  CHECK(cfg.transport.kv_timeout == duration_ms{10'000});
  CHECK(cfg.transport.expert_exchange == "auto");
  CHECK(cfg.transport.head.port == 0);
}

TEST_CASE("defaults fill every optional key; relative paths resolve against the file's directory") {
  config_dir dir;
  auto cfg = dir.parse(base);
  CHECK(cfg.source == "c.yaml");
  CHECK(cfg.cluster.name == "petrel");
  CHECK(cfg.model.path == (dir.path / "model").string());
  CHECK(cfg.model.served_name == "model");
  CHECK(cfg.gateway.address.port == 8080);
  CHECK(cfg.groups[0].chunk_tokens == 256);
  CHECK(cfg.groups[1].kv_pages == 256);
  CHECK(cfg.nodes[1].line == 4);
  CHECK(cfg.groups[1].line == 7);

  auto cfg2 = dir.parse("cluster: {name: c2, run_dir: run}\n" + base);
  CHECK(cfg2.cluster.run_dir == (dir.path / "run").string());
}

TEST_CASE("load_cluster_config names the file it cannot read") {
  config_dir dir;
  auto load_error = [](const std::string& file) {
    try {
      load_cluster_config(file);
    } catch (const config_error& e) {
      return std::string(e.what());
    }
    return std::string("(loaded)");
  };
  auto missing = (dir.path / "nope.yaml").string();
  CHECK(load_error(missing) == missing + ": cannot open the file (does it exist?)");
  CHECK(load_error(dir.path.string()).find("is a directory") != std::string::npos);
  auto file = dir.file("sub/cluster.yaml", "model: {path: ../model}\n" + base.substr(base.find('\n') + 1));
  CHECK(load_cluster_config(file).model.path == (dir.path / "model").string());
  auto bad = dir.file("bad.yaml", base + "nodez: []\n");
  CHECK(load_error(bad).rfind(bad + ":8: unknown key 'nodez'", 0) == 0);
}

// -- YAML itself -----------------------------------------------------------------------------------------

TEST_CASE("malformed YAML reports the line of the parse error") {
  config_dir dir;
  CHECK_CONFIG_ERROR(dir, "model: {path: model}\nnodes:\n  - name: p0\n     ranks: [cpu]\n", 4,
                     "not valid YAML");
  CHECK_CONFIG_ERROR(dir, "model: {path: model}\nnodes:\n\t- {name: p0}\n", 3, "not valid YAML");
  CHECK_CONFIG_ERROR(dir, "model: {path: model}\nnodes: [{name: p0, ranks: [cpu]}\ngroups:\n  x: 1\n", 3,
                     "not valid YAML");
}

TEST_CASE("the top level must be one mapping") {
  config_dir dir;
  CHECK_CONFIG_ERROR(dir, "", 1, "the top level must be a mapping");
  CHECK_CONFIG_ERROR(dir, "# only a comment\n", 1, "the top level must be a mapping");
  CHECK_CONFIG_ERROR(dir, "- model\n- nodes\n", 1, "the top level must be a mapping");
  CHECK_CONFIG_ERROR(dir, "just text\n", 1, "the top level must be a mapping");
  CHECK_CONFIG_ERROR(dir, base + "---\nnodes: []\n", 8, "a second YAML document starts here");
  CHECK_NOTHROW(dir.parse(base + "---\n")); // an empty trailing document is harmless
}

TEST_CASE("unknown keys are refused with a did-you-mean and the list of known keys") {
  config_dir dir;
  CHECK_CONFIG_ERROR(dir, base + "nodez: []\n", 8, "unknown key 'nodez' in the top level (did you mean 'nodes'?)");
  CHECK_CONFIG_ERROR(dir, base + "colour: blue\n", 8, "; known keys: cluster, model, gateway");
  CHECK(dir.error_of(base + "colour: blue\n").find("did you mean") == std::string::npos);
  CHECK_CONFIG_ERROR(dir, "model:\n  path: model\n  pth: x\n" + base.substr(base.find('\n') + 1), 3,
                     "unknown key 'pth' in model (did you mean 'path'?)");
  CHECK_CONFIG_ERROR(dir, std::regex_replace(base, std::regex("name: p0, ranks"), "name: p0, rank"), 3,
                     "unknown key 'rank' in a node (did you mean 'ranks'?)");
  CHECK_CONFIG_ERROR(dir, std::regex_replace(base, std::regex("nodes: \\[p0\\]"), "nodes: [p0], chunk_token: 8"), 6,
                     "(did you mean 'chunk_tokens'?)");
  CHECK_CONFIG_ERROR(dir, base + "transport: {kv_timout: 5s}\n", 8, "(did you mean 'kv_timeout'?)");
  CHECK_CONFIG_ERROR(dir, base + "gateway: {prot: 80}\n", 8, "(did you mean 'port'?)");
  CHECK_CONFIG_ERROR(dir, base + "supervision: {stratgy: one_for_all}\n", 8, "(did you mean 'strategy'?)");
  // Keys of the other role: a decode group has no chunked prefill, a prefill group no running batch.
  CHECK_CONFIG_ERROR(dir, std::regex_replace(base, std::regex("nodes: \\[d0\\]"), "nodes: [d0], chunk_tokens: 64"),
                     7, "unknown key 'chunk_tokens' in decode group");
  CHECK_CONFIG_ERROR(dir, std::regex_replace(base, std::regex("nodes: \\[p0\\]"), "nodes: [p0], max_running: 8"), 6,
                     "unknown key 'max_running' in prefill group");
  CHECK_CONFIG_ERROR(dir, base + "? [a, b]\n: 1\n", 8, "must be a plain word");
}

TEST_CASE("a key written twice is refused (YAML would silently keep the first)") {
  config_dir dir;
  CHECK_CONFIG_ERROR(dir, "model:\n  path: model\n  path: other\n" + base.substr(base.find('\n') + 1), 3,
                     "key 'path' appears twice in model (first on line 2)");
  CHECK_CONFIG_ERROR(dir, base + "nodes: []\n", 8, "key 'nodes' appears twice in the top level (first on line 2)");
  CHECK_CONFIG_ERROR(dir, base + "gateway: {port: 1, port: 2}\n", 8, "key 'port' appears twice in gateway");
}

TEST_CASE("an optional section with no value takes its defaults") {
  config_dir dir;
  auto cfg = dir.parse(base + "cluster:\ngateway:\nsupervision:\ntransport:\n");
  CHECK(cfg.cluster.name == "petrel");
  CHECK(cfg.gateway.address.port == 8080);
  CHECK(cfg.supervision.intensity == 5);
  CHECK(cfg.transport.kv_tls == "tcp");
  auto keys = dir.parse(base + "gateway:\n  port:\n  threads:\n");
  CHECK(keys.gateway.address.port == 8080);
  CHECK(keys.gateway.threads == 2);
}

TEST_CASE("missing sections and empty lists") {
  config_dir dir;
  auto without = [&](const std::string& prefix) {
    std::istringstream in(base);
    std::string out, line;
    bool skipping = false;
    while (std::getline(in, line)) {
      bool top = !line.empty() && line[0] != ' ';
      if (top)
        skipping = line.rfind(prefix, 0) == 0;
      if (!skipping)
        out += line + "\n";
    }
    return out;
  };
  CHECK_CONFIG_ERROR(dir, without("model:"), 1, "missing section 'model'");
  CHECK_CONFIG_ERROR(dir, without("nodes:"), 1, "missing section 'nodes'");
  CHECK_CONFIG_ERROR(dir, without("groups:"), 1, "missing section 'groups'");
  CHECK_CONFIG_ERROR(dir, std::regex_replace(base, std::regex("  decode: .*\n"), ""), 5, "groups.decode is missing");
  CHECK_CONFIG_ERROR(dir, std::regex_replace(base, std::regex("  prefill: .*\n"), ""), 5,
                     "groups.prefill is missing");
  CHECK_CONFIG_ERROR(dir, base.substr(0, base.find("groups:")) + "groups: []\n", 5,
                     "groups must be a mapping");

  CHECK_CONFIG_ERROR(dir, "model: {path: model}\nnodes: []\n", 2, "'nodes' must be a non-empty list");
  // A key with nothing after it: the error points at the key, not at the line below.
  CHECK_CONFIG_ERROR(dir, "model: {path: model}\nnodes:\ngroups: {}\n", 2, "'nodes' must be a non-empty list");
  CHECK_CONFIG_ERROR(dir, "model:\n" + base.substr(base.find('\n') + 1), 1, "model must be a mapping");
  CHECK_CONFIG_ERROR(dir, "model: {name: x}\n" + base.substr(base.find('\n') + 1), 1, "model.path is required");
  CHECK_CONFIG_ERROR(dir, std::regex_replace(base, std::regex("ranks: \\[cpu\\]\\}\n  - \\{name: d0"),
                                             "ranks: []}\n  - {name: d0"),
                     3, "node 'p0'.ranks is empty");
  CHECK_CONFIG_ERROR(dir, std::regex_replace(base, std::regex(", ranks: \\[cpu\\]\\}\n  - \\{name: d0"),
                                             "}\n  - {name: d0"),
                     3, "node 'p0' has no ranks");
  CHECK_CONFIG_ERROR(dir, std::regex_replace(base, std::regex("prefill: .*\n"), "prefill: []\n"), 6,
                     "groups.prefill must be a list of at least one group");
  CHECK_CONFIG_ERROR(dir, std::regex_replace(base, std::regex("nodes: \\[d0\\]"), "nodes: []"), 7,
                     "decode group 'decode0' needs `nodes: [...]`");
  CHECK_CONFIG_ERROR(dir, std::regex_replace(base, std::regex("name: p0, "), ""), 3, "every node needs a name");
  CHECK_CONFIG_ERROR(dir, std::regex_replace(base, std::regex("name: prefill0, "), ""), 6,
                     "every prefill group needs a name");
}

// -- values ----------------------------------------------------------------------------------------------

TEST_CASE("wrong types name the key and the offending value") {
  config_dir dir;
  CHECK_CONFIG_ERROR(dir, base + "gateway:\n  host: 127.0.0.1\n  port: http\n", 10,
                     "gateway.port has the wrong type ('http' is not a whole number)");
  CHECK_CONFIG_ERROR(dir, base + "gateway: {threads: [1, 2]}\n", 8, "gateway.threads must be a single value");
  CHECK_CONFIG_ERROR(dir, base + "supervision:\n  intensity: 1.5\n", 9, "supervision.intensity has the wrong type");
  CHECK_CONFIG_ERROR(dir, base + "supervision: {intensity: true}\n", 8, "('true' is not a whole number)");
  CHECK_CONFIG_ERROR(dir, "model: tests/data/fortune-moe\n" + base.substr(base.find('\n') + 1), 1,
                     "model must be a mapping");
  CHECK_CONFIG_ERROR(dir, std::regex_replace(base, std::regex("ranks: \\[cpu\\]\\}\n  - \\{name: d0"),
                                             "ranks: {cpu: 1}}\n  - {name: d0"),
                     3, "node 'p0'.ranks must be a count or a list of devices");
  CHECK_CONFIG_ERROR(dir, base + "cluster: [petrel]\n", 8, "cluster must be a mapping");
  CHECK_CONFIG_ERROR(dir, base + "gateway: {host: ''}\n", 8, "gateway.host must not be empty");
}

TEST_CASE("integers out of range") {
  config_dir dir;
  CHECK_CONFIG_ERROR(dir, base + "gateway: {port: 70000}\n", 8, "gateway.port = 70000 is out of range [0, 65535]");
  CHECK_CONFIG_ERROR(dir, base + "gateway: {threads: 0}\n", 8, "gateway.threads = 0 is out of range [1, 64]");
  CHECK_CONFIG_ERROR(dir, base + "gateway: {max_body_bytes: 100}\n", 8, "out of range [1024,");
  CHECK_CONFIG_ERROR(dir, base + "transport: {head_port: -1}\n", 8, "transport.head_port = -1 is out of range");
  CHECK_CONFIG_ERROR(dir, base + "supervision: {intensity: -1}\n", 8, "supervision.intensity = -1 is out of range");
  CHECK_CONFIG_ERROR(dir, "model: {path: model, max_context: -5}\n" + base.substr(base.find('\n') + 1), 1,
                     "model.max_context = -5 is out of range");
  CHECK_CONFIG_ERROR(dir, std::regex_replace(base, std::regex("nodes: \\[d0\\]"), "nodes: [d0], page_size: 0"), 7,
                     "decode group 'decode0'.page_size = 0 is out of range [1, 4096]");
  CHECK_CONFIG_ERROR(dir, std::regex_replace(base, std::regex("nodes: \\[d0\\]"), "nodes: [d0], kv_pages: 0"), 7,
                     "kv_pages = 0 is out of range");
  CHECK_CONFIG_ERROR(dir, std::regex_replace(base, std::regex("nodes: \\[d0\\]"), "nodes: [d0], max_running: 0"), 7,
                     "max_running = 0 is out of range");
  CHECK_CONFIG_ERROR(dir,
                     std::regex_replace(base, std::regex("nodes: \\[p0\\]"), "nodes: [p0], redundant_experts: -1"), 6,
                     "redundant_experts = -1 is out of range");
  CHECK_CONFIG_ERROR(dir, std::regex_replace(base, std::regex("ranks: \\[cpu\\]\\}\n  - \\{name: d0"),
                                             "ranks: 65}\n  - {name: d0"),
                     3, "node 'p0'.ranks = 65 is out of range [1, 64]");
  CHECK_CONFIG_ERROR(dir, base + "gateway: {port: 99999999999999999999999}\n", 8, "gateway.port has the wrong type");
}

TEST_CASE("durations in the file") {
  config_dir dir;
  CHECK_CONFIG_ERROR(dir, base + "supervision:\n  strategy: one_for_one\n  period: 10 parsecs\n", 10,
                     "supervision.period: '10 parsecs' has unknown unit 'parsecs'");
  CHECK_CONFIG_ERROR(dir, base + "transport: {kv_timeout: 0s}\n", 8, "transport.kv_timeout must be longer than 0");
  CHECK_CONFIG_ERROR(dir, base + "supervision: {heartbeat: -5ms}\n", 8, "supervision.heartbeat: '-5ms' must be");
  CHECK_CONFIG_ERROR(dir, base + "supervision:\n  node_period: 0\n", 9, "supervision.node_period must be longer");
  auto cfg = dir.parse(base + "supervision: {period: 1m, node_period: 90s, heartbeat: 250ms}\n");
  CHECK(cfg.supervision.period == duration_ms{60'000});
  CHECK(cfg.supervision.node_period == duration_ms{90'000});
  CHECK(cfg.supervision.heartbeat == duration_ms{250});
}

TEST_CASE("choices: backend, strategy, expert exchange, UCX transports") {
  config_dir dir;
  auto rest = base.substr(base.find('\n') + 1);
  CHECK_CONFIG_ERROR(dir, "model: {path: model, backend: gpu}\n" + rest, 1,
                     "model.backend 'gpu' is unknown (did you mean 'cpu'?); use cpu or cuda");
  CHECK_CONFIG_ERROR(dir, base + "supervision: {strategy: one_for_none}\n", 8,
                     "supervision.strategy 'one_for_none' is unknown (did you mean 'one_for_one'?)");
  CHECK_CONFIG_ERROR(dir, base + "transport: {expert_exchange: nvlink}\n", 8,
                     "transport.expert_exchange 'nvlink' is unknown; use auto, inproc, ucx, cuda_ipc or nccl");
  CHECK_CONFIG_ERROR(dir, base + "transport: {expert_exchange: nccl}\n", 8, "'nccl' needs model.backend: cuda");
  CHECK_CONFIG_ERROR(dir, base + "transport: {expert_exchange: cuda_ipc}\n", 8,
                     "'cuda_ipc' needs model.backend: cuda; with the cpu backend use inproc or ucx");
  CHECK_CONFIG_ERROR(dir, base + "transport: {kv_tls: tpc}\n", 8,
                     "transport.kv_tls names 'tpc', which is not a UCX transport (did you mean 'tcp'?)");
  CHECK_CONFIG_ERROR(dir, base + "transport: {kv_tls: 'tcp,'}\n", 8, "is not a list of UCX transports");
  CHECK(dir.parse(base + "transport: {kv_tls: 'tcp,shm'}\n").transport.kv_tls == "tcp,shm");
  CHECK(dir.parse(base + "transport: {kv_tls: ^shm}\n").transport.kv_tls == "^shm");
  // UCX network devices: a one-host cluster over tcp keeps its KV listeners on loopback.
  CHECK(dir.parse(base).transport.kv_net_devices == "lo");
  CHECK(dir.parse(base + "transport: {kv_tls: shm}\n").transport.kv_net_devices.empty());
  {
    auto two_hosts = base;
    two_hosts.replace(two_hosts.find("{name: d0,"), 10, "{name: d0, host: 10.0.0.2,");
    CHECK(dir.parse(two_hosts).transport.kv_net_devices.empty());
  }
  CHECK(dir.parse(base + "transport: {kv_net_devices: all}\n").transport.kv_net_devices.empty());
  CHECK(dir.parse(base + "transport: {kv_net_devices: 'eth0,mlx5_0:1'}\n").transport.kv_net_devices ==
        "eth0,mlx5_0:1");
  CHECK_CONFIG_ERROR(dir, base + "transport: {kv_net_devices: 'eth0; rm -rf'}\n", 8,
                     "transport.kv_net_devices 'eth0; rm -rf' is not a list of network devices");
  // KV checksums: auto is on with either backend (GPU pools are checksummed on the GPU).
  CHECK(dir.parse(base).transport.kv_checksum);
  CHECK_FALSE(dir.parse(base + "transport: {kv_checksum: off}\n").transport.kv_checksum);
  CHECK(dir.parse(base + "transport: {kv_checksum: on}\n").transport.kv_checksum);
  CHECK_CONFIG_ERROR(dir, base + "transport: {kv_checksum: yes}\n", 8,
                     "transport.kv_checksum 'yes' is unknown; use auto, on or off");
  auto gpu_rest = rest;
  gpu_rest.replace(gpu_rest.find("[cpu]"), 5, "[cuda:0]");
  gpu_rest.replace(gpu_rest.find("[cpu]"), 5, "[cuda:1]");
  CHECK(dir.parse("model: {path: model, backend: cuda}\n" + gpu_rest).transport.kv_checksum);
  // GPU host mirrors: none on one host under auto, always with staged, never with ipc, and with auto across hosts.
  auto gpu_path = [&](const std::string& transport, const std::string& rest_text) {
    return dir.parse("model: {path: model, backend: cuda}\n" + rest_text + transport).transport;
  };
  CHECK_FALSE(gpu_path("", gpu_rest).kv_gpu_mirror);
  CHECK(gpu_path("transport: {kv_gpu_path: staged}\n", gpu_rest).kv_gpu_mirror);
  CHECK_FALSE(gpu_path("transport: {kv_gpu_path: ipc}\n", gpu_rest).kv_gpu_mirror);
  auto two_host_gpus = gpu_rest;
  two_host_gpus.replace(two_host_gpus.find("{name: d0,"), 10, "{name: d0, host: 10.0.0.2,");
  CHECK(gpu_path("", two_host_gpus).kv_gpu_mirror);
  CHECK_CONFIG_ERROR(dir, "model: {path: model, backend: cuda}\n" + gpu_rest + "transport: {kv_gpu_path: nvlink}\n",
                     8, "kv_gpu_path");
  CHECK_FALSE(dir.parse("model: {path: model, backend: cuda}\n" + gpu_rest + "transport: {kv_checksum: off}\n")
                  .transport.kv_checksum);
  CHECK(dir.parse(base + "supervision: {strategy: rest_for_one}\n").supervision.strategy ==
        restart_strategy::rest_for_one);
}

TEST_CASE("names must be usable as file names and command-line words") {
  config_dir dir;
  CHECK_CONFIG_ERROR(dir, base + "cluster:\n  name: my cluster/1\n", 9, "cluster.name 'my cluster/1' is not a valid");
  CHECK_CONFIG_ERROR(dir, std::regex_replace(base, std::regex("p0"), "../p0"), 3, "node name '../p0' is not valid");
  CHECK_CONFIG_ERROR(dir, std::regex_replace(base, std::regex("decode0"), "'decode 0'"), 7,
                     "group name 'decode 0' is not valid");
}

// -- devices ---------------------------------------------------------------------------------------------

TEST_CASE("rank devices: cpu or cuda:N, matching model.backend") {
  config_dir dir;
  auto with_ranks = [&](const std::string& ranks, const std::string& backend = "cpu") {
    return "model: {path: model, backend: " + backend + "}\nnodes:\n  - name: p0\n    ranks: " + ranks +
           "\n  - {name: d0, ranks: 1}\n" + base.substr(base.find("groups:"));
  };
  CHECK_CONFIG_ERROR(dir, with_ranks("[gpu]"), 4, "node 'p0' rank 0 device 'gpu' is not a device; use cpu or cuda:N");
  CHECK_CONFIG_ERROR(dir, with_ranks("[cpu, 'cuda:']"), 4, "device 'cuda:' is not a device");
  CHECK_CONFIG_ERROR(dir, with_ranks("[cpu, cuda:]"), 4, "unknown key 'cuda' in node 'p0' rank 1"); // {cuda: null}
  CHECK_CONFIG_ERROR(dir, with_ranks("[cuda:x]", "cuda"), 4, "device 'cuda:x' is not a device");
  CHECK_CONFIG_ERROR(dir, with_ranks("[cuda:-1]", "cuda"), 4, "device 'cuda:-1' is not a device");
  CHECK_CONFIG_ERROR(dir, with_ranks("[cuda:99999999999]", "cuda"), 4, "is not a device");
  CHECK_CONFIG_ERROR(dir, with_ranks("[{device: cuda:7x}]", "cuda"), 4, "device 'cuda:7x' is not a device");
  CHECK_CONFIG_ERROR(dir, with_ranks("[{devcie: cuda:0}]", "cuda"), 4, "(did you mean 'device'?)");
  CHECK_CONFIG_ERROR(dir, with_ranks("gpu"), 4, "device 'gpu' is not a device");

  // cuda ranks need the cuda backend, and the cuda backend needs GPUs.
  CHECK_CONFIG_ERROR(dir, with_ranks("[cpu, cuda:0]"), 4,
                     "node 'p0' rank 1 is on cuda:0 but model.backend is 'cpu'; set model.backend: cuda");
  CHECK_CONFIG_ERROR(dir, with_ranks("\n      - cpu\n      - cuda:0"), 6, "rank 1 is on cuda:0");
  CHECK_CONFIG_ERROR(dir, with_ranks("cuda:0"), 4, "rank 0 is on cuda:0 but model.backend is 'cpu'");
  CHECK_CONFIG_ERROR(dir, with_ranks("[cuda:0, cpu]", "cuda"), 4, "rank 1 is on cpu but model.backend is 'cuda'");
  CHECK_CONFIG_ERROR(dir, with_ranks("[cuda:0, cuda:1, cuda:0]", "cuda"), 4,
                     "node 'p0' lists cuda:0 twice (ranks 0 and 2)");

  // Nodes on one host must not share a GPU; on different hosts they may.
  CHECK_CONFIG_ERROR(dir, with_ranks("[cuda:0, cuda:1]", "cuda"), 5,
                     "node 'd0' rank 0 uses cuda:0 on host 127.0.0.1, which node 'p0' already uses");
  CHECK_CONFIG_ERROR(dir, std::regex_replace(with_ranks("2", "cuda"), std::regex("name: d0"), "name: d0, host: localhost"),
                     5, "which node 'p0' already uses");
  CHECK_NOTHROW(dir.parse(std::regex_replace(with_ranks("2", "cuda"), std::regex("name: d0"),
                                             "name: d0, host: 10.0.0.2")));
  // model.share_gpus lets ranks share a GPU, in one node and across the nodes of one host.
  auto shared = [&](const std::string& ranks) {
    return std::regex_replace(with_ranks(ranks, "cuda"), std::regex("backend: cuda"), "backend: cuda, share_gpus: true");
  };
  auto both = dir.parse(shared("[cuda:0, cuda:0]"));
  CHECK(both.model.share_gpus);
  CHECK(both.nodes[0].ranks[1].device == "cuda:0");
  CHECK(dir.parse(shared("[cuda:0]")).nodes[1].ranks[0].device == "cuda:0"); // d0's one rank is cuda:0 too
  CHECK_CONFIG_ERROR(dir, std::regex_replace(shared("[cuda:0]"), std::regex("share_gpus: true"), "share_gpus: maybe"),
                     1, "share_gpus");

  auto cfg = dir.parse(with_ranks("[cuda:1, {device: cuda:3}]", "cuda"));
  REQUIRE(cfg.nodes[0].ranks.size() == 2);
  CHECK(cfg.nodes[0].ranks[1].device == "cuda:3");
  CHECK(cfg.nodes[0].ranks[1].cuda_index() == 3);
  // A count means that many ranks on the backend's devices.
  CHECK(cfg.nodes[1].ranks.size() == 1);
  CHECK(cfg.nodes[1].ranks[0].device == "cuda:0");
  auto counted = dir.parse(std::regex_replace(with_ranks("4", "cuda"), std::regex("ranks: 1"), "ranks: [cuda:5]"));
  REQUIRE(counted.nodes[0].ranks.size() == 4);
  CHECK(counted.nodes[0].ranks[3].device == "cuda:3");
  CHECK(counted.find_group("prefill0")->ep_size == 4);
  CHECK(dir.parse(with_ranks("3")).nodes[0].ranks[2].device == "cpu");
}

// -- topology --------------------------------------------------------------------------------------------

TEST_CASE("groups must name known nodes, each node in exactly one group") {
  config_dir dir;
  CHECK_CONFIG_ERROR(dir, std::regex_replace(base, std::regex("nodes: \\[d0\\]"), "nodes: [n3]"), 7,
                     "decode group 'decode0' names unknown node 'n3'; the nodes are p0, d0");
  CHECK_CONFIG_ERROR(dir, std::regex_replace(base, std::regex("nodes: \\[d0\\]"), "nodes: [d0, pO]"), 7,
                     "names unknown node 'pO' (did you mean 'p0'?)");
  CHECK_CONFIG_ERROR(dir, std::regex_replace(base, std::regex("nodes: \\[d0\\]"), "nodes: [d0, p0]"), 7,
                     "decode group 'decode0' names node 'p0', which already belongs to prefill group 'prefill0' "
                     "(a node serves one group)");
  CHECK_CONFIG_ERROR(dir, std::regex_replace(base, std::regex("nodes: \\[d0\\]"), "nodes: [d0, d0]"), 7,
                     "names node 'd0' twice");
  CHECK_CONFIG_ERROR(dir, std::regex_replace(base, std::regex("nodes: \\[d0\\]"), "nodes: [[d0]]"), 7,
                     "decode group 'decode0'.nodes must be a single value");
  // Block style: the line of the offending list item.
  CHECK_CONFIG_ERROR(dir, std::regex_replace(base, std::regex("  decode: .*\n"),
                                             "  decode:\n    - name: decode0\n      nodes:\n        - d0\n"
                                             "        - n3\n"),
                     11, "names unknown node 'n3'");
  auto extra = std::regex_replace(base, std::regex("groups:"), "  - {name: spare, ranks: [cpu]}\ngroups:");
  CHECK_CONFIG_ERROR(dir, extra, 5, "node 'spare' belongs to no group; list it under groups.prefill or groups.decode");
}

TEST_CASE("node and group names are unique") {
  config_dir dir;
  CHECK_CONFIG_ERROR(dir, std::regex_replace(base, std::regex("name: d0"), "name: p0"), 4,
                     "node 'p0' is defined twice (first on line 3)");
  CHECK_CONFIG_ERROR(dir, std::regex_replace(base, std::regex("name: decode0"), "name: prefill0"), 7,
                     "group 'prefill0' is defined twice (first on line 6)");
  CHECK_CONFIG_ERROR(dir, std::regex_replace(base, std::regex("  decode: .*\n"),
                                             "  decode:\n    - {name: decode0, nodes: [d0]}\n"
                                             "    - ports: 1\n      name: decode0\n      nodes: [d1]\n"),
                     9, "unknown key 'ports' in decode group");
  CHECK_CONFIG_ERROR(dir, std::regex_replace(base, std::regex("  decode: .*\n"),
                                             "  decode:\n    - {name: decode0, nodes: [d0]}\n"
                                             "    - nodes: [d1]\n      name: decode0\n"),
                     10, "group 'decode0' is defined twice (first on line 8)");
}

TEST_CASE("ep_size must equal the group's rank count") {
  config_dir dir;
  auto two = "model: {path: model}\nnodes:\n  - {name: p0, ranks: 2}\n  - {name: p1, ranks: [cpu, cpu]}\n"
             "  - {name: d0, ranks: [cpu]}\ntransport: {expert_exchange: ucx}\ngroups:\n"
             "  prefill:\n    - name: prefill0\n      nodes: [p0, p1]\n      ep_size: ";
  auto decode = "\n  decode: [{name: decode0, nodes: [d0]}]\n";
  CHECK_CONFIG_ERROR(dir, two + std::string("3") + decode, 11,
                     "prefill group 'prefill0' has ep_size 3 but its nodes have 4 ranks; set ep_size: 4");
  CHECK_CONFIG_ERROR(dir, std::regex_replace(base, std::regex("nodes: \\[p0\\]"), "nodes: [p0], ep_size: 2"), 6,
                     "has ep_size 2 but its nodes have 1 rank; set ep_size: 1 (or leave it out)");
  CHECK_CONFIG_ERROR(dir, two + std::string("0") + decode, 11, "ep_size = 0 is out of range [1, 1024]");
  auto cfg = dir.parse(two + std::string("4") + decode);
  CHECK(cfg.find_group("prefill0")->ep_size == 4);
  CHECK(cfg.find_group("prefill0")->nodes == std::vector<std::string>{"p0", "p1"});
  // Without ep_size the rank count is taken.
  CHECK(dir.parse(std::regex_replace(two + std::string("4") + decode, std::regex("      ep_size: 4\n"), ""))
            .find_group("prefill0")
            ->ep_size == 4);
}

TEST_CASE("an EP group over several node processes needs an exchange that crosses processes") {
  config_dir dir;
  auto yaml = "model: {path: model}\nnodes:\n  - {name: p0, ranks: 1}\n  - {name: p1, ranks: 1}\n"
              "  - {name: d0, ranks: 1}\ngroups:\n  prefill:\n    - name: prefill0\n      nodes: [p0, p1]\n"
              "  decode: [{name: decode0, nodes: [d0]}]\n";
  const std::string inproc = yaml + std::string("transport: {expert_exchange: inproc}\n");
  CHECK_CONFIG_ERROR(dir, inproc, 9,
                     "prefill group 'prefill0' spans 2 node processes, but transport.expert_exchange 'inproc' stays "
                     "inside one process; set transport.expert_exchange: ucx");
  CHECK_NOTHROW(dir.parse(yaml + std::string("transport: {expert_exchange: ucx}\n")));
  // auto (the default) picks per group: ucx for the group over two processes, inproc for the one-node group.
  {
    const cluster_config c = dir.parse(yaml);
    CHECK(c.expert_exchange_for(*c.find_group("prefill0")) == "ucx");
    CHECK(c.expert_exchange_for(*c.find_group("decode0")) == "inproc");
  }
  // The GPU expert exchange maps device memory between the group's ranks: one host, any number of processes.
  std::string gpu = yaml;
  gpu.replace(gpu.find("{path: model}"), 13, "{path: model, backend: cuda}");
  int device = 0;
  for (const char* n : {"p0", "p1", "d0"}) {
    const std::string key = std::string("{name: ") + n + ", ranks: 1}";
    gpu.replace(gpu.find(key), key.size(),
                std::string("{name: ") + n + ", ranks: [cuda:" + std::to_string(device++) + "]}");
  }
  CHECK_CONFIG_ERROR(dir, gpu + "transport: {expert_exchange: inproc}\n", 9, "set transport.expert_exchange: cuda_ipc");
  CHECK(dir.parse(gpu + "transport: {expert_exchange: cuda_ipc}\n").transport.expert_exchange == "cuda_ipc");
  std::string two_hosts = gpu;
  two_hosts.replace(two_hosts.find("{name: p1,"), 10, "{name: p1, host: 10.0.0.2,");
  // auto: cuda ranks on one host take the GPU plane; a group across hosts moves its rows through UCX.
  {
    const cluster_config one = dir.parse(gpu), two = dir.parse(two_hosts);
    CHECK(one.expert_exchange_for(*one.find_group("prefill0")) == "cuda_ipc");
    CHECK(two.expert_exchange_for(*two.find_group("prefill0")) == "ucx");
  }
  CHECK_CONFIG_ERROR(dir, two_hosts + "transport: {expert_exchange: cuda_ipc}\n", 8,
                     "group 'prefill0' has nodes on hosts '127.0.0.1' and '10.0.0.2', but transport.expert_exchange "
                     "'cuda_ipc' maps GPU memory between the ranks of one host");
  // nccl: a GPU per rank (NCCL refuses two ranks of a communicator on one GPU); across hosts it is allowed.
  CHECK(dir.parse(gpu + "transport: {expert_exchange: nccl}\n").transport.expert_exchange == "nccl");
  CHECK_NOTHROW(dir.parse(two_hosts + "transport: {expert_exchange: nccl}\n"));
  std::string shared = gpu;
  shared.replace(shared.find("ranks: [cuda:1]"), 15, "ranks: [cuda:0]");
  shared.replace(shared.find("backend: cuda}"), 14, "backend: cuda, share_gpus: true}");
  CHECK_CONFIG_ERROR(dir, shared + "transport: {expert_exchange: nccl}\n", 8,
                     "group 'prefill0' puts two ranks on cuda:0 of host '127.0.0.1' (nodes 'p0' and 'p1'), but "
                     "transport.expert_exchange 'nccl' needs a GPU per rank");
  CHECK_NOTHROW(dir.parse(shared + "transport: {expert_exchange: cuda_ipc}\n")); // cuda_ipc shares GPUs
  // Two ranks of a group on one GPU in one node process share a CUDA context: cuda_ipc is refused, auto takes inproc.
  std::string threads = gpu;
  threads.replace(threads.find("{name: d0, ranks: [cuda:2]}"), 27, "{name: d0, ranks: [cuda:2, cuda:2]}");
  threads.replace(threads.find("backend: cuda}"), 14, "backend: cuda, share_gpus: true}");
  CHECK_CONFIG_ERROR(dir, threads + "transport: {expert_exchange: cuda_ipc}\n", 10,
                     "group 'decode0': node 'd0' runs ranks 0 and 1 on cuda:2 in one process, but with "
                     "transport.expert_exchange 'cuda_ipc' a rank spinning on the GPU for its peer blocks");
  {
    const cluster_config c = dir.parse(threads);
    CHECK(c.expert_exchange_for(*c.find_group("decode0")) == "inproc");
    CHECK(c.expert_exchange_for(*c.find_group("prefill0")) == "cuda_ipc");
  }
  // fp8_experts: a group key of the cuda_ipc plane.
  std::string fp8 = gpu;
  fp8.replace(fp8.find("nodes: [p0, p1]"), 15, "nodes: [p0, p1]\n      fp8_experts: true");
  CHECK(dir.parse(fp8).find_group("prefill0")->fp8_experts);
  CHECK_CONFIG_ERROR(dir, fp8 + "transport: {expert_exchange: nccl}\n", 8,
                     "group 'prefill0' sets fp8_experts, which runs on the GPU expert exchange of an expert-parallel "
                     "group; this group exchanges through 'nccl'");
  std::string fp8_cpu = yaml;
  fp8_cpu.replace(fp8_cpu.find("nodes: [p0, p1]"), 15, "nodes: [p0, p1]\n      fp8_experts: true");
  CHECK_CONFIG_ERROR(dir, fp8_cpu, 10, "fp8_experts needs model.backend: cuda");
}

TEST_CASE("fixed ports never collide; port 0 means any free port") {
  config_dir dir;
  auto nodes = [&](const std::string& p0, const std::string& d0) {
    return "model: {path: model}\nnodes:\n  - {name: p0, ranks: [cpu], " + p0 + "}\n  - {name: d0, ranks: [cpu], " +
           d0 + "}\n" + base.substr(base.find("groups:"));
  };
  CHECK_CONFIG_ERROR(dir, nodes("port: 9000", "port: 9000"), 4,
                     "node 'd0' uses port 9000, already taken by node 'p0'; pick another port or 0");
  CHECK_CONFIG_ERROR(dir, nodes("port: 9000", "host: localhost, port: 9000"), 4, "already taken by node 'p0'");
  CHECK_CONFIG_ERROR(dir, nodes("host: 0.0.0.0, port: 9000", "host: 10.0.0.2, port: 9000"), 4,
                     "already taken by node 'p0'");
  CHECK_CONFIG_ERROR(dir, nodes("port: 8080", "port: 0"), 3, "node 'p0' uses port 8080, already taken by the gateway");
  CHECK_CONFIG_ERROR(dir, nodes("port: 0", "port: 7000") + "transport:\n  head_port: 7000\n", 4,
                     "node 'd0' uses port 7000, already taken by the head (transport.head_port)");
  CHECK_CONFIG_ERROR(dir, base + "gateway: {port: 7000}\ntransport: {head_port: 7000}\n", 9,
                     "transport.head_port 7000 is already taken by the gateway");
  // Different hosts may share a port; port 0 never collides.
  CHECK_NOTHROW(dir.parse(nodes("host: 10.0.0.1, port: 9000", "host: 10.0.0.2, port: 9000")));
  auto zeros = dir.parse(nodes("port: 0", "port: 0") + "gateway: {port: 0}\ntransport: {head_port: 0}\n");
  CHECK(zeros.gateway.address.port == 0);
  CHECK(zeros.transport.head.port == 0);
}

TEST_CASE("prefill token budgets: max_batch_tokens >= chunk_tokens") {
  config_dir dir;
  auto prefill = [&](const std::string& keys) {
    return std::regex_replace(base, std::regex("  prefill: .*\n"),
                              "  prefill:\n    - name: prefill0\n      nodes: [p0]\n" + keys);
  };
  CHECK_CONFIG_ERROR(dir, prefill("      chunk_tokens: 512\n      max_batch_tokens: 256\n"), 10,
                     "prefill group 'prefill0': max_batch_tokens (256) must be at least chunk_tokens (512)");
  // Only chunk_tokens written: it is the line to fix (the default max_batch_tokens is 1024).
  CHECK_CONFIG_ERROR(dir, prefill("      chunk_tokens: 2048\n"), 9, "max_batch_tokens (1024) must be at least");
  auto cfg = dir.parse(prefill("      chunk_tokens: 512\n      max_batch_tokens: 512\n"));
  CHECK(cfg.groups[0].chunk_tokens == 512);
  CHECK(cfg.groups[0].max_batch_tokens == 512);
}

// -- model -----------------------------------------------------------------------------------------------

TEST_CASE("model.path must hold a config.json; dummy needs dummy_config") {
  config_dir dir;
  auto rest = base.substr(base.find('\n') + 1);
  CHECK_CONFIG_ERROR(dir, "model:\n  path: /nonexistent/ckpt\n" + rest, 2,
                     "model.path '/nonexistent/ckpt' has no config.json (point it at a Hugging Face checkpoint");
  CHECK_CONFIG_ERROR(dir, "model:\n  backend: cpu\n  path: dummy\n" + rest, 3,
                     "model.path is 'dummy' but model.dummy_config is missing");
  CHECK_CONFIG_ERROR(dir, "model:\n  path: dummy\n  dummy_config: nope.json\n" + rest, 3,
                     "model.dummy_config '" + (dir.path / "nope.json").string() + "' does not exist");

  // The ranks read config.json from the dummy config's directory: other file names would not be found.
  dir.file("configs/v3.json", "{}");
  CHECK_CONFIG_ERROR(dir, "model:\n  path: dummy\n  dummy_config: configs/v3.json\n" + rest, 3,
                     "must be a file named config.json (or the directory holding one)");
  dir.file("configs/v3/config.json", model_config_json());
  auto cfg = dir.parse("model: {path: dummy, dummy_config: configs/v3/config.json}\n" + rest);
  CHECK(cfg.model.is_dummy());
  CHECK(cfg.model.dummy_config == (dir.path / "configs/v3/config.json").string());
  CHECK(cfg.model.served_name == "dummy");
  // A config.json that exists but does not load is refused at load time, naming the key.
  dir.file("broken/config.json", "{}");
  CHECK_CONFIG_ERROR(dir, "model:\n  path: broken\n" + rest, 2, "the model's config.json does not load");
  // A checkpoint directory stands for its config.json.
  auto from_dir = dir.parse("model: {path: dummy, dummy_config: model, name: v3-dummy}\n" + rest);
  CHECK(from_dir.model.dummy_config == (dir.path / "model/config.json").string());
  CHECK(from_dir.model.served_name == "v3-dummy");

  CHECK_CONFIG_ERROR(dir, std::regex_replace(base, std::regex("nodes: \\[p0\\]"),
                                             "nodes: [p0], init_expert_location: placement.json"),
                     6, "prefill group 'prefill0'.init_expert_location '" + (dir.path / "placement.json").string() +
                            "' does not exist");
  dir.file("placement.json", "[]");
  CHECK(dir.parse(std::regex_replace(base, std::regex("nodes: \\[p0\\]"),
                                     "nodes: [p0], init_expert_location: placement.json"))
            .groups[0]
            .init_expert_location == (dir.path / "placement.json").string());
}

TEST_CASE("security: TLS is on by default and secret_file resolves against the file and bad values are refused") {
  config_dir dir;
  auto on = dir.parse(base);
  CHECK(on.security.tls);
  CHECK(on.security.secret_file.empty());
  auto with_secret = dir.parse(base + "security: {secret_file: keys/secret}\n");
  CHECK(std::filesystem::path(with_secret.security.secret_file).is_absolute());
  CHECK(with_secret.security.secret_file.size() > std::string("keys/secret").size());
  CHECK_FALSE(dir.parse(base + "security: {tls: false}\n").security.tls);
  CHECK_CONFIG_ERROR(dir, base + "security: {tls: maybe}\n", 8,
                     "security.tls has the wrong type ('maybe' is not true or false)");
  CHECK_CONFIG_ERROR(dir, base + "security: {secret_file: ''}\n", 8, "security.secret_file must not be empty");
  CHECK_CONFIG_ERROR(dir, base + "security: {tls: false, secret_file: s}\n", 8,
                     "security.secret_file is set but security.tls is false");
  CHECK_CONFIG_ERROR(dir, base + "security: {secret: s}\n", 8, "unknown key 'secret' in security; known keys: tls, secret_file");
}

// -- the examples in docs/cluster-yaml.md -----------------------------------------------------------------

TEST_CASE("every example in docs/cluster-yaml.md loads") {
  std::ifstream in(PETREL_SOURCE_DIR "/docs/cluster-yaml.md");
  REQUIRE(in);
  std::stringstream ss;
  ss << in.rdbuf();
  auto doc = ss.str();
  // Examples follow the marker `<!-- checked: NAME -->` and sit in a ```yaml block.
  std::regex block("<!-- checked: ([a-z-]+) -->\\s*```yaml\n([\\s\\S]*?)```");
  int count = 0;
  for (auto it = std::sregex_iterator(doc.begin(), doc.end(), block); it != std::sregex_iterator(); ++it) {
    std::string name = (*it)[1];
    std::string yaml = (*it)[2];
    INFO("example " << name);
    config_dir dir;
    // Create the files the example names, relative to its directory.
    std::regex file_key("(?:path|dummy_config|init_expert_location): ([^ \n#]+)");
    for (auto f = std::sregex_iterator(yaml.begin(), yaml.end(), file_key); f != std::sregex_iterator(); ++f) {
      std::string p = (*f)[1];
      if (p == "dummy")
        continue;
      REQUIRE_MESSAGE(fs::path(p).is_relative(), "examples name files relative to cluster.yaml: " << p);
      bool is_json = p.size() > 5 && p.substr(p.size() - 5) == ".json";
      bool model_file = (*f)[0].str().rfind("init_expert_location", 0) != 0;
      dir.file(is_json ? p : p + "/config.json", model_file ? model_config_json() : "{}");
    }
    CHECK_NOTHROW(dir.parse(yaml));
    ++count;
  }
  CHECK(count >= 3);
}
