// Sampling: greedy, seeded determinism, top-k and top-p candidate sets, and draw frequencies.
#include <doctest/doctest.h>

#include <cmath>
#include <map>
#include <set>
#include <vector>

#include "runtime/sampling.hpp"

using namespace petrel;

TEST_CASE("greedy takes the argmax, lowest id on ties") {
  std::vector<float> l = {0.1f, 3.0f, -1.0f, 3.0f};
  token_sampler s({0.0f, 0, 1.0f, 1});
  CHECK(s.sample(l) == 1);
  CHECK(argmax(l) == 1);
}

TEST_CASE("the same seed gives the same tokens; another seed differs") {
  std::vector<float> l(50);
  for (size_t i = 0; i < l.size(); ++i) l[i] = float(std::sin(double(i)));
  auto draw = [&](uint64_t seed) {
    token_sampler s({1.0f, 0, 1.0f, seed});
    std::vector<int32_t> out;
    for (int i = 0; i < 64; ++i) out.push_back(s.sample(l));
    return out;
  };
  CHECK(draw(7) == draw(7));
  CHECK(draw(7) != draw(8));
}

TEST_CASE("top-k keeps exactly the k best; top-p keeps the smallest prefix reaching p") {
  // probabilities at temperature 1: 0.5 0.3 0.15 0.05
  std::vector<float> l = {std::log(0.15f), std::log(0.5f), std::log(0.05f), std::log(0.3f)};
  std::vector<int32_t> ids;
  std::vector<float> pr;
  token_sampler k2({1.0f, 2, 1.0f, 0});
  k2.candidates(l, ids, pr);
  CHECK(ids == std::vector<int32_t>{1, 3});
  CHECK(pr[0] == doctest::Approx(0.5 / 0.8));
  token_sampler p75({1.0f, 0, 0.75f, 0});
  p75.candidates(l, ids, pr);
  CHECK(ids == std::vector<int32_t>{1, 3});
  token_sampler p85({1.0f, 0, 0.85f, 0});
  p85.candidates(l, ids, pr);
  CHECK(ids == std::vector<int32_t>{1, 3, 0});
  CHECK(pr[2] == doctest::Approx(0.15 / 0.95));
  token_sampler p01({1.0f, 0, 0.01f, 0});
  p01.candidates(l, ids, pr);
  CHECK(ids == std::vector<int32_t>{1});
  // Temperature sharpens: at T = 0.5 the probabilities go as p^2.
  token_sampler t05({0.5f, 0, 1.0f, 0});
  t05.candidates(l, ids, pr);
  CHECK(pr[0] == doctest::Approx(0.25 / (0.25 + 0.09 + 0.0225 + 0.0025)).epsilon(1e-4));
  // Draws stay inside the candidate set and follow its probabilities.
  token_sampler s({1.0f, 2, 1.0f, 123});
  std::map<int32_t, int> n;
  for (int i = 0; i < 20000; ++i) n[s.sample(l)]++;
  CHECK(n.size() == 2);
  CHECK(double(n[1]) / 20000 == doctest::Approx(0.625).epsilon(0.03));
}
