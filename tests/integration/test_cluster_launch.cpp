// A real multi-process cluster on loopback: launch, SIGKILL a node process and watch it come back
// with a new epoch, exceed the restart intensity and watch the head escalate, and stop cleanly.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include "tests/support/process.hpp"

using namespace petrel::test;
using json = nlohmann::json;
using namespace std::chrono_literals;

namespace {

std::string three_node_yaml(const temp_dir& dir, const std::string& name) {
  return "cluster: {name: " + name + ", run_dir: " + (dir.path / "run").string() + "}\n" +
         "model: {path: " + std::string(PETREL_SOURCE_DIR) + "/tests/data/fortune-moe}\n"
         "gateway: {host: 127.0.0.1, port: 0}\n"
         "nodes:\n"
         "  - {name: p0, ranks: [cpu]}\n"
         "  - {name: d0, ranks: [cpu]}\n"
         "  - {name: d1, ranks: [cpu, cpu]}\n"
         "groups:\n"
         "  prefill: [{name: prefill0, nodes: [p0]}]\n"
         "  decode:\n"
         "    - {name: decode0, nodes: [d0]}\n"
         "    - {name: decode1, nodes: [d1]}\n"
         "supervision: {node_intensity: 2, node_period: 60s}\n";
}

json status_json(const std::string& cfg) {
  auto r = run_petrel("status --json " + cfg);
  if (r.exit_code != 0)
    return json{};
  try {
    return json::parse(r.output);
  } catch (...) {
    return json{};
  }
}

json node_of(const json& status, const std::string& name) {
  if (!status.contains("nodes"))
    return json{};
  for (auto& n : status["nodes"])
    if (n["name"] == name)
      return n;
  return json{};
}

bool all_running(const json& status, size_t nodes) {
  if (!status.contains("nodes") || status["nodes"].size() != nodes)
    return false;
  for (auto& n : status["nodes"]) {
    if (n["state"] != "running" || n["children"].empty())
      return false;
    for (auto& c : n["children"])
      if (c["state"] != "running")
        return false;
  }
  return true;
}

} // namespace

TEST_CASE("a killed node process is restarted with a new epoch; too many kills escalate") {
  temp_dir dir;
  auto cfg = dir.file("cluster.yaml", three_node_yaml(dir, "t3node"));
  background_process head({"launch", cfg}, (dir.path / "head.log").string());
  json st;
  REQUIRE_MESSAGE(eventually(30s, [&] { return all_running(st = status_json(cfg), 3); }), head.output());
  CHECK(node_of(st, "d1")["children"].size() == 3); // kv_agent, rank0, rank1
  int head_port = 0;
  {
    std::ifstream in(dir.path / "run" / "t3node" / "head.json");
    head_port = json::parse(in)["head_port"];
  }
  CHECK(port_open(head_port));
  std::vector<int> pids;
  for (auto& n : st["nodes"])
    pids.push_back(n["pid"]);

  // 1. SIGKILL one node process: it is back, same name, new epoch, within a few seconds.
  auto before = node_of(st, "d0");
  int old_pid = before["pid"];
  uint64_t old_epoch = before["epoch"];
  REQUIRE(::kill(old_pid, SIGKILL) == 0);
  auto t0 = std::chrono::steady_clock::now();
  REQUIRE_MESSAGE(eventually(10s,
                             [&] {
                               st = status_json(cfg);
                               auto n = node_of(st, "d0");
                               return all_running(st, 3) && n["pid"] != old_pid;
                             }),
                  head.output());
  auto recovery = std::chrono::steady_clock::now() - t0;
  MESSAGE("node d0 back after " << std::chrono::duration_cast<std::chrono::milliseconds>(recovery).count() << " ms");
  CHECK(recovery < 5s);
  auto after = node_of(st, "d0");
  CHECK(after["epoch"].get<uint64_t>() > old_epoch);
  CHECK(after["restarts"] == 1);
  CHECK_FALSE(process_alive(old_pid));
  // The other nodes were untouched (one_for_one between node processes).
  CHECK(node_of(st, "p0")["restarts"] == 0);
  CHECK(node_of(st, "p0")["pid"] == pids[0]);
  // The new incarnation's children carry the new node epoch in their high bits.
  for (auto& c : after["children"])
    CHECK((c["epoch"].get<uint64_t>() >> 32) == after["epoch"].get<uint64_t>());
  pids.push_back(after["pid"]);

  // 2. Kill it more often than the intensity (2 restarts in 60 s) allows: the second restart is
  //    still allowed, the third makes the head escalate.
  for (int i = 0; i < 2; ++i) {
    auto d0 = node_of(st, "d0");
    REQUIRE_MESSAGE(d0.contains("pid"), st.dump());
    int pid = d0["pid"];
    ::kill(pid, SIGKILL);
    pids.push_back(pid);
    if (i == 0)
      eventually(10s, [&] {
        st = status_json(cfg);
        return all_running(st, 3) && node_of(st, "d0")["pid"] != pid;
      });
  }
  auto rc = head.wait_exit(15s);
  REQUIRE_MESSAGE(rc.has_value(), "the head did not give up after exceeding the intensity");
  CHECK(*rc == 1);
  CHECK(head.output().find("escalated") != std::string::npos);
  // Nothing is left behind: no node process, no head port, no run file.
  CHECK(eventually(5s, [&] {
    for (int pid : pids)
      if (process_alive(pid))
        return false;
    return true;
  }));
  CHECK_FALSE(port_open(head_port));
  CHECK_FALSE(std::filesystem::exists(dir.path / "run" / "t3node" / "head.json"));
  // And status says so clearly.
  auto none = run_petrel("status " + cfg);
  CHECK(none.exit_code == 1);
  CHECK(none.output.find("is running") != std::string::npos);
}

TEST_CASE("petrel stop shuts every process down and frees the ports") {
  temp_dir dir;
  auto cfg = dir.file("cluster.yaml", three_node_yaml(dir, "tstop"));
  background_process head({"launch", cfg}, (dir.path / "head.log").string());
  json st;
  REQUIRE_MESSAGE(eventually(30s, [&] { return all_running(st = status_json(cfg), 3); }), head.output());
  std::vector<int> pids;
  for (auto& n : st["nodes"])
    pids.push_back(n["pid"]);
  int head_port = 0;
  {
    std::ifstream in(dir.path / "run" / "tstop" / "head.json");
    head_port = json::parse(in)["head_port"];
  }
  auto human = run_petrel("status " + cfg);
  CHECK(human.exit_code == 0);
  CHECK(human.output.find("rank0") != std::string::npos);
  auto stop = run_petrel("stop " + cfg);
  CHECK_MESSAGE(stop.exit_code == 0, stop.output);
  auto rc = head.wait_exit(10s);
  REQUIRE(rc.has_value());
  CHECK(*rc == 0);
  for (int pid : pids)
    CHECK_FALSE(process_alive(pid));
  CHECK_FALSE(port_open(head_port));
  auto again = run_petrel("stop " + cfg);
  CHECK(again.exit_code == 1);
}

TEST_CASE("a malformed or inconsistent cluster.yaml exits 2 with the file, the line and the fix") {
  temp_dir dir;
  struct bad_case {
    const char* yaml;
    const char* expect;
  };
  std::string model = "model: {path: " + std::string(PETREL_SOURCE_DIR) + "/tests/data/fortune-moe}\n";
  bad_case cases[] = {
      {"nodes: [\n", "not valid YAML"},
      {"model: {path: /nonexistent}\nnodes: [{name: a, ranks: [cpu]}]\n", "has no config.json"},
      {"nodes:\n  - {name: n0, ranks: [cpu]}\ngroups:\n  prefill: [{name: p, nodes: [n0]}]\n  decode: [{name: d0, "
       "nodes: [n3]}]\n",
       ":6: decode group 'd0' names unknown node 'n3'"},
      {"nodes:\n  - {name: n0, ranks: [gpu]}\n", "is not a device; use cpu or cuda:N"},
      {"nodez: []\n", "did you mean 'nodes'"},
  };
  for (auto& c : cases) {
    std::string text = std::string(c.yaml).find("model:") == 0 ? c.yaml : model + c.yaml;
    auto path = dir.file("bad.yaml", text);
    auto r = run_petrel("launch " + path);
    CHECK_MESSAGE(r.exit_code == 2, r.output);
    CHECK_MESSAGE(r.output.find(c.expect) != std::string::npos, r.output);
    CHECK(r.output.find("bad.yaml") != std::string::npos);
  }
}
