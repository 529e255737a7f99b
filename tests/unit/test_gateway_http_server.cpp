// The HTTP server, with real clients on 127.0.0.1: a Beast sync client, raw sockets and curl.
// Full responses, keep-alive, answers from other threads, SSE in order, client disconnect,
// 400/404/405/413, dropped and throwing handlers, pipelining, 50 parallel requests, stop().
#include <doctest/doctest.h>

#include <utility> // before Asio: Boost 1.74's awaitable.hpp needs std::exchange under C++20

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <cstdio>
#include <fstream>
#include <future>
#include <sstream>
#include <thread>

#include <poll.h>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <nlohmann/json.hpp>

#include "transport/http_server.hpp"

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;
using namespace petrel::transport;
using namespace std::chrono_literals;
using json = nlohmann::json;

namespace {

// A blocking client connection (Beast). ctest's TIMEOUT bounds a server that never answers.
struct client {
  net::io_context ioc;
  tcp::socket sock{ioc};
  beast::flat_buffer buf;

  explicit client(uint16_t port) {
    sock.connect({net::ip::make_address("127.0.0.1"), port});
  }
  http::response<http::string_body> call(http::verb verb, const std::string& target, const std::string& body = {},
                                          bool keep_alive = true) {
    http::request<http::string_body> req{verb, target, 11};
    req.set(http::field::host, "127.0.0.1");
    req.keep_alive(keep_alive);
    if (!body.empty() || verb == http::verb::post) {
      req.body() = body;
      req.set(http::field::content_type, "application/json");
      req.prepare_payload();
    }
    http::write(sock, req);
    http::response_parser<http::string_body> p;
    p.body_limit(64u << 20);
    http::read(sock, buf, p);
    return p.release();
  }
  void send_raw(const std::string& bytes) { net::write(sock, net::buffer(bytes)); }
  // Reads until the server closes, for at most 5 s (Asio's sync reads ignore SO_RCVTIMEO).
  std::string read_all() {
    std::string out(static_cast<const char*>(buf.data().data()), buf.size());
    buf.clear();
    char tmp[4096];
    auto deadline = std::chrono::steady_clock::now() + 5s;
    while (std::chrono::steady_clock::now() < deadline) {
      pollfd pfd{sock.native_handle(), POLLIN, 0};
      if (::poll(&pfd, 1, 100) <= 0) continue;
      beast::error_code ec;
      std::size_t n = sock.read_some(net::buffer(tmp), ec);
      if (ec) break;
      out.append(tmp, n);
    }
    return out;
  }
};

template <class T>
bool ready(std::future<T>& f, std::chrono::milliseconds d = 3000ms) {
  return f.wait_for(d) == std::future_status::ready;
}

std::string run_command(const std::string& cmd) {
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return out;
  char b[4096];
  std::size_t n;
  while ((n = fread(b, 1, sizeof b, p)) > 0) out.append(b, n);
  pclose(p);
  return out;
}

struct started_server {
  http_server server;
  explicit started_server(http_server_options o = {}) : server(std::move(o)) {}
  uint16_t start() {
    auto err = server.start();
    REQUIRE_FALSE(err.has_value());
    REQUIRE(server.port() != 0);
    return server.port();
  }
};

} // namespace

TEST_CASE("full responses, keep-alive, headers and answers from another thread") {
  started_server s;
  s.server.route("GET", "/hello", [](const http_request& req, std::shared_ptr<response_stream> out) {
    out->respond(200, "text/plain", "hi " + req.query + " " + req.header("x-TEST"), {{"X-Reply", "yes"}});
  });
  std::vector<std::thread> workers;
  std::mutex wm;
  s.server.route("POST", "/later", [&](const http_request& req, std::shared_ptr<response_stream> out) {
    std::lock_guard lock(wm);
    workers.emplace_back([out, body = req.body] {
      std::this_thread::sleep_for(30ms);
      CHECK(out->respond_json(503, "{\"echo\":" + body + "}", {{"Retry-After", "2"}}));
      CHECK_FALSE(out->respond_json(200, "{}")); // exactly once
    });
  });
  const uint16_t port = s.start();

  client c(port);
  http::request<http::empty_body> req{http::verb::get, "/hello?a=1", 11};
  req.set("X-Test", "v");
  http::write(c.sock, req);
  http::response<http::string_body> res;
  http::read(c.sock, c.buf, res);
  CHECK(res.result_int() == 200);
  CHECK(res.body() == "hi a=1 v");
  CHECK(res[http::field::content_type] == "text/plain");
  CHECK(res["X-Reply"] == "yes");
  CHECK(res.keep_alive());
  // Same connection again: keep-alive works.
  auto r2 = c.call(http::verb::post, "/later", "[1,2]");
  CHECK(r2.result_int() == 503);
  CHECK(r2.body() == "{\"echo\":[1,2]}");
  CHECK(r2["Retry-After"] == "2");
  CHECK(r2[http::field::content_type] == "application/json");
  auto r3 = c.call(http::verb::get, "/hello?b", {}, false);
  CHECK(r3.body() == "hi b ");
  CHECK_FALSE(r3.keep_alive());
  for (auto& t : workers) t.join();
}

TEST_CASE("SSE: events arrive in order, end with [DONE], and the connection is reused") {
  started_server s;
  std::vector<std::thread> producers;
  std::mutex pm;
  s.server.route("POST", "/stream", [&](const http_request&, std::shared_ptr<response_stream> out) {
    // No begin_sse(): the first send_event() opens the stream; a late begin_sse() is refused.
    std::lock_guard lock(pm);
    producers.emplace_back([out] {
      for (int i = 0; i < 20; ++i) {
        if (i == 1) CHECK_FALSE(out->begin_sse());
        CHECK(out->send_event("{\"i\":" + std::to_string(i) + "}"));
        if (i % 5 == 0) std::this_thread::sleep_for(2ms);
      }
      CHECK(out->send_event("line1\nline2"));
      CHECK(out->send_event("[DONE]"));
      CHECK(out->end_sse());
      CHECK_FALSE(out->send_event("late"));
    });
  });
  const uint16_t port = s.start();
  std::string expected;
  for (int i = 0; i < 20; ++i) expected += "data: {\"i\":" + std::to_string(i) + "}\n\n";
  expected += "data: line1\ndata: line2\n\ndata: [DONE]\n\n";

  client c(port);
  auto res = c.call(http::verb::post, "/stream", "{}");
  CHECK(res.result_int() == 200);
  CHECK(res[http::field::content_type] == "text/event-stream");
  CHECK(res.chunked());
  CHECK(res.body() == expected);
  auto again = c.call(http::verb::post, "/stream", "{}"); // same connection
  CHECK(again.body() == expected);

  // curl sees the same stream.
  std::string out = run_command("curl -s -N -X POST --data '{}' http://127.0.0.1:" + std::to_string(port) + "/stream");
  CHECK(out == expected);
  std::lock_guard lock(pm);
  for (auto& t : producers) t.join();
}

TEST_CASE("client disconnect fires on_disconnect, mid-stream and while waiting for an answer") {
  started_server s;
  std::promise<void> stream_gone, wait_gone;
  std::atomic<int> sent_after{0};
  std::thread producer;
  std::shared_ptr<response_stream> parked;
  s.server.route("GET", "/stream", [&](const http_request&, std::shared_ptr<response_stream> out) {
    out->on_disconnect([&] { stream_gone.set_value(); });
    out->begin_sse();
    producer = std::thread([out, &sent_after] {
      // Stream until the server reports the client gone (bounded: 10 s).
      for (int i = 0; i < 1000 && out->send_event("tick " + std::to_string(i)); ++i) std::this_thread::sleep_for(10ms);
      sent_after = out->connected() ? 1 : 2;
    });
  });
  s.server.route("GET", "/wait", [&](const http_request&, std::shared_ptr<response_stream> out) {
    out->on_disconnect([&] { wait_gone.set_value(); });
    parked = out; // never answered while the client is there
  });
  const uint16_t port = s.start();

  {
    client c(port);
    c.send_raw("GET /stream HTTP/1.1\r\nHost: x\r\n\r\n");
    char tmp[256];
    std::size_t got = c.sock.read_some(net::buffer(tmp)); // the header (and maybe an event)
    CHECK(got > 0);
    CHECK(std::string(tmp, got).find("200") != std::string::npos);
  } // the client closes mid-stream
  auto f = stream_gone.get_future();
  CHECK(ready(f));
  producer.join();
  CHECK(sent_after == 2); // send_event returned false and connected() is false

  {
    client c(port);
    c.send_raw("GET /wait HTTP/1.1\r\nHost: x\r\n\r\n");
    std::this_thread::sleep_for(50ms);
  }
  auto w = wait_gone.get_future();
  CHECK(ready(w));
  CHECK_FALSE(parked->connected());
  CHECK_FALSE(parked->respond(200, "text/plain", "too late"));
  // Registered after the fact: runs at once.
  std::atomic<bool> late{false};
  parked->on_disconnect([&] { late = true; });
  CHECK(late);
  parked.reset();
  for (int i = 0; i < 100 && s.server.connection_count() != 0; ++i) std::this_thread::sleep_for(10ms);
  CHECK(s.server.connection_count() == 0);
}

TEST_CASE("transport errors: 404, 405, 413, 400, dropped and throwing handlers") {
  http_server_options o;
  o.max_body_bytes = 1024;
  started_server s(o);
  s.server.route("POST", "/v1/completions", [](const http_request& req, std::shared_ptr<response_stream> out) {
    out->respond_json(200, "{\"len\":" + std::to_string(req.body.size()) + "}");
  });
  s.server.route("GET", "/drop", [](const http_request&, std::shared_ptr<response_stream>) {});
  s.server.route("GET", "/throw", [](const http_request&, std::shared_ptr<response_stream>) {
    throw std::runtime_error("boom");
  });
  const uint16_t port = s.start();
  auto error_of = [](const std::string& body) { return json::parse(body)["error"]; };

  client c(port);
  auto r404 = c.call(http::verb::get, "/nope");
  CHECK(r404.result_int() == 404);
  CHECK(error_of(r404.body())["code"] == "not_found");
  CHECK(error_of(r404.body())["type"] == "invalid_request_error");
  auto r405 = c.call(http::verb::get, "/v1/completions");
  CHECK(r405.result_int() == 405);
  CHECK(r405[http::field::allow] == "POST");
  CHECK(error_of(r405.body())["code"] == "method_not_allowed");
  auto r500 = c.call(http::verb::get, "/drop");
  CHECK(r500.result_int() == 500);
  CHECK(error_of(r500.body())["type"] == "invalid_request_error");
  auto rthrow = c.call(http::verb::get, "/throw");
  CHECK(rthrow.result_int() == 500);
  CHECK(error_of(rthrow.body())["message"].get<std::string>().find("boom") != std::string::npos);
  auto ok = c.call(http::verb::post, "/v1/completions", std::string(1024, 'x')); // at the limit
  CHECK(ok.result_int() == 200);
  CHECK(ok.body() == "{\"len\":1024}");

  { // over the limit, sent in full by a client that does not wait: still a clean 413
    client big(port);
    auto r413 = big.call(http::verb::post, "/v1/completions", std::string(100000, 'x'));
    CHECK(r413.result_int() == 413);
    CHECK(error_of(r413.body())["code"] == "request_too_large");
    CHECK_FALSE(r413.keep_alive());
  }
  { // and with curl (Expect: 100-continue for large bodies)
    const std::string file = "/tmp/petrel_gw_big_" + std::to_string(port) + ".json";
    std::ofstream(file) << std::string(2 << 20, 'y');
    std::string out = run_command("curl -s -o /dev/null -w '%{http_code}' -X POST --data-binary @" + file +
                                  " http://127.0.0.1:" + std::to_string(port) + "/v1/completions");
    CHECK(out == "413");
    std::remove(file.c_str());
  }
  { // malformed request line
    client bad(port);
    bad.send_raw("THIS IS NOT HTTP\r\n\r\n");
    std::string raw = bad.read_all();
    CHECK(raw.rfind("HTTP/1.1 400", 0) == 0);
    CHECK(raw.find("\"code\":\"bad_request\"") != std::string::npos);
  }
  { // malformed header
    client bad(port);
    bad.send_raw("GET / HTTP/1.1\r\nBad Header Without Colon\r\n\r\n");
    CHECK(bad.read_all().rfind("HTTP/1.1 400", 0) == 0);
  }
  { // two pipelined requests: both answered in order
    client p(port);
    p.send_raw("GET /nope1 HTTP/1.1\r\nHost: x\r\n\r\nGET /nope2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    std::string raw = p.read_all();
    auto a = raw.find("/nope1"), b = raw.find("/nope2");
    CHECK(a != std::string::npos);
    CHECK(b != std::string::npos);
    CHECK(a < b);
  }
}

TEST_CASE("50 parallel requests answered from a worker pool") {
  started_server s(http_server_options{.threads = 3});
  std::mutex m;
  std::condition_variable cv;
  std::deque<std::pair<std::string, std::shared_ptr<response_stream>>> work;
  bool done = false;
  std::vector<std::thread> pool;
  for (int i = 0; i < 4; ++i)
    pool.emplace_back([&] {
      for (;;) {
        std::unique_lock lock(m);
        cv.wait(lock, [&] { return done || !work.empty(); });
        if (work.empty()) return;
        auto [body, out] = std::move(work.front());
        work.pop_front();
        lock.unlock();
        std::this_thread::sleep_for(std::chrono::milliseconds(body.size() % 7));
        out->respond_json(200, "{\"echo\":\"" + body + "\"}");
      }
    });
  s.server.route("POST", "/echo", [&](const http_request& req, std::shared_ptr<response_stream> out) {
    std::lock_guard lock(m);
    work.emplace_back(req.body, std::move(out));
    cv.notify_one();
  });
  const uint16_t port = s.start();
  std::atomic<int> good{0};
  std::vector<std::thread> clients;
  for (int i = 0; i < 50; ++i)
    clients.emplace_back([&, i] {
      try {
        client c(port);
        for (int k = 0; k < 2; ++k) {
          std::string body = "req" + std::to_string(i) + "_" + std::to_string(k);
          auto r = c.call(http::verb::post, "/echo", body);
          if (r.result_int() == 200 && r.body() == "{\"echo\":\"" + body + "\"}") ++good;
        }
      } catch (const std::exception&) {
      }
    });
  for (auto& t : clients) t.join();
  CHECK(good == 100);
  {
    std::lock_guard lock(m);
    done = true;
  }
  cv.notify_all();
  for (auto& t : pool) t.join();
}

TEST_CASE("stop() closes open streams, fires on_disconnect, and does not hang") {
  auto s = std::make_unique<started_server>();
  std::promise<void> gone;
  std::shared_ptr<response_stream> held;
  std::promise<void> began;
  s->server.route("GET", "/stream", [&](const http_request&, std::shared_ptr<response_stream> out) {
    out->on_disconnect([&] { gone.set_value(); });
    out->begin_sse();
    out->send_event("first");
    held = out;
    began.set_value();
  });
  const uint16_t port = s->start();
  client c(port);
  c.send_raw("GET /stream HTTP/1.1\r\nHost: x\r\n\r\n");
  auto b = began.get_future();
  REQUIRE(ready(b));
  std::string seen;
  for (int i = 0; i < 50 && seen.find("data: first") == std::string::npos; ++i) {
    pollfd pfd{c.sock.native_handle(), POLLIN, 0};
    if (::poll(&pfd, 1, 100) <= 0) continue;
    char tmp[512];
    seen.append(tmp, c.sock.read_some(net::buffer(tmp)));
  }
  CHECK(seen.find("data: first") != std::string::npos);
  auto t0 = std::chrono::steady_clock::now();
  s->server.stop();
  CHECK(std::chrono::steady_clock::now() - t0 < 2s);
  auto g = gone.get_future();
  CHECK(ready(g, 0ms));
  CHECK_FALSE(held->send_event("after stop"));
  CHECK(s->server.connection_count() == 0);
  s->server.stop(); // idempotent
  auto t1 = std::chrono::steady_clock::now();
  c.read_all(); // the client sees the end of the connection at once, not after read_all's 5 s
  CHECK(std::chrono::steady_clock::now() - t1 < 2s);
  s.reset();   // server gone while the writer is still held
  held.reset(); // and then the writer: no crash, no leak (ASan/valgrind runs check this)

  // A port in use is an error value, not an exception.
  http_server a, busy({.port = 0});
  REQUIRE_FALSE(a.start().has_value());
  http_server_options o;
  o.port = a.port();
  http_server clash(o);
  auto err = clash.start();
  REQUIRE(err.has_value());
  CHECK(err->find("cannot listen on 127.0.0.1:" + std::to_string(a.port())) != std::string::npos);
}

// -- the API over HTTP: runtime/openai_api behind the server, with a fake engine thread --------------

#include "runtime/openai_api.hpp"

TEST_CASE("API over HTTP: validation errors in the OpenAI shape, streamed and full completions") {
  using namespace petrel;
  api_limits limits;
  limits.served_model_name = "tiny";
  limits.context_length = 128;
  started_server s;
  std::vector<std::thread> engines;
  std::mutex em;
  auto handler = [&](api_endpoint ep) {
    return [&, ep](const http_request& req, std::shared_ptr<response_stream> out) {
      auto parsed = parse_generation_request(ep, req.body, limits);
      if (!parsed) {
        out->respond_json(parsed.error().status, parsed.error().to_json());
        return;
      }
      // The "engine": emits "Hello, wörld" + EOS one byte-token at a time from another thread.
      std::lock_guard lock(em);
      engines.emplace_back([out, b = std::make_shared<response_builder>(std::move(parsed.value()))] {
        if (b->request().stream) {
          out->begin_sse();
          for (auto& e : b->stream_start()) out->send_event(e);
        }
        auto ids = byte_tokenizer{}.encode("Hello, w\xC3\xB6rld");
        ids.push_back(byte_tokenizer::eos_id);
        for (int32_t id : ids) {
          auto d = b->push(id);
          if (b->request().stream)
            for (auto& e : b->stream_events(d)) out->send_event(e);
          if (b->finished()) break;
        }
        if (b->request().stream) out->end_sse();
        else out->respond_json(200, b->final_body());
      });
    };
  };
  s.server.route("POST", "/v1/completions", handler(api_endpoint::completions));
  s.server.route("POST", "/v1/chat/completions", handler(api_endpoint::chat_completions));
  s.server.route("POST", "/generate", handler(api_endpoint::generate));
  const uint16_t port = s.start();
  client c(port);

  struct bad_case {
    const char* path;
    std::string body;
    int status;
    const char* param;
  };
  for (const auto& bc : std::vector<bad_case>{
           {"/v1/completions", "{not json", 400, nullptr},
           {"/v1/completions", R"({"prompt":"hi","temperature":3})", 400, "temperature"},
           {"/v1/completions", R"({"prompt":"hi","model":"other"})", 404, "model"},
           {"/v1/completions", R"({"prompt":"hi","max_tokens":500})", 400, "max_tokens"},
           {"/v1/completions", R"({"prompt":[1,999]})", 400, "prompt"},
           {"/v1/completions", R"({"prompt":"hi","n":2})", 400, "n"},
           {"/v1/chat/completions", R"({"messages":[{"role":"user","content":1}]})", 400, "messages[0].content"},
           {"/generate", R"({"text":"a","sampling_params":{"top_p":0}})", 400, "sampling_params.top_p"},
       }) {
    CAPTURE(bc.body);
    auto r = c.call(http::verb::post, bc.path, bc.body);
    CHECK(r.result_int() == bc.status);
    json e = json::parse(r.body())["error"];
    CHECK(e["type"] == "invalid_request_error");
    CHECK(e["message"].is_string());
    if (bc.param) CHECK(e["param"] == bc.param);
    else CHECK(e["param"].is_null());
  }

  auto full = c.call(http::verb::post, "/v1/completions", R"({"model":"tiny","prompt":"hi","max_tokens":50})");
  CHECK(full.result_int() == 200);
  json j = json::parse(full.body());
  CHECK(j["choices"][0]["text"] == "Hello, w\xC3\xB6rld");
  CHECK(j["choices"][0]["finish_reason"] == "stop");
  CHECK(j["usage"]["completion_tokens"] == 14);

  auto st = c.call(http::verb::post, "/v1/chat/completions",
                   R"({"messages":[{"role":"user","content":"hi"}],"stream":true,"stop":"rld"})");
  CHECK(st[http::field::content_type] == "text/event-stream");
  std::string text, last;
  int events = 0;
  std::istringstream in(st.body());
  for (std::string line; std::getline(in, line);) {
    if (line.empty()) continue;
    REQUIRE(line.rfind("data: ", 0) == 0);
    last = line.substr(6);
    ++events;
    if (last == "[DONE]") break;
    json chunk = json::parse(last); // each chunk is valid JSON on its own (no split UTF-8)
    auto& delta = chunk["choices"][0]["delta"];
    if (delta.contains("content")) text += delta["content"].get<std::string>();
  }
  CHECK(last == "[DONE]");
  CHECK(text == "Hello, w\xC3\xB6"); // cut at the stop string "rld"
  CHECK(events >= 4);

  // curl, the way users call it.
  std::string out = run_command("curl -s -N -X POST -H 'Content-Type: application/json' --data "
                                "'{\"input_ids\":[256,104],\"stream\":true,\"sampling_params\":{\"max_new_tokens\":5}}' "
                                "http://127.0.0.1:" + std::to_string(port) + "/generate");
  CHECK(out.find("data: {\"meta\":") != std::string::npos);
  CHECK(out.size() > 12);
  CHECK(out.substr(out.size() - 14) == "data: [DONE]\n\n");
  CHECK(out.find("\"type\":\"length\"") != std::string::npos);
  std::lock_guard lock(em);
  for (auto& t : engines) t.join();
}
