// The trained byte-level model tests/data/fortune-moe: Petrel must reproduce its reference numbers
// (reference_bpb.json, computed by PyTorch/HF in fp32): the greedy continuations token for token, the bits of the
// first held-out fortunes, and `petrel eval-bpb` over the whole held-out file.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "runtime/backend.hpp"
#include "runtime/generation.hpp"
#include "runtime/model.hpp"

using namespace petrel;
namespace fs = std::filesystem;

namespace {

const fs::path kDir = fs::path(PETREL_SOURCE_DIR) / "tests/data/fortune-moe";

nlohmann::json reference() { return nlohmann::json::parse(std::ifstream(kDir / "reference_bpb.json")); }

std::vector<std::string> fortunes(const std::string& text) {
  std::vector<std::string> out;
  std::string cur, line;
  std::istringstream in(text);
  while (std::getline(in, line)) {
    if (line == "%") {
      if (cur.find_first_not_of(" \t\r\n") != std::string::npos) out.push_back(cur);
      cur.clear();
    } else {
      cur += line + "\n";
    }
  }
  if (cur.find_first_not_of(" \t\r\n") != std::string::npos) out.push_back(cur);
  return out;
}

} // namespace

TEST_CASE("fortune-moe: greedy continuations and per-fortune bits match the reference") {
  if (!fs::exists(kDir / "model.safetensors")) {
    MESSAGE("tests/data/fortune-moe not present");
    return;
  }
  auto be = make_backend("cpu");
  auto model = deepseek_model::load(kDir, *be);
  CHECK(model->config().vocab_size == 258);
  auto ref = reference();
  kv_pool kv(*be, model->config(), 64, 16);
  for (auto& g : ref.at("greedy")) {
    auto prompt = g.at("prompt_ids").get<std::vector<int32_t>>();
    auto want = g.at("greedy_ids").get<std::vector<int32_t>>();
    generate_options o;
    o.max_new_tokens = int64_t(want.size());
    CHECK(generate(*model, kv, prompt, o).output_ids == want);
  }
  std::stringstream ss;
  ss << std::ifstream(kDir / "heldout.txt", std::ios::binary).rdbuf();
  auto docs = fortunes(ss.str());
  CHECK(docs.size() == ref.at("heldout_fortunes").get<size_t>());
  auto want_bits = ref.at("first_fortune_bits").get<std::vector<double>>();
  for (size_t i = 0; i < want_bits.size(); ++i) {
    std::vector<int32_t> ids = {256};
    for (unsigned char ch : docs[i]) ids.push_back(ch);
    kv_page_table t;
    REQUIRE(kv.reserve(t, int64_t(ids.size())));
    sequence_step s{std::span<const int32_t>(ids).subspan(0, ids.size() - 1), 0, t.pages, true};
    step_result out;
    model->forward({&s, 1}, kv, out);
    double bits = 0;
    for (size_t r = 0; r + 1 < ids.size(); ++r) {
      auto row = out.row(int64_t(r));
      double mx = row[0], sum = 0;
      for (float v : row) mx = std::max(mx, double(v));
      for (float v : row) sum += std::exp(double(v) - mx);
      bits += (std::log(sum) + mx - row[size_t(ids[r + 1])]) / std::log(2.0);
    }
    kv.release(t);
    CAPTURE(i);
    CHECK(bits == doctest::Approx(want_bits[i]).epsilon(1e-4));
  }
}

TEST_CASE("fortune-moe: petrel eval-bpb reproduces the held-out bits per byte") {
  if (!fs::exists(kDir / "model.safetensors")) return;
  std::string cmd = std::string(PETREL_BINARY) + " eval-bpb --model " + kDir.string() + " --text " +
                    (kDir / "heldout.txt").string() + " --threads 1";
  FILE* p = popen(cmd.c_str(), "r");
  REQUIRE(p);
  std::string out;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof buf, p)) out.append(buf, n);
  REQUIRE(pclose(p) == 0);
  auto j = nlohmann::json::parse(out);
  auto ref = reference();
  CHECK(j.at("bytes").get<int64_t>() == ref.at("heldout_bytes").get<int64_t>());
  CHECK(j.at("documents").get<int64_t>() == ref.at("heldout_fortunes").get<int64_t>());
  CHECK(j.at("bpb").get<double>() == doctest::Approx(ref.at("heldout_bpb").get<double>()).epsilon(1e-5));
}
