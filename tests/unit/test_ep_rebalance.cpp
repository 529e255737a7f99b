// Live EPLB rebalancing inside an EP group: the placement changes in the middle of a generation, the expert
// weights travel between ranks through the transport (never re-read from the checkpoint), every rank switches at
// the same step boundary, and the outputs do not change. Plus the placement file checks (--init-expert-location).
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "runtime/ep_group.hpp"
#include "runtime/generation.hpp"

using namespace petrel;
using namespace petrel::ep;
namespace fs = std::filesystem;

namespace {

const fs::path kFortune = fs::path(PETREL_SOURCE_DIR) / "tests/data/fortune-moe";
const fs::path kTiny = fs::path(PETREL_SOURCE_DIR) / "tests/data/golden/tiny_fp32";

std::vector<std::vector<int32_t>> some_prompts(int n, int32_t vocab) {
  std::vector<std::vector<int32_t>> out;
  for (int i = 0; i < n; ++i) {
    std::vector<int32_t> p;
    for (int j = 0; j < 6 + 3 * i; ++j) p.push_back(int32_t((j * 37 + i * 101 + 5) % vocab));
    out.push_back(p);
  }
  return out;
}

std::vector<generate_result> plain(const fs::path& dir, const std::vector<std::vector<int32_t>>& prompts,
                                   const generate_options& o) {
  auto be = make_backend("cpu");
  auto model = deepseek_model::load(dir, *be);
  kv_pool kv(*be, model->config(), 64, 16);
  std::vector<generate_result> r;
  for (const auto& p : prompts) r.push_back(generate(*model, kv, p, o));
  return r;
}

void check_same(const std::vector<generate_result>& want, const std::vector<generate_result>& got) {
  REQUIRE(got.size() == want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    CAPTURE(i);
    CHECK(got[i].output_ids == want[i].output_ids);
    REQUIRE(got[i].prompt_logits.size() == want[i].prompt_logits.size());
    double d = 0, top = 1;
    for (size_t j = 0; j < got[i].prompt_logits.size(); ++j) {
      d = std::max(d, double(std::fabs(got[i].prompt_logits[j] - want[i].prompt_logits[j])));
      top = std::max(top, double(std::fabs(want[i].prompt_logits[j])));
    }
    // 1e-5 of the largest logit (at least 1e-5 absolute): the single-rank model batches other prompts
    // differently, and OpenBLAS sums differently for different row counts.
    CHECK(d <= 1e-5 * top);
  }
}

/// Every slot a rank holds carries exactly the weights of the logical expert its placement names.
void check_store_matches_checkpoint(ep_group& g, const fs::path& dir) {
  auto be = make_backend("cpu");
  auto full = deepseek_model::load(dir, *be);
  const model_config& cfg = full->config();
  for (int r = 0; r < g.size(); ++r) {
    const ep_placement& pl = g.rank(r).placement();
    int ml = 0;
    for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
      if (!cfg.is_moe_layer(l)) continue;
      const auto& slots = g.rank(r).store().slots[size_t(ml)];
      REQUIRE(int(slots.size()) == pl.num_local(r));
      for (int j = 0; j < pl.num_local(r); ++j) {
        const int e = pl.phy2log[size_t(ml)][size_t(pl.slot_begin(r) + j)];
        const mlp_weights& want = full->weights().layers[size_t(l)].experts[size_t(e)];
        CHECK(std::memcmp(slots[size_t(j)].gate_up.data(), want.gate_up.data(), want.gate_up.bytes()) == 0);
        CHECK(std::memcmp(slots[size_t(j)].down.data(), want.down.data(), want.down.bytes()) == 0);
      }
      ++ml;
    }
  }
}

} // namespace

TEST_CASE("a live rebalance in the middle of a generation moves experts and leaves the outputs unchanged") {
  if (!fs::exists(kFortune / "model.safetensors")) return;
  const auto prompts = some_prompts(4, 256);
  generate_options o;
  o.max_new_tokens = 12;
  o.prompt_logits = true;
  const auto want = plain(kFortune, prompts, o);

  ep_group_options go;
  go.size = 2;
  go.redundant = 2;
  auto g = ep_group::load(kFortune, go);
  const ep_placement before = g->rank(0).placement();
  std::vector<ep_placement> seen_at_step;
  auto got = generate_ep(*g, prompts, o, 16, [&](int64_t step, ep_group& grp) {
    if (step == 5) grp.rank(1).request_rebalance(); // any rank may ask
    seen_at_step.push_back(grp.rank(0).placement());
  });
  check_same(want, got);
  int64_t moved = 0;
  for (int r = 0; r < g->size(); ++r) {
    CHECK(g->rank(r).stats().rebalances == 1);
    CHECK(g->rank(r).placement() == g->rank(0).placement()); // every rank switched
    moved += g->rank(r).stats().experts_moved_in;
  }
  CHECK(moved > 0);
  CHECK_FALSE(g->rank(0).placement() == before);
  // Requested before step 5: loads gathered and weights sent during step 5, switched at the start of step 6.
  REQUIRE(seen_at_step.size() > 7);
  CHECK(seen_at_step[6] == before);
  CHECK_FALSE(seen_at_step[7] == before);
  check_store_matches_checkpoint(*g, kFortune);
}

TEST_CASE("periodic rebalancing with EP 4, low-latency mode and two-batch overlap keeps the outputs") {
  if (!fs::exists(kTiny / "golden.json")) return;
  const auto prompts = some_prompts(8, 512);
  generate_options o;
  o.max_new_tokens = 10;
  o.prompt_logits = true;
  const auto want = plain(kTiny, prompts, o);
  ep_group_options go;
  go.size = 4;
  go.redundant = 4;
  go.rank.mode = ep_mode::low_latency;
  go.rank.two_batch_overlap = true;
  go.rank.rebalance_every = 3;
  auto g = ep_group::load(kTiny, go);
  check_same(want, generate_ep(*g, prompts, o));
  int64_t switched = 0;
  for (int r = 0; r < g->size(); ++r) {
    switched += g->rank(r).stats().rebalances;
    CHECK(g->rank(r).placement() == g->rank(0).placement());
  }
  CHECK(switched >= 4); // at least one switch, on every rank
  check_store_matches_checkpoint(*g, kTiny);
}

TEST_CASE("placements: identity, EPLB-initial, and the checks on --init-expert-location files") {
  if (!fs::exists(kTiny / "golden.json")) return;
  const model_config cfg = model_config::load(kTiny); // 8 experts, 2 MoE layers
  SUBCASE("initial placements") {
    ep_placement p = initial_placement(cfg, 3, 0);
    CHECK(p.num_slots == 8);
    CHECK(p.num_local(0) == 3);
    CHECK(p.num_local(1) == 3);
    CHECK(p.num_local(2) == 2);
    for (int s = 0; s < 8; ++s) CHECK(p.slot_begin(p.owner(s)) <= s);
    ep_placement q = initial_placement(cfg, 4, 4);
    CHECK(q.num_slots == 12);
    for (const auto& layer : q.log2phy)
      for (const auto& reps : layer) CHECK(!reps.empty());
    CHECK_THROWS_WITH_AS(initial_placement(cfg, 3, 2), doctest::Contains("do not divide evenly over 3 ranks"),
                         std::invalid_argument);
  }
  SUBCASE("a file from `petrel eplb` is accepted and validated against the model and the group") {
    nlohmann::json good = {{"phy2log", {{0, 1, 2, 3, 4, 5, 6, 7, 0, 1}, {7, 6, 5, 4, 3, 2, 1, 0, 3, 3}}},
                           {"logcnt", nlohmann::json::array()}};
    ep_placement p = placement_from_json(good, cfg, 2);
    CHECK(p.num_slots == 10);
    CHECK(p.log2phy[1][3] == std::vector<int32_t>{4, 8, 9});
    auto bad = [&](nlohmann::json j, int ranks, const char* msg) {
      CAPTURE(j.dump());
      CHECK_THROWS_WITH_AS(placement_from_json(j, cfg, ranks), doctest::Contains(msg), std::invalid_argument);
    };
    bad(good, 3, "do not divide evenly over 3 ranks");
    bad({{"phy2log", {{0, 1, 2, 3, 4, 5, 6, 7}}}}, 2, "has 1 layers but the model has 2 MoE layers");
    bad({{"phy2log", {{0, 1, 2, 3, 4, 5, 6, 8}, {0, 1, 2, 3, 4, 5, 6, 7}}}}, 2, "= 8 is not an expert id");
    bad({{"phy2log", {{0, 1, 2, 3, 4, 5, 6, 6}, {0, 1, 2, 3, 4, 5, 6, 7}}}}, 2, "places no replica of expert 7");
    bad({{"phy2log", {{0, 1, 2, 3, 4, 5, 6, 7}, {0, 1, 2, 3, 4, 5, 6, 7, 0, 1}}}}, 2, "layer 1 has 10 slots");
    bad({{"phy2log", {{0, 1, 2, 3, 4, 5, 6, "x"}, {0, 1, 2, 3, 4, 5, 6, 7}}}}, 2, "is not an integer");
    bad({{"weight", {1, 2}}}, 2, "\"phy2log\"");
    bad(nlohmann::json::array(), 2, "\"phy2log\"");
  }
  SUBCASE("files: missing, not JSON, inconsistent with --redundant, uneven with live rebalancing") {
    const fs::path d = fs::temp_directory_path() / ("petrel_ep_place_" + std::to_string(::getpid()));
    fs::create_directories(d);
    CHECK_THROWS_WITH_AS(placement_from_file((d / "none.json").string(), cfg, 2), doctest::Contains("none.json"),
                         std::invalid_argument);
    std::ofstream(d / "junk.json") << "{\"phy2log\": [[1, 2,";
    CHECK_THROWS_WITH_AS(placement_from_file((d / "junk.json").string(), cfg, 2),
                         doctest::Contains("junk.json: not valid JSON"), std::invalid_argument);
    std::ofstream(d / "ten.json") << R"({"phy2log": [[0,1,2,3,4,5,6,7,0,1],[0,1,2,3,4,5,6,7,2,3]]})";
    ep_group_options go;
    go.size = 2;
    go.redundant = 4;
    go.init_expert_location = (d / "ten.json").string();
    CHECK_THROWS_WITH_AS(ep_group::load(kTiny, go), doctest::Contains("--redundant 4 asks for 12"),
                         std::invalid_argument);
    go.redundant = 0;
    go.size = 3;
    CHECK_THROWS_WITH_AS(ep_group::load(kTiny, go), doctest::Contains("ten.json: 10 slots per layer"),
                         std::invalid_argument);
    ep_group_options uneven;
    uneven.size = 3;
    uneven.rank.rebalance_every = 4;
    CHECK_THROWS_WITH_AS(ep_group::load(kTiny, uneven), doctest::Contains("needed for live rebalancing"),
                         std::invalid_argument);
    fs::remove_all(d);
  }
}

TEST_CASE("two-batch overlap: one micro-batch's all-to-all is in flight while the other computes") {
  if (!fs::exists(kTiny / "golden.json")) return;
  // The real in-process exchange, with a log of the order in which the rank starts and waits on each tag.
  struct logged_transport final : ep_transport {
    ep_transport& inner;
    std::vector<std::pair<char, uint64_t>> log;
    explicit logged_transport(ep_transport& t) : inner(t) {}
    int rank() const override { return inner.rank(); }
    int size() const override { return inner.size(); }
    void start_all_to_all(uint64_t tag, std::span<const std::span<const std::byte>> send) override {
      log.emplace_back('s', tag);
      inner.start_all_to_all(tag, send);
    }
    void wait_all_to_all(uint64_t tag, std::vector<byte_buffer>& recv) override {
      log.emplace_back('w', tag);
      inner.wait_all_to_all(tag, recv);
    }
    void abort(const std::string& r) override { inner.abort(r); }
  };
  inprocess_exchange x(1);
  auto inner = x.make_rank(0);
  logged_transport t(*inner);
  auto be = make_backend("cpu");
  const model_config cfg = model_config::load(kTiny);
  ep_options opt;
  opt.two_batch_overlap = true;
  ep_rank rank(deepseek_model::load(kTiny, *be), initial_placement(cfg, 1, 0), t, opt);
  kv_pool kv(*be, cfg, 8, 16);
  kv_page_table a, b;
  REQUIRE(kv.reserve(a, 8));
  REQUIRE(kv.reserve(b, 8));
  std::vector<int32_t> pa = {1, 2, 3, 4}, pb = {5, 6, 7, 8};
  std::vector<sequence_step> batch = {{pa, 0, a.pages, false}, {pb, 0, b.pages, false}};
  step_result out;
  rank.step(batch, kv, out);
  CHECK(out.row_offset == std::vector<int64_t>{0, 1, 2});
  auto at = [&](char kind, int mb, int layer, exchange_phase ph) {
    const uint64_t tag = make_tag(0, mb, layer, ph);
    for (size_t i = 0; i < t.log.size(); ++i)
      if (t.log[i] == std::make_pair(kind, tag)) return int(i);
    FAIL("no ", kind, " for micro-batch ", mb, " layer ", layer);
    return -1;
  };
  for (int layer = 0; layer < int(cfg.num_hidden_layers); ++layer) {
    if (!cfg.is_moe_layer(layer)) continue;
    CAPTURE(layer);
    using P = exchange_phase;
    // micro-batch 1 dispatches (after computing its attention) before micro-batch 0 waits for its dispatch,
    CHECK(at('s', 0, layer, P::dispatch) < at('s', 1, layer, P::dispatch));
    CHECK(at('s', 1, layer, P::dispatch) < at('w', 0, layer, P::dispatch));
    // micro-batch 0's combine travels while micro-batch 1 runs its experts,
    CHECK(at('s', 0, layer, P::combine) < at('w', 1, layer, P::dispatch));
    CHECK(at('s', 1, layer, P::combine) < at('w', 0, layer, P::combine));
    // and micro-batch 1's combine while micro-batch 0 goes on to its next layer's attention and dispatch.
    CHECK(at('w', 0, layer, P::combine) < at('w', 1, layer, P::combine));
    if (layer + 1 < int(cfg.num_hidden_layers) && cfg.is_moe_layer(layer + 1))
      CHECK(at('s', 0, layer + 1, P::dispatch) < at('w', 1, layer, P::combine));
  }
}

TEST_CASE("the in-process exchange: start/wait halves, per-tag matching, delay, abort") {
  inprocess_exchange x(2, std::chrono::microseconds(20000));
  auto a = x.make_rank(0), b = x.make_rank(1);
  byte_buffer a0{std::byte{1}}, a1{std::byte{2}, std::byte{3}}, b0{}, b1{std::byte{9}};
  std::vector<std::span<const std::byte>> sa = {a0, a1}, sb = {b0, b1};
  const auto t0 = std::chrono::steady_clock::now();
  a->start_all_to_all(7, sa);
  a->start_all_to_all(8, sa); // two tags in flight
  b->start_all_to_all(8, sb);
  b->start_all_to_all(7, sb);
  std::vector<byte_buffer> got;
  b->wait_all_to_all(7, got);
  CHECK(std::chrono::steady_clock::now() - t0 >= std::chrono::microseconds(20000)); // the simulated wire time
  REQUIRE(got.size() == 2);
  CHECK(got[0] == a1);
  CHECK(got[1] == b1);
  a->wait_all_to_all(8, got);
  CHECK(got[0] == a0);
  CHECK(got[1].empty());
  std::thread waiter([&] {
    std::vector<byte_buffer> g;
    CHECK_THROWS_AS(b->wait_all_to_all(99, g), transport_error);
  });
  a->abort("rank 0 failed");
  waiter.join();
}

TEST_CASE("the in-process exchange calls every rank's abort hook once, and never a removed one") {
  // The hook is how a rank waiting on the GPU (not in this transport) learns that its group failed.
  inprocess_exchange x(3);
  auto r0 = x.make_rank(0), r1 = x.make_rank(1), r2 = x.make_rank(2);
  std::vector<std::string> seen(3);
  int calls = 0;
  r0->on_abort([&](const std::string& why) { seen[0] = why, ++calls; });
  r1->on_abort([&](const std::string& why) { seen[1] = why, ++calls; });
  r2->on_abort([&](const std::string& why) { seen[2] = why, ++calls; });
  r2->on_abort({}); // rank 2 went away: its hook must not run
  r1->abort("rank 1 failed its step");
  r0->abort("a second abort changes nothing");
  CHECK(calls == 2);
  CHECK(seen[0] == "rank 1 failed its step");
  CHECK(seen[1] == "rank 1 failed its step");
  CHECK(seen[2].empty());
  // A hook set after the abort hears it at once (a rank that joins a failed group does not wait).
  std::string late;
  r2->on_abort([&](const std::string& why) { late = why; });
  CHECK(late == "rank 1 failed its step");
}
