#include "runtime/metrics.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <stdexcept>

#include <nlohmann/json.hpp>

namespace petrel::metrics {

namespace {

// Prometheus accepts Go's ParseFloat syntax; the shortest round-trip form is both exact and short.
void append_number(std::string& out, double v) {
  if (std::isnan(v)) { out += "NaN"; return; }
  if (std::isinf(v)) { out += v > 0 ? "+Inf" : "-Inf"; return; }
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof buf, v);
  out.append(buf, res.ptr);
}

std::string number_text(double v) {
  std::string s;
  append_number(s, v);
  return s;
}

// Label values escape backslash, double quote and newline; HELP escapes backslash and newline.
void append_escaped(std::string& out, const std::string& s, bool quote) {
  for (char c : s) {
    if (c == '\\') out += "\\\\";
    else if (c == '\n') out += "\\n";
    else if (quote && c == '"') out += "\\\"";
    else out += c;
  }
}

bool valid_metric_name(const std::string& n) {
  if (n.empty()) return false;
  for (std::size_t i = 0; i < n.size(); ++i) {
    char c = n[i];
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':' ||
              (i > 0 && c >= '0' && c <= '9');
    if (!ok) return false;
  }
  return true;
}

bool valid_label_name(const std::string& n) {
  if (n.empty() || n == "le" || n.rfind("__", 0) == 0) return false;
  for (std::size_t i = 0; i < n.size(); ++i) {
    char c = n[i];
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
              (i > 0 && c >= '0' && c <= '9');
    if (!ok) return false;
  }
  return true;
}

// {a="x",b="y"} plus an optional extra label (le) at the end; empty when there are none.
void append_labels(std::string& out, const std::vector<std::string>& names,
                   const std::vector<std::string>& values, const char* extra_name = nullptr,
                   const std::string& extra_value = {}) {
  if (names.empty() && !extra_name) return;
  out += '{';
  bool first = true;
  for (std::size_t i = 0; i < names.size(); ++i) {
    if (!first) out += ',';
    first = false;
    out += names[i];
    out += "=\"";
    append_escaped(out, values[i], true);
    out += '"';
  }
  if (extra_name) {
    if (!first) out += ',';
    out += extra_name;
    out += "=\"";
    out += extra_value;
    out += '"';
  }
  out += '}';
}

template <class Child>
std::unique_ptr<Child> make_child(const std::vector<double>& buckets) {
  if constexpr (std::is_same_v<Child, histogram>) return std::make_unique<histogram>(buckets);
  else return std::make_unique<Child>();
}

} // namespace

// -- histogram --------------------------------------------------------------------

histogram::histogram(const std::vector<double>& bounds)
  : bounds_(bounds), buckets_(new std::atomic<uint64_t>[bounds.size() + 1]) {
  for (std::size_t i = 0; i <= bounds_.size(); ++i) buckets_[i].store(0);
}

void histogram::observe(double v) {
  // Bucket i counts values in (bounds[i-1], bounds[i]]; le is inclusive.
  auto it = std::lower_bound(bounds_.begin(), bounds_.end(), v);
  buckets_[static_cast<std::size_t>(it - bounds_.begin())].fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(v, std::memory_order_relaxed);
}

histogram::snapshot_t histogram::snapshot() const {
  snapshot_t s;
  s.bounds = bounds_;
  s.cumulative.resize(bounds_.size() + 1);
  uint64_t acc = 0;
  for (std::size_t i = 0; i <= bounds_.size(); ++i) {
    acc += buckets_[i].load(std::memory_order_relaxed);
    s.cumulative[i] = acc;
  }
  s.count = acc; // derived from the buckets, so that +Inf and _count always agree
  s.sum = sum_.load(std::memory_order_relaxed);
  return s;
}

// -- family -----------------------------------------------------------------------

template <class Child>
family<Child>::family(std::string name, std::string help, std::vector<std::string> label_names,
                      std::vector<double> buckets)
  : name_(std::move(name)), help_(std::move(help)), label_names_(std::move(label_names)),
    buckets_(std::move(buckets)) {}

template <class Child>
Child& family<Child>::with(const std::vector<std::string>& label_values) {
  if (label_values.size() != label_names_.size())
    throw std::invalid_argument("metric " + name_ + ": expected " +
                                std::to_string(label_names_.size()) + " label values, got " +
                                std::to_string(label_values.size()));
  std::lock_guard lock(mutex_);
  auto& slot = children_[label_values];
  if (!slot) slot = make_child<Child>(buckets_);
  return *slot;
}

template class family<counter>;
template class family<gauge>;
template class family<histogram>;

// -- registry ---------------------------------------------------------------------

namespace {

void check_names(const std::string& name, const std::vector<std::string>& labels) {
  if (!valid_metric_name(name)) throw std::invalid_argument("invalid metric name '" + name + "'");
  for (const auto& l : labels)
    if (!valid_label_name(l))
      throw std::invalid_argument("metric " + name + ": invalid label name '" + l + "'");
}

} // namespace

counter_family& registry::add_counter(const std::string& name, const std::string& help,
                                      std::vector<std::string> label_names) {
  check_names(name, label_names);
  std::lock_guard lock(mutex_);
  if (auto it = by_name_.find(name); it != by_name_.end()) {
    if (it->second->kind != metric_kind::counter || it->second->counters->label_names() != label_names)
      throw std::invalid_argument("metric " + name + " is already registered differently");
    return *it->second->counters;
  }
  auto e = std::make_unique<entry>();
  e->kind = metric_kind::counter;
  e->counters = std::make_unique<counter_family>(name, help, std::move(label_names));
  auto& ref = *e->counters;
  by_name_[name] = e.get();
  entries_.push_back(std::move(e));
  return ref;
}

gauge_family& registry::add_gauge(const std::string& name, const std::string& help,
                                  std::vector<std::string> label_names) {
  check_names(name, label_names);
  std::lock_guard lock(mutex_);
  if (auto it = by_name_.find(name); it != by_name_.end()) {
    if (it->second->kind != metric_kind::gauge || it->second->gauges->label_names() != label_names)
      throw std::invalid_argument("metric " + name + " is already registered differently");
    return *it->second->gauges;
  }
  auto e = std::make_unique<entry>();
  e->kind = metric_kind::gauge;
  e->gauges = std::make_unique<gauge_family>(name, help, std::move(label_names));
  auto& ref = *e->gauges;
  by_name_[name] = e.get();
  entries_.push_back(std::move(e));
  return ref;
}

histogram_family& registry::add_histogram(const std::string& name, const std::string& help,
                                          std::vector<std::string> label_names,
                                          std::vector<double> buckets) {
  check_names(name, label_names);
  if (buckets.empty()) throw std::invalid_argument("histogram " + name + ": no buckets");
  for (std::size_t i = 0; i < buckets.size(); ++i) {
    if (!std::isfinite(buckets[i]) || (i > 0 && buckets[i] <= buckets[i - 1]))
      throw std::invalid_argument("histogram " + name + ": buckets must be finite and increasing");
  }
  std::lock_guard lock(mutex_);
  if (auto it = by_name_.find(name); it != by_name_.end()) {
    if (it->second->kind != metric_kind::histogram ||
        it->second->histograms->label_names() != label_names)
      throw std::invalid_argument("metric " + name + " is already registered differently");
    return *it->second->histograms;
  }
  auto e = std::make_unique<entry>();
  e->kind = metric_kind::histogram;
  e->histograms = std::make_unique<histogram_family>(name, help, std::move(label_names),
                                                     std::move(buckets));
  auto& ref = *e->histograms;
  by_name_[name] = e.get();
  entries_.push_back(std::move(e));
  return ref;
}

std::string registry::render_prometheus() const {
  std::string out;
  out.reserve(4096);
  std::lock_guard lock(mutex_);
  auto header = [&out](const std::string& name, const std::string& help, const char* type) {
    out += "# HELP ";
    out += name;
    out += ' ';
    append_escaped(out, help, false);
    out += "\n# TYPE ";
    out += name;
    out += ' ';
    out += type;
    out += '\n';
  };
  for (const auto& e : entries_) {
    switch (e->kind) {
    case metric_kind::counter: {
      auto& f = *e->counters;
      header(f.name(), f.help(), "counter");
      f.for_each([&](const std::vector<std::string>& lv, const counter& c) {
        out += f.name();
        append_labels(out, f.label_names(), lv);
        out += ' ';
        append_number(out, c.value());
        out += '\n';
      });
      break;
    }
    case metric_kind::gauge: {
      auto& f = *e->gauges;
      header(f.name(), f.help(), "gauge");
      f.for_each([&](const std::vector<std::string>& lv, const gauge& g) {
        out += f.name();
        append_labels(out, f.label_names(), lv);
        out += ' ';
        append_number(out, g.value());
        out += '\n';
      });
      break;
    }
    case metric_kind::histogram: {
      auto& f = *e->histograms;
      header(f.name(), f.help(), "histogram");
      f.for_each([&](const std::vector<std::string>& lv, const histogram& h) {
        auto s = h.snapshot();
        for (std::size_t i = 0; i <= s.bounds.size(); ++i) {
          out += f.name();
          out += "_bucket";
          append_labels(out, f.label_names(), lv, "le",
                        i < s.bounds.size() ? number_text(s.bounds[i]) : std::string("+Inf"));
          out += ' ';
          out += std::to_string(s.cumulative[i]);
          out += '\n';
        }
        out += f.name();
        out += "_sum";
        append_labels(out, f.label_names(), lv);
        out += ' ';
        append_number(out, s.sum);
        out += '\n';
        out += f.name();
        out += "_count";
        append_labels(out, f.label_names(), lv);
        out += ' ';
        out += std::to_string(s.count);
        out += '\n';
      });
      break;
    }
    }
  }
  return out;
}

nlohmann::json registry::snapshot_json() const {
  nlohmann::json out = nlohmann::json::object();
  std::lock_guard lock(mutex_);
  auto labels_json = [](const std::vector<std::string>& names, const std::vector<std::string>& vals) {
    nlohmann::json l = nlohmann::json::object();
    for (std::size_t i = 0; i < names.size(); ++i) l[names[i]] = vals[i];
    return l;
  };
  for (const auto& e : entries_) {
    nlohmann::json fam;
    nlohmann::json samples = nlohmann::json::array();
    switch (e->kind) {
    case metric_kind::counter:
      fam["type"] = "counter";
      fam["help"] = e->counters->help();
      e->counters->for_each([&](const auto& lv, const counter& c) {
        samples.push_back({{"labels", labels_json(e->counters->label_names(), lv)}, {"value", c.value()}});
      });
      out[e->counters->name()] = std::move(fam);
      break;
    case metric_kind::gauge:
      fam["type"] = "gauge";
      fam["help"] = e->gauges->help();
      e->gauges->for_each([&](const auto& lv, const gauge& g) {
        samples.push_back({{"labels", labels_json(e->gauges->label_names(), lv)}, {"value", g.value()}});
      });
      out[e->gauges->name()] = std::move(fam);
      break;
    case metric_kind::histogram:
      fam["type"] = "histogram";
      fam["help"] = e->histograms->help();
      e->histograms->for_each([&](const auto& lv, const histogram& h) {
        auto s = h.snapshot();
        nlohmann::json buckets = nlohmann::json::array();
        for (std::size_t i = 0; i <= s.bounds.size(); ++i)
          buckets.push_back({i < s.bounds.size() ? nlohmann::json(s.bounds[i]) : nlohmann::json("+Inf"),
                             s.cumulative[i]});
        samples.push_back({{"labels", labels_json(e->histograms->label_names(), lv)},
                           {"buckets", std::move(buckets)}, {"sum", s.sum}, {"count", s.count}});
      });
      out[e->histograms->name()] = std::move(fam);
      break;
    }
    const std::string& name = e->kind == metric_kind::counter ? e->counters->name()
                              : e->kind == metric_kind::gauge ? e->gauges->name()
                                                              : e->histograms->name();
    out[name]["samples"] = std::move(samples);
  }
  return out;
}

// -- Petrel's metric set ------------------------------------------------------------

std::vector<double> latency_buckets_ttft() {
  return {0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60};
}
std::vector<double> latency_buckets_inter_token() {
  return {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.1, 0.2, 0.5, 1, 2};
}
std::vector<double> latency_buckets_e2e() {
  return {0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300};
}
std::vector<double> latency_buckets_kv_transfer() {
  return {0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 10};
}

serving_metrics::serving_metrics(registry& r)
  : queue_depth(r.add_gauge("petrel_queue_depth",
                            "Requests waiting in a group's scheduler queue.", {"group"})),
    running_requests(r.add_gauge("petrel_running_requests",
                                 "Requests in a group's running batch.", {"group"})),
    time_to_first_token(r.add_histogram("petrel_time_to_first_token_seconds",
                                        "Time from request arrival to its first output token.", {},
                                        latency_buckets_ttft())),
    inter_token_latency(r.add_histogram("petrel_inter_token_latency_seconds",
                                        "Time between consecutive output tokens of a request.", {},
                                        latency_buckets_inter_token())),
    e2e_request_latency(r.add_histogram("petrel_e2e_request_latency_seconds",
                                        "Time from request arrival to its last output token.", {},
                                        latency_buckets_e2e())),
    input_tokens(r.add_counter("petrel_input_tokens_total", "Prompt tokens of admitted requests.")),
    output_tokens(r.add_counter("petrel_output_tokens_total", "Generated tokens.")),
    kv_transfer(r.add_histogram("petrel_kv_transfer_seconds",
                                "Prefill-to-decode KV transfer time by phase.", {"phase"},
                                latency_buckets_kv_transfer())),
    kv_transfer_bytes(r.add_counter("petrel_kv_transfer_bytes_total",
                                    "Bytes of KV cache moved from prefill to decode.")),
    kv_transfers(r.add_counter("petrel_kv_transfers_total",
                               "Completed KV transfers by path: ucx (host pools), local (one process), cuda_ipc "
                               "(GPU to GPU on one host), staged (GPU pools through pinned host memory and UCX).",
                               {"path"})),
    actor_restarts(r.add_counter("petrel_actor_restarts_total",
                                 "Actor restarts by supervisors.", {"actor"})),
    requests(r.add_counter("petrel_requests_total",
                           "Finished requests by outcome (ok, aborted, failed, invalid, overloaded, unavailable).",
                           {"status"})) {
  // Families without labels expose their single child from the start, so a scrape sees 0.
  time_to_first_token.get();
  inter_token_latency.get();
  e2e_request_latency.get();
  input_tokens.get();
  output_tokens.get();
  kv_transfer_bytes.get();
  for (const char* phase : {"bootstrap", "allocation", "transfer"}) kv_transfer.with({phase});
}

registry& global_registry() {
  static registry r;
  return r;
}

} // namespace petrel::metrics
