// libFuzzer target: cluster.yaml text. parse_cluster_config may throw config_error (a bad file),
// nothing else: any other exception escaping, or a crash, is a finding.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <string>
#include <unistd.h>

#include "runtime/cluster_config.hpp"

namespace {
std::string g_base; // a directory with model/config.json (and a dummy config) so model paths resolve

void make_base() {
  char tmpl[] = "/tmp/petrel-fuzz-cfg-XXXXXX";
  if (!mkdtemp(tmpl)) std::abort();
  g_base = tmpl;
  for (const char* dir : {"model", "tests/data/fortune-moe", "data/fortune-moe", "configs/deepseek-v3"}) {
    std::filesystem::create_directories(g_base + "/" + dir);
    std::ofstream(g_base + "/" + dir + "/config.json") << "{}\n";
  }
}
} // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  make_base();
  std::atexit([] {
    std::error_code ec;
    std::filesystem::remove_all(g_base, ec);
  });
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string text(reinterpret_cast<const char*>(data), size);
  try {
    auto cfg = petrel::parse_cluster_config(text, "fuzz.yaml", g_base);
    // A config that loads must be internally consistent: every group's nodes exist and belong to it.
    for (const auto& g : cfg.groups)
      for (const auto& n : g.nodes)
        if (!cfg.find_node(n)) {
          std::fprintf(stderr, "group %s names unknown node %s\n", g.name.c_str(), n.c_str());
          std::abort();
        }
    for (const auto& n : cfg.nodes) (void)cfg.group_of(n.name);
  } catch (const petrel::config_error&) {
    // expected for bad input
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fuzz_cluster_config: non-config_error exception escaped: %s\n", e.what());
    std::abort();
  } catch (...) {
    std::fprintf(stderr, "fuzz_cluster_config: unknown exception escaped\n");
    std::abort();
  }
  return 0;
}
