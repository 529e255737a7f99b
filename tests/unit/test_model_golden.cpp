// Golden tests: every tests/data/golden/<name>/ (config.json, model.safetensors[+index], golden.json, logits.bin)
// made by Hugging Face transformers must be reproduced by the cpu backend: the prompt's logits within
// 1e-3 x max|logit|, and the 16 greedy tokens exactly (generated through the paged cache, never recomputed).
// Once tests/data/golden exists, it must hold at least one fixture.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sys/wait.h>

#include <nlohmann/json.hpp>

#include "runtime/backend.hpp"
#include "runtime/generation.hpp"
#include "runtime/model.hpp"

using namespace petrel;
namespace fs = std::filesystem;

namespace {

struct golden_fixture {
  std::string name;
  fs::path dir;
  std::vector<int32_t> input_ids, greedy_ids;
  int64_t prompt_len = 0, vocab = 0;
  std::vector<float> logits;
};

std::vector<golden_fixture> load_fixtures() {
  std::vector<golden_fixture> out;
  fs::path root = fs::path(PETREL_SOURCE_DIR) / "tests/data/golden";
  if (!fs::is_directory(root)) return out;
  std::vector<fs::path> dirs;
  for (auto& e : fs::directory_iterator(root))
    if (e.is_directory() && fs::exists(e.path() / "golden.json")) dirs.push_back(e.path());
  std::sort(dirs.begin(), dirs.end());
  for (auto& d : dirs) {
    golden_fixture f;
    f.name = d.filename().string();
    f.dir = d;
    nlohmann::json g = nlohmann::json::parse(std::ifstream(d / "golden.json"));
    f.input_ids = g.at("input_ids").get<std::vector<int32_t>>();
    f.greedy_ids = g.at("greedy_ids").get<std::vector<int32_t>>();
    f.prompt_len = g.at("prompt_len").get<int64_t>();
    f.vocab = g.at("vocab_size").get<int64_t>();
    std::ifstream lb(d / "logits.bin", std::ios::binary);
    f.logits.resize(size_t(f.prompt_len * f.vocab));
    lb.read(reinterpret_cast<char*>(f.logits.data()), std::streamsize(f.logits.size() * sizeof(float)));
    REQUIRE_MESSAGE(lb.gcount() == std::streamsize(f.logits.size() * sizeof(float)), f.name, ": logits.bin too short");
    out.push_back(std::move(f));
  }
  return out;
}

} // namespace

TEST_CASE("golden fixtures: present once the directory exists") {
  fs::path root = fs::path(PETREL_SOURCE_DIR) / "tests/data/golden";
  if (!fs::is_directory(root)) {
    MESSAGE("tests/data/golden does not exist yet: no golden fixtures to check");
    return;
  }
  CHECK_MESSAGE(!load_fixtures().empty(), "tests/data/golden exists but holds no fixture (<name>/golden.json)");
}

TEST_CASE("golden fixtures: logits and greedy ids match Hugging Face") {
  auto be = make_backend("cpu");
  for (const golden_fixture& f : load_fixtures()) {
    CAPTURE(f.name);
    auto model = deepseek_model::load(f.dir, *be);
    REQUIRE(model->config().vocab_size == f.vocab);
    REQUIRE(int64_t(f.input_ids.size()) == f.prompt_len);
    double ref_max = 0;
    for (float v : f.logits) ref_max = std::max(ref_max, double(std::fabs(v)));
    for (int64_t chunk : {int64_t(0), int64_t(7)}) {
      CAPTURE(chunk);
      kv_pool kv(*be, model->config(), 64, 16);
      generate_options o;
      o.max_new_tokens = int64_t(f.greedy_ids.size());
      o.prompt_logits = true;
      o.prefill_chunk = chunk;
      generate_result r = generate(*model, kv, f.input_ids, o);
      REQUIRE(r.prompt_logits.size() == f.logits.size());
      double worst = 0;
      for (size_t i = 0; i < f.logits.size(); ++i)
        worst = std::max(worst, double(std::fabs(r.prompt_logits[i] - f.logits[i])));
      MESSAGE(f.name, " chunk ", chunk, ": max |dlogit| = ", worst, " (max |logit| ", ref_max, ")");
      CHECK(worst <= 1e-3 * ref_max);
      CHECK(r.output_ids == f.greedy_ids);
    }
  }
}

TEST_CASE("golden fixtures: the petrel generate CLI prints the greedy ids and dumps the logits") {
  auto fixtures = load_fixtures();
  if (fixtures.empty()) return;
  const golden_fixture& f = fixtures.front();
  std::string ids;
  for (size_t i = 0; i < f.input_ids.size(); ++i) ids += (i ? "," : "") + std::to_string(f.input_ids[i]);
  fs::path dump = fs::temp_directory_path() / ("petrel_golden_logits_" + std::to_string(::getpid()) + ".bin");
  std::string cmd = std::string(PETREL_BINARY) + " generate --model " + f.dir.string() + " --input-ids " + ids +
                    " --max-new-tokens " + std::to_string(f.greedy_ids.size()) + " --temperature 0 --backend cpu" +
                    " --dump-logits " + dump.string();
  FILE* p = popen(cmd.c_str(), "r");
  REQUIRE(p);
  std::string out;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof buf, p)) out.append(buf, n);
  CHECK(pclose(p) == 0);
  auto j = nlohmann::json::parse(out);
  CHECK(j.at("output_ids").get<std::vector<int32_t>>() == f.greedy_ids);
  CHECK(fs::file_size(dump) == f.logits.size() * sizeof(float));
  fs::remove(dump);
}

TEST_CASE("petrel generate: a bad checkpoint is exit code 2 with a message naming the tensor") {
  auto fixtures = load_fixtures();
  if (fixtures.empty()) return;
  const golden_fixture& f = fixtures.front();
  fs::path d = fs::temp_directory_path() / ("petrel_bad_ckpt_" + std::to_string(::getpid()));
  fs::create_directories(d);
  fs::copy_file(f.dir / "config.json", d / "config.json", fs::copy_options::overwrite_existing);
  {
    // Keep the header and a little data: every tensor past that point is truncated.
    std::ifstream in(f.dir / "model.safetensors", std::ios::binary);
    std::vector<char> head(size_t(fs::file_size(f.dir / "model.safetensors") / 2));
    in.read(head.data(), std::streamsize(head.size()));
    std::ofstream(d / "model.safetensors", std::ios::binary).write(head.data(), std::streamsize(head.size()));
  }
  std::string cmd = std::string(PETREL_BINARY) + " generate --model " + d.string() + " --input-ids 1,2 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  REQUIRE(p);
  std::string out;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof buf, p)) out.append(buf, n);
  int status = pclose(p);
  CHECK(WEXITSTATUS(status) == 2);
  CHECK(out.find("tensor '") != std::string::npos);
  CHECK(out.find("truncated") != std::string::npos);
  fs::remove_all(d);
}
