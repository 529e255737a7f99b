// petrel rebalance: a live EPLB rebalance of one expert-parallel group of a running cluster. The group's
// ranks gather their expert loads, compute the new placement, move expert weights between them while
// serving goes on, and switch at a step boundary (docs/expert-parallel.md).
#include <iostream>
#include <memory>

#include <nlohmann/json.hpp>

#include "actors/cluster.hpp"
#include "tools/command.hpp"

namespace {

using namespace petrel;
using namespace petrel::cli;

const bool rebalance_registered = register_command(
    "rebalance", "Rebalance the experts of an expert-parallel group of a running cluster live (EPLB)",
    [](CLI::App& sub) -> command_fn {
      auto path = std::make_shared<std::string>();
      auto group = std::make_shared<std::string>();
      auto json = std::make_shared<bool>(false);
      sub.add_option("config", *path, "cluster.yaml of the running cluster")->required();
      sub.add_option("group", *group, "the prefill or decode group (its ep_size must be > 1)")->required();
      sub.add_flag("--json", *json, "print the ranks' EP statistics as JSON");
      return [path, group, json] {
        try {
          auto cfg = load_cluster_config(*path);
          auto rf = read_run_file(run_file_path(cfg));
          if (!rf || !cluster_running(*rf)) {
            std::cerr << "petrel rebalance: no cluster '" << cfg.cluster.name
                      << "' is running; start one with `petrel launch " << *path << "`\n";
            return int(exit_failure);
          }
          std::string out;
          int rc = request_rebalance(*rf, *group, out);
          if (rc != 0) {
            std::cerr << "petrel rebalance: " << *group << ": " << out << "\n";
            return rc;
          }
          if (*json) {
            std::cout << out << "\n";
            return 0;
          }
          // One line per rank: what it has done so far; the rebalance itself happens at the next step.
          std::cout << "rebalance requested for group '" << *group << "' (it takes effect at the next step boundary)\n";
          for (auto& r : nlohmann::json::parse(out)) {
            std::cout << "  rank " << r.value("rank", -1) << ": steps " << r.value("steps", 0) << ", rebalances "
                      << r.value("rebalances", 0) << ", experts moved in " << r.value("experts_moved_in", 0);
            if (r.contains("balancedness"))
              std::cout << ", balancedness " << r["balancedness"].get<double>();
            if (r.value("device_steps", 0) > 0)
              std::cout << ", steps on the GPU expert exchange " << r.value("device_steps", 0);
            std::cout << "\n";
          }
          return 0;
        } catch (const config_error& e) {
          std::cerr << "petrel rebalance: " << e.what() << "\n";
          return int(exit_bad_input);
        }
      };
    });

} // namespace
