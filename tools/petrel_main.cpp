// petrel: one binary, many subcommands (launch, serve, status, stop, generate, bench, chaos, ...).
#include "tools/command.hpp"

#include <cstdio>
#include <exception>
#include <map>
#include <memory>

namespace petrel::cli {
namespace {

struct command_entry {
  std::string description;
  command_setup setup;
};

std::map<std::string, command_entry>& registry() {
  static std::map<std::string, command_entry> commands;
  return commands;
}

} // namespace

bool register_command(std::string name, std::string description, command_setup setup) {
  registry().emplace(std::move(name), command_entry{std::move(description), std::move(setup)});
  return true;
}

} // namespace petrel::cli

int main(int argc, char** argv) {
  using namespace petrel::cli;
  CLI::App app{"petrel: a serving runtime for DeepSeek-style mixture-of-experts models"};
  app.require_subcommand(1);
  std::map<CLI::App*, command_fn> runners;
  for (auto& [name, entry] : registry()) {
    auto* sub = app.add_subcommand(name, entry.description);
    runners.emplace(sub, entry.setup(*sub));
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);
    return rc == 0 ? exit_ok : exit_bad_input;
  }
  for (auto& [sub, run] : runners) {
    if (sub->parsed()) {
      try {
        return run();
      } catch (const std::exception& e) {
        std::fprintf(stderr, "petrel %s: %s\n", sub->get_name().c_str(), e.what());
        return exit_failure;
      }
    }
  }
  return exit_bad_input;
}
