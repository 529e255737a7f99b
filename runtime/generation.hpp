// Single-request generation on top of deepseek_model::forward: prefill (optionally chunked), then decode
// token by token through the paged cache. Used by `petrel generate`, eval-bpb, bench-model and the tests.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "runtime/model.hpp"
#include "runtime/sampling.hpp"

namespace petrel {

struct generate_options {
  int64_t max_new_tokens = 16;
  int64_t prefill_chunk = 0;        // 0: the whole prompt in one step
  bool prompt_logits = false;       // fill generate_result::prompt_logits [prompt_len, vocab]
  int64_t stop_token = -1;          // stop after emitting this id (-1: never)
  sampling_params sampling;
};

struct generate_result {
  std::vector<int32_t> output_ids;  // new tokens only
  std::vector<float> prompt_logits; // row-major [prompt_len, vocab] when asked for
};

/// Runs one request on `kv` (its pages are allocated here and freed before returning).
/// Throws std::runtime_error when the pool has too few pages.
generate_result generate(deepseek_model& model, kv_pool& kv, std::span<const int32_t> prompt,
                         const generate_options& opt);

} // namespace petrel
