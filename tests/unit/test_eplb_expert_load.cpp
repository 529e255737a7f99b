// Expert-load recorder (ring window, merge, JSON round trip), Zipf loads, and the balancedness metric.
#include <doctest/doctest.h>

#include <numeric>
#include <stdexcept>
#include <vector>

#include "runtime/eplb.hpp"
#include "runtime/expert_load.hpp"

using namespace petrel::eplb;

TEST_CASE("expert_load: the recorder sums exactly the last W steps") {
  expert_load_recorder r(2, 4, 3);
  // Step s routes s+1 tokens to expert s % 4 in layer 0, and one token to expert 3 in layer 1.
  for (int s = 0; s < 5; ++s) {
    std::vector<int32_t> ids(s + 1, s % 4);
    r.record_topk(0, ids);
    r.record_counts(1, std::vector<int64_t>{0, 0, 0, 1});
    if (s < 4) r.next_step();
  }
  // Open step is 4; window holds steps 2, 3, 4.
  const auto w = r.window_load();
  CHECK(w[0] == std::vector<double>{5, 0, 3, 4});
  CHECK(w[1] == std::vector<double>{0, 0, 0, 3});
  CHECK(r.steps_recorded() == 4);
  r.next_step();
  r.next_step();
  CHECK(r.window_load()[0] == std::vector<double>{5, 0, 0, 0});
  r.next_step();
  CHECK(r.window_load()[0] == std::vector<double>{0, 0, 0, 0});
}

TEST_CASE("expert_load: padding ids are counted as dropped, bad shapes throw") {
  expert_load_recorder r(1, 4, 2);
  r.record_topk(0, std::vector<int32_t>{0, -1, 3, 4, 1});
  CHECK(r.dropped() == 2);
  CHECK(r.window_load()[0] == std::vector<double>{1, 1, 0, 1});
  CHECK_THROWS_AS(r.record_topk(1, std::vector<int32_t>{0}), std::out_of_range);
  CHECK_THROWS_AS(r.record_counts(0, std::vector<int64_t>{1, 2}), std::invalid_argument);
  CHECK_THROWS_AS(expert_load_recorder(0, 4, 2), std::invalid_argument);
  expert_load_recorder other(2, 4, 2);
  CHECK_THROWS_AS(r.merge_window_of(other), std::invalid_argument);
}

TEST_CASE("expert_load: JSON dump restores the ring, and its load feeds EPLB") {
  expert_load_recorder r(2, 8, 4);
  for (int s = 0; s < 6; ++s) {
    std::vector<int64_t> c(8);
    for (int e = 0; e < 8; ++e) c[e] = (s * 7 + e * 3) % 11;
    r.record_counts(0, c);
    r.record_counts(1, c);
    r.next_step();
  }
  r.record_topk(0, std::vector<int32_t>{1, 2, 2});
  const auto j = r.to_json();
  CHECK(j["format"] == "petrel.expert_load.v1");
  auto back = expert_load_recorder::from_json(j);
  CHECK(back.window_load() == r.window_load());
  CHECK(back.steps_recorded() == r.steps_recorded());
  // The restored ring keeps evicting in the same order.
  r.next_step();
  back.next_step();
  CHECK(back.window_load() == r.window_load());
  CHECK(load_matrix_from_json(r.to_json()) == r.window_load());
  // A merged recorder holds the sum of both windows.
  expert_load_recorder m(2, 8, 4);
  m.merge_window_of(r);
  m.merge_window_of(back);
  const auto wm = m.window_load(), wr = r.window_load();
  for (int e = 0; e < 8; ++e) CHECK(wm[0][e] == 2 * wr[0][e]);
  // Corrupted dumps name the field.
  auto bad = r.to_json();
  bad["windows"][1][0][3] = -5;
  CHECK_THROWS_WITH_AS(expert_load_recorder::from_json(bad), doctest::Contains("windows[1][0][3]"),
                       std::invalid_argument);
  bad = r.to_json();
  bad.erase("window");
  CHECK_THROWS_WITH_AS(expert_load_recorder::from_json(bad), doctest::Contains("\"window\""), std::invalid_argument);
}

TEST_CASE("expert_load: load_matrix_from_json accepts the three forms and rejects the rest") {
  const auto plain = nlohmann::json::parse("[[1, 2], [3, 4.5]]");
  CHECK(load_matrix_from_json(plain) == expert_load_matrix{{1, 2}, {3, 4.5}});
  CHECK(load_matrix_from_json({{"weight", plain}}) == expert_load_matrix{{1, 2}, {3, 4.5}});
  CHECK_THROWS_AS(load_matrix_from_json(nlohmann::json::parse("[[1, 2], [3]]")), std::invalid_argument);
  CHECK_THROWS_AS(load_matrix_from_json(nlohmann::json::parse("{\"w\": [[1]]}")), std::invalid_argument);
  CHECK_THROWS_AS(load_matrix_from_json(nlohmann::json::parse("[]")), std::invalid_argument);
}

TEST_CASE("expert_load: zipf_load is seeded, routes top_k per token, and skews with s") {
  const auto a = zipf_load(3, 64, 8, 1000, 1.0, 42);
  const auto b = zipf_load(3, 64, 8, 1000, 1.0, 42);
  CHECK(a == b);
  for (const auto& layer : a) {
    CHECK(std::accumulate(layer.begin(), layer.end(), 0.0) == 8000);
    // top-8 distinct: no expert is picked more than once per token.
    for (double x : layer) CHECK(x <= 1000);
  }
  auto max_share = [](const expert_load_matrix& m) {
    return *std::max_element(m[0].begin(), m[0].end()) / std::accumulate(m[0].begin(), m[0].end(), 0.0);
  };
  CHECK(max_share(zipf_load(1, 64, 8, 4000, 1.2, 1)) > max_share(zipf_load(1, 64, 8, 4000, 0.0, 1)));
  // Extreme skew with top_k = all experts stays fast and still routes every expert exactly once per token.
  const auto all = zipf_load(1, 16, 16, 200, 6.0, 9);
  for (double x : all[0]) CHECK(x == 200);
}

TEST_CASE("expert_load: balancedness of hand-made placements") {
  // 4 experts, loads 30/10/10/10 on 2 GPUs (identity: GPU0 = {0,1} = 40, GPU1 = {2,3} = 20): mean 30 / max 40.
  const expert_load_matrix w = {{30, 10, 10, 10}};
  const auto id = identity_placement(1, 4);
  const auto g = gpu_loads(id, w, 0, 2);
  CHECK(g == std::vector<double>{40, 20});
  CHECK(balancedness(id, w, 2).mean == doctest::Approx(0.75));
  // Two replicas of expert 0 split its load: slots {0, 1 | 0, 2 | 3 ...}.
  expert_placement p = identity_placement(1, 4);
  p.num_replicas = 6;
  p.phy2log = {{0, 1, 2, 0, 3, 3}};
  p.logcnt = {{2, 1, 1, 2}};
  // GPU0 = 15 + 10 + 10 = 35, GPU1 = 15 + 5 + 5 = 25 -> 30 / 35.
  CHECK(gpu_loads(p, w, 0, 2) == std::vector<double>{35, 25});
  CHECK(balancedness(p, w, 2).step_weighted == doctest::Approx(30.0 / 35.0));
  // Uneven GPUs: 256 slots on 72 GPUs, each GPU gets 3 or 4 slots and everything is counted once.
  const auto big = identity_placement(1, 256);
  const expert_load_matrix ones = {std::vector<double>(256, 1.0)};
  const auto g72 = gpu_loads(big, ones, 0, 72);
  CHECK(std::accumulate(g72.begin(), g72.end(), 0.0) == 256);
  for (double x : g72) CHECK((x == 3 || x == 4));
  CHECK_THROWS_AS(balancedness(big, w, 2), std::invalid_argument);
}
