#include "runtime/generation.hpp"

#include <algorithm>
#include <stdexcept>

namespace petrel {

generate_result generate(deepseek_model& model, kv_pool& kv, std::span<const int32_t> prompt,
                         const generate_options& opt) {
  if (prompt.empty()) throw std::invalid_argument("generate: empty prompt");
  generate_result res;
  kv_page_table table;
  const int64_t total = int64_t(prompt.size()) + std::max<int64_t>(opt.max_new_tokens, 0);
  if (!kv.reserve(table, total))
    throw std::runtime_error("generate: the KV pool has too few free pages for " + std::to_string(total) + " tokens");
  struct page_guard {
    kv_pool& kv;
    kv_page_table& t;
    ~page_guard() { kv.release(t); }
  } guard{kv, table};

  token_sampler sampler(opt.sampling);
  step_result out;
  const int64_t L = int64_t(prompt.size());
  const int64_t chunk = opt.prefill_chunk > 0 ? opt.prefill_chunk : L;
  if (opt.prompt_logits) res.prompt_logits.reserve(size_t(L * model.config().vocab_size));
  for (int64_t start = 0; start < L; start += chunk) {
    const int64_t n = std::min(chunk, L - start);
    sequence_step s{prompt.subspan(size_t(start), size_t(n)), start, table.pages, opt.prompt_logits};
    model.forward({&s, 1}, kv, out);
    if (opt.prompt_logits) res.prompt_logits.insert(res.prompt_logits.end(), out.logits.begin(), out.logits.end());
  }
  table.num_tokens = L;
  if (opt.max_new_tokens <= 0) return res;
  int32_t next = sampler.sample(out.last(0));
  res.output_ids.push_back(next);
  while (int64_t(res.output_ids.size()) < opt.max_new_tokens && next != opt.stop_token) {
    sequence_step s{{&next, 1}, table.num_tokens, table.pages, false};
    model.forward({&s, 1}, kv, out);
    table.num_tokens += 1;
    next = sampler.sample(out.last(0));
    res.output_ids.push_back(next);
  }
  return res;
}

} // namespace petrel
