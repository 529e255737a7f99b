// petrel launch | node | status | stop: starting, inspecting and stopping a cluster.
#include <iomanip>
#include <iostream>
#include <map>
#include <sstream>

#include <nlohmann/json.hpp>
#include <memory>
#include <thread>

#include "actors/cluster.hpp"
#include "tools/command.hpp"
#include "tools/http_client.hpp"
#include "tools/launch_demo.hpp"

namespace {

using namespace petrel;
using namespace petrel::cli;

/// Loads cluster.yaml, or prints the error and returns nullopt (exit code 2 follows).
std::optional<cluster_config> load_or_report(const std::string& path) {
  try {
    return load_cluster_config(path);
  } catch (const config_error& e) {
    std::cerr << "petrel: " << e.what() << "\n";
    return std::nullopt;
  }
}

const bool launch_registered = register_command(
    "launch", "Launch the cluster described by cluster.yaml (one process per node) and serve until stopped",
    [](CLI::App& sub) -> command_fn {
      auto path = std::make_shared<std::string>("cluster.yaml");
      auto no_demo = std::make_shared<bool>(false);
      sub.add_option("config", *path, "cluster.yaml to launch")->capture_default_str();
      sub.add_flag("--no-demo", *no_demo, "do not send the demo prompt once the cluster is up");
      return [path, no_demo] {
        auto cfg = load_or_report(*path);
        if (!cfg)
          return int(exit_bad_input);
        head_options opts;
        opts.config_path = *path;
        std::thread demo;
        opts.on_ready = [&](const run_file& rf) {
          std::cout << "petrel: cluster '" << rf.cluster << "' launched: " << cfg->nodes.size()
                    << " node processes, head pid " << rf.head_pid << " on port " << rf.head_port;
          if (rf.gateway_port)
            std::cout << ", gateway http://" << rf.gateway_host << ":" << rf.gateway_port;
          if (rf.tls)
            std::cout << "\n  cluster links: TLS; only holders of the secret " << rf.secret_file << " may join";
          else
            std::cout << "\n  cluster links: plain TCP (security.tls: false); any local process may connect";
          std::cout << "\n  petrel status " << *path << "   # live actor tree\n  petrel stop " << *path
                    << "     # stop it\n"
                    << std::flush;
          // The main job's proof of life: one streamed completion through the whole PD path.
          if (!*no_demo && rf.gateway_port)
            demo = std::thread([rf, name = cfg->model.served_name, p = *path] {
              run_launch_demo(rf.gateway_host, rf.gateway_port, name, p);
            });
        };
        int rc = 0;
        try {
          rc = run_head(*cfg, opts);
        } catch (const config_error& e) {
          std::cerr << "petrel: " << e.what() << "\n";
          rc = exit_bad_input;
        }
        if (demo.joinable())
          demo.join();
        return rc;
      };
    });

const bool node_registered = register_command(
    "node", "Run one node process of a cluster (started by `petrel launch`)", [](CLI::App& sub) -> command_fn {
      auto opts = std::make_shared<node_options>();
      auto head = std::make_shared<std::string>();
      sub.add_option("--config", opts->config_path, "cluster.yaml")->required();
      sub.add_option("--node", opts->node, "node name")->required();
      sub.add_option("--head", *head, "head address HOST:PORT")->required();
      sub.add_option("--epoch", opts->epoch, "incarnation epoch given by the head")->required();
      return [opts, head] {
        auto cfg = load_or_report(opts->config_path);
        if (!cfg)
          return int(exit_bad_input);
        auto colon = head->rfind(':');
        if (colon == std::string::npos) {
          std::cerr << "petrel node: --head must be HOST:PORT\n";
          return int(exit_bad_input);
        }
        opts->head_host = head->substr(0, colon);
        opts->head_port = std::stoi(head->substr(colon + 1));
        return run_node(*cfg, *opts);
      };
    });

/// Finds the run file of the cluster that `path` describes; prints why not when there is none.
std::optional<run_file> find_running(const std::string& path) {
  auto cfg = load_or_report(path);
  if (!cfg)
    return std::nullopt;
  auto rf_path = run_file_path(*cfg);
  auto rf = read_run_file(rf_path);
  if (!rf)
    std::cerr << "no Petrel cluster '" << cfg->cluster.name << "' is running (no run file at " << rf_path
              << "); start one with `petrel launch " << path << "`\n";
  return rf;
}

/// Tokens per group and kind from the gateway's metrics: {"decode0/output": 1234, ...}.
std::map<std::string, double> group_token_counts(const run_file& rf) {
  std::map<std::string, double> out;
  auto r = http_client::get(rf.gateway_host, rf.gateway_port, "/dashboard/data", std::chrono::milliseconds(3000));
  if (!r.ok())
    return out;
  try {
    auto doc = nlohmann::json::parse(r.body);
    for (auto& sample : doc.at("metrics").at("petrel_group_tokens_total").at("samples"))
      out[sample["labels"]["group"].get<std::string>() + "/" + sample["labels"]["kind"].get<std::string>()] =
          sample["value"].get<double>();
  } catch (const std::exception&) {
  }
  return out;
}

/// One line per group: load from /health, throughput from two token counts `seconds` apart.
std::string group_table(const run_file& rf, const std::map<std::string, double>& before,
                        const std::map<std::string, double>& after, double seconds) {
  auto h = http_client::get(rf.gateway_host, rf.gateway_port, "/health", std::chrono::milliseconds(3000));
  if (!h.ok())
    return "";
  std::ostringstream os;
  os << "\n" << std::left << std::setw(12) << "GROUP" << std::setw(8) << "QUEUED" << std::setw(9) << "RUNNING"
     << std::setw(14) << "KV FREE" << std::setw(10) << "RANKS UP" << std::setw(14) << "INPUT tok/s"
     << "OUTPUT tok/s\n";
  try {
    auto health = nlohmann::json::parse(h.body);
    for (auto& g : health.at("groups")) {
      auto name = g["group"].get<std::string>();
      auto rate = [&](const char* kind) {
        auto key = name + "/" + kind;
        auto a = after.count(key) ? after.at(key) : 0.0, b = before.count(key) ? before.at(key) : 0.0;
        return seconds > 0 ? (a - b) / seconds : 0.0;
      };
      os << std::setw(12) << name << std::setw(8) << g["queued"].get<int>() << std::setw(9) << g["running"].get<int>()
         << std::setw(14) << (std::to_string(g["free_pages"].get<int>()) + "/" + std::to_string(g["total_pages"].get<int>()))
         << std::setw(10) << (std::to_string(g["ranks_up"].get<int>()) + "/" + std::to_string(g["ranks"].get<int>()))
         << std::setw(14) << std::fixed << std::setprecision(1) << rate("input") << rate("output") << "\n";
    }
  } catch (const std::exception&) {
    return "";
  }
  return os.str();
}

const bool status_registered = register_command(
    "status", "Show the live actor tree of a running cluster: node, actor, state, epoch, restarts",
    [](CLI::App& sub) -> command_fn {
      auto path = std::make_shared<std::string>("cluster.yaml");
      auto json = std::make_shared<bool>(false);
      auto watch = std::make_shared<double>(0);
      sub.add_option("config", *path, "cluster.yaml of the cluster")->capture_default_str();
      sub.add_flag("--json", *json, "print JSON");
      sub.add_option("--watch", *watch, "refresh every SECONDS until interrupted");
      return [path, json, watch] {
        auto rf = find_running(*path);
        if (!rf)
          return int(exit_failure);
        // Per-group throughput needs two samples: over the --watch period, or over one second.
        double period = *watch > 0 ? *watch : 1.0;
        auto before = *json ? std::map<std::string, double>{} : group_token_counts(*rf);
        for (;;) {
          std::string out;
          int rc = print_cluster_status(*rf, *json, out);
          if (rc == 0 && !*json && rf->gateway_port) {
            if (*watch <= 0)
              std::this_thread::sleep_for(std::chrono::milliseconds(static_cast<int>(period * 1000)));
            auto after = group_token_counts(*rf);
            out += group_table(*rf, before, after, period);
            before = std::move(after);
          }
          if (*watch > 0)
            std::cout << "\x1b[2J\x1b[H";
          (rc == 0 ? std::cout : std::cerr) << out << std::flush;
          if (*watch <= 0 || rc != 0)
            return rc;
          std::this_thread::sleep_for(std::chrono::milliseconds(static_cast<int>(*watch * 1000)));
        }
      };
    });

const bool stop_registered = register_command(
    "stop", "Stop a running cluster cleanly (all node processes, then the head)", [](CLI::App& sub) -> command_fn {
      auto path = std::make_shared<std::string>("cluster.yaml");
      auto timeout = std::make_shared<double>(30);
      sub.add_option("config", *path, "cluster.yaml of the cluster")->capture_default_str();
      sub.add_option("--timeout", *timeout, "seconds to wait")->capture_default_str();
      return [path, timeout] {
        auto rf = find_running(*path);
        if (!rf)
          return int(exit_failure);
        std::string out;
        int rc = stop_cluster(*rf, std::chrono::milliseconds(static_cast<int>(*timeout * 1000)), out);
        (rc == 0 ? std::cout : std::cerr) << out;
        return rc;
      };
    });

} // namespace
