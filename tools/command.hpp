// The petrel CLI: each subcommand lives in its own tools/cmd_<name>.cpp and registers itself here,
// so that adding a subcommand never touches another one's file.
#pragma once

#include <functional>
#include <string>

#include <CLI/CLI.hpp>

namespace petrel::cli {

/// Exit codes shared by every subcommand.
enum exit_code : int {
  exit_ok = 0,
  exit_failure = 1,   // the work itself failed (a peer died, an expectation did not hold)
  exit_bad_input = 2, // the user's input was wrong (bad flag, bad cluster.yaml, bad checkpoint)
};

/// Runs the subcommand once its options are parsed; returns the process exit code.
using command_fn = std::function<int()>;

/// Adds the subcommand's options to `sub` and returns the function that runs it.
using command_setup = std::function<command_fn(CLI::App& sub)>;

/// Registers a subcommand; call from a static initializer in tools/cmd_<name>.cpp:
///   static const bool registered = petrel::cli::register_command("eplb", "...", setup);
bool register_command(std::string name, std::string description, command_setup setup);

} // namespace petrel::cli
