// The `petrel eplb` command line: the stable JSON interface and exit code 2 on bad input.
#include <doctest/doctest.h>

#include <cstdio>
#include <fstream>
#include <set>
#include <string>
#include <sys/wait.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

namespace {

struct run_result {
  int rc;
  std::string out;
};

run_result run_petrel(const std::string& args) {
  const std::string cmd = std::string(PETREL_BINARY) + " eplb " + args + " 2>/dev/null";
  FILE* p = popen(cmd.c_str(), "r");
  REQUIRE(p != nullptr);
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  const int status = pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

std::string write_temp(const std::string& name, const std::string& text) {
  const std::string path = "/tmp/petrel_test_eplb_cli_" + std::to_string(getpid()) + "_" + name;
  std::ofstream(path) << text;
  return path;
}

} // namespace

TEST_CASE("eplb cli: anchor vector through the command line") {
  const auto path = write_temp("anchor.json", R"({"weight": [[ 90,132, 40, 61,104,165, 39,  4, 73, 56,183, 86],
    [ 20,107,104, 64, 19,197,187,157,172, 86, 16, 27]]})");
  const auto r = run_petrel("--input " + path + " --replicas 16 --groups 4 --nodes 2 --gpus 8");
  REQUIRE(r.rc == 0);
  const auto j = nlohmann::json::parse(r.out);
  REQUIRE(j.contains("phy2log"));
  REQUIRE(j.contains("log2phy"));
  REQUIRE(j.contains("logcnt"));
  CHECK(j["logcnt"] == nlohmann::json::parse("[[1,2,1,1,2,2,1,1,1,1,2,1],[1,2,1,1,1,2,2,1,2,1,1,1]]"));
  const auto anchor = nlohmann::json::parse("[[5,6,5,7,8,4,3,4,10,9,10,2,0,1,11,1],[7,10,6,8,6,11,8,9,2,4,5,1,5,0,3,1]]");
  for (int l = 0; l < 2; ++l)
    for (int e = 0; e < 12; ++e) {
      std::set<int> got, want;
      for (int s = 0; s < 16; ++s) {
        if (j["phy2log"][l][s] == e) got.insert(s);
        if (anchor[l][s] == e) want.insert(s);
      }
      CHECK(got == want);
    }
  CHECK(j["log2phy"][0].size() == 12);
  CHECK(j["log2phy"][0][0].size() == 2);
  std::remove(path.c_str());
}

TEST_CASE("eplb cli: bad input exits with 2") {
  const auto path = write_temp("bad.json", "[[1, 2, 3, 4]]");
  CHECK(run_petrel("--input " + path + " --replicas 6 --gpus 4").rc == 2);       // 6 % 4 != 0
  CHECK(run_petrel("--input /nonexistent/x.json --replicas 4 --gpus 2").rc == 2); // missing file
  const auto garbage = write_temp("garbage.json", "{not json");
  CHECK(run_petrel("--input " + garbage + " --replicas 4 --gpus 2").rc == 2);
  CHECK(run_petrel("--replicas 4 --gpus 2").rc == 2); // no load at all
  CHECK(run_petrel("--input " + path + " --replicas 4 --gpus 2").rc == 0);
  std::remove(path.c_str());
  std::remove(garbage.c_str());
}

TEST_CASE("eplb cli: --report improves balancedness on a skewed load") {
  const auto r = run_petrel("--zipf 1.0 --experts 64 --layers 4 --replicas 80 --groups 8 --nodes 2 --gpus 16 "
                            "--tokens 4096 --report");
  REQUIRE(r.rc == 0);
  const auto j = nlohmann::json::parse(r.out);
  const double before = j["before"]["balancedness_mean"], after = j["after"]["balancedness_mean"];
  CHECK(before > 0.0);
  CHECK(after > before);
  CHECK(after <= 1.0);
}
