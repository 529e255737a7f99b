// petrel generate: run prompts through the model on one backend and print the new token ids.
//   petrel generate --model DIR --input-ids 5,17,42 --max-new-tokens 16 --temperature 0 [--dump-logits FILE]
//                   [--backend cpu] [--load dummy] [--prefill-chunk N] [--threads T]
//   expert parallelism (N in-process ranks, prompts spread over them, DP attention; runtime/ep_group.hpp):
//                   --ep N [--redundant R] [--ep-mode normal|low_latency] [--tbo] [--dispatch-delay-us U]
//                   [--init-expert-location FILE] [--rebalance-every S] [--max-dispatch-tokens M]
//                   [--ep-transport inprocess|ucx]   (ucx: one OS process per rank, UCX over tcp on loopback)
// stdout: {"output_ids":[...]} (new tokens only), one line per prompt; --input-ids may be given several times.
// --dump-logits (one prompt only) writes the prompt's logits, float32 LE, row-major [prompt_len, vocab].
// With any EP flag the output is the same as with --ep 1; a summary of the group goes to stderr.
#include <chrono>
#include <csignal>
#include <cstdio>
#include <spawn.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>
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
#include "transport/ep_ucx.hpp"
#include "transport/kv_transfer.hpp"

extern char** environ;

namespace {

struct generate_cli {
  std::string model, dump_logits, backend = "cpu", load = "auto";
  std::vector<std::string> input_ids;
  // expert parallelism
  int ep = 1, redundant = 0, max_dispatch_tokens = 128;
  std::string ep_mode = "normal", init_expert_location;
  bool tbo = false;
  int64_t dispatch_delay_us = 0, rebalance_every = 0;
  std::string ep_transport = "inprocess", dump_expert_load;
  int ep_rank_index = -1;     // internal: this process is rank i of a --ep-transport ucx group
  std::string ep_rendezvous;  // internal: the directory where the ranks meet
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
         !o.init_expert_location.empty() || o.rebalance_every != 0 || o.ep_transport != "inprocess" ||
         !o.dump_expert_load.empty();
}

int write_logits(const std::string& path, const std::vector<float>& logits);

std::string check_ep_flags(const generate_cli& o) {
  if (o.ep < 1) return "--ep must be >= 1, got " + std::to_string(o.ep);
  if (o.redundant < 0) return "--redundant must be >= 0";
  if (o.ep_mode != "normal" && o.ep_mode != "low_latency")
    return "--ep-mode must be 'normal' or 'low_latency', got '" + o.ep_mode + "'";
  if (o.dispatch_delay_us < 0) return "--dispatch-delay-us must be >= 0";
  if (o.rebalance_every < 0) return "--rebalance-every must be >= 0";
  if (o.max_dispatch_tokens < 1) return "--max-dispatch-tokens must be >= 1";
  if (o.ep_transport != "inprocess" && o.ep_transport != "ucx")
    return "--ep-transport must be 'inprocess' or 'ucx', got '" + o.ep_transport + "'";
  if (o.ep_transport == "ucx" && o.dispatch_delay_us != 0)
    return "--dispatch-delay-us simulates the wire of the in-process transport; it does not apply to --ep-transport ucx";
  if (o.ep_transport == "ucx" && o.ep > 255) return "--ep-transport ucx takes at most 255 ranks";
  if (o.ep_transport == "ucx" && !o.dump_expert_load.empty())
    return "--dump-expert-load needs the in-process transport (each UCX rank process has only its own load)";
  return "";
}

// -- --ep-transport ucx: one OS process per rank ------------------------------------------------------------

std::string fmt_float(double v) {
  char b[64];
  std::snprintf(b, sizeof b, "%.9g", v);
  return b;
}

/// The command line of rank r's process: this command's options plus the internal rank flags.
std::vector<std::string> rank_args(const generate_cli& o, int r, const std::string& dir) {
  std::vector<std::string> a = {"petrel", "generate", "--model", o.model};
  for (const auto& ids : o.input_ids) a.insert(a.end(), {"--input-ids", ids});
  a.insert(a.end(), {"--max-new-tokens", std::to_string(o.max_new_tokens), "--temperature", fmt_float(o.temperature),
                     "--top-k", std::to_string(o.top_k), "--top-p", fmt_float(o.top_p), "--seed", std::to_string(o.seed),
                     "--backend", o.backend, "--load", o.load, "--prefill-chunk", std::to_string(o.prefill_chunk),
                     "--page-size", std::to_string(o.page_size), "--stop-token", std::to_string(o.stop_token),
                     "--threads", std::to_string(o.threads), "--ep", std::to_string(o.ep), "--redundant",
                     std::to_string(o.redundant), "--ep-mode", o.ep_mode, "--max-dispatch-tokens",
                     std::to_string(o.max_dispatch_tokens), "--rebalance-every", std::to_string(o.rebalance_every),
                     "--ep-transport", "ucx", "--ep-rank-index", std::to_string(r), "--ep-rendezvous", dir});
  if (o.tbo) a.push_back("--tbo");
  if (!o.init_expert_location.empty()) a.insert(a.end(), {"--init-expert-location", o.init_expert_location});
  return a;
}

void write_file_atomically(const std::filesystem::path& p, const std::string& text) {
  const std::filesystem::path tmp = p.string() + ".tmp";
  std::ofstream(tmp) << text;
  std::filesystem::rename(tmp, p);
}

/// Runs rank `me` of the group: meets the others in `dir`, generates its share of the prompts (prompt i lives on
/// rank i % N) and writes them to dir/out.<me> (one JSON line per prompt: {"i": ..., "output_ids": [...]}).
/// Returns the rank's results too (rank 0 needs its prompt logits for --dump-logits).
std::vector<petrel::generate_result> run_ucx_rank(const generate_cli& o, const std::vector<std::vector<int32_t>>& prompts,
                                                  int me, const std::filesystem::path& dir,
                                                  const std::vector<pid_t>& children) {
  using namespace petrel::ep;
  namespace tr = petrel::transport;
  const int N = o.ep;
  auto t = tr::ep_ucx_transport::create(me, N, {"tcp", "lo", std::chrono::milliseconds(60'000)});
  write_file_atomically(dir / ("addr." + std::to_string(me)), tr::to_hex(t->address()));
  std::vector<std::vector<uint8_t>> addrs(static_cast<size_t>(N));
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  for (int r = 0; r < N; ++r) {
    const auto f = dir / ("addr." + std::to_string(r));
    while (!std::filesystem::exists(f)) {
      for (pid_t c : children)
        if (waitpid(c, nullptr, WNOHANG) == c) throw std::runtime_error("a rank process exited before the group met");
      if (std::chrono::steady_clock::now() > until) throw std::runtime_error("rank " + std::to_string(r) + " never published its UCX address");
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    std::string hex;
    std::ifstream(f) >> hex;
    auto bytes = tr::from_hex(hex);
    if (!bytes) throw std::runtime_error("rank " + std::to_string(r) + "'s address: " + bytes.error());
    addrs[size_t(r)] = *bytes;
  }
  t->connect(addrs);
  auto be = petrel::make_backend(o.backend);
  if (o.threads > 0) be->set_num_threads(o.threads);
  auto model = petrel::deepseek_model::load(o.model, *be, o.load == "dummy", o.seed);
  const petrel::model_config cfg = model->config();
  for (const auto& p : prompts)
    for (int32_t tok : p)
      if (tok >= cfg.vocab_size)
        throw std::invalid_argument("--input-ids: token " + std::to_string(tok) + " is outside the vocabulary (vocab_size " +
                                    std::to_string(cfg.vocab_size) + ")");
  ep_placement placement = starting_placement(cfg, N, o.redundant, o.init_expert_location);
  if (std::string err = check_placement(placement.phy2log, cfg, N, o.rebalance_every > 0); !err.empty())
    throw std::invalid_argument(err + (o.rebalance_every > 0 ? " (needed for live rebalancing)" : ""));
  ep_options opt;
  opt.mode = o.ep_mode == "normal" ? ep_mode::normal : ep_mode::low_latency;
  opt.two_batch_overlap = o.tbo;
  opt.rebalance_every = o.rebalance_every;
  opt.max_dispatch_tokens = o.max_dispatch_tokens;
  ep_rank rank(std::move(model), placement, *t, opt);
  std::vector<std::span<const int32_t>> mine;
  std::vector<size_t> index;
  int32_t pages = 1;
  for (size_t i = size_t(me); i < prompts.size(); i += size_t(N)) {
    mine.emplace_back(prompts[i]);
    index.push_back(i);
    pages += petrel::pages_for_tokens(int64_t(prompts[i].size()) + std::max<int64_t>(o.max_new_tokens, 0), o.page_size);
  }
  petrel::kv_pool kv(*be, cfg, pages, o.page_size);
  petrel::generate_options g;
  g.max_new_tokens = o.max_new_tokens;
  g.prefill_chunk = o.prefill_chunk;
  g.prompt_logits = !o.dump_logits.empty() && me == 0;
  g.stop_token = o.stop_token;
  g.sampling = {o.temperature, o.top_k, o.top_p, o.seed};
  std::vector<petrel::generate_result> res = generate_on_rank(rank, kv, mine, g);
  std::string lines;
  for (size_t j = 0; j < res.size(); ++j)
    lines += nlohmann::json({{"i", index[j]}, {"output_ids", res[j].output_ids}}).dump() + "\n";
  write_file_atomically(dir / ("out." + std::to_string(me)), lines);
  std::fprintf(stderr, "petrel generate: EP rank %d/%d (UCX, pid %d): %zu prompt(s), %lld step(s), %lld rebalance(s), %lld expert replicas received\n",
               me, N, int(getpid()), mine.size(), (long long)rank.stats().steps, (long long)rank.stats().rebalances,
               (long long)rank.stats().experts_moved_in);
  return res;
}

int run_ep_ucx(const generate_cli& o, const std::vector<std::vector<int32_t>>& prompts) {
  const bool child = o.ep_rank_index >= 0;
  if (child) {
    try {
      run_ucx_rank(o, prompts, o.ep_rank_index, o.ep_rendezvous, {});
      return petrel::cli::exit_ok;
    } catch (const std::invalid_argument& e) {
      return bad_input(e.what());
    } catch (const petrel::model_load_error& e) {
      return bad_input(e.what());
    } catch (const std::exception& e) {
      std::fprintf(stderr, "petrel generate: EP rank %d: %s\n", o.ep_rank_index, e.what());
      return petrel::cli::exit_failure;
    }
  }
  // The parent is rank 0; ranks 1..N-1 are this program again, with the internal rank flags.
  char tmpl[] = "/tmp/petrel_ep_XXXXXX";
  if (!mkdtemp(tmpl)) return bad_input("cannot create a rendezvous directory under /tmp");
  const std::filesystem::path dir = tmpl;
  std::vector<pid_t> children;
  std::string self = std::filesystem::read_symlink("/proc/self/exe").string();
  for (int r = 1; r < o.ep; ++r) {
    std::vector<std::string> args = rank_args(o, r, dir.string());
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_t pid = 0;
    if (posix_spawn(&pid, self.c_str(), nullptr, nullptr, argv.data(), environ) != 0) {
      for (pid_t c : children) kill(c, SIGTERM);
      return bad_input("cannot start the rank processes");
    }
    children.push_back(pid);
  }
  int rc = petrel::cli::exit_ok;
  std::vector<petrel::generate_result> mine;
  try {
    mine = run_ucx_rank(o, prompts, 0, dir, children);
  } catch (const std::invalid_argument& e) {
    rc = bad_input(e.what());
  } catch (const petrel::model_load_error& e) {
    rc = bad_input(e.what());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "petrel generate: EP rank 0: %s\n", e.what());
    rc = petrel::cli::exit_failure;
  }
  for (pid_t c : children) {
    if (rc != petrel::cli::exit_ok) kill(c, SIGTERM); // a failed rank 0 never lets the others finish
    int status = 0;
    waitpid(c, &status, 0);
    const int code = WIFEXITED(status) ? WEXITSTATUS(status) : petrel::cli::exit_failure;
    if (rc == petrel::cli::exit_ok && code != 0) rc = code;
  }
  if (rc == petrel::cli::exit_ok) {
    std::vector<std::string> lines(prompts.size());
    for (int r = 0; r < o.ep; ++r) {
      std::ifstream in(dir / ("out." + std::to_string(r)));
      std::string line;
      while (std::getline(in, line)) {
        auto j = nlohmann::json::parse(line);
        lines[j.at("i").get<size_t>()] = nlohmann::json({{"output_ids", j.at("output_ids")}}).dump();
      }
    }
    if (!o.dump_logits.empty()) rc = write_logits(o.dump_logits, mine.at(0).prompt_logits);
    if (rc == petrel::cli::exit_ok)
      for (const auto& l : lines) std::printf("%s\n", l.c_str());
  }
  std::filesystem::remove_all(dir);
  return rc;
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
  if (std::string err = check_ep_flags(o); !err.empty()) return bad_input(err);
  if (o.ep_transport == "ucx") return run_ep_ucx(o, prompts);
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
  if (!o.dump_expert_load.empty()) {
    // Every rank's routed-token counts (logical experts, MoE layers), merged: what `petrel eplb --input` reads.
    const auto& l0 = group->rank(0).load();
    petrel::eplb::expert_load_recorder merged(l0.num_layers(), l0.num_experts(), 1);
    for (int r = 0; r < group->size(); ++r) merged.merge_window_of(group->rank(r).load());
    std::ofstream f(o.dump_expert_load);
    f << merged.to_json().dump() << "\n";
    if (!f) return bad_input("--dump-expert-load: cannot write '" + o.dump_expert_load + "'");
  }
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
      sub.add_option("--ep-transport", o->ep_transport,
                     "inprocess (N threads, default) or ucx (N processes, UCX over tcp on loopback)");
      sub.add_option("--dump-expert-load", o->dump_expert_load,
                     "EP: write the routed-token counts of every (MoE layer, expert) over the last 128 steps, all "
                     "ranks merged (the recorder JSON `petrel eplb --input` reads)");
      sub.add_option("--ep-rank-index", o->ep_rank_index, "internal (--ep-transport ucx)")->group("");
      sub.add_option("--ep-rendezvous", o->ep_rendezvous, "internal (--ep-transport ucx)")->group("");
      return [o] { return run(*o); };
    });

} // namespace
