// libFuzzer target: HTTP request bodies of the three generation endpoints.
// Input: byte 0 picks the endpoint, the rest is the body. parse_generation_request must never throw
// or crash; an accepted request must satisfy the limits it was checked against, and the output
// assembler must survive any token ids fed to it (stop-string hold-back, UTF-8 detokenizing).
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <string_view>

#include "runtime/openai_api.hpp"

namespace {
void fail(const char* what) {
  std::fprintf(stderr, "fuzz_openai_api: invariant broken: %s\n", what);
  std::abort();
}
} // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  static const petrel::api_endpoint endpoints[] = {petrel::api_endpoint::completions,
                                                   petrel::api_endpoint::chat_completions,
                                                   petrel::api_endpoint::generate};
  const auto ep = endpoints[data[0] % 3];
  std::string_view body(reinterpret_cast<const char*>(data + 1), size - 1);
  const petrel::api_limits limits; // the defaults
  auto r = petrel::parse_generation_request(ep, body, limits);
  if (!r) {
    const auto& e = r.error();
    if (e.status < 400 || e.status > 599) fail("error status outside 4xx/5xx");
    (void)e.to_json();
    return 0;
  }
  const auto& req = r.value();
  if (req.prompt_ids.empty()) fail("accepted an empty prompt");
  for (int32_t id : req.prompt_ids)
    if (id < 0 || id >= limits.vocab_size) fail("prompt id outside the vocabulary");
  for (int32_t id : req.sampling.stop_token_ids)
    if (id < 0 || id >= limits.vocab_size) fail("stop token id outside the vocabulary");
  if (req.sampling.max_tokens < 1) fail("max_tokens < 1");
  if (int64_t(req.prompt_ids.size()) + req.sampling.max_tokens > limits.context_length)
    fail("prompt + max_tokens exceeds context_length");
  if (req.sampling.stop.size() > limits.max_stop_sequences) fail("too many stop sequences");
  if (!(req.sampling.temperature >= 0.0 && req.sampling.temperature <= 2.0)) fail("temperature out of range");
  if (!(req.sampling.top_p > 0.0 && req.sampling.top_p <= 1.0)) fail("top_p out of range");
  if (req.sampling.top_k < 0) fail("top_k negative");

  // Drive the response side with ids taken from the body bytes (bounded work per input).
  petrel::response_builder rb(req);
  (void)rb.stream_start();
  const size_t steps = std::min<size_t>(size - 1, 256);
  for (size_t i = 0; i < steps && !rb.finished(); ++i) {
    int32_t id = int32_t(data[1 + i]) % limits.vocab_size;
    auto d = rb.push(id);
    (void)rb.stream_events(d);
  }
  if (!rb.finished()) (void)rb.stream_events(rb.finish(petrel::finish_reason::length));
  (void)rb.final_body();
  if (rb.output().completion_tokens() > req.sampling.max_tokens) fail("more tokens accepted than max_tokens");
  return 0;
}
