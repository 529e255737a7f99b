// petrel bench-model: prefill and decode tokens/s of a model on this machine's backend.
//   petrel bench-model --model DIR --threads T [--load dummy] [--prompt-len 128] [--prefill-batch 4]
//                      [--decode-batch 8] [--decode-steps 32] [--reps 3]
// prefill: one step holding prefill-batch prompts of prompt-len tokens (median of reps);
// decode: decode-batch sequences after a prompt-len prefill, decode-steps steps of one token each (median of reps);
// decode_b1: the same with one sequence (per-token latency). Prints one JSON object with tokens per wall second
// and per process-CPU second (the latter is what to compare on a shared machine).
//
// Expert parallelism (N in-process ranks, runtime/ep_group.hpp): with --ep N the benchmark times EP steps instead:
// every rank runs --prefill-batch prompts of --prompt-len tokens per step (median step time over --steps steps).
//   --zipf S          routes every token to top-k experts drawn from Zipf(S) (a per-layer random order of experts,
//                     the same on every rank) instead of the router, then reports balancedness (mean / max rank
//                     load) and step time with the initial placement, requests a live EPLB rebalance, and reports
//                     both again with the new placement;
//   --tbo, --dispatch-delay-us U, --ep-mode, --redundant R as in petrel generate.
//   --ep-data host|gpu|both  where the dispatch/combine rows go: through the host transport (fp32), through the GPU
//                     data plane (runtime/ep_device_plane.hpp, cuda backend), or both groups alternated step by step
//                     (reports the step time ratio). --ep-experts fp32|fp8: the plane's experts in fp32 on
//                     dequantised rows (default) or as fp8 grouped GEMMs on the received fp8 rows.
//                     --ep-exchange cuda_ipc|nccl: what carries the plane's rows (Petrel's kernels, or NCCL send/recv,
//                     which needs a GPU per rank: --backend cuda:each puts rank r on GPU r).
#include <algorithm>
#include <cmath>
#include <chrono>
#include <ctime>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/backend.hpp"
#include "runtime/ep_group.hpp"
#include "runtime/model.hpp"
#include "runtime/sampling.hpp"
#include "tools/command.hpp"

namespace {

struct bench_cli {
  std::string model, backend = "cpu", load = "auto";
  int threads = 1;
  int64_t prompt_len = 128, prefill_batch = 4, decode_batch = 8, decode_steps = 32, reps = 3;
  int page_size = 64;
  // expert parallelism
  int ep = 0, redundant = 0;
  double zipf = -1;
  bool tbo = false;
  int64_t dispatch_delay_us = 0, steps = 8;
  std::string ep_mode = "normal";
  std::string ep_data = "host"; // host | gpu | both (alternate the two and compare)
  std::string ep_exchange = "cuda_ipc"; // the GPU plane's carrier: cuda_ipc | nccl
  std::string ep_experts = "fp32"; // GPU plane: fp32 experts on dequantised rows, or fp8 grouped GEMMs
  uint64_t seed = 1;
};

using clock_type = std::chrono::steady_clock;

// Process CPU seconds (all threads): on a shared machine wall time includes waiting for a core, CPU time does not.
double cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

struct rate {
  double wall = 0, cpu = 0; // tokens per wall second, per CPU second
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Decode throughput for `batch` sequences.
rate bench_decode(petrel::deepseek_model& m, petrel::kv_pool& kv, const bench_cli& o, int64_t batch,
                    const std::vector<int32_t>& prompt) {
  std::vector<petrel::kv_page_table> tables(static_cast<size_t>(batch));
  for (auto& t : tables)
    if (!kv.reserve(t, o.prompt_len + o.decode_steps)) throw std::runtime_error("KV pool too small");
  std::vector<petrel::sequence_step> steps;
  petrel::step_result out;
  for (auto& t : tables) steps.push_back({prompt, 0, t.pages, false});
  m.forward(steps, kv, out);
  std::vector<int32_t> next(static_cast<size_t>(batch));
  for (int64_t b = 0; b < batch; ++b) next[size_t(b)] = petrel::argmax(out.last(size_t(b)));
  auto t0 = clock_type::now();
  double c0 = cpu_seconds();
  for (int64_t s = 0; s < o.decode_steps; ++s) {
    steps.clear();
    for (int64_t b = 0; b < batch; ++b)
      steps.push_back({std::span<const int32_t>(&next[size_t(b)], 1), o.prompt_len + s, tables[size_t(b)].pages, false});
    m.forward(steps, kv, out);
    for (int64_t b = 0; b < batch; ++b) next[size_t(b)] = petrel::argmax(out.last(size_t(b)));
  }
  double secs = std::chrono::duration<double>(clock_type::now() - t0).count(), cpu = cpu_seconds() - c0;
  for (auto& t : tables) kv.release(t);
  return {double(batch * o.decode_steps) / secs, double(batch * o.decode_steps) / cpu};
}

// Zipf(s) top-k routing: per layer a fixed random order of the experts (the same on every rank), ranks drawn with
// P(rank r) ~ r^-s, k distinct experts per token.
struct zipf_router {
  std::vector<std::vector<int32_t>> order; // [moe layer][rank] -> expert
  std::vector<double> cdf;
  uint64_t state;
  zipf_router(int layers, int experts, double s, uint64_t seed, int rank) : state(seed * 0x9e3779b97f4a7c15ull + uint64_t(rank) + 1) {
    uint64_t g = seed + 12345;
    auto next = [&g] {
      g = g * 6364136223846793005ull + 1442695040888963407ull;
      return g >> 11;
    };
    for (int l = 0; l < layers; ++l) {
      std::vector<int32_t> o(static_cast<size_t>(experts));
      for (int e = 0; e < experts; ++e) o[size_t(e)] = e;
      for (int e = experts - 1; e > 0; --e) std::swap(o[size_t(e)], o[size_t(next() % uint64_t(e + 1))]);
      order.push_back(o);
    }
    double acc = 0;
    for (int r = 1; r <= experts; ++r) cdf.push_back(acc += std::pow(double(r), -s));
    for (double& c : cdf) c /= acc;
  }
  double uniform() {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return double(state >> 11) * (1.0 / 9007199254740992.0);
  }
  void route(int layer, std::span<int32_t> ids, int top_k) {
    for (size_t t = 0; t + size_t(top_k) <= ids.size(); t += size_t(top_k))
      for (int k = 0; k < top_k; ++k) {
        int32_t e;
        bool dup;
        do {
          const size_t r = size_t(std::lower_bound(cdf.begin(), cdf.end(), uniform()) - cdf.begin());
          e = order[size_t(layer)][std::min(r, cdf.size() - 1)];
          dup = false;
          for (int j = 0; j < k; ++j) dup |= ids[t + size_t(j)] == e;
        } while (dup);
        ids[t + size_t(k)] = e;
      }
  }
};

// One in-process EP group with its per-rank prompts: every step, each rank prefills prefill_batch prompts.
struct ep_bench_group {
  std::unique_ptr<petrel::ep::ep_group> g;
  std::vector<std::unique_ptr<petrel::kv_pool>> pools;
  std::vector<petrel::kv_pool*> kv;
  std::vector<std::vector<petrel::kv_page_table>> tables;
  std::vector<std::vector<petrel::sequence_step>> batches;
  std::vector<petrel::step_result> outs;
  std::vector<double> ms, critical_cpu_ms; // per timed step: wall, and the largest rank-thread CPU time
  std::vector<int64_t> rows0;

  ep_bench_group(std::unique_ptr<petrel::ep::ep_group> grp, const bench_cli& o, const std::vector<int32_t>& prompt)
      : g(std::move(grp)) {
    const int N = g->size();
    const auto& cfg = g->config();
    tables.resize(size_t(N));
    batches.resize(size_t(N));
    outs.resize(size_t(N));
    for (int r = 0; r < N; ++r) {
      pools.push_back(std::make_unique<petrel::kv_pool>(
          g->rank_backend(r), cfg, int32_t(o.prefill_batch) * petrel::pages_for_tokens(o.prompt_len, o.page_size) + 1,
          o.page_size));
      kv.push_back(pools.back().get());
      tables[size_t(r)].resize(size_t(o.prefill_batch));
      for (auto& t : tables[size_t(r)]) {
        pools.back()->reserve(t, o.prompt_len);
        batches[size_t(r)].push_back({prompt, 0, t.pages, false});
      }
    }
  }
  std::vector<int64_t> rows() const {
    std::vector<int64_t> v;
    for (int r = 0; r < g->size(); ++r) v.push_back(g->rank(r).stats().expert_rows);
    return v;
  }
  static double thread_cpu_ms() {
    timespec ts{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return 1e3 * double(ts.tv_sec) + 1e-6 * double(ts.tv_nsec);
  }
  void step(bool timed) {
    std::vector<double> cpu(size_t(g->size()), 0.0);
    auto t0 = clock_type::now();
    g->run_on_ranks([&](int r) {
      const double c0 = thread_cpu_ms();
      g->rank(r).step(batches[size_t(r)], *kv[size_t(r)], outs[size_t(r)]);
      cpu[size_t(r)] = thread_cpu_ms() - c0;
    });
    if (!timed) return;
    ms.push_back(1000 * std::chrono::duration<double>(clock_type::now() - t0).count());
    critical_cpu_ms.push_back(*std::max_element(cpu.begin(), cpu.end()));
  }
  void start_timing() {
    ms.clear();
    critical_cpu_ms.clear();
    rows0 = rows();
  }
  nlohmann::ordered_json report(double modelled_balancedness = -1) const {
    const auto r1 = rows();
    std::vector<int64_t> per_rank;
    int64_t mx = 0, sum = 0;
    for (size_t r = 0; r < r1.size(); ++r) {
      per_rank.push_back(r1[r] - rows0[r]);
      mx = std::max(mx, per_rank.back());
      sum += per_rank.back();
    }
    nlohmann::ordered_json j = {{"step_ms_median", median(ms)},
                                {"step_ms_min", *std::min_element(ms.begin(), ms.end())},
                                {"busiest_rank_cpu_ms_median", median(critical_cpu_ms)},
                                {"balancedness_measured_rows", mx > 0 ? double(sum) / double(r1.size()) / double(mx) : 1.0},
                                {"expert_rows_per_rank", per_rank}};
    if (modelled_balancedness >= 0) j["balancedness_eplb_model"] = modelled_balancedness;
    j["steps_on_gpu_plane"] = g->rank(0).stats().device_steps;
    return j;
  }
};

// Times two groups step by step in alternation, so that a busy shared machine slows both alike. On a shared
// machine compare the minimum step times and the busiest rank's thread CPU time (contention does not inflate it):
// a rank that waits in an all-to-all sleeps, so the busiest rank's CPU time is the step's critical compute.
void alternate(ep_bench_group& a, ep_bench_group& b, int64_t steps) {
  a.step(false);
  b.step(false);
  a.start_timing();
  b.start_timing();
  for (int64_t s = 0; s < steps; ++s) {
    a.step(true);
    b.step(true);
  }
}

int run_ep(const bench_cli& o) {
  using namespace petrel::ep;
  auto bad = [](const std::string& m) {
    std::fprintf(stderr, "petrel bench-model: %s\n", m.c_str());
    return petrel::cli::exit_bad_input;
  };
  if (o.ep < 1) return bad("--ep must be >= 1");
  if (o.ep_mode != "normal" && o.ep_mode != "low_latency") return bad("--ep-mode must be 'normal' or 'low_latency'");
  if (o.steps < 1 || o.dispatch_delay_us < 0 || o.redundant < 0 || o.prefill_batch < 1 || o.prompt_len < 1)
    return bad("--steps, --prefill-batch, --prompt-len must be >= 1, --dispatch-delay-us and --redundant >= 0");
  if (o.zipf >= 0 && o.tbo) return bad("--zipf and --tbo are separate comparisons: give one of them");
  if (o.ep_experts != "fp32" && o.ep_experts != "fp8") return bad("--ep-experts must be fp32 or fp8, got '" + o.ep_experts + "'");
  if (o.ep_data != "host" && o.ep_data != "gpu" && o.ep_data != "both")
    return bad("--ep-data must be host, gpu or both, got '" + o.ep_data + "'");
  if (o.ep_exchange != "cuda_ipc" && o.ep_exchange != "nccl")
    return bad("--ep-exchange must be cuda_ipc or nccl, got '" + o.ep_exchange + "'");
  if (o.ep_data == "both" && (o.tbo || o.zipf >= 0)) return bad("--ep-data both is its own comparison: drop --tbo/--zipf");
  ep_group_options go;
  go.size = o.ep;
  go.redundant = o.redundant;
  go.backend = o.backend;
  go.dispatch_delay = std::chrono::microseconds(o.dispatch_delay_us);
  go.rank.mode = o.ep_mode == "normal" ? ep_mode::normal : ep_mode::low_latency;
  go.rank.load_window = int(2 * o.steps + 16);
  go.rank.device_exchange = o.ep_data == "gpu";
  go.rank.device_fp8_experts = o.ep_experts == "fp8";
  go.rank.device_kind = o.ep_exchange == "nccl" ? device_exchange_kind::nccl : device_exchange_kind::cuda_ipc;
  if (o.ep_data != "host") prepare_process_for_device_plane(); // before the first CUDA call
  go.rank.device_max_tokens = int(std::max<int64_t>(512, o.prefill_batch * o.prompt_len));
  petrel::model_config cfg;
  try {
    cfg = petrel::model_config::load(o.model);
  } catch (const std::exception& e) {
    return bad(e.what());
  }
  int moe_layers = 0;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) moe_layers += cfg.is_moe_layer(l) ? 1 : 0;
  auto with_zipf = [&](ep_group_options x) {
    // Each rank's thread calls its own router.
    std::vector<std::shared_ptr<zipf_router>> routers;
    for (int r = 0; r < o.ep; ++r)
      routers.push_back(std::make_shared<zipf_router>(moe_layers, int(cfg.n_routed_experts), o.zipf, o.seed, r));
    const int k = int(cfg.num_experts_per_tok);
    x.rank.routing_override = [routers, k](int rank, int layer, std::span<int32_t> ids) {
      routers[size_t(rank)]->route(layer, ids, k);
    };
    return x;
  };
  std::vector<int32_t> prompt(size_t(o.prompt_len));
  uint64_t st = 12345;
  for (auto& t : prompt) {
    st = st * 6364136223846793005ull + 1442695040888963407ull;
    t = int32_t((st >> 33) % uint64_t(std::min<int64_t>(cfg.vocab_size, 256)));
  }
  auto make = [&](const ep_group_options& x) {
    auto g = ep_group::load(o.model, x, o.load == "dummy", o.seed);
    g->rank_backend(0).set_num_threads(o.threads);
    return std::make_unique<ep_bench_group>(std::move(g), o, prompt);
  };
  const int64_t tokens = o.prefill_batch * o.prompt_len;
  nlohmann::ordered_json j = {{"model", o.model},
                              {"ep", o.ep},
                              {"redundant", o.redundant},
                              {"mode", o.ep_mode},
                              {"ep_data", o.ep_data},
                              {"gpu_experts", o.ep_experts},
                              {"gpu_exchange", o.ep_exchange},
                              {"dispatch_delay_us", o.dispatch_delay_us},
                              {"tokens_per_rank_step", tokens},
                              {"prefill_batch", o.prefill_batch},
                              {"steps", o.steps},
                              {"threads", o.threads}};
  try {
    if (o.zipf >= 0) {
      // `live`: the initial placement, a Zipf load, then a live rebalance; `fixed`: the initial placement kept.
      auto live = make(with_zipf(go));
      live->step(false);
      live->start_timing();
      for (int64_t s = 0; s < o.steps; ++s) live->step(true);
      const nlohmann::ordered_json solo_before = live->report();
      const ep_placement before = live->g->rank(0).placement();
      live->g->rank(0).request_rebalance();
      live->step(false); // loads gathered, weights sent
      live->step(false); // switched
      const ep_placement after = live->g->rank(0).placement();
      auto fixed = make(with_zipf(go));
      alternate(*fixed, *live, o.steps);
      petrel::eplb::expert_load_matrix load = live->g->rank(0).load().window_load();
      for (int r = 1; r < o.ep; ++r) {
        auto w = live->g->rank(r).load().window_load();
        for (size_t l = 0; l < load.size(); ++l)
          for (size_t e = 0; e < load[l].size(); ++e) load[l][e] += w[l][e];
      }
      const double bb = petrel::eplb::balancedness(before.to_eplb(), load, o.ep).step_weighted;
      const double ba = petrel::eplb::balancedness(after.to_eplb(), load, o.ep).step_weighted;
      int64_t moved = 0;
      for (int r = 0; r < o.ep; ++r) moved += live->g->rank(r).stats().experts_moved_in;
      j["zipf"] = o.zipf;
      j["slots_per_layer"] = before.num_slots;
      j["before_eplb"] = fixed->report(bb);
      j["after_eplb"] = live->report(ba);
      j["before_eplb_unpaired"] = solo_before;
      j["rebalance"] = {{"switched_on_every_rank", live->g->rank(0).stats().rebalances == 1},
                        {"expert_replicas_moved", moved}};
      j["step_time_ratio_before_over_after"] = median(fixed->ms) / median(live->ms);
      j["step_time_min_ratio_before_over_after"] =
          *std::min_element(fixed->ms.begin(), fixed->ms.end()) / *std::min_element(live->ms.begin(), live->ms.end());
      j["busiest_rank_cpu_ratio_before_over_after"] = median(fixed->critical_cpu_ms) / median(live->critical_cpu_ms);
      j["anchor"] = "SGLang on 96 H100s (ANCHORS.md): EPLB gives 1.49x prefill, 2.54x decode throughput";
    } else if (o.ep_data == "both") {
      auto gpu_opts = go;
      gpu_opts.rank.device_exchange = true;
      auto host = make(go);
      auto gpu = make(gpu_opts);
      alternate(*host, *gpu, o.steps);
      j["host_plane"] = host->report();
      j["gpu_plane"] = gpu->report();
      j["step_time_ratio_host_over_gpu"] = median(host->ms) / median(gpu->ms);
    } else {
      auto tbo_opts = go;
      tbo_opts.rank.two_batch_overlap = true;
      auto plain = make(go);
      if (!o.tbo) {
        plain->step(false);
        plain->start_timing();
        for (int64_t s = 0; s < o.steps; ++s) plain->step(true);
        j["result"] = plain->report();
      } else {
        auto tbo = make(tbo_opts);
        alternate(*plain, *tbo, o.steps);
        j["without_tbo"] = plain->report();
        j["with_tbo"] = tbo->report();
        j["step_time_ratio_without_over_with"] = median(plain->ms) / median(tbo->ms);
        j["step_time_min_ratio_without_over_with"] =
            *std::min_element(plain->ms.begin(), plain->ms.end()) / *std::min_element(tbo->ms.begin(), tbo->ms.end());
        j["anchor"] = "SGLang (ANCHORS.md): TBO +27-35% prefill throughput at equal batch";
      }
    }
  } catch (const std::exception& e) {
    return bad(e.what());
  }
  std::printf("%s\n", j.dump().c_str());
  return petrel::cli::exit_ok;
}

int run(const bench_cli& o) {
  if (o.ep > 0) return run_ep(o);
  if (o.prompt_len < 1 || o.prefill_batch < 1 || o.decode_batch < 1 || o.decode_steps < 1 || o.reps < 1)
    return petrel::cli::exit_bad_input;
  std::unique_ptr<petrel::backend> be;
  try {
    be = petrel::make_backend(petrel::rank_backend_name(o.backend, 0));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "petrel bench-model: --backend: %s\n", e.what());
    return petrel::cli::exit_bad_input;
  }
  be->set_num_threads(o.threads);
  std::unique_ptr<petrel::deepseek_model> m;
  try {
    m = petrel::deepseek_model::load(o.model, *be, o.load == "dummy");
  } catch (const petrel::model_load_error& e) {
    std::fprintf(stderr, "petrel bench-model: %s\n", e.what());
    return petrel::cli::exit_bad_input;
  }
  const auto& cfg = m->config();
  std::vector<int32_t> prompt(size_t(o.prompt_len));
  uint64_t s = 12345;
  for (auto& t : prompt) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    t = int32_t((s >> 33) % uint64_t(std::min<int64_t>(cfg.vocab_size, 256)));
  }
  const int64_t seqs = std::max(o.prefill_batch, o.decode_batch);
  const int32_t pages = int32_t(seqs) * petrel::pages_for_tokens(o.prompt_len + o.decode_steps, o.page_size);
  petrel::kv_pool kv(*be, cfg, pages, o.page_size);

  // Prefill: one step with prefill_batch prompts.
  std::vector<double> prefill_tps, prefill_cpu;
  for (int64_t r = 0; r <= o.reps; ++r) { // rep 0 warms up
    std::vector<petrel::kv_page_table> tables(size_t(o.prefill_batch));
    std::vector<petrel::sequence_step> steps;
    for (auto& t : tables) {
      kv.reserve(t, o.prompt_len);
      steps.push_back({prompt, 0, t.pages, false});
    }
    petrel::step_result out;
    auto t0 = clock_type::now();
    double c0 = cpu_seconds();
    m->forward(steps, kv, out);
    double secs = std::chrono::duration<double>(clock_type::now() - t0).count(), cpu = cpu_seconds() - c0;
    if (r > 0) {
      prefill_tps.push_back(double(o.prefill_batch * o.prompt_len) / secs);
      prefill_cpu.push_back(double(o.prefill_batch * o.prompt_len) / cpu);
    }
    for (auto& t : tables) kv.release(t);
  }
  std::vector<double> decode_tps, decode_cpu, decode_b1, decode_b1_cpu;
  for (int64_t r = 0; r < o.reps; ++r) {
    rate d = bench_decode(*m, kv, o, o.decode_batch, prompt), d1 = bench_decode(*m, kv, o, 1, prompt);
    decode_tps.push_back(d.wall);
    decode_cpu.push_back(d.cpu);
    decode_b1.push_back(d1.wall);
    decode_b1_cpu.push_back(d1.cpu);
  }
  nlohmann::ordered_json j = {{"model", o.model},
                              {"parameters", cfg.parameter_count()},
                              {"backend", be->name()},
                              {"threads", o.threads},
                              {"prompt_len", o.prompt_len},
                              {"prefill_batch", o.prefill_batch},
                              {"prefill_tokens_per_s", median(prefill_tps)},
                              {"prefill_tokens_per_cpu_s", median(prefill_cpu)},
                              {"decode_batch", o.decode_batch},
                              {"decode_steps", o.decode_steps},
                              {"decode_tokens_per_s", median(decode_tps)},
                              {"decode_tokens_per_cpu_s", median(decode_cpu)},
                              {"decode_b1_tokens_per_s", median(decode_b1)},
                              {"decode_b1_tokens_per_cpu_s", median(decode_b1_cpu)},
                              {"decode_b1_ms_per_token", 1000.0 / median(decode_b1)}};
  std::printf("%s\n", j.dump().c_str());
  return petrel::cli::exit_ok;
}

const bool registered = petrel::cli::register_command(
    "bench-model", "Measure prefill and decode tokens/s of a model on this machine",
    [](CLI::App& sub) -> petrel::cli::command_fn {
      auto o = std::make_shared<bench_cli>();
      sub.add_option("--model", o->model, "model directory")->required();
      sub.add_option("--threads", o->threads, "OpenBLAS threads");
      sub.add_option("--backend", o->backend, "cpu");
      sub.add_option("--load", o->load, "auto | dummy");
      sub.add_option("--prompt-len", o->prompt_len, "prompt tokens per sequence");
      sub.add_option("--prefill-batch", o->prefill_batch, "prompts per prefill step");
      sub.add_option("--decode-batch", o->decode_batch, "sequences per decode step");
      sub.add_option("--decode-steps", o->decode_steps, "decode steps timed");
      sub.add_option("--reps", o->reps, "repetitions (the median is reported)");
      sub.add_option("--page-size", o->page_size, "KV page size");
      sub.add_option("--ep", o->ep, "expert parallelism: time steps of N in-process ranks (see the file's header)");
      sub.add_option("--redundant", o->redundant, "EP: redundant expert slots per MoE layer");
      sub.add_option("--zipf", o->zipf, "EP: Zipf(S) routing; report balancedness and step time before/after EPLB");
      sub.add_flag("--tbo", o->tbo, "EP: two-batch overlap");
      sub.add_option("--dispatch-delay-us", o->dispatch_delay_us, "EP: simulated wire time of every all-to-all");
      sub.add_option("--ep-mode", o->ep_mode, "EP: normal | low_latency");
      sub.add_option("--ep-data", o->ep_data, "EP: rows through the host transport, the GPU data plane, or both compared");
      sub.add_option("--ep-experts", o->ep_experts, "EP GPU plane: fp32 experts (default) or fp8 grouped GEMMs");
      sub.add_option("--ep-exchange", o->ep_exchange, "EP GPU plane: cuda_ipc (Petrel's kernels, default) or nccl");
      sub.add_option("--steps", o->steps, "EP: timed steps per phase (median reported)");
      sub.add_option("--seed", o->seed, "EP: seed of the Zipf routing and dummy weights");
      return [o] { return run(*o); };
    });

} // namespace
