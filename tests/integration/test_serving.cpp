// Serving end to end, for real: a head process (gateway, router, schedulers) and node processes
// (ranks, kv_agents) on loopback, the embedded model, KV pages over UCX, a real HTTP client.
#include <doctest/doctest.h>

#include <future>
#include <set>
#include <tuple>

#include <nlohmann/json.hpp>

#include "actors/cluster.hpp"
#include "tests/support/http_client.hpp"
#include "tests/support/launched_cluster.hpp"
#include "tests/support/process.hpp"

using namespace petrel::test;
using json = nlohmann::json;
using namespace std::chrono_literals;

namespace {

std::string model_dir() { return std::string(PETREL_SOURCE_DIR) + "/tests/data/fortune-moe"; }

std::string cluster_yaml(const temp_dir& dir, const std::string& name, int kv_pages = 256, int max_queued = 64,
                         int decode_nodes = 1) {
  std::string y = "cluster: {name: " + name + ", run_dir: " + (dir.path / "run").string() + "}\n" +
                  "model: {path: " + model_dir() + ", name: fortune-moe}\n" +
                  "gateway: {host: 127.0.0.1, port: 0, max_queued: " + std::to_string(max_queued) + "}\n" +
                  "nodes:\n  - {name: p0, ranks: [cpu]}\n";
  for (int i = 0; i < decode_nodes; ++i)
    y += "  - {name: d" + std::to_string(i) + ", ranks: [cpu]}\n";
  y += "groups:\n  prefill: [{name: prefill0, nodes: [p0], chunk_tokens: 32, max_batch_tokens: 64, kv_pages: 256,"
       " page_size: 16}]\n  decode:\n";
  for (int i = 0; i < decode_nodes; ++i)
    y += "    - {name: decode" + std::to_string(i) + ", nodes: [d" + std::to_string(i) +
         "], page_size: 16, max_running: 16, kv_pages: " + std::to_string(kv_pages) + "}\n";
  y += "supervision: {node_intensity: 5, node_period: 60s}\n";
  return y;
}

/// A launched cluster; stops it (and asserts nothing is left) at the end.
struct running_cluster {
  temp_dir dir;
  std::string cfg;
  std::unique_ptr<background_process> head;
  int port = 0;

  explicit running_cluster(const std::string& name, int kv_pages = 256, int max_queued = 64, int decode_nodes = 1) {
    cfg = dir.file("cluster.yaml", cluster_yaml(dir, name, kv_pages, max_queued, decode_nodes));
    head = std::make_unique<background_process>(std::vector<std::string>{"launch", cfg},
                                                (dir.path / "head.log").string());
    auto run = dir.path / "run" / name / "head.json";
    REQUIRE_MESSAGE(eventually(30s,
                               [&] {
                                 if (!std::filesystem::exists(run))
                                   return false;
                                 std::ifstream in(run);
                                 port = json::parse(in)["gateway_port"];
                                 auto h = http_get(port, "/health");
                                 return h.status == 200 && json::parse(h.body)["status"] == "ok";
                               }),
                    head->output());
  }
  ~running_cluster() {
    run_petrel("stop " + cfg);
    head->wait_exit(15s);
  }
  json health() { return json::parse(http_get(port, "/health").body); }
};

std::string completion(int port, const std::string& prompt, int max_tokens, const std::string& extra_fields = "") {
  return petrel::test::completion_text(port, prompt, max_tokens, extra_fields);
}

using petrel::test::reference_text;

/// The text of an SSE completion stream: (concatenated text, events, whether [DONE] came).
std::tuple<std::string, size_t, bool> sse_text(const std::string& body) {
  std::string text;
  size_t events = 0;
  for (size_t pos = 0; (pos = body.find("data: ", pos)) != std::string::npos;) {
    auto end = body.find("\n\n", pos);
    auto payload = body.substr(pos + 6, end - pos - 6);
    pos = end;
    ++events;
    if (payload == "[DONE]")
      return {text, events, true};
    auto j = json::parse(payload);
    if (j.contains("error"))
      return {text + "<error: " + j["error"].dump() + ">", events, false};
    text += j["choices"][0]["text"].get<std::string>();
  }
  return {text, events, false};
}

bool all_pages_free(running_cluster& c) {
  auto h = c.health();
  for (auto& g : h["groups"])
    if (g["free_pages"] != g["total_pages"] || g["running"] != 0 || g["queued"] != 0)
      return false;
  return h["open_requests"] == 0;
}

} // namespace

TEST_CASE("PD-disaggregated serving matches the single-process model and streams over SSE") {
  running_cluster c("tserve");
  // Greedy output through gateway -> router -> prefill rank -> UCX -> decode rank equals the plain model.
  for (std::string prompt : {"The meaning of life is", "Q: Why did the chicken cross the road?\nA:"}) {
    auto served = completion(c.port, prompt, 48);
    CHECK(served == reference_text(prompt, 48));
  }
  // A prompt longer than chunk_tokens (32) runs as several prefill chunks and still matches.
  std::string long_prompt = "You will be successful in your work, and your friends will admire you. ";
  long_prompt += long_prompt;
  CHECK(completion(c.port, long_prompt, 24) == reference_text(long_prompt, 24));

  // Streaming: ordered chunks, then [DONE]; the concatenated text equals the non-streamed one.
  auto r = http_post(c.port, "/v1/completions",
                     R"({"model":"fortune-moe","prompt":"The meaning of life is","max_tokens":48,"temperature":0,"stream":true})");
  CHECK(r.status == 200);
  CHECK(r.headers.find("text/event-stream") != std::string::npos);
  auto [streamed, events, done] = sse_text(r.body);
  CHECK(done);
  CHECK(events > 3);
  CHECK(streamed == completion(c.port, "The meaning of life is", 48));

  // Native /generate and the chat endpoint.
  auto g = http_post(c.port, "/generate", R"({"text":"Hello","sampling_params":{"max_new_tokens":8,"temperature":0}})");
  CHECK(g.status == 200);
  CHECK(json::parse(g.body)["output_ids"].size() <= 8);
  auto chat = http_post(c.port, "/v1/chat/completions",
                        R"({"model":"fortune-moe","messages":[{"role":"user","content":"Hi"}],"max_tokens":8})");
  CHECK(chat.status == 200);
  CHECK(json::parse(chat.body)["object"] == "chat.completion");

  // Bad input: a 4xx in OpenAI's error shape, and nothing half-processed.
  auto bad = http_post(c.port, "/v1/completions", "{not json");
  CHECK(bad.status == 400);
  CHECK(json::parse(bad.body)["error"]["type"] == "invalid_request_error");
  auto too_long = http_post(c.port, "/v1/completions", R"({"model":"fortune-moe","prompt":"x","max_tokens":100000})");
  CHECK(too_long.status == 400);
  CHECK(json::parse(too_long.body)["error"]["param"] == "max_tokens");

  // `petrel status` shows per-group load and throughput next to the actor tree.
  auto status = run_petrel("status " + c.cfg);
  CHECK(status.exit_code == 0);
  CHECK(status.output.find("OUTPUT tok/s") != std::string::npos);
  CHECK(status.output.find("prefill0") != std::string::npos);

  // Metrics move.
  auto m = http_get(c.port, "/metrics").body;
  CHECK(m.find("petrel_group_tokens_total{group=\"decode0\",kind=\"output\"}") != std::string::npos);
  CHECK(m.find("petrel_kv_transfer_seconds_count{phase=\"transfer\"}") != std::string::npos);
  CHECK(m.find("petrel_output_tokens_total") != std::string::npos);
  CHECK(eventually(5s, [&] { return all_pages_free(c); }));
}

TEST_CASE("concurrent requests batch together and all pages come back") {
  running_cluster c("tconc");
  const std::string prompt = "A fortune: ";
  auto expected = reference_text(prompt, 24);
  std::vector<std::future<std::string>> futures;
  for (int i = 0; i < 12; ++i)
    futures.push_back(std::async(std::launch::async, [&] { return completion(c.port, prompt, 24); }));
  for (auto& f : futures)
    CHECK(f.get() == expected);
  CHECK(eventually(5s, [&] { return all_pages_free(c); }));
}

TEST_CASE("a client that disconnects mid-stream frees its pages on both sides") {
  running_cluster c("tabort");
  // curl gives up after 0.3 s of a 400-token stream.
  http_post(c.port, "/v1/completions",
            R"({"model":"fortune-moe","prompt":"Once upon a time","max_tokens":400,"temperature":0.8,"ignore_eos":true,"stream":true})",
            "--max-time 0.2");
  CHECK_MESSAGE(eventually(10s, [&] { return all_pages_free(c); }), c.health().dump());
  auto m = http_get(c.port, "/metrics").body;
  CHECK_MESSAGE(m.find("petrel_requests_total{status=\"aborted\"} 1") != std::string::npos, m);
}

TEST_CASE("admission control: a full KV pool queues requests, then refuses with 503 and Retry-After") {
  // 6 pages of 16 tokens: room for one 88-token request at a time; at most 2 may wait.
  running_cluster c("tadmit", /*kv_pages=*/6, /*max_queued=*/2);
  std::vector<std::future<http_reply>> futures;
  for (int i = 0; i < 16; ++i)
    futures.push_back(std::async(std::launch::async, [&] {
      return http_post(c.port, "/v1/completions",
                       R"({"model":"fortune-moe","prompt":"Tell me","max_tokens":80,"temperature":0,"ignore_eos":true})");
    }));
  int ok = 0, refused = 0;
  for (auto& f : futures) {
    auto r = f.get();
    if (r.status == 200) {
      ++ok;
    } else {
      CHECK(r.status == 503);
      CHECK(r.headers.find("Retry-After") != std::string::npos);
      ++refused;
    }
  }
  CHECK(ok >= 2);     // the pool holds one request: a second success means it waited in the queue
  CHECK(refused >= 1);
  CHECK(ok + refused == 16);
  // A request that can never fit the pool is refused at once, not queued forever.
  auto huge = http_post(c.port, "/v1/completions",
                        R"({"model":"fortune-moe","prompt":"x","max_tokens":400,"temperature":0})");
  CHECK(huge.status == 400);
  CHECK(json::parse(huge.body)["error"]["type"] == "invalid_request_error");
  CHECK(eventually(5s, [&] { return all_pages_free(c); }));
}

TEST_CASE("killing the decode node mid-stream migrates the request: the output is unchanged") {
  running_cluster c("tmigrate");
  const std::string prompt = "The best way to predict the future is";
  auto expected = reference_text(prompt, 400);
  int pid = node_pid(c.cfg, "d0");
  REQUIRE(pid > 0);
  auto fut = std::async(std::launch::async, [&] { return completion(c.port, prompt, 400); });
  // Wait until the request is decoding on d0, then SIGKILL d0's process.
  REQUIRE(eventually(10s, [&] {
    auto h = c.health();
    for (auto& g : h["groups"])
      if (g["group"] == "decode0" && g["running"] == 1)
        return true;
    return false;
  }));
  ::kill(pid, SIGKILL);
  auto served = fut.get();
  CHECK(served == expected);
  CHECK(eventually(10s, [&] { return all_pages_free(c) && c.health()["status"] == "ok"; }));
}

TEST_CASE("restarting the router and the schedulers mid-stream: the stream goes on, the sampled text is unchanged") {
  running_cluster c("trouter");
  // Sampled (temperature 0.8, fixed seed): Petrel samples each position from (seed, position), so a
  // request resubmitted after a restart must continue at the right position to give the same text.
  const std::string body =
      R"({"model":"fortune-moe","prompt":"Once upon a time","max_tokens":200,"temperature":0.8,"seed":7,"ignore_eos":true,"stream":true})";
  auto reference = http_post(c.port, "/v1/completions", body);
  REQUIRE(reference.status == 200);
  auto [expected, n_ref, done_ref] = sse_text(reference.body);
  REQUIRE(done_ref);
  // Stretch every decode step (about 50x) so that each restart lands while the stream is running.
  auto run = petrel::read_run_file(petrel::run_file_path(petrel::load_cluster_config(c.cfg)));
  REQUIRE(run);
  petrel::fault_request slow;
  slow.kind = "slow", slow.node = "d0", slow.child = "rank0", slow.factor = 50, slow.duration_ms = 120'000;
  std::string detail;
  REQUIRE_MESSAGE(petrel::inject_fault(*run, slow, detail) == 0, detail);
  // A device fault needs a device: a cpu rank refuses it, names why, and keeps serving.
  petrel::fault_request gpu = slow;
  gpu.kind = "gpu_fault";
  std::string why;
  CHECK(petrel::inject_fault(*run, gpu, why) != 0);
  CHECK_MESSAGE(why.find("has no device to fault") != std::string::npos, why);
  for (std::string actor : {"head/router", "head/decode/decode0", "head/prefill/prefill0"}) {
    CAPTURE(actor);
    auto fut = std::async(std::launch::async, [&] { return http_post(c.port, "/v1/completions", body); });
    REQUIRE(eventually(10s, [&] {
      auto h = c.health(); // (not a range-for over a temporary's member)
      for (auto& g : h["groups"])
        if (g["group"] == "decode0" && g["running"] == 1)
          return true;
      return false;
    }));
    auto restarted = run_petrel("restart " + c.cfg + " " + actor);
    CHECK_MESSAGE(restarted.exit_code == 0, restarted.output);
    auto r = fut.get();
    CHECK(r.status == 200);
    auto [text, events, done] = sse_text(r.body);
    CHECK(done);
    CHECK(text == expected);
  }
  CHECK(eventually(5s, [&] {
    auto m = http_get(c.port, "/metrics").body;
    return m.find("petrel_actor_restarts_total{actor=\"head/router\"} 1") != std::string::npos &&
           m.find("petrel_actor_restarts_total{actor=\"head/decode/decode0\"} 1") != std::string::npos;
  }));
  CHECK(eventually(10s, [&] { return all_pages_free(c); }));
  // A restarted gateway listens on the same port (the one the run file names), though cluster.yaml says 0.
  REQUIRE(run_petrel("restart " + c.cfg + " head/gateway").exit_code == 0);
  CHECK(eventually(10s, [&] {
    auto h = http_get(c.port, "/health");
    return h.status == 200 && json::parse(h.body)["status"] == "ok";
  }));
  CHECK(completion(c.port, "Once upon a time", 8) == reference_text("Once upon a time", 8));
  // An unknown actor is the user's error.
  CHECK(run_petrel("restart " + c.cfg + " head/nobody").exit_code == 2);
}

TEST_CASE("a streamed request no decode pool can hold gets a 400 before any stream opens") {
  running_cluster c("toversize", /*kv_pages=*/6);
  auto r = http_post(c.port, "/v1/completions",
                     R"({"model":"fortune-moe","prompt":"x","max_tokens":400,"temperature":0,"stream":true})");
  CHECK(r.status == 400);
  CHECK(r.headers.find("text/event-stream") == std::string::npos);
  CHECK(json::parse(r.body)["error"]["code"] == "context_length_exceeded");
}

TEST_CASE("the HF golden fixtures through the PD cluster give HF's greedy ids") {
  // Every fixture model (fp32, YaRN, fp8 block-scaled) served by separate prefill and decode
  // processes, KV over UCX, many requests at once: the greedy ids equal Hugging Face's.
  for (auto fixture : {"tiny_fp32", "yarn", "fp8"}) {
    auto dir = std::string(PETREL_SOURCE_DIR) + "/tests/data/golden/" + fixture;
    std::ifstream in(dir + "/golden.json");
    REQUIRE(in);
    auto golden = json::parse(in);
    temp_dir tmp;
    std::string name = std::string("tgold") + fixture;
    for (auto& ch : name)
      if (ch == '_')
        ch = '-';
    auto cfg = tmp.file("cluster.yaml",
                        "cluster: {name: " + name + ", run_dir: " + (tmp.path / "run").string() + "}\n" +
                            "model: {path: " + dir + ", name: golden}\n" +
                            "gateway: {host: 127.0.0.1, port: 0}\n"
                            "nodes:\n  - {name: p0, ranks: [cpu]}\n  - {name: d0, ranks: [cpu]}\n"
                            "groups:\n  prefill: [{name: prefill0, nodes: [p0], chunk_tokens: 64, max_batch_tokens: 128,"
                            " page_size: 16, kv_pages: 128}]\n"
                            "  decode: [{name: decode0, nodes: [d0], page_size: 16, kv_pages: 128}]\n");
    background_process head({"launch", cfg, "--no-demo"}, (tmp.path / "head.log").string());
    int port = 0;
    auto run = tmp.path / "run" / name / "head.json";
    REQUIRE_MESSAGE(eventually(30s,
                               [&] {
                                 if (!std::filesystem::exists(run))
                                   return false;
                                 std::ifstream rf(run);
                                 port = json::parse(rf)["gateway_port"];
                                 auto h = http_get(port, "/health");
                                 return h.status == 200 && json::parse(h.body)["status"] == "ok";
                               }),
                    head.output());
    json body{{"input_ids", golden["input_ids"]},
              {"sampling_params",
               {{"max_new_tokens", golden["greedy_ids"].size()}, {"temperature", 0}, {"ignore_eos", true}}}};
    std::vector<std::future<http_reply>> replies;
    for (int i = 0; i < 4; ++i)
      replies.push_back(std::async(std::launch::async, [&] { return http_post(port, "/generate", body.dump()); }));
    for (auto& f : replies) {
      auto r = f.get();
      REQUIRE_MESSAGE(r.status == 200, r.body);
      CHECK_MESSAGE(json::parse(r.body)["output_ids"] == golden["greedy_ids"], fixture);
    }
    run_petrel("stop " + cfg);
    head.wait_exit(15s);
  }
}
