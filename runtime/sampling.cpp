#include "runtime/sampling.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace petrel {

int32_t argmax(std::span<const float> logits) {
  int32_t best = 0;
  for (size_t i = 1; i < logits.size(); ++i)
    if (logits[i] > logits[size_t(best)]) best = int32_t(i);
  return best;
}

token_sampler::token_sampler(sampling_params p) : p_(p), state_(p.seed ^ 0x853c49e6748fea9bull) {}

double token_sampler::next_uniform() {
  // splitmix64: fixed across platforms and standard libraries (std distributions are not).
  uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return double(z >> 11) * (1.0 / 9007199254740992.0);
}

void token_sampler::candidates(std::span<const float> logits, std::vector<int32_t>& ids, std::vector<float>& probs) {
  const int32_t V = int32_t(logits.size());
  ids.resize(size_t(V));
  std::iota(ids.begin(), ids.end(), 0);
  int32_t keep = V;
  auto by_logit = [&](int32_t a, int32_t b) { return logits[size_t(a)] > logits[size_t(b)] || (logits[size_t(a)] == logits[size_t(b)] && a < b); };
  if (p_.top_k > 0 && p_.top_k < V) {
    keep = p_.top_k;
    std::partial_sort(ids.begin(), ids.begin() + keep, ids.end(), by_logit);
  } else {
    std::sort(ids.begin(), ids.end(), by_logit);
  }
  ids.resize(size_t(keep));
  // Softmax of logits / temperature over the kept set (max first, so no overflow).
  const float inv_t = 1.0f / p_.temperature;
  const float mx = logits[size_t(ids[0])] * inv_t;
  probs.resize(ids.size());
  double sum = 0.0;
  for (size_t i = 0; i < ids.size(); ++i) {
    probs[i] = std::exp(logits[size_t(ids[i])] * inv_t - mx);
    sum += probs[i];
  }
  for (auto& p : probs) p = float(p / sum);
  if (p_.top_p < 1.0f) {
    // Smallest prefix whose mass reaches top_p (at least one token).
    double cum = 0.0;
    size_t n = 0;
    while (n < probs.size()) {
      cum += probs[n++];
      if (cum >= p_.top_p) break;
    }
    ids.resize(n);
    probs.resize(n);
    double s2 = 0.0;
    for (float p : probs) s2 += p;
    for (auto& p : probs) p = float(p / s2);
  }
}

int32_t token_sampler::sample(std::span<const float> logits) {
  if (p_.temperature <= 0.0f || logits.size() <= 1) return argmax(logits);
  candidates(logits, ids_, probs_);
  double u = next_uniform(), cum = 0.0;
  for (size_t i = 0; i < ids_.size(); ++i) {
    cum += probs_[i];
    if (u < cum) return ids_[i];
  }
  return ids_.back();
}

} // namespace petrel
