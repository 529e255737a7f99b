// The launch demo: one streamed completion from a just-launched cluster; see launch_demo.hpp.
#include "tools/launch_demo.hpp"

#include <chrono>
#include <cstdio>
#include <exception>

#include <nlohmann/json.hpp>

#include "tools/http_client.hpp"

namespace petrel::cli {

namespace {

std::string display_host(const std::string& host) {
  return host.empty() || host == "0.0.0.0" ? "127.0.0.1" : host;
}

} // namespace

bool run_launch_demo(const std::string& host_in, int port, const std::string& model_name,
                     const std::string& config_path) {
  using json = nlohmann::json;
  const std::string host = display_host(host_in);
  const std::string prompt = "The meaning of life is";
  bool streamed_ok = false;
  try {
    json body{{"model", model_name}, {"prompt", prompt}, {"max_tokens", 64}, {"temperature", 0.7},
              {"stream", true}};
    std::printf("\n$ completion of \"%s\" (64 tokens, temperature 0.7), streamed:\n%s", prompt.c_str(),
                prompt.c_str());
    std::fflush(stdout);
    bool done = false;
    std::string event_error;
    auto res = http_client::post_json(
        host, port, "/v1/completions", body.dump(),
        [&](std::string_view data) {
          if (data == "[DONE]") {
            done = true;
            return;
          }
          json j = json::parse(data, nullptr, false);
          if (j.is_discarded() || !j.is_object())
            return;
          if (j.contains("error")) {
            event_error = j["error"].dump();
            return;
          }
          if (j.contains("choices") && j["choices"].is_array() && !j["choices"].empty()) {
            const json& t = j["choices"][0]["text"];
            if (t.is_string()) {
              auto& s = t.get_ref<const std::string&>();
              std::fwrite(s.data(), 1, s.size(), stdout);
              std::fflush(stdout);
            }
          }
        },
        std::chrono::seconds(60));
    std::printf("\n");
    if (!res.error.empty())
      std::fprintf(stderr, "petrel: the demo completion failed: %s\n", res.error.c_str());
    else if (res.status != 200)
      std::fprintf(stderr, "petrel: the demo completion failed: HTTP %d %s\n", res.status, res.body.c_str());
    else if (!event_error.empty())
      std::fprintf(stderr, "petrel: the demo completion failed: %s\n", event_error.c_str());
    else if (!done)
      std::fprintf(stderr, "petrel: the demo completion ended without [DONE]\n");
    else
      streamed_ok = true;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "\npetrel: the demo completion failed: %s\n", e.what());
  }
  std::printf("\nQuery it:\n"
              "  curl http://%s:%d/v1/completions -H 'Content-Type: application/json' \\\n"
              "    -d '{\"model\": \"%s\", \"prompt\": \"Once upon a time\", \"max_tokens\": 32}'\n"
              "Stop it:\n"
              "  petrel stop %s\n",
              host.c_str(), port, model_name.c_str(), config_path.c_str());
  std::fflush(stdout);
  return streamed_ok;
}

void run_launch_demo(const std::string& host, int port, const std::string& model_name) {
  run_launch_demo(host, port, model_name, "cluster.yaml");
}

} // namespace petrel::cli
