// petrel launch | node | status | stop: starting, inspecting and stopping a cluster.
#include <iostream>
#include <memory>
#include <thread>

#include "actors/cluster.hpp"
#include "tools/command.hpp"
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
        for (;;) {
          std::string out;
          int rc = print_cluster_status(*rf, *json, out);
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
