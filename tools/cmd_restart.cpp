// petrel restart: restart one actor of a running cluster live. The actor is killed; its supervisor
// starts it again with a new epoch, and the serving path recovers what it held (docs/operations.md).
#include <iostream>
#include <memory>

#include "actors/cluster.hpp"
#include "runtime/chaos_scenario.hpp"
#include "tools/command.hpp"

namespace {

using namespace petrel;
using namespace petrel::cli;

const bool restart_registered = register_command(
    "restart",
    "Restart one actor of a running cluster live (NODE/CHILD, GROUP/rankN, head/router, head/decode/GROUP, ...)",
    [](CLI::App& sub) -> command_fn {
      auto path = std::make_shared<std::string>("cluster.yaml");
      auto actor = std::make_shared<std::string>();
      sub.add_option("config", *path, "cluster.yaml of the running cluster")->required();
      sub.add_option("actor", *actor,
                     "the actor: NODE/CHILD (d0/rank0, p0/kv_agent), GROUP/rankN, prefill|decode/rankN, or one of "
                     "the head's: head/router, head/gateway, head/prefill/GROUP, head/decode/GROUP")
          ->required();
      return [path, actor] {
        try {
          auto cfg = load_cluster_config(*path);
          auto [node, child] = resolve_chaos_actor(cfg, *actor);
          auto rf = read_run_file(run_file_path(cfg));
          if (!rf || !cluster_running(*rf)) {
            std::cerr << "petrel restart: no cluster '" << cfg.cluster.name << "' is running; start one with `petrel launch "
                      << *path << "`\n";
            return int(exit_failure);
          }
          std::string out;
          fault_request f;
          f.kind = "kill";
          f.node = node;
          f.child = child;
          if (inject_fault(*rf, f, out) != 0) {
            std::cerr << "petrel restart: " << *actor << ": " << out << "\n";
            return int(exit_failure);
          }
          std::cout << "restarted " << *actor << " (epoch " << out << " killed; its supervisor starts the next)\n";
          return 0;
        } catch (const config_error& e) {
          std::cerr << "petrel restart: " << e.what() << "\n";
          return int(exit_bad_input);
        }
      };
    });

} // namespace
