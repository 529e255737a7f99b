// petrel bench: a serving benchmark against a running Petrel gateway (or any OpenAI-compatible server).
//   petrel bench --config cluster.yaml --num-prompts 200 --input-len 64 --output-len 64 --max-concurrency 8
//   petrel bench --port 8080 --endpoint chat --request-rate 4 --dataset prompts.txt --json out.json
// Requests arrive as a Poisson process (--request-rate R req/s; inf sends them all at once) and at most
// --max-concurrency are in flight. Every request is its own HTTP/1.1 connection; all of them run on one
// Asio thread, so the client's own work never competes with itself for locks.
// Latencies: TTFT = send to the first event carrying output; ITL = gaps between output events;
// E2E = send to the end of the response. A streamed request only counts as successful when its stream
// ended with `data: [DONE]` and no event reported an error or an aborted finish.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <deque>
#include <fstream>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <nlohmann/json.hpp>

#include "actors/cluster.hpp"
#include "runtime/cluster_config.hpp"
#include "tools/command.hpp"
#include "tools/http_client.hpp"
#include "tools/svg_plot.hpp"

namespace {

using json = nlohmann::json;
using steady = std::chrono::steady_clock;
namespace asio = boost::asio;

struct bench_options {
  std::string host = "127.0.0.1";
  int port = 0;
  std::string config;
  std::string endpoint = "completions";
  std::string model;
  int num_prompts = 100;
  int input_len = 64;
  int output_len = 64;
  double range_ratio = 1.0;
  std::string dataset;
  std::string request_rate = "inf";
  int max_concurrency = 0; // 0: no limit
  int warmup = 1;
  uint64_t seed = 1;
  bool stream = true;
  bool ignore_eos = true;
  double temperature = 0.0;
  double timeout_s = 600;
  std::string json_path;
  std::string plot_path;
  std::vector<std::string> plot_from;
  bool progress = false;
};

struct bench_request {
  std::string prompt;
  int output_len = 0;
};

struct request_outcome {
  bool success = false;
  std::string error;
  int prompt_tokens = 0;
  int output_tokens = 0;
  double ttft_s = 0;
  double e2e_s = 0;
  std::vector<double> itl_s;
};

int bad_input(const std::string& msg) {
  std::fprintf(stderr, "petrel bench: %s\n", msg.c_str());
  return petrel::cli::exit_bad_input;
}

int failure(const std::string& msg) {
  std::fprintf(stderr, "petrel bench: %s\n", msg.c_str());
  return petrel::cli::exit_failure;
}

double seconds_since(steady::time_point t) { return std::chrono::duration<double>(steady::now() - t).count(); }

// -- the request bodies -------------------------------------------------------------------------------------

std::string endpoint_path(const std::string& endpoint) {
  if (endpoint == "chat")
    return "/v1/chat/completions";
  if (endpoint == "generate")
    return "/generate";
  return "/v1/completions";
}

std::string request_body(const bench_options& o, const std::string& model, const bench_request& r) {
  json body;
  if (o.endpoint == "generate") {
    body = {{"text", r.prompt},
            {"sampling_params",
             {{"max_new_tokens", r.output_len}, {"temperature", o.temperature}, {"ignore_eos", o.ignore_eos}}},
            {"stream", o.stream}};
    return body.dump();
  }
  body = {{"model", model},
          {"max_tokens", r.output_len},
          {"temperature", o.temperature},
          {"ignore_eos", o.ignore_eos},
          {"stream", o.stream}};
  if (o.endpoint == "chat")
    body["messages"] = json::array({{{"role", "user"}, {"content", r.prompt}}});
  else
    body["prompt"] = r.prompt;
  if (o.stream)
    body["stream_options"] = {{"include_usage", true}};
  return body.dump(-1, ' ', false, json::error_handler_t::replace);
}

// -- one request's stream -----------------------------------------------------------------------------------

/// Follows one request: timestamps its output events and reads token counts from the usage/meta it carries.
struct request_tracker {
  const bench_options& o;
  steady::time_point start;
  steady::time_point last_output;
  request_outcome out;
  bool first_seen = false;
  bool done_seen = false;
  int counted_tokens = 0; // output events (or output_ids) seen, when no usage arrives
  bool have_usage = false;
  std::string event_error;

  request_tracker(const bench_options& opts) : o(opts), start(steady::now()) {}

  void output_event(int tokens) {
    auto now = steady::now();
    if (!first_seen) {
      first_seen = true;
      out.ttft_s = std::chrono::duration<double>(now - start).count();
    } else {
      out.itl_s.push_back(std::chrono::duration<double>(now - last_output).count());
    }
    last_output = now;
    counted_tokens += tokens;
  }

  void read_usage(const json& j) {
    if (j.is_object() && j.contains("completion_tokens") && j["completion_tokens"].is_number_integer()) {
      out.output_tokens = j["completion_tokens"].get<int>();
      if (j.contains("prompt_tokens") && j["prompt_tokens"].is_number_integer())
        out.prompt_tokens = j["prompt_tokens"].get<int>();
      have_usage = true;
    }
  }

  void check_finish(const json& reason) {
    std::string r;
    if (reason.is_string())
      r = reason.get<std::string>();
    else if (reason.is_object() && reason.contains("type") && reason["type"].is_string())
      r = reason["type"].get<std::string>();
    if (r == "abort" && event_error.empty())
      event_error = "the server aborted the request (finish_reason abort)";
  }

  void on_event(std::string_view data) {
    if (data == "[DONE]") {
      done_seen = true;
      return;
    }
    if (done_seen) {
      if (event_error.empty())
        event_error = "an event arrived after [DONE]";
      return;
    }
    json j = json::parse(data, nullptr, false);
    if (j.is_discarded() || !j.is_object()) {
      if (event_error.empty())
        event_error = "an event is not a JSON object: " + std::string(data.substr(0, 120));
      return;
    }
    if (j.contains("error")) {
      if (event_error.empty())
        event_error = "error event: " + j["error"].dump().substr(0, 200);
      return;
    }
    if (o.endpoint == "generate") {
      int ids = j.contains("output_ids") && j["output_ids"].is_array() ? int(j["output_ids"].size()) : 0;
      if (ids > 0)
        output_event(ids);
      if (j.contains("meta") && j["meta"].is_object()) {
        read_usage(j["meta"]);
        if (j["meta"].contains("finish_reason"))
          check_finish(j["meta"]["finish_reason"]);
      }
      return;
    }
    if (j.contains("usage") && j["usage"].is_object())
      read_usage(j["usage"]);
    if (!j.contains("choices") || !j["choices"].is_array() || j["choices"].empty())
      return;
    const json& c = j["choices"][0];
    const json* text = nullptr;
    if (o.endpoint == "chat") {
      if (c.contains("delta") && c["delta"].is_object() && c["delta"].contains("content"))
        text = &c["delta"]["content"];
    } else if (c.contains("text")) {
      text = &c["text"];
    }
    if (text && text->is_string() && !text->get_ref<const std::string&>().empty())
      output_event(1);
    if (c.contains("finish_reason"))
      check_finish(c["finish_reason"]);
  }

  /// Turns the exchange's end into the request's outcome.
  request_outcome finish(const petrel::http_client::result& res) {
    out.e2e_s = seconds_since(start);
    auto fail = [&](std::string why) {
      out.success = false;
      out.error = std::move(why);
      return out;
    };
    if (!res.error.empty())
      return fail(res.error);
    if (res.status != 200)
      return fail("HTTP " + std::to_string(res.status) + ": " + res.body.substr(0, 300));
    if (o.stream) {
      if (!res.event_stream)
        return fail("expected an SSE stream, got content type '" + res.content_type + "'");
      if (!event_error.empty())
        return fail(event_error);
      if (!done_seen)
        return fail("the stream ended without data: [DONE]");
    } else {
      json j = json::parse(res.body, nullptr, false);
      if (j.is_discarded() || !j.is_object())
        return fail("the response is not a JSON object: " + res.body.substr(0, 120));
      if (o.endpoint == "generate") {
        if (j.contains("meta") && j["meta"].is_object()) {
          read_usage(j["meta"]);
          if (j["meta"].contains("finish_reason"))
            check_finish(j["meta"]["finish_reason"]);
        }
        if (!have_usage && j.contains("output_ids") && j["output_ids"].is_array())
          counted_tokens = int(j["output_ids"].size());
      } else {
        if (j.contains("usage"))
          read_usage(j["usage"]);
        if (j.contains("choices") && j["choices"].is_array() && !j["choices"].empty() &&
            j["choices"][0].contains("finish_reason"))
          check_finish(j["choices"][0]["finish_reason"]);
      }
      if (!event_error.empty())
        return fail(event_error);
      out.ttft_s = out.e2e_s; // without a stream the first token arrives with the last
    }
    if (!have_usage)
      out.output_tokens = counted_tokens;
    out.success = true;
    return out;
  }
};

// -- arrivals, concurrency and the progress bar -------------------------------------------------------------

class progress_bar {
public:
  progress_bar(bool enabled, size_t total, std::string label)
      : enabled_(enabled), total_(total), label_(std::move(label)) {}
  void update(size_t done, size_t failed) {
    if (!enabled_)
      return;
    auto now = steady::now();
    if (done < total_ && now - last_ < std::chrono::milliseconds(100))
      return;
    last_ = now;
    const int width = 40;
    int filled = total_ ? int(width * done / total_) : width;
    std::string bar(size_t(filled), '#');
    bar.resize(size_t(width), '.');
    std::fprintf(stderr, "\r%s [%s] %zu/%zu%s", label_.c_str(), bar.c_str(), done, total_,
                 failed ? (" (" + std::to_string(failed) + " failed)").c_str() : "");
    if (done == total_)
      std::fprintf(stderr, "\n");
    std::fflush(stderr);
  }

private:
  bool enabled_;
  size_t total_;
  std::string label_;
  steady::time_point last_{};
};

struct phase_result {
  std::vector<request_outcome> outcomes;
  double duration_s = 0;
};

/// Sends `requests` with Poisson arrivals at `rate` req/s (infinite: all at once), at most `concurrency`
/// in flight (0: no limit), all on one io_context thread; returns when every request has ended.
phase_result run_phase(const bench_options& o, const std::string& model, const std::vector<bench_request>& requests,
                       double rate, int concurrency, std::mt19937_64& rng, progress_bar& bar) {
  phase_result pr;
  pr.outcomes.resize(requests.size());
  const size_t n = requests.size();
  if (n == 0)
    return pr;
  std::vector<double> arrival(n, 0.0);
  if (std::isfinite(rate)) {
    std::exponential_distribution<double> gap(rate);
    double t = 0;
    for (size_t i = 0; i < n; ++i) {
      arrival[i] = t;
      t += gap(rng);
    }
  }
  asio::io_context io;
  asio::steady_timer timer(io);
  std::deque<size_t> waiting;
  size_t next_arrival = 0, finished = 0, failed = 0;
  int in_flight = 0;
  const auto t0 = steady::now();
  const std::string path = endpoint_path(o.endpoint);

  std::function<void()> pump;
  auto launch = [&](size_t i) {
    ++in_flight;
    auto tracker = std::make_shared<request_tracker>(o);
    petrel::http_client::request req;
    req.host = o.host;
    req.port = o.port;
    req.target = path;
    req.body = request_body(o, model, requests[i]);
    req.timeout = std::chrono::milliseconds(static_cast<long long>(o.timeout_s * 1000));
    petrel::http_client::event_fn on_event;
    if (o.stream)
      on_event = [tracker](std::string_view data) { tracker->on_event(data); };
    petrel::http_client::async_fetch(io, std::move(req), std::move(on_event),
                                     [&, tracker, i](petrel::http_client::result res) {
                                       pr.outcomes[i] = tracker->finish(res);
                                       --in_flight;
                                       ++finished;
                                       if (!pr.outcomes[i].success)
                                         ++failed;
                                       bar.update(finished, failed);
                                       pump();
                                     });
  };
  pump = [&] {
    while (!waiting.empty() && (concurrency <= 0 || in_flight < concurrency)) {
      size_t i = waiting.front();
      waiting.pop_front();
      launch(i);
    }
  };
  std::function<void()> arrive = [&] {
    double elapsed = seconds_since(t0);
    while (next_arrival < n && arrival[next_arrival] <= elapsed)
      waiting.push_back(next_arrival++);
    pump();
    if (next_arrival < n) {
      timer.expires_at(t0 + std::chrono::duration_cast<steady::duration>(
                                std::chrono::duration<double>(arrival[next_arrival])));
      timer.async_wait([&](const boost::system::error_code&) { arrive(); });
    }
  };
  bar.update(0, 0);
  arrive();
  io.run();
  pr.duration_s = seconds_since(t0);
  return pr;
}

// -- statistics ---------------------------------------------------------------------------------------------

struct summary_stats {
  double mean = 0, median = 0, p99 = 0;
};

/// Mean, median and 99th percentile (linear interpolation between order statistics), in milliseconds.
summary_stats stats_ms(std::vector<double> seconds) {
  summary_stats s;
  if (seconds.empty())
    return s;
  std::sort(seconds.begin(), seconds.end());
  auto pct = [&](double p) {
    double pos = p / 100.0 * double(seconds.size() - 1);
    size_t lo = size_t(std::floor(pos));
    size_t hi = std::min(lo + 1, seconds.size() - 1);
    double frac = pos - double(lo);
    return (seconds[lo] + (seconds[hi] - seconds[lo]) * frac) * 1000.0;
  };
  double sum = 0;
  for (double v : seconds)
    sum += v;
  s.mean = sum / double(seconds.size()) * 1000.0;
  s.median = pct(50);
  s.p99 = pct(99);
  return s;
}

// -- the workload -------------------------------------------------------------------------------------------

int draw_len(std::mt19937_64& rng, int len, double ratio) {
  int lo = std::max(1, static_cast<int>(std::floor(len * ratio)));
  if (lo >= len)
    return len;
  return std::uniform_int_distribution<int>(lo, len)(rng);
}

/// Random printable ASCII. The embedded models are byte-level with a BOS in front, so a prompt of
/// `tokens - 1` bytes is `tokens` prompt tokens.
std::string random_prompt(std::mt19937_64& rng, int tokens) {
  std::uniform_int_distribution<int> ch(32, 126);
  std::string s(size_t(std::max(1, tokens - 1)), ' ');
  for (auto& c : s)
    c = static_cast<char>(ch(rng));
  return s;
}

std::vector<bench_request> make_requests(const bench_options& o, const std::vector<std::string>& lines, int count,
                                         int max_prompt_bytes, std::mt19937_64& rng) {
  std::vector<bench_request> out;
  out.reserve(size_t(count));
  for (int i = 0; i < count; ++i) {
    bench_request r;
    r.output_len = draw_len(rng, o.output_len, o.range_ratio);
    if (lines.empty()) {
      r.prompt = random_prompt(rng, draw_len(rng, o.input_len, o.range_ratio));
    } else {
      r.prompt = lines[std::uniform_int_distribution<size_t>(0, lines.size() - 1)(rng)];
      if (max_prompt_bytes > 0 && int(r.prompt.size()) > max_prompt_bytes)
        r.prompt.resize(size_t(max_prompt_bytes));
    }
    out.push_back(std::move(r));
  }
  return out;
}

// -- the command --------------------------------------------------------------------------------------------

/// `--plot-from a.json b.json ... --plot out.svg`: throughput and latency against concurrency from the --json
/// results of earlier runs (one per --max-concurrency), with no server involved.
int plot_sweep(const bench_options& o) {
  if (o.plot_path.empty())
    return bad_input("--plot-from needs --plot FILE.svg to write to");
  struct point {
    double concurrency, out_tps, in_tps, ttft_p50, ttft_p99, itl_p50, itl_p99;
  };
  std::vector<point> pts;
  for (const auto& path : o.plot_from) {
    std::ifstream in(path);
    if (!in)
      return bad_input("--plot-from: cannot read " + path);
    json j = json::parse(in, nullptr, false);
    if (j.is_discarded() || !j.is_object())
      return bad_input("--plot-from: " + path + " is not a JSON object (write one with petrel bench --json)");
    try {
      int c = j.at("max_concurrency").get<int>();
      // Without a limit every request may be in flight at once.
      pts.push_back({double(c > 0 ? c : j.at("num_prompts").get<int>()), j.at("output_throughput").get<double>(),
                     j.at("input_throughput").get<double>(), j.at("median_ttft_ms").get<double>(),
                     j.at("p99_ttft_ms").get<double>(), j.at("median_itl_ms").get<double>(),
                     j.at("p99_itl_ms").get<double>()});
    } catch (const json::exception& e) {
      return bad_input("--plot-from: " + path + " lacks a petrel bench --json field: " + e.what());
    }
  }
  std::sort(pts.begin(), pts.end(), [](const point& a, const point& b) { return a.concurrency < b.concurrency; });
  petrel::plot::line_chart tput, lat;
  tput.title = "Throughput against concurrency (" + std::to_string(pts.size()) + " runs)";
  tput.x_label = "max concurrency (requests in flight)";
  tput.y_label = "tokens/s";
  lat.title = "Latency against concurrency";
  lat.x_label = tput.x_label;
  lat.y_label = "latency (ms)";
  tput.series = {{"output tok/s", {}, {}}, {"input tok/s", {}, {}}};
  lat.series = {{"TTFT p50", {}, {}}, {"TTFT p99", {}, {}}, {"ITL p50", {}, {}}, {"ITL p99", {}, {}}};
  tput.x_log = lat.x_log = true; // sweeps double the concurrency
  for (const auto& p : pts) {
    const double ys[] = {p.out_tps, p.in_tps, p.ttft_p50, p.ttft_p99, p.itl_p50, p.itl_p99};
    for (size_t k = 0; k < 6; ++k) {
      auto& s = k < 2 ? tput.series[k] : lat.series[k - 2];
      s.x.push_back(p.concurrency);
      s.y.push_back(ys[k]);
    }
  }
  if (auto err = petrel::plot::write_svg_file(o.plot_path, petrel::plot::render_svg({tput, lat}, 2, 640, 420));
      !err.empty())
    return bad_input("--plot: " + err);
  std::fprintf(stderr, "petrel bench: wrote %s\n", o.plot_path.c_str());
  return petrel::cli::exit_ok;
}

int run_bench(bench_options o) {
  if (!o.plot_from.empty())
    return plot_sweep(o);
  // Where the gateway is.
  if (!o.config.empty()) {
    try {
      auto cfg = petrel::load_cluster_config(o.config);
      auto rf_path = petrel::run_file_path(cfg);
      auto rf = petrel::read_run_file(rf_path);
      if (!rf)
        return failure("no Petrel cluster '" + cfg.cluster.name + "' is running (no run file at " + rf_path +
                       "); start one with `petrel launch " + o.config + "`");
      if (rf->gateway_port <= 0)
        return failure("the run file " + rf_path + " names no gateway port");
      o.host = rf->gateway_host.empty() || rf->gateway_host == "0.0.0.0" ? "127.0.0.1" : rf->gateway_host;
      o.port = rf->gateway_port;
    } catch (const petrel::config_error& e) {
      return bad_input(e.what());
    }
  }
  if (o.port <= 0 || o.port > 65535)
    return bad_input("give the gateway with --port PORT (and --host) or --config cluster.yaml");
  if (o.endpoint != "completions" && o.endpoint != "chat" && o.endpoint != "generate")
    return bad_input("--endpoint must be completions, chat or generate, got '" + o.endpoint + "'");
  if (o.num_prompts < 1)
    return bad_input("--num-prompts must be >= 1");
  if (o.input_len < 1 || o.output_len < 1)
    return bad_input("--input-len and --output-len must be >= 1");
  if (!(o.range_ratio > 0 && o.range_ratio <= 1))
    return bad_input("--range-ratio must be in (0, 1]");
  if (o.warmup < 0 || o.max_concurrency < 0)
    return bad_input("--warmup and --max-concurrency must be >= 0");
  if (!(o.timeout_s > 0))
    return bad_input("--timeout must be > 0 seconds");
  double rate = std::numeric_limits<double>::infinity();
  if (o.request_rate != "inf") {
    try {
      size_t used = 0;
      rate = std::stod(o.request_rate, &used);
      if (used != o.request_rate.size() || !(rate > 0))
        throw std::invalid_argument("");
    } catch (const std::exception&) {
      return bad_input("--request-rate must be a positive number of requests per second or 'inf', got '" +
                       o.request_rate + "'");
    }
  }
  std::vector<std::string> lines;
  if (!o.dataset.empty()) {
    std::ifstream in(o.dataset);
    if (!in)
      return bad_input("cannot read --dataset " + o.dataset);
    for (std::string line; std::getline(in, line);) {
      if (!line.empty() && line.back() == '\r')
        line.pop_back();
      if (!line.empty())
        lines.push_back(line);
    }
    if (lines.empty())
      return bad_input("--dataset " + o.dataset + " has no non-empty line");
  }

  // Which model, and how much context it has.
  auto models = petrel::http_client::get(o.host, o.port, "/v1/models");
  if (!models.ok())
    return failure("cannot list models at http://" + o.host + ":" + std::to_string(o.port) + "/v1/models: " +
                   (models.error.empty() ? "HTTP " + std::to_string(models.status) : models.error));
  int context = 0;
  {
    json j = json::parse(models.body, nullptr, false);
    if (j.is_discarded() || !j.contains("data") || !j["data"].is_array() || j["data"].empty())
      return failure("/v1/models answered no model: " + models.body.substr(0, 200));
    const json* chosen = &j["data"][0];
    if (!o.model.empty()) {
      chosen = nullptr;
      for (auto& m : j["data"])
        if (m.value("id", "") == o.model)
          chosen = &m;
      if (!chosen)
        return bad_input("the server does not serve model '" + o.model + "' (it serves " +
                         j["data"][0].value("id", "?") + ")");
    }
    o.model = chosen->value("id", "");
    context = chosen->value("max_model_len", 0);
  }
  if (context > 0 && lines.empty() && o.endpoint == "completions" && o.input_len + o.output_len > context)
    return bad_input("--input-len " + std::to_string(o.input_len) + " + --output-len " +
                     std::to_string(o.output_len) + " exceeds the model's context of " + std::to_string(context) +
                     " tokens");
  int max_prompt_bytes = context > 0 ? context - o.output_len - 1 : 0;
  if (!lines.empty() && context > 0 && max_prompt_bytes < 1)
    return bad_input("--output-len " + std::to_string(o.output_len) + " leaves no room for a prompt in the context of " +
                     std::to_string(context));

  std::mt19937_64 rng(o.seed);
  auto requests = make_requests(o, lines, o.num_prompts, max_prompt_bytes, rng);
  bool show_progress = o.progress || ::isatty(2);

  std::printf("petrel bench: %d requests to http://%s:%d%s (model %s, %s), input %d output %d tokens "
              "(range ratio %.2f), rate %s req/s, max concurrency %s\n",
              o.num_prompts, o.host.c_str(), o.port, endpoint_path(o.endpoint).c_str(), o.model.c_str(),
              o.stream ? "stream" : "no stream", o.input_len, o.output_len, o.range_ratio, o.request_rate.c_str(),
              o.max_concurrency ? std::to_string(o.max_concurrency).c_str() : "unlimited");
  std::fflush(stdout);

  if (o.warmup > 0) {
    auto warm = make_requests(o, lines, o.warmup, max_prompt_bytes, rng);
    progress_bar wbar(show_progress, warm.size(), "warmup");
    auto wr = run_phase(o, o.model, warm, std::numeric_limits<double>::infinity(), o.max_concurrency, rng, wbar);
    size_t bad = 0;
    for (auto& r : wr.outcomes)
      bad += !r.success;
    if (bad)
      std::fprintf(stderr, "petrel bench: warning: %zu of %zu warmup requests failed (first: %s)\n", bad,
                   wr.outcomes.size(), std::find_if(wr.outcomes.begin(), wr.outcomes.end(), [](auto& r) {
                     return !r.success;
                   })->error.c_str());
  }

  progress_bar bar(show_progress, requests.size(), "bench");
  auto pr = run_phase(o, o.model, requests, rate, o.max_concurrency, rng, bar);

  // Aggregate.
  size_t ok = 0, bad = 0;
  long long in_tokens = 0, out_tokens = 0;
  std::vector<double> ttft, itl, e2e, tpot;
  std::map<std::string, int> errors;
  double busy = 0;
  for (auto& r : pr.outcomes) {
    busy += r.e2e_s;
    if (!r.success) {
      ++bad;
      errors[r.error]++;
      continue;
    }
    ++ok;
    in_tokens += r.prompt_tokens;
    out_tokens += r.output_tokens;
    ttft.push_back(r.ttft_s);
    e2e.push_back(r.e2e_s);
    itl.insert(itl.end(), r.itl_s.begin(), r.itl_s.end());
    if (r.output_tokens > 1)
      tpot.push_back((r.e2e_s - r.ttft_s) / double(r.output_tokens - 1));
  }
  const double d = pr.duration_s > 0 ? pr.duration_s : 1e-9;
  auto st_ttft = stats_ms(ttft), st_itl = stats_ms(itl), st_e2e = stats_ms(e2e), st_tpot = stats_ms(tpot);

  std::printf("---------------- petrel bench: results ----------------\n");
  std::printf("%-36s %12zu\n", "successful requests", ok);
  std::printf("%-36s %12zu\n", "failed requests", bad);
  std::printf("%-36s %12.2f\n", "duration (s)", pr.duration_s);
  std::printf("%-36s %12lld\n", "input tokens", in_tokens);
  std::printf("%-36s %12lld\n", "output tokens", out_tokens);
  std::printf("%-36s %12.2f\n", "request throughput (req/s)", double(ok) / d);
  std::printf("%-36s %12.1f\n", "input throughput (tok/s)", double(in_tokens) / d);
  std::printf("%-36s %12.1f\n", "output throughput (tok/s)", double(out_tokens) / d);
  std::printf("%-36s %12.2f\n", "mean requests in flight", busy / d);
  auto row = [](const char* name, const summary_stats& s) {
    std::printf("%-12s mean %10.2f   p50 %10.2f   p99 %10.2f\n", name, s.mean, s.median, s.p99);
  };
  std::printf("latency (ms):\n");
  row("TTFT", st_ttft);
  row("ITL", st_itl);
  row("TPOT", st_tpot);
  row("E2E", st_e2e);
  // The anchor (docs ANCHORS.md): SGLang's DeepSeek-V3 deployment on H100 nodes. The model and the hardware here
  // are not comparable to it; the ratio only says how far this run is from that figure.
  const double anchor_in = 52300, anchor_out = 22300;
  std::printf("anchor: SGLang DeepSeek-V3 on 8xH100 nodes, 52.3k input / 22.3k output tok/s per node; this run: "
              "%.3g / %.3g of it (different model and hardware)\n",
              double(in_tokens) / d / anchor_in, double(out_tokens) / d / anchor_out);
  int shown = 0;
  for (auto& [msg, count] : errors) {
    if (shown++ == 5) {
      std::fprintf(stderr, "  ... %zu more kinds of error\n", errors.size() - 5);
      break;
    }
    std::fprintf(stderr, "petrel bench: %d request(s) failed: %s\n", count, msg.c_str());
  }

  if (!o.json_path.empty()) {
    json j;
    j["endpoint"] = endpoint_path(o.endpoint);
    j["host"] = o.host;
    j["port"] = o.port;
    j["model"] = o.model;
    j["stream"] = o.stream;
    j["ignore_eos"] = o.ignore_eos;
    j["temperature"] = o.temperature;
    j["num_prompts"] = o.num_prompts;
    j["input_len"] = o.input_len;
    j["output_len"] = o.output_len;
    j["range_ratio"] = o.range_ratio;
    j["dataset"] = o.dataset;
    j["request_rate"] = o.request_rate;
    j["max_concurrency"] = o.max_concurrency;
    j["warmup"] = o.warmup;
    j["seed"] = o.seed;
    j["completed"] = ok;
    j["failed"] = bad;
    j["duration_s"] = pr.duration_s;
    j["total_input_tokens"] = in_tokens;
    j["total_output_tokens"] = out_tokens;
    j["request_throughput"] = double(ok) / d;
    j["input_throughput"] = double(in_tokens) / d;
    j["output_throughput"] = double(out_tokens) / d;
    j["mean_in_flight"] = busy / d;
    for (auto [name, s] : {std::pair{"ttft", st_ttft}, {"itl", st_itl}, {"tpot", st_tpot}, {"e2e", st_e2e}}) {
      j[std::string("mean_") + name + "_ms"] = s.mean;
      j[std::string("median_") + name + "_ms"] = s.median;
      j[std::string("p99_") + name + "_ms"] = s.p99;
    }
    j["anchor"] = {{"source", "SGLang DeepSeek-V3, 96 H100 (ANCHORS.md)"},
                   {"input_tok_s_per_node", anchor_in},
                   {"output_tok_s_per_node", anchor_out},
                   {"input_ratio", double(in_tokens) / d / anchor_in},
                   {"output_ratio", double(out_tokens) / d / anchor_out}};
    json errs = json::array();
    for (auto& [msg, count] : errors)
      errs.push_back({{"error", msg}, {"count", count}});
    j["errors"] = errs;
    json per = json::array();
    for (size_t i = 0; i < pr.outcomes.size(); ++i) {
      const auto& r = pr.outcomes[i];
      per.push_back({{"success", r.success},
                     {"max_tokens", requests[i].output_len},
                     {"prompt_tokens", r.prompt_tokens},
                     {"output_tokens", r.output_tokens},
                     {"ttft_ms", r.ttft_s * 1000},
                     {"e2e_ms", r.e2e_s * 1000},
                     {"output_events", r.success ? r.itl_s.size() + 1 : size_t(0)},
                     {"error", r.error}});
    }
    j["requests"] = per;
    std::ofstream f(o.json_path);
    if (!f)
      return failure("cannot write --json " + o.json_path);
    f << j.dump(2) << "\n";
  }
  if (!o.plot_path.empty()) {
    // Latency CDFs of the successful requests, in ms on a log axis: TTFT, ITL and E2E differ by orders of magnitude.
    auto in_ms = [](std::vector<double> v) {
      for (auto& x : v)
        x *= 1000.0;
      return v;
    };
    petrel::plot::line_chart c;
    c.title = "petrel bench: latency CDFs (" + std::to_string(ok) + " requests, " + o.model + ", max concurrency " +
              (o.max_concurrency ? std::to_string(o.max_concurrency) : std::string("unlimited")) + ")";
    c.x_label = "latency (ms, log scale)";
    c.y_label = "cumulative fraction";
    c.x_log = true;
    c.step = true;
    c.series = {petrel::plot::empirical_cdf("TTFT", in_ms(ttft)), petrel::plot::empirical_cdf("ITL", in_ms(itl)),
                petrel::plot::empirical_cdf("E2E", in_ms(e2e))};
    if (auto err = petrel::plot::write_svg_file(o.plot_path, petrel::plot::render_svg({c}, 1, 800, 480)); !err.empty())
      return failure("--plot: " + err);
    std::fprintf(stderr, "petrel bench: wrote %s\n", o.plot_path.c_str());
  }
  if (ok == 0 || bad > 0)
    return petrel::cli::exit_failure;
  return petrel::cli::exit_ok;
}

const bool registered = petrel::cli::register_command(
    "bench", "Serving benchmark against a running gateway: throughput, TTFT, ITL, E2E latency",
    [](CLI::App& sub) -> petrel::cli::command_fn {
      auto o = std::make_shared<bench_options>();
      sub.add_option("--host", o->host, "gateway host")->capture_default_str();
      sub.add_option("--port", o->port, "gateway port");
      sub.add_option("--config", o->config, "cluster.yaml of a running cluster (reads its run file for the port)");
      sub.add_option("--endpoint", o->endpoint, "completions | chat | generate")->capture_default_str();
      sub.add_option("--model", o->model, "model name (default: the first one /v1/models lists)");
      sub.add_option("--num-prompts", o->num_prompts, "requests to send")->capture_default_str();
      sub.add_option("--input-len", o->input_len, "prompt tokens (random printable bytes)")->capture_default_str();
      sub.add_option("--output-len", o->output_len, "max tokens to generate")->capture_default_str();
      sub.add_option("--range-ratio", o->range_ratio, "lengths drawn uniformly from [len*ratio, len]")
          ->capture_default_str();
      sub.add_option("--dataset", o->dataset, "file of prompts, one per line (replaces random prompts)");
      sub.add_option("--request-rate", o->request_rate, "Poisson arrival rate in req/s, or inf (all at once)")
          ->capture_default_str();
      sub.add_option("--max-concurrency", o->max_concurrency, "requests in flight at most (0: no limit)")
          ->capture_default_str();
      sub.add_option("--warmup", o->warmup, "requests sent (and not measured) before the run")->capture_default_str();
      sub.add_option("--seed", o->seed, "random seed for prompts, lengths and arrivals")->capture_default_str();
      sub.add_flag("--stream,!--no-stream", o->stream, "stream the responses (SSE)")->capture_default_str();
      sub.add_flag("--ignore-eos,!--no-ignore-eos", o->ignore_eos, "generate exactly the output length")
          ->capture_default_str();
      sub.add_option("--temperature", o->temperature, "sampling temperature")->capture_default_str();
      sub.add_option("--timeout", o->timeout_s, "seconds one request may take")->capture_default_str();
      sub.add_option("--json", o->json_path, "write the results (and every request's figures) to this file");
      sub.add_option("--plot", o->plot_path, "write the TTFT, ITL and E2E latency CDFs as an SVG to this file");
      sub.add_option("--plot-from", o->plot_from,
                     "with --plot: plot throughput and latency against concurrency from these --json results "
                     "(no server needed)");
      sub.add_flag("--progress", o->progress, "show the progress bar even when stderr is not a terminal");
      return [o] { return run_bench(*o); };
    });

} // namespace
