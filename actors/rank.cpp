#include "actors/rank.hpp"

#include <chrono>
#include <iostream>
#include <mutex>
#include <thread>

#include <caf/all.hpp>

#include <map>

#include <nlohmann/json.hpp>

#include "runtime/backend.hpp"
#include "runtime/ep.hpp"
#include "runtime/kv_cache.hpp"
#include "runtime/model.hpp"
#include "runtime/sampling.hpp"
#include "transport/ep_ucx.hpp"
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
  // Expert parallelism: the group's exchange of the current generation, this rank's endpoint, and the EP rank
  // (which owns the model once formed). See form_ep_group.
  std::shared_ptr<ep::inprocess_exchange> ep_exchange;
  std::unique_ptr<ep::ep_transport> ep_transport;
  std::unique_ptr<ep::ep_rank> ep;
  transport::ep_ucx_transport* ep_ucx = nullptr; // ep_transport, when the group exchanges over UCX
  uint64_t ep_generation = 0;                     // the generation whose endpoint is open

  deepseek_model& active_model() { return ep ? ep->model() : *model; }

  // CAF destroys an actor's state in on_exit, before its attach_functor callbacks run: whatever must
  // happen when an incarnation ends happens here.
  ~rank_state();
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
// Deliberately never destroyed: at process exit, static destruction order would otherwise tear down retired
// pools (and the KV engines they hold) after UCX's own state, and crash the exit.
std::vector<retired_pool>& retired_pools = *new std::vector<retired_pool>;
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

// -- EP groups of one process -------------------------------------------------------------------------
// The ranks of an EP group that live in one node process share one in-process exchange per generation. The
// scheduler forms a generation (rebuild_atom to every rank); the first rank to join a newer generation aborts
// the older exchange, so a rank still waiting in it (its peer died mid-step) fails its step instead of hanging.

struct ep_generation_entry {
  uint64_t generation = 0;
  std::shared_ptr<ep::inprocess_exchange> exchange;
  std::unique_ptr<ep::ep_transport> aborter; // an endpoint kept only to abort the exchange
};

std::mutex ep_registry_mutex;
std::map<std::string, ep_generation_entry> ep_registry;

std::shared_ptr<ep::inprocess_exchange> join_ep_generation(const std::string& group, uint64_t generation, int size) {
  std::lock_guard<std::mutex> guard{ep_registry_mutex};
  auto& e = ep_registry[group];
  if (generation < e.generation)
    throw std::invalid_argument("EP generation " + std::to_string(generation) + " of group '" + group +
                                "' is older than the current one (" + std::to_string(e.generation) + ")");
  if (generation > e.generation || !e.exchange) {
    if (e.aborter)
      e.aborter->abort("EP group '" + group + "' re-formed at generation " + std::to_string(generation));
    e.generation = generation;
    e.exchange = std::make_shared<ep::inprocess_exchange>(size);
    e.aborter = e.exchange->make_rank(0);
  }
  return e.exchange;
}

/// Phase 1 of forming this rank's EP group at `generation`: the previous EP rank (whose model kept only its own
/// experts) is dropped and the model loaded again; this generation's exchange endpoint opens. Returns its address
/// (empty for the in-process exchange) and, on rank 0 of an NCCL group, the NCCL unique id.
ep_endpoint open_ep_generation(rank_state& st, uint64_t generation) {
  auto& cfg = st.config;
  if (st.ep_transport)
    st.ep_transport->abort("rank " + std::to_string(cfg.ep_index) + " re-forms its EP group");
  st.ep.reset();
  st.ep_ucx = nullptr;
  st.ep_transport.reset();
  st.ep_exchange.reset();
  if (!st.model)
    st.model = deepseek_model::load(cfg.model_path, *st.be, cfg.dummy, /*seed=*/1);
  st.ep_generation = generation;
  ep_endpoint out{generation, {}, {}};
  // A new communicator per generation: rank 0 makes its id; the scheduler's ep_peers hands it to every rank.
  if (cfg.expert_exchange == "nccl" && cfg.ep_index == 0)
    out.bootstrap = ep::make_device_plane_bootstrap(ep::device_exchange_kind::nccl);
  // cuda_ipc and nccl move the rows through the GPU data plane; its control traffic takes ucx between processes.
  if (cfg.expert_exchange == "ucx" || (cfg.rows_on_gpu() && cfg.ep_spans_processes)) {
    transport::ep_ucx_options opts;
    opts.net_devices = cfg.net_devices;
    auto t = transport::ep_ucx_transport::create(cfg.ep_index, cfg.ep_size, opts);
    st.ep_ucx = t.get();
    out.address = t->address();
    st.ep_transport = std::move(t);
    return out;
  }
  st.ep_exchange = join_ep_generation(cfg.group, generation, cfg.ep_size);
  st.ep_transport = st.ep_exchange->make_rank(cfg.ep_index);
  return out;
}

/// Phase 2: connects to the peers (UCX) and splits the model by the initial placement.
void connect_ep_generation(rank_state& st, const ep_peers& peers) {
  auto& cfg = st.config;
  if (!st.ep_transport || peers.generation != st.ep_generation)
    throw std::invalid_argument("EP generation " + std::to_string(peers.generation) +
                                " was not opened on this rank (open: " + std::to_string(st.ep_generation) + ")");
  if (st.ep)
    return; // answered twice
  if (st.ep_ucx) {
    if (peers.addresses.size() != static_cast<size_t>(cfg.ep_size))
      throw std::invalid_argument("EP group of " + std::to_string(cfg.ep_size) + " ranks got " +
                                  std::to_string(peers.addresses.size()) + " addresses");
    st.ep_ucx->connect(peers.addresses);
  }
  auto placement =
      ep::starting_placement(st.model->config(), cfg.ep_size, cfg.redundant_experts, cfg.init_expert_location);
  ep::ep_options opt;
  opt.mode = cfg.ep_mode == "low_latency" ? ep::ep_mode::low_latency : ep::ep_mode::normal;
  opt.two_batch_overlap = cfg.two_batch_overlap;
  opt.device_fp8_experts = cfg.fp8_experts;
  opt.rebalance_every = cfg.rebalance_every;
  opt.device_exchange = cfg.rows_on_gpu();
  if (cfg.expert_exchange == "nccl") {
    if (peers.bootstrap.empty())
      throw std::invalid_argument("the NCCL expert exchange needs rank 0's NCCL unique id, and ep_peers carries none");
    opt.device_kind = ep::device_exchange_kind::nccl;
    opt.device_bootstrap = peers.bootstrap;
  }
  opt.device_max_tokens = std::max(1, cfg.ep_device_max_tokens);
  st.ep = std::make_unique<ep::ep_rank>(std::move(st.model), std::move(placement), *st.ep_transport, opt);
}

std::string ep_stats_json(const rank_state& st) {
  auto& s = st.ep->stats();
  nlohmann::json j{{"rank", st.config.ep_index},
                   {"generation", st.ep_generation},
                   {"steps", s.steps},
                   {"low_latency_steps", s.low_latency_steps},
                   {"rebalances", s.rebalances},
                   {"experts_moved_in", s.experts_moved_in},
                   {"experts_copied_local", s.experts_copied_local},
                   {"weight_bytes_in", s.weight_bytes_in},
                   {"expert_rows", s.expert_rows},
                   {"device_steps", s.device_steps},
                   {"device_tokens_sent", s.device_tokens_sent},
                   {"device_buffer_bytes", st.ep->plane() ? st.ep->plane()->buffer_bytes() : size_t(0)},
                   {"slots", st.ep->placement().num_slots}};
  if (!s.last_rebalance_note.empty())
    j["note"] = s.last_rebalance_note;
  if (st.ep->load().steps_recorded() > 0) {
    try {
      auto report = eplb::balancedness(st.ep->placement().to_eplb(), st.ep->load().window_load(), st.ep->size());
      j["balancedness"] = report.step_weighted; // of the routing this rank's own tokens asked for
    } catch (const std::exception&) {
    }
  }
  return j.dump();
}

rank_state::~rank_state() {
  // A rank that ends releases its EP peers at once (their waits fail) rather than leaving them blocked.
  if (ep_transport)
    ep_transport->abort(config.node + "/rank" + std::to_string(config.index) + " ended");
  ep.reset();
  ep_ucx = nullptr;
  ep_transport.reset();
  ep_exchange.reset();
  retire_pool(*this);
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
  // A GPU rank runs on its own device (cuda:N from cluster.yaml), with its own streams and allocator.
  st.be = make_backend(cfg.backend == "cuda" ? cfg.device : cfg.backend);
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
          if (st.config.ep_size > 1) {
            if (!st.ep)
              return make_error(petrel_errc::rank_failed, "the EP group is not formed (waiting for rebuild)");
            st.ep->step(st.steps, *st.kv, st.scratch); // collective: every rank of the group steps together
          } else {
            st.model->forward(st.steps, *st.kv, st.scratch);
          }
        } catch (const ep::transport_error& e) {
          // A peer failed or the group re-formed: this step's requests fail (and migrate); the scheduler
          // re-forms the group (and the rank reloads its model) before the next step.
          st.ep.reset();
          st.ep_ucx = nullptr;
          st.ep_transport.reset();
          return make_error(petrel_errc::rank_failed, std::string("EP group failed: ") + e.what());
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
        if (f.kind == "gpu_fault") {
          // The device fails like under a faulting kernel: on a GPU the process exits (sticky error) and the
          // supervisor restarts it; a cpu rank has no device and says so. The fault lands 20 ms after the answer
          // (from a thread of its own, as a fault from another stream would), so that whoever injected it hears
          // "ok" before the process goes.
          if (st.be->name().rfind("cuda", 0) != 0)
            return make_error(petrel_errc::bad_request, "rank on '" + st.be->name() +
                                                            "' has no device to fault (gpu_fault needs a cuda rank)");
          std::cerr << "petrel " << st.config.node << "/rank" << st.config.index
                    << ": injecting a device fault (chaos gpu_fault)\n";
          std::thread([be = st.be.get()] {
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
            try {
              be->inject_device_fault(); // a sticky error: the process exits
            } catch (const std::exception& e) {
              std::cerr << "petrel rank: the injected device fault did not end the process: " << e.what() << "\n";
            }
          }).detach();
          return caf::ok_atom::value;
        }
        if (f.kind != "slow" || f.factor < 1.0)
          return make_error(petrel_errc::bad_request, "a rank takes 'slow' faults with factor >= 1 or 'gpu_fault'");
        st.slow_factor = f.factor;
        st.slow_until = std::chrono::steady_clock::now() + std::chrono::milliseconds(f.duration_ms);
        return caf::ok_atom::value;
      },
      [self](rebuild_atom, uint64_t generation) -> caf::result<ep_endpoint> {
        auto& st = self->state;
        if (st.config.ep_size <= 1)
          return make_error(petrel_errc::bad_request, "rank is not part of an expert-parallel group");
        try {
          return open_ep_generation(st, generation);
        } catch (const std::exception& e) {
          return make_error(petrel_errc::rank_failed, std::string("cannot open the EP exchange: ") + e.what());
        }
      },
      [self](rebuild_atom, ep_peers& peers) -> caf::result<caf::ok_atom> {
        try {
          connect_ep_generation(self->state, peers);
        } catch (const std::exception& e) {
          return make_error(petrel_errc::rank_failed, std::string("cannot form the EP group: ") + e.what());
        }
        return caf::ok_atom::value;
      },
      [self](rebalance_atom, bool trigger) -> caf::result<std::string> {
        auto& st = self->state;
        if (!st.ep)
          return make_error(petrel_errc::bad_request,
                            st.config.ep_size > 1 ? "the EP group is not formed yet" : "rank is not expert-parallel");
        if (trigger)
          st.ep->request_rebalance();
        return ep_stats_json(st);
      },
  };
}

} // namespace

caf::actor spawn_rank(caf::local_actor* parent, const rank_config& cfg, const child_context& ctx) {
  return caf::actor_cast<caf::actor>(parent->spawn<caf::detached>(rank_impl, cfg, ctx.epoch));
}

} // namespace petrel
