// `petrel bench` under load, for real: 200 concurrent SSE streams against a launched PD cluster. Every stream
// must end with [DONE] and carry exactly the tokens asked for, and every KV page must come back afterwards.
// Also: bench itself counts a stream that ends without [DONE] as failed (against a small fake server).
#include <doctest/doctest.h>

#include <atomic>
#include <utility> // before Boost.Asio: its awaitable.hpp uses std::exchange without including it
#include <thread>

#include <boost/asio.hpp>
#include <nlohmann/json.hpp>

#include "tests/support/http_client.hpp"
#include "tests/support/launched_cluster.hpp"
#include "tests/support/process.hpp"

using namespace petrel::test;
using json = nlohmann::json;
using namespace std::chrono_literals;

namespace {

json read_json(const std::string& path) {
  std::ifstream in(path);
  json j = json::parse(in, nullptr, false);
  return j.is_discarded() ? json::object() : j;
}

/// An HTTP server that answers /v1/models and answers every POST with an SSE stream of `events` text chunks
/// that then closes the connection without `data: [DONE]` (a server that dies mid-stream looks like this).
class truncating_sse_server {
public:
  explicit truncating_sse_server(int events) : acceptor_(io_, {boost::asio::ip::make_address("127.0.0.1"), 0}) {
    port_ = acceptor_.local_endpoint().port();
    thread_ = std::thread([this, events] {
      while (!stop_) {
        boost::system::error_code ec;
        boost::asio::ip::tcp::socket s(io_);
        acceptor_.accept(s, ec);
        if (ec || stop_)
          break;
        serve(s, events);
      }
    });
  }
  ~truncating_sse_server() {
    stop_ = true;
    boost::system::error_code ec;
    boost::asio::ip::tcp::socket poke(io_);
    poke.connect(acceptor_.local_endpoint(), ec); // wakes the blocking accept
    thread_.join();
  }
  int port() const { return port_; }

private:
  void serve(boost::asio::ip::tcp::socket& s, int events) {
    boost::system::error_code ec;
    std::string req;
    char buf[4096];
    // Read the head, then the body by Content-Length.
    size_t head_end;
    while ((head_end = req.find("\r\n\r\n")) == std::string::npos) {
      size_t n = s.read_some(boost::asio::buffer(buf), ec);
      if (ec)
        return;
      req.append(buf, n);
    }
    size_t len = 0;
    auto cl = req.find("Content-Length: ");
    if (cl == std::string::npos)
      cl = req.find("content-length: ");
    if (cl != std::string::npos)
      len = std::stoul(req.substr(cl + 16));
    while (req.size() < head_end + 4 + len) {
      size_t n = s.read_some(boost::asio::buffer(buf), ec);
      if (ec)
        return;
      req.append(buf, n);
    }
    std::string out;
    if (req.rfind("GET /v1/models", 0) == 0) {
      std::string body = R"({"object":"list","data":[{"id":"fake","object":"model","max_model_len":512}]})";
      out = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) +
            "\r\nConnection: close\r\n\r\n" + body;
    } else {
      out = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n";
      for (int i = 0; i < events; ++i)
        out += R"(data: {"object":"text_completion","choices":[{"index":0,"text":"x","finish_reason":null}]})"
               "\n\n";
    }
    boost::asio::write(s, boost::asio::buffer(out), ec);
    s.shutdown(boost::asio::ip::tcp::socket::shutdown_both, ec);
  }

  boost::asio::io_context io_;
  boost::asio::ip::tcp::acceptor acceptor_;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

} // namespace

TEST_CASE("petrel bench: 200 concurrent streams all complete, and every KV page comes back") {
  // Requests need at most 32 prompt + 16 output tokens = 3 pages of 16. 64 run at once (192 pages); the rest
  // wait in the router's queue (max_queued 256 > 200).
  launched_cluster c("tbenchload", [](const std::string& run_dir) {
    return "cluster: {name: tbenchload, run_dir: " + run_dir + "}\n" + "model: {path: " + fortune_model_dir() +
           ", name: fortune-moe}\n" + "gateway: {host: 127.0.0.1, port: 0, max_queued: 256}\n" +
           "nodes:\n  - {name: p0, ranks: [cpu]}\n  - {name: d0, ranks: [cpu]}\n" +
           "groups:\n  prefill: [{name: prefill0, nodes: [p0], chunk_tokens: 256, max_batch_tokens: 1024,"
           " kv_pages: 512, page_size: 16}]\n"
           "  decode: [{name: decode0, nodes: [d0], page_size: 16, max_running: 64, kv_pages: 256}]\n";
  });
  auto out = (c.dir.path / "bench.json").string();
  auto started = std::chrono::steady_clock::now();
  auto r = run_petrel("bench --port " + std::to_string(c.port) +
                      " --num-prompts 200 --max-concurrency 200 --request-rate inf --input-len 32 --output-len 16"
                      " --range-ratio 0.5 --warmup 0 --seed 7 --timeout 120 --json " +
                      out);
  auto took = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  MESSAGE("bench took " << took << " s:\n" << r.output);
  CHECK_MESSAGE(r.exit_code == 0, r.output);
  auto j = read_json(out);
  REQUIRE_MESSAGE(j.contains("requests"), r.output);
  CHECK(j["completed"] == 200);
  CHECK(j["failed"] == 0);
  CHECK(j["requests"].size() == 200);
  int exact = 0;
  for (auto& q : j["requests"]) {
    // --ignore-eos is on by default, so each stream carries exactly max_tokens tokens, 8..16 of them,
    // after a prompt of 16..32 tokens (BOS included).
    CHECK(q["success"] == true);
    CHECK(q["max_tokens"] >= 8);
    CHECK(q["max_tokens"] <= 16);
    CHECK(q["prompt_tokens"] >= 16);
    CHECK(q["prompt_tokens"] <= 32);
    exact += q["output_tokens"] == q["max_tokens"];
    CHECK(q["output_events"] >= 1);
  }
  CHECK(exact == 200);
  CHECK(j["total_output_tokens"].get<long long>() >= 200 * 8);
  CHECK(j["p99_ttft_ms"].get<double>() >= j["median_ttft_ms"].get<double>());
  CHECK(j["output_throughput"].get<double>() > 0);
  // Nothing leaks: every group's pages return, nothing runs or waits.
  CHECK_MESSAGE(eventually(10s, [&] { return c.idle(); }), c.health().dump());
}

TEST_CASE("petrel bench counts a stream that ends without [DONE] as failed") {
  truncating_sse_server fake(3);
  temp_dir d;
  auto out = (d.path / "truncated.json").string();
  auto r = run_petrel("bench --port " + std::to_string(fake.port()) +
                      " --num-prompts 5 --input-len 8 --output-len 4 --warmup 0 --timeout 10 --json " + out);
  CHECK_MESSAGE(r.exit_code == 1, r.output);
  CHECK_MESSAGE(r.output.find("without data: [DONE]") != std::string::npos, r.output);
  auto j = read_json(out);
  CHECK(j["completed"] == 0);
  CHECK(j["failed"] == 5);
}

TEST_CASE("petrel bench refuses bad input with exit code 2 and says which flag") {
  auto r = run_petrel("bench --num-prompts 3");
  CHECK(r.exit_code == 2);
  CHECK(r.output.find("--port") != std::string::npos);
  r = run_petrel("bench --port 1 --endpoint bogus");
  CHECK(r.exit_code == 2);
  CHECK(r.output.find("--endpoint") != std::string::npos);
  r = run_petrel("bench --port 1 --request-rate fast");
  CHECK(r.exit_code == 2);
  CHECK(r.output.find("--request-rate") != std::string::npos);
  // Nothing listens on port 1: a clear failure, not a hang or a crash.
  r = run_petrel("bench --port 1 --num-prompts 1");
  CHECK(r.exit_code == 1);
  CHECK(r.output.find("cannot list models") != std::string::npos);
}
