// The chaos suite: every scenario in tests/chaos/scenarios runs against a real multi-process cluster
// through `petrel chaos`, which must report nothing lost, nothing failed, outputs equal to a
// fault-free run and recovery within the bound.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include "tests/support/process.hpp"

using namespace petrel::test;
using json = nlohmann::json;

namespace {

json play(const std::string& name) {
  temp_dir dir;
  auto report = (dir.path / "report.json").string();
  auto scenario = std::string(PETREL_SOURCE_DIR) + "/tests/chaos/scenarios/" + name;
  auto r = run_petrel("chaos " + scenario + " --report " + report);
  MESSAGE(r.output);
  CHECK_MESSAGE(r.exit_code == 0, r.output);
  std::ifstream in(report);
  REQUIRE(in);
  auto j = json::parse(in);
  CHECK(j["passed"] == true);
  int shown = 0;
  for (auto& r : j["requests"])
    if (r["status"] != "completed" && shown++ < 3)
      MESSAGE("request " << r["id"] << " " << r["status"] << ": " << r.value("error", std::string()));
  CHECK(j["summary"]["lost"] == 0);
  CHECK(j["summary"]["failed"] == 0);
  CHECK(j["summary"]["mismatched"] == 0);
  CHECK(j["summary"]["completed"] == j["summary"]["total"]);
  for (auto& f : j["faults"]) {
    CHECK_MESSAGE(f["injected"] == true, f.dump());
    CHECK(f["recovery_ms"].get<double>() >= 0);
  }
  return j;
}

} // namespace

TEST_CASE("chaos: actor crashes") { play("kill_actors.yaml"); }
TEST_CASE("chaos: node process kills") { play("kill_nodes.yaml"); }
TEST_CASE("chaos: stalled nodes") { play("stall.yaml"); }
TEST_CASE("chaos: KV link delay, drop and partition") { play("links.yaml"); }
TEST_CASE("chaos: a slow rank") { play("slow.yaml"); }
TEST_CASE("chaos: corrupted KV pages are caught by their checksums and re-prefilled") {
  auto j = play("corrupt.yaml");
  CHECK(j["kv_checksum"]["mismatch"].get<double>() >= 1);
  CHECK(j["kv_checksum"]["ok"].get<double>() >= 60);
}
TEST_CASE("chaos: the head's router and schedulers crash") { play("kill_head_actors.yaml"); }
TEST_CASE("chaos: requests that arrive while the router restarts wait for it") { play("kill_router_often.yaml"); }

TEST_CASE("chaos: a bad scenario exits 2 naming the line") {
  temp_dir dir;
  auto cluster = std::string(PETREL_SOURCE_DIR) + "/tests/chaos/cluster.yaml";
  auto path = dir.file("bad.yaml", "seed: 1\ncluster: " + cluster +
                                       "\nevents:\n  - {at: 1s, kill_node: {node: p9}}\n");
  auto r = run_petrel("chaos " + path);
  CHECK(r.exit_code == 2);
  CHECK_MESSAGE(r.output.find("bad.yaml:4: event 'kill_node' names unknown node 'p9'") != std::string::npos, r.output);
  auto path2 = dir.file("bad2.yaml", "seed: 1\ncluster: " + cluster + "\nevents:\n  - {at: 1s, explode: {}}\n");
  auto r2 = run_petrel("chaos " + path2);
  CHECK(r2.exit_code == 2);
  CHECK(r2.output.find("unknown key 'explode'") != std::string::npos);
}
