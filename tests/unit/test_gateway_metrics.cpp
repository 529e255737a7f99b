// The metrics registry: exposition text format 0.0.4 line by line, label escaping, thread safety,
// and the JSON snapshot.
#include <doctest/doctest.h>

#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "runtime/metrics.hpp"

using namespace petrel::metrics;

namespace {
std::vector<std::string> lines_of(const std::string& s) {
  std::vector<std::string> out;
  std::istringstream in(s);
  for (std::string l; std::getline(in, l);) out.push_back(l);
  return out;
}
bool has_line(const std::vector<std::string>& lines, const std::string& l) {
  return std::find(lines.begin(), lines.end(), l) != lines.end();
}
} // namespace

TEST_CASE("histogram renders HELP, TYPE, cumulative buckets, sum and count") {
  registry r;
  auto& h = r.add_histogram("petrel_test_latency_seconds", "A test latency.", {"phase"}, {0.1, 0.5, 1});
  auto& child = h.with({"transfer"});
  child.observe(0.05);
  child.observe(0.1); // le is inclusive
  child.observe(0.3);
  child.observe(7);
  const std::string text = r.render_prometheus();
  auto lines = lines_of(text);
  REQUIRE(lines.size() == 8);
  CHECK(lines[0] == "# HELP petrel_test_latency_seconds A test latency.");
  CHECK(lines[1] == "# TYPE petrel_test_latency_seconds histogram");
  CHECK(lines[2] == "petrel_test_latency_seconds_bucket{phase=\"transfer\",le=\"0.1\"} 2");
  CHECK(lines[3] == "petrel_test_latency_seconds_bucket{phase=\"transfer\",le=\"0.5\"} 3");
  CHECK(lines[4] == "petrel_test_latency_seconds_bucket{phase=\"transfer\",le=\"1\"} 3");
  CHECK(lines[5] == "petrel_test_latency_seconds_bucket{phase=\"transfer\",le=\"+Inf\"} 4");
  CHECK(lines[6] == "petrel_test_latency_seconds_sum{phase=\"transfer\"} 7.45");
  CHECK(lines[7] == "petrel_test_latency_seconds_count{phase=\"transfer\"} 4");
  CHECK(text.back() == '\n');
}

TEST_CASE("counters and gauges with labels, escaping, and registration rules") {
  registry r;
  auto& c = r.add_counter("petrel_requests_total", "Requests.\nSecond line \\ here", {"status"});
  c.with({"ok"}).inc();
  c.with({"ok"}).inc(2);
  c.with({"ok"}).inc(-5); // ignored: counters never go down
  c.with({"we\"ird\\\n"}).inc();
  auto& g = r.add_gauge("petrel_queue_depth", "Queue.", {"group"});
  g.with({"p0"}).set(3);
  g.with({"p0"}).dec();
  auto& plain = r.add_counter("petrel_plain_total", "No labels.");
  plain.get().inc(1.5);
  auto lines = lines_of(r.render_prometheus());
  CHECK(has_line(lines, "# HELP petrel_requests_total Requests.\\nSecond line \\\\ here"));
  CHECK(has_line(lines, "# TYPE petrel_requests_total counter"));
  CHECK(has_line(lines, "petrel_requests_total{status=\"ok\"} 3"));
  CHECK(has_line(lines, "petrel_requests_total{status=\"we\\\"ird\\\\\\n\"} 1"));
  CHECK(has_line(lines, "# TYPE petrel_queue_depth gauge"));
  CHECK(has_line(lines, "petrel_queue_depth{group=\"p0\"} 2"));
  CHECK(has_line(lines, "petrel_plain_total 1.5"));

  CHECK(&r.add_counter("petrel_requests_total", "again", {"status"}) == &c); // idempotent
  CHECK_THROWS_AS(r.add_gauge("petrel_requests_total", "x", {"status"}), std::invalid_argument);
  CHECK_THROWS_AS(r.add_counter("bad name", "x"), std::invalid_argument);
  CHECK_THROWS_AS(r.add_counter("petrel_x", "x", {"le"}), std::invalid_argument);
  CHECK_THROWS_AS(c.with({"a", "b"}), std::invalid_argument);
  CHECK_THROWS_AS(r.add_histogram("petrel_h", "x", {}, {1, 0.5}), std::invalid_argument);
}

TEST_CASE("serving_metrics registers every documented name; snapshot is JSON") {
  registry r;
  serving_metrics m(r);
  m.requests.with({"ok"}).inc();
  m.kv_transfer.with({"transfer"}).observe(0.002);
  m.time_to_first_token.get().observe(0.3);
  m.queue_depth.with({"prefill-0"}).set(4);
  const std::string text = r.render_prometheus();
  for (const char* name :
       {"petrel_queue_depth", "petrel_running_requests", "petrel_time_to_first_token_seconds",
        "petrel_inter_token_latency_seconds", "petrel_e2e_request_latency_seconds",
        "petrel_input_tokens_total", "petrel_output_tokens_total", "petrel_kv_transfer_seconds",
        "petrel_kv_transfer_bytes_total", "petrel_actor_restarts_total", "petrel_requests_total"}) {
    CAPTURE(name);
    CHECK(text.find(std::string("# TYPE ") + name + " ") != std::string::npos);
  }
  CHECK(text.find("petrel_kv_transfer_seconds_bucket{phase=\"bootstrap\",le=\"+Inf\"} 0") != std::string::npos);
  CHECK(text.find("petrel_input_tokens_total 0\n") != std::string::npos);

  auto j = r.snapshot_json();
  CHECK(j["petrel_requests_total"]["type"] == "counter");
  CHECK(j["petrel_requests_total"]["samples"][0]["labels"]["status"] == "ok");
  CHECK(j["petrel_requests_total"]["samples"][0]["value"] == 1.0);
  auto ttft = j["petrel_time_to_first_token_seconds"]["samples"][0];
  CHECK(ttft["count"] == 1);
  CHECK(ttft["buckets"].back()[0] == "+Inf");
  CHECK(ttft["buckets"].back()[1] == 1);
  CHECK(j["petrel_queue_depth"]["samples"][0]["value"] == 4.0);
}

TEST_CASE("concurrent updates are not lost") {
  registry r;
  auto& c = r.add_counter("petrel_c_total", "c", {"t"});
  auto& h = r.add_histogram("petrel_h_seconds", "h", {}, {0.5});
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      auto& mine = c.with({t % 2 ? "odd" : "even"});
      for (int i = 0; i < 10000; ++i) {
        mine.inc();
        h.get().observe(i % 2 ? 1.0 : 0.25);
        if (i % 1000 == 0) (void)r.render_prometheus();
      }
    });
  for (auto& t : threads) t.join();
  CHECK(c.with({"odd"}).value() == 20000);
  CHECK(c.with({"even"}).value() == 20000);
  auto s = h.get().snapshot();
  CHECK(s.count == 40000);
  CHECK(s.cumulative[0] == 20000);
  CHECK(s.sum == doctest::Approx(20000 * 1.0 + 20000 * 0.25));
}
