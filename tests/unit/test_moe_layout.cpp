// Grouped-GEMM token layouts: contiguous (128-aligned blocks) and masked ([experts, max_m, hidden] + counts).
#include <doctest/doctest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <stdexcept>

#include "runtime/moe_layout.hpp"

using namespace petrel::moe;

namespace {

struct routing {
  int num_tokens, top_k, num_slots;
  std::vector<int32_t> slots;  // [tokens x top_k], distinct per token
  std::vector<float> weights;  // [tokens x top_k]
  std::vector<float> x;        // [tokens x hidden]
};

routing make_routing(int num_tokens, int top_k, int num_slots, int hidden, uint64_t seed, double skew = 0.0) {
  std::mt19937_64 rng(seed);
  routing r{num_tokens, top_k, num_slots, {}, {}, {}};
  std::vector<double> w(num_slots);
  for (int s = 0; s < num_slots; ++s) w[s] = 1.0 / std::pow(s + 1.0, skew);
  std::discrete_distribution<int> pick(w.begin(), w.end());
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (int t = 0; t < num_tokens; ++t) {
    std::vector<int32_t> chosen;
    while (static_cast<int>(chosen.size()) < top_k) {
      const int s = pick(rng);
      if (std::find(chosen.begin(), chosen.end(), s) == chosen.end()) chosen.push_back(s);
    }
    for (int k = 0; k < top_k; ++k) {
      r.slots.push_back(chosen[k]);
      r.weights.push_back(u(rng) + 2.0f);
    }
  }
  r.x.resize(static_cast<size_t>(num_tokens) * hidden);
  for (auto& v : r.x) v = u(rng);
  return r;
}

// What the experts "compute" in the tests: row * (local expert + 1), so a wrong expert id shows up.
float expert_scale(int local_expert) { return static_cast<float>(local_expert + 1); }

// out[t] = sum over local (t,k) of w * (e+1) * x[t], straight from the routing.
std::vector<float> reference_combine(const routing& r, int hidden, int slot_begin, int num_local) {
  std::vector<float> out(static_cast<size_t>(r.num_tokens) * hidden, 0.0f);
  for (int t = 0; t < r.num_tokens; ++t)
    for (int k = 0; k < r.top_k; ++k) {
      const int e = r.slots[t * r.top_k + k] - slot_begin;
      if (e < 0 || e >= num_local) continue;
      for (int h = 0; h < hidden; ++h)
        out[static_cast<size_t>(t) * hidden + h] += r.weights[t * r.top_k + k] * expert_scale(e) * r.x[t * hidden + h];
    }
  return out;
}

} // namespace

TEST_CASE("moe_layout: contiguous layout round-trips permute -> expert -> combine") {
  const int hidden = 16, slot_begin = 9, num_local = 9;
  const auto r = make_routing(300, 8, 288 / 8, hidden, 3, 0.8); // 36 slots, rank owns 9..17
  const auto L = build_contiguous_layout(r.slots, r.num_tokens, r.top_k, slot_begin, num_local);
  std::vector<float> rows(static_cast<size_t>(L.num_rows) * hidden);
  permute_contiguous(L, r.x, hidden, rows);
  for (int row = 0; row < L.num_rows; ++row)
    if (L.row_expert[row] >= 0)
      for (int h = 0; h < hidden; ++h) rows[static_cast<size_t>(row) * hidden + h] *= expert_scale(L.row_expert[row]);
  std::vector<float> out(static_cast<size_t>(r.num_tokens) * hidden);
  unpermute_contiguous(L, rows, r.weights, hidden, out);
  const auto ref = reference_combine(r, hidden, slot_begin, num_local);
  for (size_t i = 0; i < out.size(); ++i) REQUIRE(out[i] == doctest::Approx(ref[i]).epsilon(1e-5));

  // Unweighted round trip of a single-expert-per-token routing is the identity on routed tokens.
  std::vector<int32_t> one(50);
  for (int t = 0; t < 50; ++t) one[t] = t % 3;
  std::vector<float> x(50 * 4);
  std::iota(x.begin(), x.end(), 0.0f);
  const auto L1 = build_contiguous_layout(one, 50, 1, 0, 3, 8);
  std::vector<float> rows1(static_cast<size_t>(L1.num_rows) * 4), back(x.size());
  permute_contiguous(L1, x, 4, rows1);
  unpermute_contiguous(L1, rows1, {}, 4, back);
  CHECK(back == x);
}

TEST_CASE("moe_layout: contiguous blocks are 128-aligned with -1 padding rows and a consistent inverse") {
  const auto r = make_routing(1000, 8, 64, 1, 5, 1.0);
  const int slot_begin = 8, num_local = 8;
  const auto L = build_contiguous_layout(r.slots, r.num_tokens, r.top_k, slot_begin, num_local);
  CHECK(L.num_rows % 128 == 0);
  int routed = 0;
  for (int e = 0; e < num_local; ++e) {
    const int begin = L.expert_begin[e], end = L.expert_begin[e + 1];
    CHECK(begin % 128 == 0);
    CHECK(end - begin == (L.expert_count[e] + 127) / 128 * 128);
    for (int row = begin; row < end; ++row) {
      if (row < begin + L.expert_count[e]) {
        CHECK(L.row_expert[row] == e);
        REQUIRE(L.row_pair[row] >= 0);
        CHECK(L.pair_row[L.row_pair[row]] == row);
        CHECK(r.slots[L.row_pair[row]] == slot_begin + e);
      } else {
        CHECK(L.row_expert[row] == -1);
        CHECK(L.row_pair[row] == -1);
      }
    }
    routed += L.expert_count[e];
  }
  int local_pairs = 0;
  for (size_t p = 0; p < r.slots.size(); ++p) {
    const bool local = r.slots[p] >= slot_begin && r.slots[p] < slot_begin + num_local;
    local_pairs += local;
    CHECK((L.pair_row[p] >= 0) == local);
  }
  CHECK(routed == local_pairs);
  // An expert with no tokens takes no rows.
  std::vector<int32_t> only_two = {2, 2, 2};
  const auto L2 = build_contiguous_layout(only_two, 3, 1, 0, 4);
  CHECK(L2.expert_begin == std::vector<int32_t>{0, 0, 0, 128, 128});
  CHECK_THROWS_AS(build_contiguous_layout(only_two, 2, 1, 0, 4), std::invalid_argument);
}

TEST_CASE("moe_layout: masked layout counts, round trip, and overflow is reported not dropped") {
  const int hidden = 8, slot_begin = 0, num_local = 4;
  const auto r = make_routing(128, 2, 16, hidden, 11, 0.0);
  std::vector<int> wanted(num_local, 0);
  for (int32_t s : r.slots)
    if (s < num_local) ++wanted[s];
  const int max_m = *std::max_element(wanted.begin(), wanted.end());

  const auto L = build_masked_layout(r.slots, r.num_tokens, r.top_k, slot_begin, num_local, max_m);
  CHECK_FALSE(L.overflowed());
  for (int e = 0; e < num_local; ++e) {
    CHECK(L.count[e] == wanted[e]);
    CHECK(L.wanted[e] == wanted[e]);
    for (int m = 0; m < max_m; ++m) CHECK((L.slot_pair[e * max_m + m] >= 0) == (m < L.count[e]));
  }
  std::vector<float> buf(static_cast<size_t>(num_local) * max_m * hidden);
  permute_masked(L, r.x, hidden, buf);
  for (int e = 0; e < num_local; ++e)
    for (int m = 0; m < max_m; ++m)
      for (int h = 0; h < hidden; ++h) buf[(static_cast<size_t>(e) * max_m + m) * hidden + h] *= expert_scale(e);
  std::vector<float> out(static_cast<size_t>(r.num_tokens) * hidden);
  unpermute_masked(L, buf, r.weights, hidden, out);
  const auto ref = reference_combine(r, hidden, slot_begin, num_local);
  for (size_t i = 0; i < out.size(); ++i) REQUIRE(out[i] == doctest::Approx(ref[i]).epsilon(1e-5));

  // One row short for the busiest expert: exactly its excess is reported, and the combine refuses.
  const int busiest = static_cast<int>(std::max_element(wanted.begin(), wanted.end()) - wanted.begin());
  int64_t excess = 0;
  for (int e = 0; e < num_local; ++e) excess += std::max(0, wanted[e] - (max_m - 1));
  const auto S = build_masked_layout(r.slots, r.num_tokens, r.top_k, slot_begin, num_local, max_m - 1);
  CHECK(S.overflowed());
  CHECK(S.overflow == excess);
  CHECK(std::find(S.overflowed_experts.begin(), S.overflowed_experts.end(), busiest) != S.overflowed_experts.end());
  CHECK(S.count[busiest] == max_m - 1);
  CHECK(S.wanted[busiest] == wanted[busiest]);
  int marked = 0;
  for (int32_t v : S.pair_slot) marked += (v == k_pair_overflowed);
  CHECK(marked == excess);
  std::vector<float> sbuf(static_cast<size_t>(num_local) * (max_m - 1) * hidden);
  permute_masked(S, r.x, hidden, sbuf);
  CHECK_THROWS_AS(unpermute_masked(S, sbuf, r.weights, hidden, out), std::runtime_error);
}
