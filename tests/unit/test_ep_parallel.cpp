// Expert parallelism in one process (real threads, real all-to-alls through the in-process exchange): EP = 2, 3
// and 4 give the same greedy ids and logits (within 1e-5) as the plain single-rank model, with and without
// redundant experts, in normal and low-latency mode, with two-batch overlap, on the Hugging Face fixtures and
// the embedded fortune-moe model. Prompts are spread over the ranks (DP attention), so some ranks run
// zero-token steps while serving the others' experts.
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "runtime/ep_group.hpp"
#include "runtime/generation.hpp"

using namespace petrel;
using namespace petrel::ep;
namespace fs = std::filesystem;

namespace {

std::vector<fs::path> golden_dirs() {
  std::vector<fs::path> out;
  fs::path root = fs::path(PETREL_SOURCE_DIR) / "tests/data/golden";
  if (!fs::is_directory(root)) return out;
  for (auto& e : fs::directory_iterator(root))
    if (e.is_directory() && fs::exists(e.path() / "golden.json")) out.push_back(e.path());
  std::sort(out.begin(), out.end());
  return out;
}

/// Three prompts: the fixture's, and two of other lengths (so ranks prefill different amounts).
std::vector<std::vector<int32_t>> prompts_for(const fs::path& dir) {
  nlohmann::json g = nlohmann::json::parse(std::ifstream(dir / "golden.json"));
  auto ids = g.at("input_ids").get<std::vector<int32_t>>();
  const int32_t V = g.at("vocab_size").get<int32_t>();
  std::vector<int32_t> b, c;
  for (size_t i = 0; i < 5; ++i) b.push_back(int32_t((ids[i % ids.size()] * 7 + 3) % V));
  for (size_t i = 0; i < 13; ++i) c.push_back(int32_t((i * 31 + 11) % size_t(V)));
  return {ids, b, c};
}

struct reference {
  std::vector<generate_result> results;
};

reference plain_reference(const fs::path& dir, const std::vector<std::vector<int32_t>>& prompts,
                          const generate_options& o) {
  auto be = make_backend("cpu");
  auto model = deepseek_model::load(dir, *be);
  kv_pool kv(*be, model->config(), 64, 16);
  reference r;
  for (const auto& p : prompts) r.results.push_back(generate(*model, kv, p, o));
  return r;
}

/// max |a - b| relative to max(1, max |b|).
double max_rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double w = 0, top = 1;
  for (size_t i = 0; i < a.size(); ++i) {
    w = std::max(w, double(std::fabs(a[i] - b[i])));
    top = std::max(top, double(std::fabs(b[i])));
  }
  return w / top;
}

void check_same(const reference& ref, const std::vector<generate_result>& got) {
  REQUIRE(got.size() == ref.results.size());
  for (size_t i = 0; i < got.size(); ++i) {
    CAPTURE(i);
    CHECK(got[i].output_ids == ref.results[i].output_ids);
    if (!ref.results[i].prompt_logits.empty()) {
      // Within 1e-5 of the largest logit (1e-5 absolute when logits are small): the single-rank reference
      // batches the prompts differently, and OpenBLAS sums differently for different row counts.
      const double d = max_rel_diff(got[i].prompt_logits, ref.results[i].prompt_logits);
      CHECK(d <= 1e-5);
    }
  }
}

struct ep_case {
  int size, redundant;
  ep_mode mode;
  bool tbo;
};

} // namespace

TEST_CASE("EP = 2, 3, 4 match EP = 1 on the Hugging Face fixtures (greedy ids, logits within 1e-5)") {
  const auto dirs = golden_dirs();
  if (dirs.empty()) {
    MESSAGE("no golden fixtures");
    return;
  }
  generate_options o;
  o.max_new_tokens = 8;
  o.prompt_logits = true;
  // 8 experts per layer: EP 3 without redundancy holds 3/3/2 experts; with 1 or 4 redundant slots 3 or 4 each.
  const std::vector<ep_case> cases = {
      {2, 0, ep_mode::normal, false},      {3, 0, ep_mode::normal, false},     {4, 0, ep_mode::normal, false},
      {2, 2, ep_mode::normal, false},      {3, 1, ep_mode::normal, false},     {4, 4, ep_mode::normal, false},
      {2, 0, ep_mode::low_latency, false}, {3, 4, ep_mode::low_latency, false}, {4, 0, ep_mode::low_latency, false},
      {4, 4, ep_mode::low_latency, false},
  };
  for (const fs::path& dir : dirs) {
    CAPTURE(dir.filename().string());
    const auto prompts = prompts_for(dir);
    const reference ref = plain_reference(dir, prompts, o);
    for (const ep_case& c : cases) {
      CAPTURE(c.size);
      CAPTURE(c.redundant);
      CAPTURE(mode_name(c.mode));
      ep_group_options go;
      go.size = c.size;
      go.redundant = c.redundant;
      go.rank.mode = c.mode;
      auto group = ep_group::load(dir, go);
      check_same(ref, generate_ep(*group, prompts, o));
      int64_t ll = 0, rows = 0;
      for (int r = 0; r < group->size(); ++r) {
        ll += group->rank(r).stats().low_latency_steps;
        rows += group->rank(r).stats().expert_rows;
        // Each rank holds only its own slots.
        const ep_placement& pl = group->rank(r).placement();
        for (const auto& layer : group->rank(r).store().slots) CHECK(int(layer.size()) == pl.num_local(r));
        for (const auto& layer : group->rank(r).model().weights().layers) CHECK(layer.experts.empty());
      }
      CHECK(rows > 0);
      if (c.mode == ep_mode::low_latency) CHECK(ll > 0); // decode steps went through the masked layout
      else CHECK(ll == 0);
    }
  }
}

TEST_CASE("EP with two-batch overlap gives the same outputs (TBO on fixtures, 6 prompts over 2 and 3 ranks)") {
  const auto dirs = golden_dirs();
  if (dirs.empty()) return;
  const fs::path dir = dirs.front();
  auto prompts = prompts_for(dir);
  auto more = prompts;
  for (auto p : more) {
    p.push_back(7);
    prompts.push_back(p);
  }
  generate_options o;
  o.max_new_tokens = 6;
  o.prompt_logits = true;
  const reference ref = plain_reference(dir, prompts, o);
  for (const ep_case& c : std::vector<ep_case>{{2, 0, ep_mode::normal, true},
                                               {3, 1, ep_mode::low_latency, true},
                                               {1, 0, ep_mode::normal, true}}) {
    CAPTURE(c.size);
    ep_group_options go;
    go.size = c.size;
    go.redundant = c.redundant;
    go.rank.mode = c.mode;
    go.rank.two_batch_overlap = true;
    auto group = ep_group::load(dir, go);
    check_same(ref, generate_ep(*group, prompts, o));
  }
}

TEST_CASE("TBO cuts a lone prefill sequence in two: same logits and ids, chunked or not") {
  const auto dirs = golden_dirs();
  if (dirs.empty()) return;
  const fs::path dir = dirs.back();
  const auto prompts = prompts_for(dir); // 3 prompts on 3 ranks: one sequence per rank
  for (int64_t chunk : {int64_t(0), int64_t(5)}) {
    CAPTURE(chunk);
    generate_options o;
    o.max_new_tokens = 6;
    o.prompt_logits = true;
    o.prefill_chunk = chunk;
    const reference ref = plain_reference(dir, prompts, o);
    ep_group_options go;
    go.size = 3;
    go.redundant = 1;
    go.rank.two_batch_overlap = true;
    auto group = ep_group::load(dir, go);
    check_same(ref, generate_ep(*group, prompts, o));
    o.prompt_logits = false; // only the last row of the second half is returned
    const reference ref2 = plain_reference(dir, prompts, o);
    check_same(ref2, generate_ep(*group, prompts, o));
  }
}

TEST_CASE("EP on the embedded fortune-moe model reproduces the reference greedy continuations") {
  const fs::path dir = fs::path(PETREL_SOURCE_DIR) / "tests/data/fortune-moe";
  if (!fs::exists(dir / "model.safetensors")) return;
  auto ref = nlohmann::json::parse(std::ifstream(dir / "reference_bpb.json"));
  std::vector<std::vector<int32_t>> prompts, want;
  for (auto& g : ref.at("greedy")) {
    prompts.push_back(g.at("prompt_ids").get<std::vector<int32_t>>());
    want.push_back(g.at("greedy_ids").get<std::vector<int32_t>>());
    if (prompts.size() == 4) break;
  }
  size_t longest = 0;
  for (auto& w : want) longest = std::max(longest, w.size());
  generate_options o;
  o.max_new_tokens = int64_t(longest);
  o.prompt_logits = true;
  const reference plain = plain_reference(dir, prompts, o);
  for (const ep_case& c : std::vector<ep_case>{{2, 0, ep_mode::normal, false},
                                               {3, 1, ep_mode::low_latency, true},
                                               {4, 4, ep_mode::normal, true}}) {
    CAPTURE(c.size);
    ep_group_options go;
    go.size = c.size;
    go.redundant = c.redundant;
    go.rank.mode = c.mode;
    go.rank.two_batch_overlap = c.tbo;
    auto group = ep_group::load(dir, go);
    auto got = generate_ep(*group, prompts, o);
    check_same(plain, got);
    for (size_t i = 0; i < want.size(); ++i) {
      std::vector<int32_t> head(got[i].output_ids.begin(), got[i].output_ids.begin() + std::ptrdiff_t(want[i].size()));
      CHECK(head == want[i]);
    }
  }
}

TEST_CASE("a rank that fails its step aborts the group instead of leaving its peers waiting") {
  const auto dirs = golden_dirs();
  if (dirs.empty()) return;
  ep_group_options go;
  go.size = 3;
  auto group = ep_group::load(dirs.front(), go);
  const model_config& cfg = group->config();
  std::vector<std::unique_ptr<kv_pool>> pools;
  std::vector<kv_pool*> kv;
  for (int r = 0; r < 3; ++r) {
    pools.push_back(std::make_unique<kv_pool>(group->rank_backend(r), cfg, 4, 16));
    kv.push_back(pools.back().get());
  }
  kv_page_table t0, t1;
  REQUIRE(pools[0]->reserve(t0, 4));
  REQUIRE(pools[1]->reserve(t1, 4));
  std::vector<int32_t> good = {1, 2, 3}, bad = {1, int32_t(cfg.vocab_size) + 5};
  std::vector<std::vector<sequence_step>> batches(3);
  batches[0].push_back({good, 0, t0.pages, false});
  batches[1].push_back({bad, 0, t1.pages, false}); // rank 1 throws before its first all-to-all
  std::vector<step_result> outs(3);
  CHECK_THROWS_WITH_AS(group->step(batches, kv, outs), doctest::Contains("outside the vocabulary"),
                       std::invalid_argument);
}
