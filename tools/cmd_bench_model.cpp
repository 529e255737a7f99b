// petrel bench-model: prefill and decode tokens/s of a model on this machine's backend.
//   petrel bench-model --model DIR --threads T [--load dummy] [--prompt-len 128] [--prefill-batch 4]
//                      [--decode-batch 8] [--decode-steps 32] [--reps 3]
// prefill: one step holding prefill-batch prompts of prompt-len tokens (median of reps);
// decode: decode-batch sequences after a prompt-len prefill, decode-steps steps of one token each (median of reps);
// decode_b1: the same with one sequence (per-token latency). Prints one JSON object with tokens per wall second
// and per process-CPU second (the latter is what to compare on a shared machine).
#include <algorithm>
#include <chrono>
#include <ctime>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/backend.hpp"
#include "runtime/model.hpp"
#include "runtime/sampling.hpp"
#include "tools/command.hpp"

namespace {

struct bench_cli {
  std::string model, backend = "cpu", load = "auto";
  int threads = 1;
  int64_t prompt_len = 128, prefill_batch = 4, decode_batch = 8, decode_steps = 32, reps = 3;
  int page_size = 64;
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

int run(const bench_cli& o) {
  if (o.prompt_len < 1 || o.prefill_batch < 1 || o.decode_batch < 1 || o.decode_steps < 1 || o.reps < 1)
    return petrel::cli::exit_bad_input;
  std::unique_ptr<petrel::backend> be;
  try {
    be = petrel::make_backend(o.backend);
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
      return [o] { return run(*o); };
    });

} // namespace
