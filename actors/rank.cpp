#include "actors/rank.hpp"

#include <chrono>
#include <iostream>
#include <mutex>
#include <thread>

#include <caf/all.hpp>

#include "runtime/backend.hpp"
#include "runtime/kv_cache.hpp"
#include "runtime/model.hpp"
#include "runtime/sampling.hpp"
#include "transport/kv_transfer.hpp"

namespace petrel {

namespace {

struct rank_state {
  static inline const char* name = "petrel.rank";

  rank_config config;
  epoch_fence fence;
  std::unique_ptr<backend> be;
  std::unique_ptr<deepseek_model> model;
  std::unique_ptr<kv_pool> kv;
  rank_info info;
  double slow_factor = 1.0; // fault injection: steps take this many times as long ...
  std::chrono::steady_clock::time_point slow_until{}; // ... until then
  step_result scratch;
  std::vector<sequence_step> steps;
};

using rank_pointer = rank_actor::stateful_pointer<rank_state>;

// -- retired KV pools ---------------------------------------------------------------------------
// A peer may still be writing into (or reading from) a pool after its rank's incarnation ended: a
// transfer in flight, or one that timed out on the sender but whose bytes are still on the wire.
// UCX over tcp does not check keys at the target, so freeing the memory would turn such a write
// into a crash or, worse, into garbage in someone else's pages. A retired pool therefore stays
// mapped and registered, unused, for a grace period longer than any transfer deadline.

struct retired_pool {
  std::unique_ptr<backend> be; // declared first: destroyed last, after the pool it allocated
  std::unique_ptr<kv_pool> kv;
  std::shared_ptr<transport::kv_transfer_engine> engine;
  uint64_t pool_id = 0;
  std::chrono::steady_clock::time_point retired_at;
};

std::mutex retired_mutex;
std::vector<retired_pool> retired_pools;
constexpr auto retired_grace = std::chrono::seconds(60);

void release_expired_pools() {
  std::vector<retired_pool> expired;
  {
    std::lock_guard<std::mutex> guard{retired_mutex};
    auto now = std::chrono::steady_clock::now();
    for (auto it = retired_pools.begin(); it != retired_pools.end();)
      if (now - it->retired_at > retired_grace) {
        expired.push_back(std::move(*it));
        it = retired_pools.erase(it);
      } else {
        ++it;
      }
  }
  for (auto& r : expired)
    if (r.engine && r.pool_id != 0)
      r.engine->deregister_pool(r.pool_id);
}

void retire_pool(rank_state& st) {
  if (!st.kv)
    return;
  std::lock_guard<std::mutex> guard{retired_mutex};
  retired_pools.push_back(retired_pool{std::move(st.be), std::move(st.kv), st.config.kv_engine, st.info.pool_id,
                                       std::chrono::steady_clock::now()});
}

/// Stateless per-position sampling: the token at output position `position` depends only on the
/// logits, the request's settings and (seed, position), so a migrated request continues exactly.
int32_t sample_at(std::span<const float> logits, const sampling_spec& s, int32_t position) {
  if (s.temperature <= 0.0f || s.top_k == 1)
    return argmax(logits);
  sampling_params p;
  p.temperature = s.temperature;
  p.top_k = s.top_k;
  p.top_p = s.top_p;
  p.seed = s.seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(position) + 1;
  token_sampler sampler(p);
  return sampler.sample(logits);
}

void load(rank_pointer self) {
  release_expired_pools();
  auto& st = self->state;
  auto& cfg = st.config;
  st.be = make_backend(cfg.backend);
  st.be->set_num_threads(cfg.threads);
  st.model = deepseek_model::load(cfg.model_path, *st.be, cfg.dummy, /*seed=*/1);
  st.kv = std::make_unique<kv_pool>(*st.be, st.model->config(), cfg.kv_pages, cfg.page_size);
  auto& info = st.info;
  info.epoch = st.fence.epoch;
  info.node = cfg.node;
  info.index = cfg.index;
  info.num_pages = st.kv->num_pages();
  info.page_size = st.kv->page_size();
  info.page_bytes = st.kv->bytes_per_page();
  info.vocab = static_cast<int32_t>(st.model->config().vocab_size);
  info.max_context = cfg.max_context > 0 ? cfg.max_context
                                         : static_cast<int32_t>(st.model->config().max_position_embeddings);
  if (cfg.kv_engine) {
    auto desc = cfg.kv_engine->register_pool(st.kv->base(), st.kv->total_bytes());
    if (!desc)
      throw std::runtime_error("cannot register the KV pool: " + desc.error());
    info.pool_id = desc->pool_id;
    info.pool = desc->to_bytes();
  }
}

rank_actor::behavior_type rank_impl(rank_pointer self, rank_config cfg, uint64_t epoch) {
  auto& st = self->state;
  st.config = std::move(cfg);
  st.fence.epoch = epoch;
  try {
    load(self);
  } catch (const std::exception& e) {
    // The incarnation ends with this error; the supervisor's restart policy (and intensity) applies.
    auto what = st.config.node + "/rank" + std::to_string(st.config.index) + " failed to start: " + e.what();
    std::cerr << "petrel " << what << "\n";
    throw std::runtime_error(what);
  }
  self->attach_functor([self](const caf::error&) { retire_pool(self->state); });
  return {
      [self](ping_atom) { return caf::make_result(pong_atom::value, self->state.fence.epoch); },
      [self](info_atom) { return self->state.info; },
      [self](forward_atom, forward_step& step) -> caf::result<step_output> {
        auto& st = self->state;
        if (auto err = st.fence.check(step.epoch))
          return err;
        auto t0 = std::chrono::steady_clock::now();
        st.steps.clear();
        for (auto& item : step.items)
          st.steps.push_back(sequence_step{item.tokens, item.start_pos, item.pages, false});
        try {
          st.model->forward(st.steps, *st.kv, st.scratch);
        } catch (const std::invalid_argument& e) {
          // A malformed step (bad token id, short page table) is the sender's bug: refuse it.
          return make_error(petrel_errc::bad_request, e.what());
        }
        step_output out;
        out.tokens.reserve(step.items.size());
        for (size_t i = 0; i < step.items.size(); ++i)
          out.tokens.push_back(step.items[i].sample
                                   ? sample_at(st.scratch.last(i), step.items[i].sampling, step.items[i].position)
                                   : -1);
        auto now = std::chrono::steady_clock::now();
        if (now < st.slow_until && st.slow_factor > 1.0) // injected slowness: stretch the step
          std::this_thread::sleep_for((now - t0) * (st.slow_factor - 1.0));
        out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        return out;
      },
      [self](fault_atom, fault_spec& f) -> caf::result<caf::ok_atom> {
        auto& st = self->state;
        if (f.kind != "slow" || f.factor < 1.0)
          return make_error(petrel_errc::bad_request, "a rank takes only 'slow' faults with factor >= 1");
        st.slow_factor = f.factor;
        st.slow_until = std::chrono::steady_clock::now() + std::chrono::milliseconds(f.duration_ms);
        return caf::ok_atom::value;
      },
  };
}

} // namespace

caf::actor spawn_rank(caf::local_actor* parent, const rank_config& cfg, const child_context& ctx) {
  return caf::actor_cast<caf::actor>(parent->spawn<caf::detached>(rank_impl, cfg, ctx.epoch));
}

} // namespace petrel
