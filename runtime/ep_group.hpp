// An EP group of N ranks inside one process: N ep_ranks, one thread each, joined by an inprocess_exchange.
// `petrel generate --ep N`, `petrel bench-model --ep N` and the tests use it. A cluster runs one ep_rank per rank
// actor instead, with a transport between processes; nothing else changes (see runtime/ep.hpp).
#pragma once

#include <chrono>
#include <filesystem>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "runtime/ep.hpp"
#include "runtime/generation.hpp"

namespace petrel::ep {

struct ep_group_options {
  int size = 1;
  int redundant = 0;                 // extra physical slots beyond one per expert (ignored with a placement file)
  std::string init_expert_location;  // `petrel eplb` JSON; empty: initial_placement(size, redundant)
  ep_options rank;                   // every rank's options
  std::chrono::microseconds dispatch_delay{0}; // simulated wire time of every all-to-all
  std::string backend = "cpu";       // or "cuda", "cuda:N", "cuda:each" (a GPU per rank: rank_backend_name)
};

class ep_group {
public:
  /// Loads DIR once per rank (dummy: random weights from config.json, the same on every rank), each rank keeping
  /// only its experts. Throws std::invalid_argument (bad options or placement file; the message names the
  /// file) or model_load_error (bad checkpoint).
  static std::unique_ptr<ep_group> load(const std::filesystem::path& dir, const ep_group_options& opt,
                                        bool dummy = false, uint64_t seed = 0);
  ~ep_group();

  int size() const { return int(ranks_.size()); }
  ep_rank& rank(int r) { return *ranks_[size_t(r)]; }
  const model_config& config() { return ranks_[0]->model().config(); }
  backend& rank_backend(int r) { return *backends_[size_t(r)]; }
  inprocess_exchange& exchange() { return *exchange_; }

  /// One collective step, all ranks in parallel: rank r runs batches[r] (possibly empty) on *kv[r] into
  /// outs[r]. Rethrows the error of the rank that failed first (a peer's "aborted" error only if none other).
  void step(std::span<const std::vector<sequence_step>> batches, std::span<kv_pool* const> kv,
            std::span<step_result> outs);

  /// Runs fn(r) for every rank on that rank's thread, in parallel; rethrows as step() does.
  void run_on_ranks(const std::function<void(int)>& fn);

private:
  ep_group() = default;
  struct workers;
  std::vector<std::unique_ptr<backend>> backends_;
  std::unique_ptr<inprocess_exchange> exchange_;
  std::vector<std::unique_ptr<ep_transport>> transports_;
  std::vector<std::unique_ptr<ep_rank>> ranks_;
  std::unique_ptr<workers> workers_;
};

/// One rank's share of a generation: its prompts, their pages in the rank's pool, sampling, results. generate_ep
/// runs one per rank; a rank in its own process (petrel generate --ep-transport ucx) runs one alone.
class rank_generation {
public:
  /// Reserves every prompt's pages in `kv` (throws std::runtime_error when it is too small).
  rank_generation(kv_pool& kv, std::vector<std::span<const int32_t>> prompts, const generate_options& opt,
                  int64_t vocab);
  ~rank_generation();
  /// The sequences of the next step (empty when this rank is done). Valid until consume().
  const std::vector<sequence_step>& next_batch();
  /// Takes the step's result for next_batch().
  void consume(const step_result& out);
  bool done() const;
  /// Results in prompt order (pages released).
  std::vector<generate_result> finish();

private:
  struct sequence;
  kv_pool& kv_;
  generate_options opt_;
  std::vector<sequence> seqs_;
  std::vector<sequence_step> batch_;
  std::vector<size_t> in_batch_;
};

/// Generates `prompts` on one rank of a group whose other ranks run the same call on their prompts (each in its
/// own thread or process): steps until this rank is done and no rank had tokens in the last step.
std::vector<generate_result> generate_on_rank(ep_rank& rank, kv_pool& kv, std::vector<std::span<const int32_t>> prompts,
                                              const generate_options& opt);

/// Called before every step of generate_ep with the step number (for example to request a rebalance).
using step_hook = std::function<void(int64_t step, ep_group& group)>;

/// Generates every prompt on the group (DP attention): prompt i lives on rank i % N with its own KV there; all
/// ranks step together (continuous batching: prefill chunks and decodes share steps) until every prompt is done;
/// a rank whose prompts are finished keeps taking zero-token steps. Same options and results as generate(), per
/// prompt, in order (prompt_logits for every prompt when asked).
std::vector<generate_result> generate_ep(ep_group& group, std::span<const std::vector<int32_t>> prompts,
                                         const generate_options& opt, int32_t page_size = 16,
                                         const step_hook& before_step = {});

} // namespace petrel::ep
