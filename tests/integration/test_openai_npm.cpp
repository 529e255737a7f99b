// The official `openai` npm client (tests/integration/openai_client) against a launched cluster: a plain
// completion, a streamed chat completion read chunk by chunk to its end, and a refused request.
// tools/setup.sh installs the client (npm install in that folder). Without it this test FAILS, on purpose:
// a compatibility test that silently skips proves nothing.
#include <doctest/doctest.h>

#include <filesystem>

#include "tests/support/launched_cluster.hpp"
#include "tests/support/process.hpp"

using namespace petrel::test;

namespace {

std::string client_dir() { return std::string(PETREL_SOURCE_DIR) + "/tests/integration/openai_client"; }

command_result run_shell(const std::string& cmd) {
  command_result r;
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  if (!p)
    return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0)
    r.output.append(buf.data(), n);
  int status = ::pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

} // namespace

TEST_CASE("the official openai npm client talks to Petrel (completion, streamed chat, typed error)") {
  auto node = run_shell("command -v node");
  REQUIRE_MESSAGE(node.exit_code == 0,
                  "node is not installed: this test needs Node.js >= 18 and npm (tools/setup.sh installs them)");
  REQUIRE_MESSAGE(std::filesystem::exists(client_dir() + "/node_modules/openai/package.json"),
                  ("the openai npm package is not installed in " + client_dir() +
                   "/node_modules. Run tools/setup.sh (it runs `npm install --no-audit --no-fund` there), or "
                   "run that command in that folder yourself."));

  launched_cluster c("topenainpm", [](const std::string& run_dir) {
    return "cluster: {name: topenainpm, run_dir: " + run_dir + "}\n" + "model: {path: " + fortune_model_dir() +
           ", name: fortune-moe}\n" + "gateway: {host: 127.0.0.1, port: 0}\n" +
           "nodes:\n  - {name: p0, ranks: [cpu]}\n  - {name: d0, ranks: [cpu]}\n" +
           "groups:\n  prefill: [{name: prefill0, nodes: [p0], chunk_tokens: 64, max_batch_tokens: 256,"
           " kv_pages: 128, page_size: 16}]\n"
           "  decode: [{name: decode0, nodes: [d0], page_size: 16, max_running: 8, kv_pages: 128}]\n";
  });
  auto r = run_shell("cd " + shell_quote(client_dir()) + " && PETREL_BASE_URL=http://127.0.0.1:" +
                     std::to_string(c.port) + "/v1 PETREL_MODEL=fortune-moe timeout 120 node test.mjs");
  MESSAGE(r.output);
  CHECK_MESSAGE(r.exit_code == 0, r.output);
  CHECK(r.output.find("all checks passed") != std::string::npos);
  CHECK(eventually(std::chrono::seconds(10), [&] { return c.idle(); }));
}
