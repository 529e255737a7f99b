// petrel generate: run prompts through the model on one backend and print the new token ids.
//   petrel generate --model DIR --input-ids 5,17,42 --max-new-tokens 16 --temperature 0 [--dump-logits FILE]
//                   [--backend cpu] [--load dummy] [--prefill-chunk N] [--threads T]
//   expert parallelism (N in-process ranks, prompts spread over them, DP attention; runtime/ep_group.hpp):
//                   --ep N [--redundant R] [--ep-mode normal|low_latency] [--tbo] [--dispatch-delay-us U]
//                   [--init-expert-location FILE] [--rebalance-every S] [--max-dispatch-tokens M]
// stdout: {"output_ids":[...]} (new tokens only), one line per prompt; --input-ids may be given several times.
// --dump-logits (one prompt only) writes the prompt's logits, float32 LE, row-major [prompt_len, vocab].
// With any EP flag the output is the same as with --ep 1; a summary of the group goes to stderr.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/backend.hpp"
#include "runtime/ep_group.hpp"
#include "runtime/generation.hpp"
#include "runtime/model.hpp"
#include "runtime/safetensors.hpp"
#include "tools/command.hpp"

namespace {

struct generate_cli {
  std::string model, dump_logits, backend = "cpu", load = "auto";
  std::vector<std::string> input_ids;
  // expert parallelism
  int ep = 1, redundant = 0, max_dispatch_tokens = 128;
  std::string ep_mode = "normal", init_expert_location;
  bool tbo = false;
  int64_t dispatch_delay_us = 0, rebalance_every = 0;
  int64_t max_new_tokens = 16, prefill_chunk = 0, stop_token = -1;
  int page_size = 64, threads = 0;
  float temperature = 0.0f, top_p = 1.0f;
  int top_k = 0;
  uint64_t seed = 0;
};

int bad_input(const std::string& msg) {
  std::fprintf(stderr, "petrel generate: %s\n", msg.c_str());
  return petrel::cli::exit_bad_input;
}

bool parse_ids(const std::string& s, std::vector<int32_t>& out) {
  size_t i = 0;
  while (i < s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    std::string tok = s.substr(i, j - i);
    if (tok.empty()) return false;
    try {
      size_t used = 0;
      long long v = std::stoll(tok, &used);
      if (used != tok.size() || v < 0 || v > INT32_MAX) return false;
      out.push_back(int32_t(v));
    } catch (...) {
      return false;
    }
    i = j + 1;
  }
  return !out.empty();
}

/// What loading will read: tensors and bytes over DIR/*.safetensors (headers only; the files are mapped, not read).
/// Printed before and after the load so a long load is not silent. deepseek_model::load takes no progress
/// callback, so this is a start and an end line, not a live counter. Any problem here is left to load() to report.
struct checkpoint_size {
  size_t files = 0, tensors = 0, bytes = 0;
};
checkpoint_size scan_checkpoint(const std::string& dir) {
  checkpoint_size s;
  try {
    for (const auto& e : std::filesystem::directory_iterator(dir)) {
      if (e.path().extension() != ".safetensors") continue;
      auto f = petrel::safetensors_file::open(e.path());
      ++s.files;
      s.tensors += f->tensors().size();
      for (const auto& [name, t] : f->tensors()) s.bytes += t.nbytes;
    }
  } catch (const std::exception&) {
    return {};
  }
  return s;
}

bool uses_ep(const generate_cli& o) {
  return o.ep != 1 || o.redundant != 0 || o.ep_mode != "normal" || o.tbo || o.dispatch_delay_us != 0 ||
         !o.init_expert_location.empty() || o.rebalance_every != 0;
}

int write_logits(const std::string& path, const std::vector<float>& logits) {
  std::ofstream f(path, std::ios::binary);
  if (!f) return bad_input("--dump-logits: cannot write '" + path + "'");
  f.write(reinterpret_cast<const char*>(logits.data()), std::streamsize(logits.size() * sizeof(float)));
  if (!f) {
    std::fprintf(stderr, "petrel generate: writing '%s' failed\n", path.c_str());
    return petrel::cli::exit_failure;
  }
  return petrel::cli::exit_ok;
}

int run_ep(const generate_cli& o, const std::vector<std::vector<int32_t>>& prompts) {
  using namespace petrel::ep;
  if (o.ep < 1) return bad_input("--ep must be >= 1, got " + std::to_string(o.ep));
  if (o.redundant < 0) return bad_input("--redundant must be >= 0");
  if (o.ep_mode != "normal" && o.ep_mode != "low_latency")
    return bad_input("--ep-mode must be 'normal' or 'low_latency', got '" + o.ep_mode + "'");
  if (o.dispatch_delay_us < 0) return bad_input("--dispatch-delay-us must be >= 0");
  if (o.rebalance_every < 0) return bad_input("--rebalance-every must be >= 0");
  if (o.max_dispatch_tokens < 1) return bad_input("--max-dispatch-tokens must be >= 1");
  ep_group_options go;
  go.size = o.ep;
  go.redundant = o.redundant;
  go.init_expert_location = o.init_expert_location;
  go.backend = o.backend;
  go.dispatch_delay = std::chrono::microseconds(o.dispatch_delay_us);
  go.rank.mode = o.ep_mode == "normal" ? ep_mode::normal : ep_mode::low_latency;
  go.rank.two_batch_overlap = o.tbo;
  go.rank.rebalance_every = o.rebalance_every;
  go.rank.max_dispatch_tokens = o.max_dispatch_tokens;
  std::unique_ptr<ep_group> group;
  const auto t0 = std::chrono::steady_clock::now();
  try {
    group = ep_group::load(o.model, go, o.load == "dummy", o.seed);
  } catch (const petrel::model_load_error& e) {
    return bad_input(e.what());
  } catch (const std::invalid_argument& e) {
    const std::string what = e.what();
    if (!o.init_expert_location.empty() && what.rfind(o.init_expert_location, 0) == 0)
      return bad_input("--init-expert-location " + what);
    return bad_input(what);
  }
  if (o.threads > 0) group->rank_backend(0).set_num_threads(o.threads);
  const auto& cfg = group->config();
  for (const auto& p : prompts)
    for (int32_t t : p)
      if (t >= cfg.vocab_size)
        return bad_input("--input-ids: token " + std::to_string(t) + " is outside the vocabulary (vocab_size " +
                         std::to_string(cfg.vocab_size) + ")");
  const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  petrel::generate_options opt;
  opt.max_new_tokens = o.max_new_tokens;
  opt.prefill_chunk = o.prefill_chunk;
  opt.prompt_logits = !o.dump_logits.empty();
  opt.stop_token = o.stop_token;
  opt.sampling = {o.temperature, o.top_k, o.top_p, o.seed};
  const auto g0 = std::chrono::steady_clock::now();
  std::vector<petrel::generate_result> results = generate_ep(*group, prompts, opt, o.page_size);
  const double gen_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - g0).count();

  const ep_rank& r0 = group->rank(0);
  int64_t moved = 0, ll = r0.stats().low_latency_steps;
  for (int r = 0; r < group->size(); ++r) moved += group->rank(r).stats().experts_moved_in;
  std::fprintf(stderr,
               "petrel generate: EP %d in-process ranks, %d expert slots per MoE layer (%d redundant), mode %s "
               "(%lld of %lld steps low-latency), TBO %s; %lld rebalance(s), %lld expert replicas moved; "
               "load %.2f s, generate %.2f s\n",
               group->size(), r0.placement().num_slots, r0.placement().num_slots - int(cfg.n_routed_experts),
               o.ep_mode.c_str(), (long long)ll, (long long)r0.stats().steps, o.tbo ? "on" : "off",
               (long long)r0.stats().rebalances, (long long)moved, load_s, gen_s);
  if (!r0.stats().last_rebalance_note.empty())
    std::fprintf(stderr, "petrel generate: %s\n", r0.stats().last_rebalance_note.c_str());
  if (!o.dump_logits.empty())
    if (int rc = write_logits(o.dump_logits, results[0].prompt_logits); rc != 0) return rc;
  for (const auto& r : results) std::printf("%s\n", nlohmann::json({{"output_ids", r.output_ids}}).dump().c_str());
  return petrel::cli::exit_ok;
}

int run(const generate_cli& o) {
  std::vector<std::vector<int32_t>> prompts;
  for (const std::string& ids : o.input_ids) {
    std::vector<int32_t> p;
    if (!parse_ids(ids, p))
      return bad_input("--input-ids must be a comma-separated list of non-negative integers, got '" + ids + "'");
    prompts.push_back(std::move(p));
  }
  if (prompts.empty()) return bad_input("--input-ids is required");
  if (o.load != "auto" && o.load != "dummy") return bad_input("--load must be 'auto' or 'dummy'");
  if (o.max_new_tokens < 0) return bad_input("--max-new-tokens must be >= 0");
  if (o.page_size <= 0) return bad_input("--page-size must be positive");
  if (!o.dump_logits.empty() && prompts.size() > 1) return bad_input("--dump-logits takes one prompt (one --input-ids)");
  if (uses_ep(o)) return run_ep(o, prompts);
  std::unique_ptr<petrel::backend> be;
  try {
    be = petrel::make_backend(o.backend);
  } catch (const std::exception& e) {
    return bad_input(std::string("--backend: ") + e.what());
  }
  if (o.threads > 0) be->set_num_threads(o.threads);
  std::unique_ptr<petrel::deepseek_model> model;
  const checkpoint_size ck = o.load == "dummy" ? checkpoint_size{} : scan_checkpoint(o.model);
  if (ck.files)
    std::fprintf(stderr, "petrel generate: loading %s: %zu tensors, %.1f MiB in %zu file(s)\n", o.model.c_str(),
                 ck.tensors, double(ck.bytes) / (1 << 20), ck.files);
  const auto load_start = std::chrono::steady_clock::now();
  try {
    model = petrel::deepseek_model::load(o.model, *be, o.load == "dummy", o.seed);
  } catch (const petrel::model_load_error& e) {
    return bad_input(e.what());
  }
  if (ck.files) {
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - load_start).count();
    std::fprintf(stderr, "petrel generate: loaded %zu tensors (%.1f MiB) in %.2f s (%.0f MiB/s)\n", ck.tensors,
                 double(ck.bytes) / (1 << 20), s, s > 0 ? double(ck.bytes) / (1 << 20) / s : 0.0);
  }
  const auto& cfg = model->config();
  int64_t total = 0;
  for (const auto& prompt : prompts) {
    for (int32_t t : prompt)
      if (t >= cfg.vocab_size)
        return bad_input("--input-ids: token " + std::to_string(t) + " is outside the vocabulary (vocab_size " +
                         std::to_string(cfg.vocab_size) + ")");
    total = std::max(total, int64_t(prompt.size()) + o.max_new_tokens);
  }
  petrel::kv_pool kv(*be, cfg, petrel::pages_for_tokens(total, o.page_size), o.page_size);

  petrel::generate_options opt;
  opt.max_new_tokens = o.max_new_tokens;
  opt.prefill_chunk = o.prefill_chunk;
  opt.prompt_logits = !o.dump_logits.empty();
  opt.stop_token = o.stop_token;
  opt.sampling = {o.temperature, o.top_k, o.top_p, o.seed};
  std::vector<petrel::generate_result> results;
  for (const auto& prompt : prompts) results.push_back(petrel::generate(*model, kv, prompt, opt));

  if (!o.dump_logits.empty())
    if (int rc = write_logits(o.dump_logits, results[0].prompt_logits); rc != 0) return rc;
  for (const auto& r : results) {
    nlohmann::json out = {{"output_ids", r.output_ids}};
    std::printf("%s\n", out.dump().c_str());
  }
  return petrel::cli::exit_ok;
}

const bool registered = petrel::cli::register_command(
    "generate", "Run prompts through a DeepSeek-V3 model (optionally expert-parallel) and print the generated token ids",
    [](CLI::App& sub) -> petrel::cli::command_fn {
      auto o = std::make_shared<generate_cli>();
      sub.add_option("--model", o->model, "model directory (config.json + safetensors)")->required();
      sub.add_option("--input-ids", o->input_ids, "prompt token ids, comma-separated; repeat for several prompts")
          ->required()
          ->take_all()
          ->allow_extra_args(false);
      sub.add_option("--max-new-tokens", o->max_new_tokens, "tokens to generate");
      sub.add_option("--temperature", o->temperature, "0 = greedy");
      sub.add_option("--top-k", o->top_k, "keep the k most likely tokens (0 = all)");
      sub.add_option("--top-p", o->top_p, "nucleus mass (1 = all)");
      sub.add_option("--seed", o->seed, "sampling seed (and dummy-weight seed)");
      sub.add_option("--dump-logits", o->dump_logits, "write the prompt's logits (float32 [prompt_len, vocab])");
      sub.add_option("--backend", o->backend, "cpu");
      sub.add_option("--load", o->load, "auto (read the checkpoint) or dummy (random weights from config.json)");
      sub.add_option("--prefill-chunk", o->prefill_chunk, "prefill the prompt in chunks of N tokens (0 = one step)");
      sub.add_option("--page-size", o->page_size, "KV cache page size in tokens");
      sub.add_option("--stop-token", o->stop_token, "stop after this token id (-1 = never)");
      sub.add_option("--threads", o->threads, "OpenBLAS threads (0 = OPENBLAS_NUM_THREADS, else 1)");
      sub.add_option("--ep", o->ep, "expert parallelism: N in-process ranks, prompts spread over them (default 1)");
      sub.add_option("--redundant", o->redundant, "redundant expert slots per MoE layer (EP)");
      sub.add_option("--ep-mode", o->ep_mode, "normal (contiguous layout) or low_latency (masked layout for steps "
                                              "that fit --max-dispatch-tokens)");
      sub.add_option("--max-dispatch-tokens", o->max_dispatch_tokens, "low-latency mode: tokens per rank and micro-batch");
      sub.add_flag("--tbo", o->tbo, "two-batch overlap: two micro-batches per rank");
      sub.add_option("--dispatch-delay-us", o->dispatch_delay_us, "simulated wire time of every expert all-to-all");
      sub.add_option("--init-expert-location", o->init_expert_location,
                     "initial expert placement: the JSON `petrel eplb` prints ({\"phy2log\": [[...]]})");
      sub.add_option("--rebalance-every", o->rebalance_every, "live EPLB rebalance every S steps (0 = never)");
      return [o] { return run(*o); };
    });

} // namespace
