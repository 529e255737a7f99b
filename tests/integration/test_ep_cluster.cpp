// Expert parallelism in a served cluster: prefill and decode groups of two rank actors each (one node
// process per group), DP attention plus expert-parallel MoE layers, redundant experts, TBO on the prefill
// side and the low-latency (masked) dispatch on the decode side. Outputs must equal the single-process model,
// also across a live EPLB rebalance and across the crash of any one rank of a group.
#include <doctest/doctest.h>

#include <csignal>
#include <future>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "actors/cluster.hpp"
#include "tests/support/launched_cluster.hpp"

using namespace std::chrono_literals;
using json = nlohmann::json;
using petrel::test::fortune_model_dir;
using petrel::test::launched_cluster;
using namespace petrel::test;

namespace {

std::string ep_cluster_yaml(const std::string& run_dir) {
  return "cluster: {name: tep, run_dir: " + run_dir + "}\n" + "model: {path: " + fortune_model_dir() +
         ", name: fortune-moe}\n" +
         "gateway: {host: 127.0.0.1, port: 0}\n"
         "nodes:\n"
         "  - {name: p0, ranks: [cpu, cpu]}\n"
         "  - {name: d0, ranks: [cpu, cpu]}\n"
         "  - {name: d1, ranks: [cpu]}\n"
         "groups:\n"
         "  prefill:\n"
         "    - {name: prefill0, nodes: [p0], ep_size: 2, redundant_experts: 2, two_batch_overlap: true,"
         " chunk_tokens: 32, max_batch_tokens: 64}\n"
         "  decode:\n"
         "    - {name: decode0, nodes: [d0], ep_size: 2, redundant_experts: 2, ep_mode: low_latency,"
         " rebalance_below: 1.0, rebalance_min_steps: 50}\n"
         "    - {name: decode1, nodes: [d1]}\n"
         "supervision: {node_intensity: 5, node_period: 60s, intensity: 20, period: 10s}\n";
}

std::string complete(int port, const std::string& prompt, int max_tokens, const std::string& extra = "") {
  return completion_text(port, prompt, max_tokens, extra);
}

bool group_running(launched_cluster& c, const std::string& group) {
  auto h = c.health();
  for (auto& g : h["groups"])
    if (g["group"] == group && g["running"].get<int>() >= 1)
      return true;
  return false;
}

} // namespace

TEST_CASE("expert-parallel groups serve the single-process model's output, across rebalances and rank crashes") {
  launched_cluster c("tep", ep_cluster_yaml);

  // Greedy, several prompts at once (both DP ranks of each EP group get work, the single-rank group too).
  std::vector<std::string> prompts{"Once upon a time", "The best way to predict the future is", "A fortune: ",
                                   "Never trust", "Why", "In the beginning the universe was"};
  std::vector<std::future<std::string>> served;
  for (auto& p : prompts)
    served.push_back(std::async(std::launch::async, [&c, p] { return complete(c.port, p, 40); }));
  for (size_t i = 0; i < prompts.size(); ++i)
    CHECK(served[i].get() == reference_text(prompts[i], 40));

  // The group's eplb_rebalancer watches its balancedness and, below rebalance_below, starts a rebalance itself.
  CHECK(eventually(20s, [&] {
    complete(c.port, "Why", 16);
    auto m = http_get(c.port, "/metrics").body;
    return m.find("petrel_eplb_balancedness{group=\"decode0\"}") != std::string::npos &&
           m.find("petrel_eplb_rebalances_total{group=\"decode0\",trigger=\"balancedness\"}") != std::string::npos;
  }));

  // Sampled with a seed: the same text every time, whatever happens to the group meanwhile.
  const std::string sampled = R"("temperature":0.8,"seed":11,"ignore_eos":true)";
  auto expected = complete(c.port, "Once upon a time", 200, sampled);

  // A live rebalance of each EP group while a request streams through it.
  for (std::string group : {"decode0", "prefill0"}) {
    CAPTURE(group);
    auto fut = std::async(std::launch::async, [&] { return complete(c.port, "Once upon a time", 200, sampled); });
    if (group == "decode0")
      CHECK(eventually(10s, [&] { return group_running(c, "decode0"); }));
    auto r = run_petrel("rebalance " + c.cfg + " " + group + " --json");
    REQUIRE_MESSAGE(r.exit_code == 0, r.output);
    CHECK(fut.get() == expected);
    // The next steps carried the rebalance out: every rank reports it, with weights moved over the exchange.
    {
      std::vector<std::future<std::string>> more; // enough requests that both decode groups step again
      for (int i = 0; i < 4; ++i)
        more.push_back(std::async(std::launch::async, [&] { return complete(c.port, "x", 8); }));
      for (auto& f : more)
        f.get();
    }
    auto stats = json::parse(run_petrel("rebalance " + c.cfg + " " + group + " --json").output);
    REQUIRE(stats.size() == 2);
    for (auto& one : stats) {
      int rebalances = one.value("rebalances", 0);
      CHECK(rebalances >= 1);
      CHECK(one["slots"] == 10);
    }
  }

  CHECK(http_get(c.port, "/metrics").body.find("petrel_eplb_rebalances_total{group=\"prefill0\",trigger=\"manual\"}") !=
        std::string::npos);

  // Any one rank of an EP group crashes mid-request: the group re-forms, the request migrates, the text is the same.
  for (std::string actor : {"d0/rank1", "d0/rank0", "p0/rank1"}) {
    CAPTURE(actor);
    auto fut = std::async(std::launch::async, [&] { return complete(c.port, "Once upon a time", 200, sampled); });
    if (actor[0] == 'd')
      CHECK(eventually(10s, [&] { return group_running(c, "decode0"); }));
    auto r = run_petrel("restart " + c.cfg + " " + actor);
    CHECK_MESSAGE(r.exit_code == 0, r.output);
    CHECK(fut.get() == expected);
  }
  CHECK(eventually(20s, [&] { return c.idle() && c.health()["status"] == "ok"; }));
  CHECK(complete(c.port, "Never trust", 24) == reference_text("Never trust", 24));

  // A group of one rank is not expert-parallel: the user's error, exit 2.
  auto r = run_petrel("rebalance " + c.cfg + " decode1");
  CHECK(r.exit_code == 2);
  CHECK(r.output.find("not expert-parallel") != std::string::npos);
  CHECK(run_petrel("rebalance " + c.cfg + " nosuchgroup").exit_code == 2);
}

TEST_CASE("an EP group across node processes exchanges over UCX and survives the SIGKILL of one of them") {
  launched_cluster c("tepx", [](const std::string& run_dir) {
    return "cluster: {name: tepx, run_dir: " + run_dir + "}\n" + "model: {path: " + fortune_model_dir() +
           ", name: fortune-moe}\n" +
           "gateway: {host: 127.0.0.1, port: 0}\n"
           "nodes:\n"
           "  - {name: p0, ranks: [cpu]}\n"
           "  - {name: p1, ranks: [cpu]}\n"
           "  - {name: d0, ranks: [cpu]}\n"
           "  - {name: d1, ranks: [cpu]}\n"
           "groups:\n"
           "  prefill: [{name: prefill0, nodes: [p0, p1], ep_size: 2, chunk_tokens: 32, max_batch_tokens: 64}]\n"
           "  decode: [{name: decode0, nodes: [d0, d1], ep_size: 2, redundant_experts: 2}]\n"
           // No transport section: expert_exchange auto gives both groups (each over two processes) ucx.
           "supervision: {node_intensity: 5, node_period: 60s}\n";
  });
  std::vector<std::string> prompts{"Once upon a time", "Never trust", "Why", "A fortune: "};
  std::vector<std::future<std::string>> served;
  for (auto& p : prompts)
    served.push_back(std::async(std::launch::async, [&c, p] { return complete(c.port, p, 32); }));
  for (size_t i = 0; i < prompts.size(); ++i)
    CHECK(served[i].get() == reference_text(prompts[i], 32));

  const std::string sampled = R"("temperature":0.8,"seed":5,"ignore_eos":true)";
  auto expected = complete(c.port, "Once upon a time", 200, sampled);
  auto r = run_petrel("rebalance " + c.cfg + " decode0 --json");
  REQUIRE_MESSAGE(r.exit_code == 0, r.output);
  CHECK(complete(c.port, "Once upon a time", 200, sampled) == expected);

  // SIGKILL the process of decode rank 1 mid-request: rank 0 (another process) fails its step through UCX's
  // peer-error detection, the group re-forms with the restarted process, and the request migrates.
  int pid = node_pid(c.cfg, "d1");
  REQUIRE(pid > 0);
  auto fut = std::async(std::launch::async, [&] { return complete(c.port, "Once upon a time", 200, sampled); });
  CHECK(eventually(10s, [&] { return group_running(c, "decode0"); }));
  ::kill(pid, SIGKILL);
  CHECK(fut.get() == expected);
  CHECK(eventually(30s, [&] { return c.idle() && c.health()["status"] == "ok"; }));
  // The group re-formed: a newer generation, and the restarted process's rank is in it.
  auto before = json::parse(r.output);
  auto after = run_petrel("rebalance " + c.cfg + " decode0 --json");
  REQUIRE(after.exit_code == 0);
  auto now = json::parse(after.output);
  REQUIRE(now.size() == 2);
  CHECK(now[0]["generation"].get<uint64_t>() > before[0]["generation"].get<uint64_t>());
  CHECK(now[0]["generation"] == now[1]["generation"]);
}
