// The first thing `petrel launch` shows once a cluster is up: one streamed completion, then how to query it
// and how to stop it.
#pragma once

#include <string>

namespace petrel::cli {

/// Sends one streaming completion ("The meaning of life is", 64 tokens, temperature 0.7) to the gateway at
/// host:port and prints the text to stdout as it arrives; then prints a curl line to query the cluster and
/// `petrel stop CONFIG_PATH` to stop it. Never throws; a failed request is reported on stderr.
/// Returns true when the completion streamed to its end.
bool run_launch_demo(const std::string& host, int port, const std::string& model_name,
                     const std::string& config_path);

/// The same, with "cluster.yaml" as the config path shown in the stop line.
void run_launch_demo(const std::string& host, int port, const std::string& model_name);

} // namespace petrel::cli
