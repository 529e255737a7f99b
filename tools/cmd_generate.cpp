// petrel generate: run one prompt through the model on one backend and print the new token ids.
//   petrel generate --model DIR --input-ids 5,17,42 --max-new-tokens 16 --temperature 0 [--dump-logits FILE]
//                   [--backend cpu] [--load dummy] [--prefill-chunk N] [--threads T]
// stdout: {"output_ids":[...]} (new tokens only). --dump-logits writes the prompt's logits, float32 LE,
// row-major [prompt_len, vocab].
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/backend.hpp"
#include "runtime/generation.hpp"
#include "runtime/model.hpp"
#include "runtime/safetensors.hpp"
#include "tools/command.hpp"

namespace {

struct generate_cli {
  std::string model, input_ids, dump_logits, backend = "cpu", load = "auto";
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

int run(const generate_cli& o) {
  std::vector<int32_t> prompt;
  if (!parse_ids(o.input_ids, prompt))
    return bad_input("--input-ids must be a comma-separated list of non-negative integers, got '" + o.input_ids + "'");
  if (o.load != "auto" && o.load != "dummy") return bad_input("--load must be 'auto' or 'dummy'");
  if (o.max_new_tokens < 0) return bad_input("--max-new-tokens must be >= 0");
  if (o.page_size <= 0) return bad_input("--page-size must be positive");
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
  for (int32_t t : prompt)
    if (t >= cfg.vocab_size)
      return bad_input("--input-ids: token " + std::to_string(t) + " is outside the vocabulary (vocab_size " +
                       std::to_string(cfg.vocab_size) + ")");
  const int64_t total = int64_t(prompt.size()) + o.max_new_tokens;
  petrel::kv_pool kv(*be, cfg, petrel::pages_for_tokens(total, o.page_size), o.page_size);

  petrel::generate_options opt;
  opt.max_new_tokens = o.max_new_tokens;
  opt.prefill_chunk = o.prefill_chunk;
  opt.prompt_logits = !o.dump_logits.empty();
  opt.stop_token = o.stop_token;
  opt.sampling = {o.temperature, o.top_k, o.top_p, o.seed};
  petrel::generate_result r = petrel::generate(*model, kv, prompt, opt);

  if (!o.dump_logits.empty()) {
    std::ofstream f(o.dump_logits, std::ios::binary);
    if (!f) return bad_input("--dump-logits: cannot write '" + o.dump_logits + "'");
    f.write(reinterpret_cast<const char*>(r.prompt_logits.data()), std::streamsize(r.prompt_logits.size() * sizeof(float)));
    if (!f) {
      std::fprintf(stderr, "petrel generate: writing '%s' failed\n", o.dump_logits.c_str());
      return petrel::cli::exit_failure;
    }
  }
  nlohmann::json out = {{"output_ids", r.output_ids}};
  std::printf("%s\n", out.dump().c_str());
  return petrel::cli::exit_ok;
}

const bool registered = petrel::cli::register_command(
    "generate", "Run one prompt through a DeepSeek-V3 model and print the generated token ids",
    [](CLI::App& sub) -> petrel::cli::command_fn {
      auto o = std::make_shared<generate_cli>();
      sub.add_option("--model", o->model, "model directory (config.json + safetensors)")->required();
      sub.add_option("--input-ids", o->input_ids, "prompt token ids, comma-separated")->required();
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
      return [o] { return run(*o); };
    });

} // namespace
