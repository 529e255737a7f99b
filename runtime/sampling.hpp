// Token sampling on host logits: greedy, temperature, top-k, top-p, with a per-request seed.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace petrel {

struct sampling_params {
  float temperature = 0.0f; // <= 0: greedy (argmax, lowest id on ties)
  int32_t top_k = 0;        // <= 0: no top-k cut
  float top_p = 1.0f;       // >= 1: no nucleus cut
  uint64_t seed = 0;
};

/// One request's sampler: owns its random state, so a request is reproducible from its seed alone,
/// whatever else shares the batch. Scratch vectors are reused across calls (no per-token allocation).
class token_sampler {
public:
  explicit token_sampler(sampling_params p = {});
  int32_t sample(std::span<const float> logits);
  /// The candidate set after temperature/top-k/top-p, sorted by descending probability (for tests).
  void candidates(std::span<const float> logits, std::vector<int32_t>& ids, std::vector<float>& probs);
  const sampling_params& params() const { return p_; }

private:
  double next_uniform(); // [0, 1)
  sampling_params p_;
  uint64_t state_;
  std::vector<int32_t> ids_;
  std::vector<float> probs_;
};

/// argmax with the lowest index winning ties.
int32_t argmax(std::span<const float> logits);

} // namespace petrel
