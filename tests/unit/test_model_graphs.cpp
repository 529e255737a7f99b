// deepseek_model's fixed-layout decode step (the path CUDA graphs capture, runtime/model.cpp forward_graph) run
// eagerly on the cpu backend: same logits and routing counts as the ordinary path, across batch buckets, context
// bounds and padding rows; bad input still gets a clear error. test_cuda_backend runs the same check on the GPU.
#include <doctest/doctest.h>

#include <filesystem>
#include <stdexcept>
#include <string>

#include "model_graphs_check.hpp"
#include "runtime/backend.hpp"

using namespace petrel;
namespace fs = std::filesystem;

namespace {
const std::vector<int> kPrompts{5, 30, 62, 17, 9};
const std::vector<std::vector<int>> kRounds{{0, 1, 2, 3, 4}, {1, 3}, {2}, {0, 1, 2, 3, 4}};
} // namespace

TEST_CASE("model graphs: the fixed-layout decode path matches the ordinary path on cpu (fortune-moe, golden)") {
  auto be = make_backend("cpu");
  for (const char* rel : {"tests/data/fortune-moe", "tests/data/golden/tiny_fp32", "tests/data/golden/yarn"}) {
    fs::path dir = fs::path(PETREL_SOURCE_DIR) / rel;
    if (!fs::exists(dir / "config.json")) continue;
    CAPTURE(rel);
    graphs_check::outcome o = graphs_check::run(*be, dir, kPrompts, kRounds, 4, true);
    MESSAGE(std::string(rel), ": steps=", o.steps, " fixed_layout=", o.fixed_layout, " bitwise=", o.bitwise,
            " max_rel=", o.worst_rel);
    CHECK(o.fixed_layout == o.steps);
    CHECK(o.replayed == 0); // the cpu backend has no graphs
    CHECK(o.worst_rel <= 1e-5);
  }
}

TEST_CASE("model graphs: off by default on cpu, and bad input still throws on the fixed-layout path") {
  auto be = make_backend("cpu");
  fs::path dir = fs::path(PETREL_SOURCE_DIR) / "tests/data/fortune-moe";
  if (!fs::exists(dir / "config.json")) return;
  auto m = deepseek_model::load(dir, *be);
  kv_pool kv(*be, m->config(), 8, 16);
  std::vector<int32_t> prompt{1, 2, 3}, pages{0, 1}, bad{int32_t(m->config().vocab_size)}, tok{4};
  step_result r;
  sequence_step p{prompt, 0, pages, false};
  m->forward({&p, 1}, kv, r);
  sequence_step d{tok, 3, pages, false};
  m->forward({&d, 1}, kv, r);
  CHECK(m->last_step_mode() == 0); // graphs are off unless asked for (and the cpu backend has none)
  m->set_decode_graphs(true, true);
  sequence_step b{bad, 4, pages, false};
  CHECK_THROWS_AS(m->forward({&b, 1}, kv, r), std::invalid_argument);
  sequence_step f{tok, 40, pages, false}; // needs 41 tokens, the table holds 32
  CHECK_THROWS_AS(m->forward({&f, 1}, kv, r), std::invalid_argument);
  m->forward({&d, 1}, kv, r);
  CHECK(m->last_step_mode() == 1);
}
