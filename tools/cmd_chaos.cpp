// petrel chaos SCENARIO.yaml: starts (or attaches to) a cluster, drives a seeded load, plays a
// timeline of faults, and checks that nothing was lost, nothing failed and greedy outputs equal a
// fault-free run. Every fault and every request outcome goes into a JSON history.
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "actors/cluster.hpp"
#include "runtime/backend.hpp"
#include "runtime/chaos_scenario.hpp"
#include "runtime/generation.hpp"
#include "runtime/model.hpp"
#include "tools/command.hpp"
#include "tools/http_client.hpp"

namespace {

using namespace petrel;
using namespace petrel::cli;
using json = nlohmann::json;
using steady = std::chrono::steady_clock;
namespace fs = std::filesystem;

struct chaos_request {
  std::vector<int32_t> prompt;
  int max_new = 0;
  std::vector<int32_t> reference; // fault-free greedy output (empty when not computed)
  // outcome
  std::string status = "pending"; // pending (never sent) | lost (no answer) | completed | failed
  int http_status = 0;
  std::string error;
  std::vector<int32_t> output;
  double latency_ms = 0;
};

struct fault_record {
  const chaos_event* event = nullptr;
  double injected_at_ms = 0;
  bool injected = false;
  std::string detail;
  std::atomic<double> recovery_ms{-1};
};

double ms_since(steady::time_point t0) {
  return std::chrono::duration<double, std::milli>(steady::now() - t0).count();
}

/// Builds the seeded workload: printable prompts (BOS + bytes) and output lengths.
std::vector<chaos_request> make_workload(const chaos_scenario& sc) {
  std::mt19937_64 rng(sc.seed);
  static const std::string alphabet = "abcdefghijklmnopqrstuvwxyz abcdefghijklmnopqrstuvwxyz ETAOINSHRDLU.,?!'";
  std::vector<chaos_request> out(static_cast<size_t>(sc.load.requests));
  for (auto& r : out) {
    int in = std::uniform_int_distribution<int>(sc.load.input_min, sc.load.input_max)(rng);
    r.max_new = std::uniform_int_distribution<int>(sc.load.output_min, sc.load.output_max)(rng);
    r.prompt.push_back(256);
    for (int i = 1; i < in; ++i)
      r.prompt.push_back(static_cast<unsigned char>(alphabet[rng() % alphabet.size()]));
  }
  return out;
}

/// The fault-free greedy outputs, computed in this process with the same model and kernels.
void compute_references(const cluster_config& cfg, std::vector<chaos_request>& reqs) {
  auto be = make_backend(cfg.model.backend);
  auto model = deepseek_model::load(cfg.model.is_dummy() ? fs::path(cfg.model.dummy_config).parent_path()
                                                         : fs::path(cfg.model.path),
                                    *be, cfg.model.is_dummy(), 1);
  int64_t longest = 0;
  for (auto& r : reqs)
    longest = std::max<int64_t>(longest, static_cast<int64_t>(r.prompt.size()) + r.max_new);
  kv_pool kv(*be, model->config(), pages_for_tokens(longest, 16) + 1, 16);
  for (auto& r : reqs) {
    generate_options opt;
    opt.max_new_tokens = r.max_new;
    r.reference = generate(*model, kv, r.prompt, opt).output_ids;
  }
}

/// The node's pid from the head's status.
int node_pid(const run_file& run, const std::string& node) {
  std::string out;
  if (print_cluster_status(run, true, out) != 0)
    return 0;
  auto status = json::parse(out);
  for (auto& n : status["nodes"])
    if (n["name"] == node)
      return n["pid"];
  return 0;
}

bool healthy(const run_file& run) {
  auto r = http_client::get(run.gateway_host, run.gateway_port, "/health", std::chrono::milliseconds(2000));
  if (!r.ok())
    return false;
  try {
    return json::parse(r.body)["status"] == "ok";
  } catch (...) {
    return false;
  }
}

std::string describe_event(const chaos_event& e) {
  if (e.kind == "kill" || e.kind == "slow" || e.kind == "gpu_fault")
    return e.actor;
  if (e.kind == "kill_node" || e.kind == "stall")
    return e.node;
  if (e.kind == "partition")
    return e.from + "<->" + e.to;
  return e.from + "->" + e.to;
}

/// Injects one fault; returns false with the reason in `detail`.
bool inject(const cluster_config& cfg, const run_file& run, const chaos_event& e, uint64_t seed, std::string& detail) {
  fault_request f;
  f.duration_ms = e.length.count();
  f.seed = seed;
  if (e.kind == "kill" || e.kind == "slow" || e.kind == "gpu_fault") {
    auto [node, child] = resolve_chaos_actor(cfg, e.actor);
    f.kind = e.kind;
    f.node = node;
    f.child = child;
    f.factor = e.factor;
    return inject_fault(run, f, detail) == 0;
  }
  if (e.kind == "kill_node") {
    f.kind = "kill_node";
    f.node = e.node;
    return inject_fault(run, f, detail) == 0;
  }
  if (e.kind == "stall") {
    int pid = node_pid(run, e.node);
    if (pid <= 0 || ::kill(pid, SIGSTOP) != 0) {
      detail = "no running process for node " + e.node;
      return false;
    }
    detail = "SIGSTOP pid " + std::to_string(pid);
    std::thread([pid, length = e.length] {
      std::this_thread::sleep_for(length);
      ::kill(pid, SIGCONT); // harmless if the head already replaced the process
    }).detach();
    return true;
  }
  // Link faults act on the sending node's kv_agent; a partition cuts both directions.
  f.kind = e.kind;
  f.delay_ms = e.ms.count();
  f.prob = e.prob;
  f.node = e.from;
  f.peer = e.to;
  bool ok = inject_fault(run, f, detail) == 0;
  if (ok && e.kind == "partition") {
    std::swap(f.node, f.peer);
    ok = inject_fault(run, f, detail) == 0;
  }
  return ok;
}

int run_chaos(const std::string& scenario_path, const std::string& report_path, bool attach) {
  chaos_scenario sc;
  cluster_config cfg;
  try {
    sc = load_chaos_scenario(scenario_path);
    cfg = load_cluster_config(sc.cluster);
  } catch (const config_error& e) {
    std::cerr << "petrel chaos: " << e.what() << "\n";
    return exit_bad_input;
  }
  auto reqs = make_workload(sc);
  bool compare = sc.load.temperature == 0 &&
                 (sc.expect.outputs_match_fault_free.value_or(false) || sc.expect.mismatched.has_value());

  // Start the cluster (or attach to the running one).
  std::optional<pid_t> head_pid;
  auto run_path = run_file_path(cfg);
  if (!attach) {
    if (auto existing = read_run_file(run_path); existing && cluster_running(*existing)) {
      std::cerr << "petrel chaos: cluster '" << cfg.cluster.name << "' is already running; stop it or use --attach\n";
      return exit_bad_input;
    }
    fs::create_directories(fs::path(run_path).parent_path());
    auto log = (fs::path(run_path).parent_path() / "chaos-head.log").string();
    pid_t pid = ::fork();
    if (pid == 0) {
      // If the runner dies (a test timeout, ^C), the cluster stops with it instead of lingering.
      ::prctl(PR_SET_PDEATHSIG, SIGTERM);
      int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      auto exe = fs::read_symlink("/proc/self/exe").string();
      ::execl(exe.c_str(), exe.c_str(), "launch", sc.cluster.c_str(), "--no-demo", static_cast<char*>(nullptr));
      ::_exit(127);
    }
    head_pid = pid;
  }
  std::optional<run_file> run;
  auto up_deadline = steady::now() + std::chrono::seconds(60);
  while (steady::now() < up_deadline) {
    run = read_run_file(run_path);
    if (run && run->gateway_port && healthy(*run))
      break;
    run.reset();
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  if (!run) {
    std::cerr << "petrel chaos: the cluster did not become healthy within 60 s (see " << run_path << ")\n";
    if (head_pid)
      ::kill(*head_pid, SIGKILL), ::waitpid(*head_pid, nullptr, 0);
    return exit_failure;
  }

  // Load and faults run on one clock.
  auto t0 = steady::now();
  std::atomic<size_t> next{0};
  std::vector<std::thread> workers;
  for (int w = 0; w < sc.load.concurrency; ++w)
    workers.emplace_back([&] {
      for (size_t i; (i = next.fetch_add(1)) < reqs.size();) {
        if (sc.load.duration.count() > 0 && steady::now() - t0 > sc.load.duration)
          break;
        auto& r = reqs[i];
        r.status = "lost"; // until an answer arrives
        json body{{"input_ids", r.prompt},
                  {"sampling_params", {{"max_new_tokens", r.max_new}, {"temperature", sc.load.temperature},
                                       {"ignore_eos", true}, {"seed", sc.seed + i}}}};
        auto start = steady::now();
        auto res = http_client::post_json(run->gateway_host, run->gateway_port, "/generate", body.dump(), {},
                                          sc.load.request_timeout);
        r.latency_ms = ms_since(start);
        r.http_status = res.status;
        if (!res.error.empty()) {
          r.status = "lost";
          r.error = res.error;
        } else if (res.status != 200) {
          r.status = "failed";
          r.error = res.body.substr(0, 300);
        } else {
          r.status = "completed";
          try {
            r.output = json::parse(res.body)["output_ids"].get<std::vector<int32_t>>();
          } catch (...) {
            r.status = "failed";
            r.error = "unreadable body";
          }
        }
      }
    });
  std::vector<std::unique_ptr<fault_record>> faults;
  std::vector<std::thread> watchers;
  for (auto& e : sc.events) {
    std::this_thread::sleep_until(t0 + e.at);
    auto rec = std::make_unique<fault_record>();
    rec->event = &e;
    rec->injected_at_ms = ms_since(t0);
    rec->injected = inject(cfg, *run, e, sc.seed, rec->detail);
    std::cerr << "petrel chaos: t=" << std::fixed << std::setprecision(1) << rec->injected_at_ms / 1000 << "s "
              << e.kind << " " << describe_event(e) << (rec->injected ? " injected" : " NOT injected: ")
              << (rec->injected ? "" : rec->detail) << "\n";
    // Recovery: from the end of the fault until the cluster reports every rank up again.
    auto* r = rec.get();
    watchers.emplace_back([r, &run, t0, end = rec->injected_at_ms + static_cast<double>(e.length.count())] {
      std::this_thread::sleep_for(std::chrono::milliseconds(200)); // let the fault take effect
      auto deadline = steady::now() + std::chrono::seconds(60);
      while (steady::now() < deadline) {
        if (ms_since(t0) >= end && healthy(*run)) {
          r->recovery_ms = std::max(0.0, ms_since(t0) - end);
          return;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
    });
    faults.push_back(std::move(rec));
  }
  for (auto& w : workers)
    w.join();
  for (auto& w : watchers)
    w.join();
  double duration_s = ms_since(t0) / 1000;

  // The head's KV checksum counters (transport.kv_checksum): how many arrivals were checked and how
  // many were caught corrupted and re-prefilled.
  std::map<std::string, double> kv_checks;
  if (auto m = http_client::get(run->gateway_host, run->gateway_port, "/metrics"); m.status == 200) {
    std::istringstream lines(m.body);
    const std::string prefix = "petrel_kv_checksum_checks_total{result=\"";
    for (std::string line; std::getline(lines, line);)
      if (line.rfind(prefix, 0) == 0) {
        auto end = line.find('"', prefix.size());
        auto space = line.rfind(' ');
        if (end != std::string::npos && space != std::string::npos)
          kv_checks[line.substr(prefix.size(), end - prefix.size())] = std::atof(line.c_str() + space + 1);
      }
  }

  if (head_pid) {
    std::string out;
    stop_cluster(*run, std::chrono::seconds(30), out);
    ::waitpid(*head_pid, nullptr, 0);
  }
  // Requests never issued (a duration-bounded load) are not part of the run.
  reqs.erase(std::remove_if(reqs.begin(), reqs.end(), [](auto& r) { return r.status == "pending"; }), reqs.end());
  if (compare) {
    // The fault-free reference: the same prompts through the model in this process.
    std::cerr << "petrel chaos: computing " << reqs.size() << " fault-free reference outputs\n";
    compute_references(cfg, reqs);
  }

  // Report.
  int completed = 0, failed = 0, lost = 0, mismatched = 0;
  json jreqs = json::array();
  for (size_t i = 0; i < reqs.size(); ++i) {
    auto& r = reqs[i];
    bool match = !compare || r.status != "completed" || r.output == r.reference;
    completed += r.status == "completed";
    failed += r.status == "failed";
    lost += r.status == "lost";
    mismatched += !match;
    json jr{{"id", i}, {"status", r.status}, {"http_status", r.http_status}, {"latency_ms", r.latency_ms},
            {"prompt_tokens", r.prompt.size()}, {"output_tokens", r.output.size()}};
    if (compare)
      jr["matches_fault_free"] = match;
    if (!r.error.empty())
      jr["error"] = r.error;
    jreqs.push_back(jr);
  }
  double max_recovery = 0;
  json jfaults = json::array();
  bool all_injected = true, all_recovered = true;
  for (auto& f : faults) {
    auto& e = *f->event;
    all_injected &= f->injected;
    all_recovered &= f->recovery_ms >= 0;
    max_recovery = std::max(max_recovery, f->recovery_ms.load());
    jfaults.push_back({{"at_ms", f->injected_at_ms}, {"kind", e.kind}, {"target", describe_event(e)},
                       {"for_ms", e.length.count()}, {"injected", f->injected}, {"detail", f->detail},
                       {"recovery_ms", f->recovery_ms.load()}, {"line", e.line}});
  }
  json checks = json::array();
  bool passed = all_injected && all_recovered;
  auto check = [&](const std::string& name, json expected, json actual, bool ok) {
    checks.push_back({{"expectation", name}, {"expected", expected}, {"actual", actual}, {"ok", ok}});
    passed &= ok;
  };
  if (sc.expect.lost)
    check("lost", *sc.expect.lost, lost, lost <= *sc.expect.lost);
  if (sc.expect.failed)
    check("failed", *sc.expect.failed, failed, failed <= *sc.expect.failed);
  if (sc.expect.mismatched)
    check("mismatched", *sc.expect.mismatched, mismatched, mismatched <= *sc.expect.mismatched);
  if (sc.expect.outputs_match_fault_free.value_or(false))
    check("outputs_match_fault_free", true, mismatched == 0, mismatched == 0);
  if (sc.expect.kv_corrupt_detected)
    check("kv_corrupt_detected", *sc.expect.kv_corrupt_detected, kv_checks["mismatch"] > 0,
          (kv_checks["mismatch"] > 0) == *sc.expect.kv_corrupt_detected);
  if (sc.expect.max_recovery)
    check("max_recovery_ms", sc.expect.max_recovery->count(), max_recovery,
          all_recovered && max_recovery <= static_cast<double>(sc.expect.max_recovery->count()));
  json report{{"scenario", scenario_path}, {"cluster", sc.cluster},       {"seed", sc.seed},
              {"duration_s", duration_s}, {"faults", jfaults},           {"requests", jreqs},
              {"summary",
               {{"total", reqs.size()}, {"completed", completed}, {"failed", failed}, {"lost", lost},
                {"mismatched", mismatched}, {"max_recovery_ms", max_recovery}}},
              {"kv_checksum",
               {{"ok", kv_checks["ok"]}, {"mismatch", kv_checks["mismatch"]}, {"missing", kv_checks["missing"]},
                {"error", kv_checks["error"]}}},
              {"expectations", checks},   {"passed", passed}};
  if (!report_path.empty())
    std::ofstream(report_path) << report.dump(2) << "\n";

  std::cout << "petrel chaos: " << scenario_path << " (seed " << sc.seed << ", " << std::fixed << std::setprecision(1)
            << duration_s << " s)\n\n";
  std::cout << std::left << std::setw(10) << "AT" << std::setw(11) << "FAULT" << std::setw(22) << "TARGET"
            << std::setw(10) << "FOR" << "RECOVERY\n";
  for (auto& f : jfaults)
    std::cout << std::setw(10) << (std::to_string(int(f["at_ms"].get<double>())) + "ms") << std::setw(11)
              << f["kind"].get<std::string>() << std::setw(22) << f["target"].get<std::string>() << std::setw(10)
              << (std::to_string(f["for_ms"].get<int64_t>()) + "ms")
              << (f["injected"].get<bool>()
                      ? (f["recovery_ms"].get<double>() < 0 ? std::string("never")
                                                            : std::to_string(int(f["recovery_ms"].get<double>())) + "ms")
                      : "not injected: " + f["detail"].get<std::string>())
              << "\n";
  std::cout << "\nrequests " << reqs.size() << "  completed " << completed << "  failed " << failed << "  lost " << lost
            << "  mismatched " << (compare ? std::to_string(mismatched) : std::string("n/a")) << "\n";
  if (kv_checks["mismatch"] + kv_checks["missing"] + kv_checks["error"] > 0)
    std::cout << "KV checksums: " << static_cast<long long>(kv_checks["ok"]) << " ok, "
              << static_cast<long long>(kv_checks["mismatch"]) << " corrupt arrivals caught and re-prefilled, "
              << static_cast<long long>(kv_checks["missing"] + kv_checks["error"]) << " unchecked (re-prefilled)\n";
  for (auto& c : checks)
    std::cout << (c["ok"].get<bool>() ? "  ok    " : "  FAIL  ") << c["expectation"].get<std::string>() << ": expected "
              << c["expected"].dump() << ", got " << c["actual"].dump() << "\n";
  std::cout << (passed ? "PASSED" : "FAILED") << "\n";
  return passed ? exit_ok : exit_failure;
}

const bool registered = register_command(
    "chaos", "Play a fault-injection scenario against a cluster and check that nothing is lost",
    [](CLI::App& sub) -> command_fn {
      auto scenario = std::make_shared<std::string>();
      auto report = std::make_shared<std::string>();
      auto attach = std::make_shared<bool>(false);
      sub.add_option("scenario", *scenario, "scenario YAML")->required();
      sub.add_option("--report", *report, "write the JSON history here");
      sub.add_flag("--attach", *attach, "use the cluster that is already running instead of launching one");
      return [=] { return run_chaos(*scenario, *report, *attach); };
    });

} // namespace
