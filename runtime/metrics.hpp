// Prometheus metrics for Petrel: a thread-safe registry of counter, gauge and histogram families
// with label sets, rendered in the text exposition format 0.0.4, plus a JSON snapshot for dashboards.
//
// Hot path: look a child up once (family.with({...}) takes the family's mutex), keep the reference
// (it stays valid for the registry's lifetime), then inc()/set()/observe() are lock-free atomics.
#pragma once

#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace petrel::metrics {

// -- children: one per label set ---------------------------------------------------

class counter {
public:
  void inc(double amount = 1.0) { // negative amounts are ignored: counters only go up
    if (amount > 0) value_.fetch_add(amount, std::memory_order_relaxed);
  }
  double value() const { return value_.load(std::memory_order_relaxed); }

private:
  std::atomic<double> value_{0.0};
};

class gauge {
public:
  void set(double v) { value_.store(v, std::memory_order_relaxed); }
  void add(double d) { value_.fetch_add(d, std::memory_order_relaxed); }
  void inc() { add(1.0); }
  void dec() { add(-1.0); }
  double value() const { return value_.load(std::memory_order_relaxed); }

private:
  std::atomic<double> value_{0.0};
};

class histogram {
public:
  /// `bounds`: sorted, finite upper bounds; +Inf is implicit.
  explicit histogram(const std::vector<double>& bounds);
  void observe(double v);

  struct snapshot_t {
    std::vector<double> bounds;            // without +Inf
    std::vector<uint64_t> cumulative;      // bounds.size() + 1 entries, the last one is +Inf == count
    double sum = 0.0;
    uint64_t count = 0;
  };
  snapshot_t snapshot() const;

private:
  std::vector<double> bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> buckets_; // per bucket (not cumulative), bounds_.size() + 1
  std::atomic<double> sum_{0.0};
};

// -- families ---------------------------------------------------------------------

enum class metric_kind { counter, gauge, histogram };

/// A metric name with its HELP text, label names and one child per distinct label-value list.
template <class Child>
class family {
public:
  family(std::string name, std::string help, std::vector<std::string> label_names,
         std::vector<double> buckets = {});

  /// The child for these label values (in label-name order), created on first use. Throws
  /// std::invalid_argument when the count differs from the label names. The reference stays valid.
  Child& with(const std::vector<std::string>& label_values);
  Child& with(std::initializer_list<std::string> label_values) {
    return with(std::vector<std::string>(label_values));
  }
  /// The child of a family without labels.
  Child& get() { return with(std::vector<std::string>{}); }

  const std::string& name() const { return name_; }
  const std::string& help() const { return help_; }
  const std::vector<std::string>& label_names() const { return label_names_; }

  /// Calls f(label_values, child) for every child, in label order, under the family's lock.
  template <class F>
  void for_each(F&& f) const {
    std::lock_guard lock(mutex_);
    for (const auto& [labels, child] : children_) f(labels, *child);
  }

private:
  std::string name_, help_;
  std::vector<std::string> label_names_;
  std::vector<double> buckets_;
  mutable std::mutex mutex_;
  std::map<std::vector<std::string>, std::unique_ptr<Child>> children_;
};

using counter_family = family<counter>;
using gauge_family = family<gauge>;
using histogram_family = family<histogram>;

// -- registry ---------------------------------------------------------------------

class registry {
public:
  /// Registers a family, or returns the existing one of that name. Throws std::invalid_argument on
  /// an invalid name, or when the name exists with another kind, label names or buckets.
  counter_family& add_counter(const std::string& name, const std::string& help,
                              std::vector<std::string> label_names = {});
  gauge_family& add_gauge(const std::string& name, const std::string& help,
                          std::vector<std::string> label_names = {});
  histogram_family& add_histogram(const std::string& name, const std::string& help,
                                  std::vector<std::string> label_names, std::vector<double> buckets);

  /// Text exposition format 0.0.4 (Content-Type: text/plain; version=0.0.4; charset=utf-8),
  /// families in registration order.
  std::string render_prometheus() const;

  /// {"name": {"type", "help", "samples": [{"labels": {...}, "value"} | {"labels", "buckets":
  /// [[le, cumulative]...], "sum", "count"}]}}. le of the last bucket is "+Inf".
  nlohmann::json snapshot_json() const;

private:
  struct entry {
    metric_kind kind;
    std::unique_ptr<counter_family> counters;
    std::unique_ptr<gauge_family> gauges;
    std::unique_ptr<histogram_family> histograms;
  };
  mutable std::mutex mutex_;
  std::vector<std::unique_ptr<entry>> entries_; // registration order
  std::map<std::string, entry*, std::less<>> by_name_;
};

/// The exposition Content-Type for /metrics.
inline constexpr const char* prometheus_content_type = "text/plain; version=0.0.4; charset=utf-8";

/// Default bucket sets (seconds).
std::vector<double> latency_buckets_ttft();
std::vector<double> latency_buckets_inter_token();
std::vector<double> latency_buckets_e2e();
std::vector<double> latency_buckets_kv_transfer();

/// Every metric Petrel exports (docs/http-api.md lists them), registered on one registry.
struct serving_metrics {
  explicit serving_metrics(registry& r);

  gauge_family& queue_depth;           // petrel_queue_depth{group}
  gauge_family& running_requests;      // petrel_running_requests{group}
  histogram_family& time_to_first_token; // petrel_time_to_first_token_seconds
  histogram_family& inter_token_latency; // petrel_inter_token_latency_seconds
  histogram_family& e2e_request_latency; // petrel_e2e_request_latency_seconds
  counter_family& input_tokens;        // petrel_input_tokens_total
  counter_family& output_tokens;       // petrel_output_tokens_total
  histogram_family& kv_transfer;       // petrel_kv_transfer_seconds{phase=bootstrap|allocation|transfer}
  counter_family& kv_transfer_bytes;   // petrel_kv_transfer_bytes_total
  counter_family& kv_transfers;        // petrel_kv_transfers_total{path=ucx|local|cuda_ipc|staged}
  counter_family& actor_restarts;      // petrel_actor_restarts_total{actor}
  counter_family& requests;            // petrel_requests_total{status}
};

/// The process-wide registry (what GET /metrics renders).
registry& global_registry();

} // namespace petrel::metrics
