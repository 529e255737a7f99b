// `petrel generate --ep N`: prints the same lines as --ep 1 (several prompts spread over the ranks), takes the
// placement `petrel eplb` prints as --init-expert-location, and refuses bad flags and bad placement files with
// exit code 2 and a message naming them.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>
#include <sys/wait.h>
#include <unistd.h>

namespace fs = std::filesystem;

namespace {

const fs::path kTiny = fs::path(PETREL_SOURCE_DIR) / "tests/data/golden/tiny_fp32";

struct run_result {
  int code = -1;
  std::string out;
};

run_result run(const std::string& args, bool with_stderr = false) {
  std::string cmd = std::string(PETREL_BINARY) + " " + args + (with_stderr ? " 2>&1" : " 2>/dev/null");
  FILE* p = popen(cmd.c_str(), "r");
  REQUIRE(p);
  run_result r;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof buf, p)) r.out.append(buf, n);
  int status = pclose(p);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

const std::string kPrompts = " --input-ids 10,20,30,40,50,60,70 --input-ids 3,1,4,1,5 --input-ids 400,2 --max-new-tokens 10";

} // namespace

TEST_CASE("petrel generate --ep N prints what --ep 1 prints") {
  if (!fs::exists(kTiny / "golden.json")) return;
  const std::string base = "generate --model " + kTiny.string() + kPrompts;
  run_result one = run(base);
  REQUIRE(one.code == 0);
  CHECK(std::count(one.out.begin(), one.out.end(), '\n') == 3); // one line per prompt
  for (const std::string& flags : {std::string(" --ep 2"), std::string(" --ep 3 --redundant 1 --ep-mode low_latency"),
                                   std::string(" --ep 4 --redundant 4 --tbo --rebalance-every 3"),
                                   std::string(" --ep 2 --tbo --dispatch-delay-us 200"),
                                   // one OS process per rank, UCX over tcp, experts moving between processes
                                   std::string(" --ep 3 --redundant 4 --ep-transport ucx --tbo --rebalance-every 3")}) {
    CAPTURE(flags);
    run_result ep = run(base + flags);
    CHECK(ep.code == 0);
    CHECK(ep.out == one.out);
  }
}

TEST_CASE("petrel generate --init-expert-location takes the placement petrel eplb prints") {
  if (!fs::exists(kTiny / "golden.json")) return;
  const fs::path place = fs::temp_directory_path() / ("petrel_ep_place_" + std::to_string(::getpid()) + ".json");
  run_result e = run("eplb --zipf 1.2 --experts 8 --layers 2 --top-k 2 --replicas 12 --groups 4 --nodes 1 --gpus 4");
  REQUIRE(e.code == 0);
  std::ofstream(place) << e.out;
  const std::string base = "generate --model " + kTiny.string() + kPrompts;
  run_result one = run(base);
  run_result ep = run(base + " --ep 4 --init-expert-location " + place.string(), true);
  CHECK(ep.code == 0);
  CHECK(ep.out.find(one.out) != std::string::npos);
  CHECK(ep.out.find("12 expert slots per MoE layer (4 redundant)") != std::string::npos);
  // The same file does not fit a group of 5 ranks.
  run_result bad = run(base + " --ep 5 --init-expert-location " + place.string(), true);
  CHECK(bad.code == 2);
  CHECK(bad.out.find("--init-expert-location " + place.string() + ": 12 slots per layer do not divide evenly over 5") !=
        std::string::npos);
  fs::remove(place);
}

TEST_CASE("the EPLB loop on the command line: generate --dump-expert-load, eplb --input, generate --init-expert-location") {
  if (!fs::exists(kTiny / "golden.json")) return;
  const std::string tag = std::to_string(::getpid());
  const fs::path load = fs::temp_directory_path() / ("petrel_ep_load_" + tag + ".json");
  const fs::path place = fs::temp_directory_path() / ("petrel_ep_place2_" + tag + ".json");
  const std::string base = "generate --model " + kTiny.string() + kPrompts;
  run_result one = run(base);
  run_result first = run(base + " --ep 2 --dump-expert-load " + load.string());
  CHECK(first.code == 0);
  CHECK(first.out == one.out);
  REQUIRE(fs::exists(load));
  run_result e = run("eplb --input " + load.string() + " --replicas 12 --groups 4 --nodes 1 --gpus 4");
  REQUIRE(e.code == 0);
  std::ofstream(place) << e.out;
  run_result again = run(base + " --ep 4 --init-expert-location " + place.string());
  CHECK(again.code == 0);
  CHECK(again.out == one.out);
  fs::remove(load);
  fs::remove(place);
}

TEST_CASE("petrel generate: bad EP flags and placement files exit 2 with a message") {
  if (!fs::exists(kTiny / "golden.json")) return;
  const fs::path bad = fs::temp_directory_path() / ("petrel_ep_bad_" + std::to_string(::getpid()) + ".json");
  std::ofstream(bad) << R"({"phy2log": [[0,1,2,3,4,5,6,7],[0,1,2,3,4,5,6,9]]})";
  const std::string base = "generate --model " + kTiny.string() + " --input-ids 1,2,3";
  struct bad_case {
    std::string flags, message;
  };
  for (const bad_case& c : std::vector<bad_case>{
           {" --ep 0", "--ep must be >= 1"},
           {" --ep 2 --ep-mode fastest", "--ep-mode must be 'normal' or 'low_latency'"},
           {" --ep 2 --redundant -1", "--redundant must be >= 0"},
           {" --ep 2 --redundant 1", "do not divide evenly over 2 ranks"},
           {" --ep 9", "8 expert slots cannot be spread over 9 ranks"},
           {" --ep 2 --init-expert-location " + bad.string(), "= 9 is not an expert id"},
           {" --ep 2 --init-expert-location /nonexistent/p.json", "/nonexistent/p.json: cannot open"},
           {" --ep 2 --input-ids 1,2 --dump-logits /tmp/x.bin", "--dump-logits takes one prompt"},
           {" --ep 2 --ep-transport tcp", "--ep-transport must be 'inprocess' or 'ucx'"},
           {" --ep 2 --ep-transport ucx --dispatch-delay-us 5", "does not apply to --ep-transport ucx"},
           {" --ep 2 --ep-transport ucx --redundant 1", "do not divide evenly over 2 ranks"},
       }) {
    CAPTURE(c.flags);
    run_result r = run(base + c.flags, true);
    CHECK(r.code == 2);
    CHECK(r.out.find(c.message) != std::string::npos);
  }
  fs::remove(bad);
}
