// EPLB: the published test vector (ANCHORS.md), the global policy, invalid arguments, and placement properties.
#include <doctest/doctest.h>

#include <algorithm>
#include <random>
#include <set>
#include <stdexcept>

#include "runtime/eplb.hpp"
#include "runtime/expert_load.hpp"

using namespace petrel::eplb;

namespace {

const expert_load_matrix anchor_weight = {{90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86},
                                          {20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27}};
const std::vector<std::vector<int>> anchor_phy2log = {{5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1},
                                                      {7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1}};
const std::vector<std::vector<int>> anchor_logcnt = {{1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1},
                                                     {1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1}};

std::set<int> slots_of(const std::vector<int>& phy2log, int expert) {
  std::set<int> s;
  for (int i = 0; i < static_cast<int>(phy2log.size()); ++i)
    if (phy2log[i] == expert) s.insert(i);
  return s;
}

// Properties every placement must have, whatever the load.
void check_placement(const expert_placement& p, const eplb_shape& shape) {
  const int per_gpu = shape.num_replicas / shape.num_gpus;
  for (int l = 0; l < p.num_layers; ++l) {
    REQUIRE(static_cast<int>(p.phy2log[l].size()) == shape.num_replicas);
    int total = 0;
    for (int e = 0; e < p.num_logical; ++e) {
      const int cnt = p.logcnt[l][e];
      CHECK(cnt >= 1);
      total += cnt;
      // log2phy lists exactly the slots phy2log maps to e, then -1 padding.
      std::set<int> listed;
      for (int r = 0; r < p.max_replicas; ++r) {
        const int slot = p.log2phy[l][e][r];
        if (r < cnt) {
          REQUIRE(slot >= 0);
          CHECK(p.phy2log[l][slot] == e);
          listed.insert(slot);
        } else {
          CHECK(slot == -1);
        }
      }
      CHECK(listed == slots_of(p.phy2log[l], e));
    }
    CHECK(total == shape.num_replicas);
    // Every GPU gets exactly replicas/gpus slots, each holding a real expert.
    std::vector<int> per(shape.num_gpus, 0);
    for (int s = 0; s < shape.num_replicas; ++s) {
      CHECK(p.phy2log[l][s] >= 0);
      CHECK(p.phy2log[l][s] < p.num_logical);
      ++per[s / per_gpu];
    }
    for (int g = 0; g < shape.num_gpus; ++g) CHECK(per[g] == per_gpu);
  }
}

} // namespace

TEST_CASE("eplb: hierarchical policy reproduces the published test vector (slot sets and logcnt)") {
  const eplb_shape shape{16, 4, 2, 8};
  CHECK(uses_hierarchical_policy(shape));
  const auto p = rebalance_experts(anchor_weight, shape);
  REQUIRE(p.num_layers == 2);
  REQUIRE(p.num_logical == 12);
  CHECK(p.max_replicas == 2);
  CHECK(p.logcnt == anchor_logcnt);
  for (int l = 0; l < 2; ++l)
    for (int e = 0; e < 12; ++e) {
      INFO("layer " << l << " expert " << e);
      CHECK(slots_of(p.phy2log[l], e) == slots_of(anchor_phy2log[l], e));
    }
  check_placement(p, shape);
}

TEST_CASE("eplb: balanced packing fills every pack and puts the heaviest item first") {
  const std::vector<double> items = {10, 1, 7, 3, 9, 2};
  const auto pk = balanced_packing(items, 2);
  std::vector<double> load(2, 0);
  std::vector<int> n(2, 0);
  for (size_t i = 0; i < items.size(); ++i) {
    load[pk.pack[i]] += items[i];
    ++n[pk.pack[i]];
  }
  CHECK(n[0] == 3);
  CHECK(n[1] == 3);
  // 10 -> p0, 9 -> p1, 7 -> p1 (9 < 10), 3 -> p0 (10 < 16), 2 -> p0 (13 < 16, now full), 1 -> p1.
  CHECK(load[0] == doctest::Approx(15));
  CHECK(load[1] == doctest::Approx(17));
  CHECK(pk.pack[0] == 0);
  CHECK(pk.rank[0] == 0);
  CHECK_THROWS_AS(balanced_packing(items, 4), std::invalid_argument);
}

TEST_CASE("eplb: replicate_experts gives the extra replicas to the largest load per replica") {
  const auto r = replicate_experts({100, 10, 60}, 6);
  // 100 -> 2 (50), 60 -> 2 (30), 100 -> 3 (33.3): counts {3,1,2}.
  CHECK(r.count == std::vector<int>{3, 1, 2});
  CHECK(r.phy2log == std::vector<int>{0, 1, 2, 0, 2, 0});
  CHECK(r.replica_rank == std::vector<int>{0, 0, 0, 1, 1, 2});
}

TEST_CASE("eplb: global policy when groups do not divide over nodes") {
  // 3 groups over 2 nodes: treated as one group on one node, replicas packed over all GPUs.
  const expert_load_matrix w = {{90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86}};
  const eplb_shape shape{16, 3, 2, 4};
  CHECK_FALSE(uses_hierarchical_policy(shape));
  const auto p = rebalance_experts(w, shape);
  check_placement(p, shape);
  // Global replication: the 4 redundant replicas go to 183, 165, 132, 104 (largest load per replica each time:
  // 183, 165, 132, 104 > 91.5 ...).
  const std::vector<int> expect = {1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1};
  CHECK(p.logcnt[0] == expect);
  // Same as asking for one group on one node explicitly.
  const auto q = rebalance_experts(w, eplb_shape{16, 1, 1, 4});
  CHECK(q.phy2log == p.phy2log);
  // Balance: every GPU's load within the heaviest replica of the mean.
  const auto g = gpu_loads(p, w, 0, 4);
  const double mean = 1033.0 / 4;
  for (double x : g) CHECK(std::abs(x - mean) < 92.0);
}

TEST_CASE("eplb: invalid arguments give a clear error") {
  const expert_load_matrix w = {{1, 2, 3, 4, 5, 6, 7, 8}};
  auto err = [&](eplb_shape s) { return check_arguments(w, s); };
  CHECK(err({12, 2, 2, 4}).empty());
  CHECK(err({10, 2, 2, 4}).find("replicas (10) must be divisible by gpus (4)") != std::string::npos);
  CHECK(err({12, 2, 2, 3}).find("divisible by nodes") != std::string::npos);
  CHECK(err({12, 3, 1, 4}).find("experts (8) must be divisible by groups (3)") != std::string::npos);
  CHECK(err({12, 3, 2, 4}).empty()); // 3 groups on 2 nodes: the global policy ignores groups
  CHECK(err({4, 2, 2, 4}).find("at least the number of experts") != std::string::npos);
  CHECK(err({0, 2, 2, 4}).find("replicas must be positive") != std::string::npos);
  CHECK(check_arguments({{1, 2}, {1, 2, 3}}, {4, 1, 1, 2}).find("layer 1 has 3 experts") != std::string::npos);
  CHECK(check_arguments({{1, -2}}, {2, 1, 1, 2}).find("load[0][1]") != std::string::npos);
  CHECK(check_arguments({}, {2, 1, 1, 2}).find("no layers") != std::string::npos);
  CHECK_THROWS_WITH_AS(rebalance_experts(w, {10, 2, 2, 4}), doctest::Contains("divisible by gpus"),
                       std::invalid_argument);
}

TEST_CASE("eplb: property test over random loads and shapes") {
  std::mt19937_64 rng(7);
  struct shape_case {
    int experts;
    eplb_shape shape;
  };
  const std::vector<shape_case> cases = {{256, {288, 8, 4, 32}}, {256, {288, 8, 1, 72}}, {64, {96, 8, 2, 16}},
                                         {64, {64, 8, 4, 8}},     {32, {48, 4, 3, 6}},     {16, {32, 4, 2, 4}}};
  for (const auto& c : cases) {
    for (int trial = 0; trial < 3; ++trial) {
      expert_load_matrix w(2, std::vector<double>(c.experts));
      std::lognormal_distribution<double> d(0.0, 1.0 + trial);
      for (auto& row : w)
        for (auto& x : row) x = std::floor(d(rng) * 100);
      INFO("experts " << c.experts << " replicas " << c.shape.num_replicas << " gpus " << c.shape.num_gpus);
      const auto p = rebalance_experts(w, c.shape);
      check_placement(p, c.shape);
      // With redundant slots, EPLB must never balance worse than the identity placement without redundancy.
      if (c.shape.num_replicas > c.experts) {
        const auto before = balancedness(identity_placement(2, c.experts), w, c.shape.num_gpus);
        const auto after = balancedness(p, w, c.shape.num_gpus);
        CHECK(after.step_weighted >= before.step_weighted - 1e-9);
      }
    }
  }
}

TEST_CASE("eplb: edge shapes: groups that do not divide experts, one GPU, a single hot expert") {
  // 4 experts in 3 "groups" over 2 nodes: only the global policy can run, and it ignores groups.
  const expert_load_matrix w4 = {{10, 20, 30, 40}};
  const auto g = rebalance_experts(w4, {8, 3, 2, 4});
  check_placement(g, {8, 3, 2, 4});
  // Spare replicas go to 40, then 30, then the tie 20 vs 40/2 to the lower index (20), then 40 again.
  CHECK(g.logcnt[0] == std::vector<int>{1, 2, 2, 3});
  // One GPU, no redundancy: every expert exactly once.
  const auto one = rebalance_experts(w4, {4, 1, 1, 1});
  CHECK(one.logcnt[0] == std::vector<int>{1, 1, 1, 1});
  // A single hot expert takes every redundant slot of its node.
  const expert_load_matrix hot = {{1000, 1, 1, 1, 1, 1, 1, 1}};
  const auto h = rebalance_experts(hot, {12, 2, 2, 4});
  check_placement(h, {12, 2, 2, 4});
  CHECK(h.logcnt[0][0] == 3); // its node has 6 slots for 4 experts: both spare slots go to it
  // Equal loads with no spare slots: one replica each.
  const auto eq = rebalance_experts({{50, 50, 50, 50, 50, 50, 50, 50}}, {8, 2, 2, 4});
  for (int c : eq.logcnt[0]) CHECK(c == 1);
}
