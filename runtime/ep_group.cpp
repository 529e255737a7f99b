#include "runtime/ep_group.hpp"

#include <condition_variable>
#include <mutex>
#include <thread>

#include "runtime/sampling.hpp"

namespace petrel::ep {

// One persistent thread per rank; run() hands every thread the same job and waits for all of them.
struct ep_group::workers {
  explicit workers(int n) : errors(size_t(n)) {
    for (int r = 0; r < n; ++r) threads.emplace_back([this, r] { loop(r); });
  }
  ~workers() {
    {
      std::lock_guard lock(mu);
      stop = true;
    }
    cv.notify_all();
    for (auto& t : threads) t.join();
  }
  void run(const std::function<void(int)>& fn) {
    std::unique_lock lock(mu);
    job = &fn;
    std::fill(errors.begin(), errors.end(), nullptr);
    remaining = int(threads.size());
    ++generation;
    cv.notify_all();
    done.wait(lock, [&] { return remaining == 0; });
    job = nullptr;
    // The root cause first: a rank's own error, not a peer's report that the group was aborted.
    std::exception_ptr first, first_abort;
    for (auto& e : errors) {
      if (!e) continue;
      try {
        std::rethrow_exception(e);
      } catch (const transport_error&) {
        if (!first_abort) first_abort = e;
      } catch (...) {
        if (!first) first = e;
      }
    }
    if (first) std::rethrow_exception(first);
    if (first_abort) std::rethrow_exception(first_abort);
  }
  void loop(int r) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* fn;
      {
        std::unique_lock lock(mu);
        cv.wait(lock, [&] { return stop || generation != seen; });
        if (stop) return;
        seen = generation;
        fn = job;
      }
      std::exception_ptr err;
      try {
        (*fn)(r);
      } catch (...) {
        err = std::current_exception();
      }
      std::lock_guard lock(mu);
      errors[size_t(r)] = err;
      if (--remaining == 0) done.notify_all();
    }
  }

  std::vector<std::thread> threads;
  std::mutex mu;
  std::condition_variable cv, done;
  const std::function<void(int)>* job = nullptr;
  std::vector<std::exception_ptr> errors;
  uint64_t generation = 0;
  int remaining = 0;
  bool stop = false;
};

std::unique_ptr<ep_group> ep_group::load(const std::filesystem::path& dir, const ep_group_options& opt, bool dummy,
                                         uint64_t seed) {
  if (opt.size < 1) throw std::invalid_argument("--ep must be >= 1");
  const model_config cfg = model_config::load(dir);
  ep_placement placement = starting_placement(cfg, opt.size, opt.redundant, opt.init_expert_location);
  if (!opt.init_expert_location.empty() && opt.redundant > 0 &&
      placement.num_slots != int(cfg.n_routed_experts) + opt.redundant)
    throw std::invalid_argument(opt.init_expert_location + ": the placement has " +
                                std::to_string(placement.num_slots) + " slots per layer, but --redundant " +
                                std::to_string(opt.redundant) + " asks for " +
                                std::to_string(cfg.n_routed_experts + opt.redundant));
  // Checked once here so that no rank throws half-way through construction.
  if (std::string err = check_placement(placement.phy2log, cfg, opt.size, opt.rank.rebalance_every > 0); !err.empty())
    throw std::invalid_argument(err + (opt.rank.rebalance_every > 0 ? " (needed for live rebalancing)" : ""));

  std::unique_ptr<ep_group> g(new ep_group());
  g->exchange_ = std::make_unique<inprocess_exchange>(opt.size, opt.dispatch_delay);
  ep_options rank_opt = opt.rank;
  // The NCCL plane's communicator comes from one unique id, made here (the process of rank 0) for every rank.
  if (rank_opt.device_exchange && rank_opt.device_kind == device_exchange_kind::nccl && rank_opt.device_bootstrap.empty())
    rank_opt.device_bootstrap = make_device_plane_bootstrap(device_exchange_kind::nccl);
  for (int r = 0; r < opt.size; ++r) {
    g->backends_.push_back(make_backend(rank_backend_name(opt.backend, r)));
    g->transports_.push_back(g->exchange_->make_rank(r));
    auto model = deepseek_model::load(dir, *g->backends_.back(), dummy, seed);
    g->ranks_.push_back(std::make_unique<ep_rank>(std::move(model), placement, *g->transports_.back(), rank_opt));
  }
  g->workers_ = std::make_unique<workers>(opt.size);
  return g;
}

ep_group::~ep_group() {
  workers_.reset(); // threads first: they may still reference ranks
}

void ep_group::run_on_ranks(const std::function<void(int)>& fn) {
  // Each rank's worker thread drives that rank's backend (its own GPU with backend "cuda:each").
  const std::function<void(int)> bound = [&](int r) {
    backends_[size_t(r)]->bind_thread();
    fn(r);
  };
  workers_->run(bound);
}

void ep_group::step(std::span<const std::vector<sequence_step>> batches, std::span<kv_pool* const> kv,
                    std::span<step_result> outs) {
  if (int(batches.size()) != size() || int(kv.size()) != size() || int(outs.size()) != size())
    throw std::invalid_argument("ep_group::step: one batch, pool and result per rank");
  run_on_ranks([&](int r) { ranks_[size_t(r)]->step(batches[size_t(r)], *kv[size_t(r)], outs[size_t(r)]); });
}

// -- generation over the group -----------------------------------------------------------------------

struct rank_generation::sequence {
  std::span<const int32_t> prompt;
  kv_page_table table;
  int64_t pos = 0;     // tokens in the cache
  int64_t stepped = 0; // tokens fed in the current step
  bool prefilling = true, done = false;
  int32_t last = 0;
  token_sampler sampler;
  generate_result result;
};

rank_generation::rank_generation(kv_pool& kv, std::vector<std::span<const int32_t>> prompts,
                                 const generate_options& opt, int64_t vocab)
    : kv_(kv), opt_(opt) {
  const int64_t max_new = std::max<int64_t>(opt.max_new_tokens, 0);
  seqs_.reserve(prompts.size());
  for (auto p : prompts) {
    if (p.empty()) throw std::invalid_argument("generate: empty prompt");
    sequence s{p, {}, 0, 0, true, false, 0, token_sampler(opt.sampling), {}};
    if (!kv.reserve(s.table, int64_t(p.size()) + max_new))
      throw std::runtime_error("generate: the KV pool has too few free pages");
    if (opt.prompt_logits) s.result.prompt_logits.reserve(p.size() * size_t(vocab));
    seqs_.push_back(std::move(s));
  }
}

rank_generation::~rank_generation() {
  for (auto& s : seqs_) kv_.release(s.table);
}

bool rank_generation::done() const {
  for (const auto& s : seqs_)
    if (!s.done) return false;
  return true;
}

const std::vector<sequence_step>& rank_generation::next_batch() {
  batch_.clear();
  in_batch_.clear();
  const int64_t chunk = opt_.prefill_chunk;
  for (size_t i = 0; i < seqs_.size(); ++i) {
    sequence& s = seqs_[i];
    if (s.done) continue;
    const int64_t L = int64_t(s.prompt.size());
    if (s.prefilling) {
      const int64_t n = chunk > 0 ? std::min(chunk, L - s.pos) : L - s.pos;
      s.stepped = n;
      batch_.push_back({s.prompt.subspan(size_t(s.pos), size_t(n)), s.pos, s.table.pages, opt_.prompt_logits});
    } else {
      s.stepped = 1;
      batch_.push_back({std::span<const int32_t>(&s.last, 1), s.pos, s.table.pages, false});
    }
    in_batch_.push_back(i);
  }
  return batch_;
}

void rank_generation::consume(const step_result& out) {
  const int64_t max_new = std::max<int64_t>(opt_.max_new_tokens, 0);
  for (size_t i = 0; i < in_batch_.size(); ++i) {
    sequence& s = seqs_[in_batch_[i]];
    s.pos += s.stepped;
    if (s.prefilling) {
      if (opt_.prompt_logits)
        s.result.prompt_logits.insert(s.result.prompt_logits.end(), out.logits.begin() + out.row_offset[i] * out.vocab,
                                      out.logits.begin() + out.row_offset[i + 1] * out.vocab);
      if (s.pos < int64_t(s.prompt.size())) continue;
      s.prefilling = false;
      s.table.num_tokens = s.pos;
      if (max_new <= 0) {
        s.done = true;
        continue;
      }
    }
    s.last = s.sampler.sample(out.last(i));
    s.result.output_ids.push_back(s.last);
    if (int64_t(s.result.output_ids.size()) >= max_new || s.last == opt_.stop_token) s.done = true;
  }
  batch_.clear();
  in_batch_.clear();
}

std::vector<generate_result> rank_generation::finish() {
  std::vector<generate_result> out;
  for (auto& s : seqs_) {
    kv_.release(s.table);
    out.push_back(std::move(s.result));
  }
  return out;
}

std::vector<generate_result> generate_on_rank(ep_rank& rank, kv_pool& kv, std::vector<std::span<const int32_t>> prompts,
                                              const generate_options& opt) {
  rank_generation gen(kv, std::move(prompts), opt, rank.model().config().vocab_size);
  step_result out;
  // Step while this rank has work, or while any rank had tokens in the last step (one empty step ends it).
  while (!gen.done() || rank.group_had_tokens()) {
    rank.step(gen.next_batch(), kv, out);
    gen.consume(out);
  }
  return gen.finish();
}

std::vector<generate_result> generate_ep(ep_group& group, std::span<const std::vector<int32_t>> prompts,
                                         const generate_options& opt, int32_t page_size,
                                         const step_hook& before_step) {
  const int N = group.size();
  const model_config& cfg = group.config();
  for (const auto& p : prompts)
    if (p.empty()) throw std::invalid_argument("generate: empty prompt");
  const int64_t max_new = std::max<int64_t>(opt.max_new_tokens, 0);
  std::vector<std::vector<size_t>> prompt_of(static_cast<size_t>(N));
  std::vector<int32_t> pages(size_t(N), 1);
  for (size_t i = 0; i < prompts.size(); ++i) {
    const int r = int(i % size_t(N));
    prompt_of[size_t(r)].push_back(i);
    pages[size_t(r)] += pages_for_tokens(int64_t(prompts[i].size()) + max_new, page_size);
  }
  std::vector<std::unique_ptr<kv_pool>> pools;
  std::vector<kv_pool*> pool_ptrs;
  std::vector<std::unique_ptr<rank_generation>> gens;
  for (int r = 0; r < N; ++r) {
    pools.push_back(std::make_unique<kv_pool>(group.rank_backend(r), cfg, pages[size_t(r)], page_size));
    pool_ptrs.push_back(pools.back().get());
    std::vector<std::span<const int32_t>> mine;
    for (size_t i : prompt_of[size_t(r)]) mine.emplace_back(prompts[i]);
    gens.push_back(std::make_unique<rank_generation>(*pools.back(), mine, opt, cfg.vocab_size));
  }
  std::vector<std::vector<sequence_step>> batches(static_cast<size_t>(N));
  std::vector<step_result> outs(static_cast<size_t>(N));
  for (int64_t step = 0;; ++step) {
    bool any = false;
    for (int r = 0; r < N; ++r) {
      batches[size_t(r)] = gens[size_t(r)]->next_batch();
      any |= !batches[size_t(r)].empty();
    }
    if (!any) break;
    if (before_step) before_step(step, group);
    group.step(batches, pool_ptrs, outs);
    for (int r = 0; r < N; ++r) gens[size_t(r)]->consume(outs[size_t(r)]);
  }
  std::vector<generate_result> results(prompts.size());
  for (int r = 0; r < N; ++r) {
    auto mine = gens[size_t(r)]->finish();
    for (size_t j = 0; j < mine.size(); ++j) results[prompt_of[size_t(r)][j]] = std::move(mine[j]);
  }
  return results;
}

} // namespace petrel::ep
