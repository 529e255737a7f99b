// Test support: a real cluster (`petrel launch` in the background) from a cluster.yaml text, waited on until its
// gateway answers /health, and stopped with `petrel stop` at the end.
#pragma once

#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include "tests/support/http_client.hpp"
#include "tests/support/process.hpp"

namespace petrel::test {

/// Where the embedded model lives in the source tree.
inline std::string fortune_model_dir() { return source_dir() + "/tests/data/fortune-moe"; }

/// Text of a /v1/completions answer (greedy unless `extra` JSON fields say otherwise); REQUIREs a 200.
inline std::string completion_text(int port, const std::string& prompt, int max_tokens, const std::string& extra = "") {
  nlohmann::json body{{"model", "fortune-moe"}, {"prompt", prompt}, {"max_tokens", max_tokens}, {"temperature", 0}};
  auto text = body.dump();
  if (!extra.empty())
    text = text.substr(0, text.size() - 1) + "," + extra + "}";
  auto r = http_post(port, "/v1/completions", text);
  REQUIRE_MESSAGE(r.status == 200, r.body);
  return nlohmann::json::parse(r.body)["choices"][0]["text"];
}

/// What `petrel generate` (one process, no actors, no transfer, all experts local) says for the embedded model,
/// greedy: the reference every served output is compared with.
inline std::string reference_text(const std::string& prompt, int max_tokens) {
  std::string ids = "256"; // the byte tokenizer's BOS
  for (unsigned char c : prompt)
    ids += "," + std::to_string(c);
  auto r = run_petrel("generate --model " + fortune_model_dir() + " --input-ids " + ids + " --max-new-tokens " +
                      std::to_string(max_tokens) + " --temperature 0");
  REQUIRE(r.exit_code == 0);
  auto out = nlohmann::json::parse(r.output.substr(r.output.find('{'))); // (never range-for over a temporary)
  std::string text;
  for (int id : out["output_ids"]) {
    if (id == 257) // EOS
      break;
    if (id < 256)
      text += static_cast<char>(id);
  }
  return text;
}

/// The pid of node `node`'s process as `petrel status --json CFG` reports it; 0 when the cluster does not answer or
/// lists no such node (a node being restarted, say).
inline int node_pid(const std::string& cfg, const std::string& node) {
  auto out = run_petrel("status --json " + cfg).output;
  auto brace = out.find('{');
  auto st = nlohmann::json::parse(brace == std::string::npos ? std::string() : out.substr(brace), nullptr, false);
  if (st.is_discarded() || !st.contains("nodes"))
    return 0;
  for (auto& n : st["nodes"])
    if (n["name"] == node && n["pid"].is_number_integer())
      return n["pid"].get<int>();
  return 0;
}

/// A launched cluster. `yaml_for(run_dir)` returns the cluster.yaml text; it must name the cluster `name`,
/// use `run_dir` and gateway port 0.
class launched_cluster {
public:
  template <class YamlFor>
  launched_cluster(const std::string& name, YamlFor yaml_for,
                   std::chrono::milliseconds ready_timeout = std::chrono::seconds(60)) {
    using json = nlohmann::json;
    run_dir_ = (dir.path / "run").string();
    cfg = dir.file("cluster.yaml", yaml_for(run_dir_));
    head = std::make_unique<background_process>(std::vector<std::string>{"launch", cfg},
                                                (dir.path / "head.log").string());
    auto run = dir.path / "run" / name / "head.json";
    bool up = eventually(ready_timeout, [&] {
      if (!std::filesystem::exists(run))
        return false;
      std::ifstream in(run);
      json j = json::parse(in, nullptr, false);
      if (j.is_discarded() || !j.contains("gateway_port"))
        return false;
      port = j["gateway_port"];
      auto h = http_get(port, "/health");
      if (h.status != 200)
        return false;
      json hj = json::parse(h.body, nullptr, false);
      return !hj.is_discarded() && hj.value("status", "") == "ok";
    });
    REQUIRE_MESSAGE(up, head->output());
  }
  ~launched_cluster() {
    run_petrel("stop " + cfg);
    head->wait_exit(std::chrono::seconds(15));
  }

  nlohmann::json health() const {
    auto h = http_get(port, "/health");
    auto j = nlohmann::json::parse(h.body, nullptr, false);
    return j.is_discarded() ? nlohmann::json::object() : j;
  }

  /// Every group's KV pages are free and nothing runs or waits.
  bool idle() const {
    auto h = health();
    if (!h.contains("groups"))
      return false;
    for (auto& g : h["groups"])
      if (g["free_pages"] != g["total_pages"] || g["running"] != 0 || g["queued"] != 0)
        return false;
    return h.value("open_requests", -1) == 0;
  }

  temp_dir dir;
  std::string cfg;
  std::unique_ptr<background_process> head;
  int port = 0;

private:
  std::string run_dir_;
};

} // namespace petrel::test
