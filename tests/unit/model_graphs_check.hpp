// Shared by test_model_graphs (cpu: the fixed-layout decode path run eagerly) and test_cuda_backend (cuda: the
// same path captured and replayed as CUDA graphs): decode steps through deepseek_model's graph path give the
// logits and routing counts of the ordinary path. Header only (tests/unit/*.cpp are executables).
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "runtime/kv_cache.hpp"
#include "runtime/model.hpp"

namespace petrel::graphs_check {

struct outcome {
  double worst_rel = 0;   // max |graph - eager| / max |eager| over every decode step
  int steps = 0, replayed = 0, fixed_layout = 0;
  bool bitwise = true;
};

/// Two models on one backend (the same weights): `g` with decode graphs on, `e` without. Prefills `prompts`,
/// then decodes in rounds; each round takes the sequences in `rounds[r]` (indices) for `steps` steps, the next
/// tokens being the eager model's greedy picks. Checks every step's logits and routing counts.
inline outcome run(backend& be, const std::filesystem::path& dir, const std::vector<int>& prompt_lens,
                   const std::vector<std::vector<int>>& rounds, int steps, bool force_without_graphs) {
  auto g = deepseek_model::load(dir, be);
  auto e = deepseek_model::load(dir, be);
  g->set_decode_graphs(true, force_without_graphs);
  e->set_decode_graphs(false);
  const int32_t ps = 16, per_seq = 16; // 256 tokens a sequence
  const int n = int(prompt_lens.size());
  kv_pool gkv(be, g->config(), n * per_seq, ps), ekv(be, e->config(), n * per_seq, ps);
  const int64_t V = g->config().vocab_size;
  std::vector<std::vector<int32_t>> pages(static_cast<size_t>(n)), toks(static_cast<size_t>(n));
  std::vector<int64_t> len(static_cast<size_t>(n));
  std::mt19937 rng(7);
  std::vector<int32_t> next(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    for (int32_t p = 0; p < per_seq; ++p) pages[size_t(i)].push_back(i * per_seq + p);
    for (int k = 0; k < prompt_lens[size_t(i)]; ++k) toks[size_t(i)].push_back(int32_t(rng() % uint32_t(V)));
    sequence_step q{toks[size_t(i)], 0, pages[size_t(i)], false};
    step_result rg, re;
    g->forward({&q, 1}, gkv, rg);
    e->forward({&q, 1}, ekv, re);
    len[size_t(i)] = int64_t(toks[size_t(i)].size());
    auto l = re.last(0);
    next[size_t(i)] = int32_t(std::max_element(l.begin(), l.end()) - l.begin());
  }
  outcome o;
  for (const std::vector<int>& members : rounds)
    for (int s = 0; s < steps; ++s) {
      std::vector<int32_t> tok(members.size());
      std::vector<sequence_step> batch;
      for (size_t j = 0; j < members.size(); ++j) tok[j] = next[size_t(members[j])];
      for (size_t j = 0; j < members.size(); ++j) {
        const int i = members[j];
        batch.push_back(sequence_step{std::span<const int32_t>(&tok[j], 1), len[size_t(i)], pages[size_t(i)], false});
      }
      step_result rg, re;
      g->forward(batch, gkv, rg);
      e->forward(batch, ekv, re);
      o.steps++;
      o.fixed_layout += g->last_step_mode() >= 1;
      o.replayed += g->last_step_mode() == 2;
      REQUIRE(rg.logits.size() == re.logits.size());
      REQUIRE(rg.row_offset == re.row_offset);
      double mx = 0, diff = 0;
      for (size_t k = 0; k < re.logits.size(); ++k) {
        mx = std::max(mx, double(std::fabs(re.logits[k])));
        diff = std::max(diff, double(std::fabs(re.logits[k] - rg.logits[k])));
      }
      o.bitwise = o.bitwise && rg.logits == re.logits;
      o.worst_rel = std::max(o.worst_rel, diff / std::max(mx, 1e-30));
      // Routing counts: the same totals (padding rows are not counted) and, all but always, the same experts.
      int64_t sg = 0, se = 0;
      for (int64_t c : g->routing_counts()) sg += c;
      for (int64_t c : e->routing_counts()) se += c;
      CHECK(sg == se);
      if (o.bitwise) CHECK(g->routing_counts() == e->routing_counts());
      for (size_t j = 0; j < members.size(); ++j) {
        const int i = members[j];
        len[size_t(i)]++;
        auto l = re.last(j);
        next[size_t(i)] = int32_t(std::max_element(l.begin(), l.end()) - l.begin());
      }
    }
  return o;
}

} // namespace petrel::graphs_check
