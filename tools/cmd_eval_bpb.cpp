// petrel eval-bpb: held-out bits per byte of a byte-level model (ids 0..255 = bytes, 256 = BOS, 257 = EOS).
//   petrel eval-bpb --model DIR --text FILE [--context N] [--docs auto|fortune|whole] [--batch B]
// Each document is fed as [BOS] + bytes; every byte is predicted from BOS and the bytes before it (BOS and EOS are
// not predicted). A document longer than context-1 bytes is cut into consecutive windows, each restarting at BOS.
// Documents: "fortune" splits the text on lines holding only '%' (fortune format; blank fortunes dropped),
// "whole" takes the file as one document, "auto" picks fortune when such a line exists.
// bpb = sum(-log2 p(byte)) / number of bytes. Prints one JSON object.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/backend.hpp"
#include "runtime/model.hpp"
#include "tools/command.hpp"

namespace {

constexpr int32_t kBos = 256;

struct eval_bpb_cli {
  std::string model, text, docs = "auto", backend = "cpu", load = "auto";
  int64_t context = 0, batch = 16;
  int threads = 0;
};

int bad_input(const std::string& msg) {
  std::fprintf(stderr, "petrel eval-bpb: %s\n", msg.c_str());
  return petrel::cli::exit_bad_input;
}

std::vector<std::string> split_fortunes(const std::string& text) {
  std::vector<std::string> docs;
  std::string cur;
  auto flush = [&] {
    if (cur.find_first_not_of(" \t\r\n\f\v") != std::string::npos) docs.push_back(cur);
    cur.clear();
  };
  size_t i = 0;
  while (i < text.size()) {
    size_t j = text.find('\n', i);
    size_t end = j == std::string::npos ? text.size() : j + 1;
    std::string line = text.substr(i, end - i);
    std::string bare = line;
    while (!bare.empty() && (bare.back() == '\n' || bare.back() == '\r')) bare.pop_back();
    if (bare == "%") flush();
    else cur += line;
    i = end;
  }
  flush();
  return docs;
}

int run(const eval_bpb_cli& o) {
  std::ifstream in(o.text, std::ios::binary);
  if (!in) return bad_input("--text: cannot open '" + o.text + "'");
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  if (o.docs != "auto" && o.docs != "fortune" && o.docs != "whole")
    return bad_input("--docs must be auto, fortune or whole");
  bool fortune = o.docs == "fortune";
  if (o.docs == "auto") fortune = text.rfind("%\n", 0) == 0 || text.find("\n%\n") != std::string::npos;
  std::vector<std::string> docs = fortune ? split_fortunes(text) : std::vector<std::string>{text};
  if (docs.empty() || docs[0].empty()) return bad_input("--text: '" + o.text + "' holds no text");
  if (o.batch <= 0) return bad_input("--batch must be positive");

  std::unique_ptr<petrel::backend> be;
  try {
    be = petrel::make_backend(o.backend);
  } catch (const std::exception& e) {
    return bad_input(std::string("--backend: ") + e.what());
  }
  if (o.threads > 0) be->set_num_threads(o.threads);
  std::unique_ptr<petrel::deepseek_model> model;
  try {
    model = petrel::deepseek_model::load(o.model, *be, o.load == "dummy");
  } catch (const petrel::model_load_error& e) {
    return bad_input(e.what());
  }
  const auto& cfg = model->config();
  if (cfg.vocab_size < 257)
    return bad_input("model vocab_size " + std::to_string(cfg.vocab_size) +
                     " is not a byte-level vocabulary (needs ids 0..255 bytes and 256 = BOS)");
  const int64_t context = o.context > 0 ? o.context : std::min<int64_t>(cfg.max_position_embeddings, 4096);
  if (context < 2) return bad_input("--context must be at least 2");

  // Windows: [BOS] + up to context-1 bytes each.
  struct window {
    std::vector<int32_t> tokens; // BOS + bytes
  };
  std::vector<window> windows;
  int64_t total_bytes = 0;
  for (const std::string& d : docs) {
    for (size_t i = 0; i < d.size(); i += size_t(context - 1)) {
      window w;
      w.tokens.push_back(kBos);
      for (size_t k = i; k < std::min(d.size(), i + size_t(context - 1)); ++k) w.tokens.push_back(uint8_t(d[k]));
      total_bytes += int64_t(w.tokens.size()) - 1;
      windows.push_back(std::move(w));
    }
  }

  const int32_t page = 64;
  const int32_t pages_per_window = petrel::pages_for_tokens(context, page);
  petrel::kv_pool kv(*be, cfg, int32_t(o.batch) * pages_per_window, page);
  std::vector<petrel::kv_page_table> tables(size_t(o.batch));
  std::vector<petrel::sequence_step> steps;
  petrel::step_result out;
  double bits = 0.0;
  int64_t tokens = 0;
  auto t0 = std::chrono::steady_clock::now();
  for (size_t w0 = 0; w0 < windows.size(); w0 += size_t(o.batch)) {
    const size_t n = std::min(windows.size() - w0, size_t(o.batch));
    steps.clear();
    for (size_t i = 0; i < n; ++i) {
      const auto& w = windows[w0 + i];
      if (!kv.reserve(tables[i], int64_t(w.tokens.size()))) throw std::runtime_error("KV pool too small");
      // The last token is only ever a target, never an input.
      steps.push_back({std::span<const int32_t>(w.tokens).subspan(0, w.tokens.size() - 1), 0, tables[i].pages, true});
      tokens += int64_t(w.tokens.size()) - 1;
    }
    model->forward(steps, kv, out);
    for (size_t i = 0; i < n; ++i) {
      const auto& w = windows[w0 + i];
      for (int64_t r = out.row_offset[i]; r < out.row_offset[i + 1]; ++r) {
        auto row = out.row(r);
        const int32_t target = w.tokens[size_t(r - out.row_offset[i] + 1)];
        double mx = row[0];
        for (float v : row) mx = std::max(mx, double(v));
        double sum = 0.0;
        for (float v : row) sum += std::exp(double(v) - mx);
        bits += (std::log(sum) + mx - double(row[size_t(target)])) / std::log(2.0);
      }
      kv.release(tables[i]);
    }
  }
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  nlohmann::ordered_json j = {{"bpb", bits / double(total_bytes)},
                              {"bits", bits},
                              {"bytes", total_bytes},
                              {"documents", docs.size()},
                              {"docs", fortune ? "fortune" : "whole"},
                              {"windows", windows.size()},
                              {"context", context},
                              {"seconds", secs},
                              {"tokens_per_s", double(tokens) / secs}};
  std::printf("%s\n", j.dump().c_str());
  return petrel::cli::exit_ok;
}

const bool registered = petrel::cli::register_command(
    "eval-bpb", "Held-out bits per byte of a byte-level model on a text file",
    [](CLI::App& sub) -> petrel::cli::command_fn {
      auto o = std::make_shared<eval_bpb_cli>();
      sub.add_option("--model", o->model, "model directory")->required();
      sub.add_option("--text", o->text, "text file (bytes)")->required();
      sub.add_option("--context", o->context, "window length in tokens incl. BOS (default: max_position_embeddings)");
      sub.add_option("--docs", o->docs, "auto | fortune (split on '%' lines) | whole");
      sub.add_option("--batch", o->batch, "windows per forward step");
      sub.add_option("--backend", o->backend, "cpu");
      sub.add_option("--load", o->load, "auto | dummy");
      sub.add_option("--threads", o->threads, "OpenBLAS threads (0 = OPENBLAS_NUM_THREADS, else 1)");
      return [o] { return run(*o); };
    });

} // namespace
