// The simulator against what bench-rank measured on the H100 (docs/data/bench-rank-h100, written by
// `petrel bench-rank --preset prefill-ep32|decode-ep72 --json`): simulating the measured single-GPU runs from
// their own kernel times must give their step times back within 10%.
#include <doctest/doctest.h>

#include <cmath>
#include <string>

#include <nlohmann/json.hpp>

#include "tests/support/process.hpp"

using petrel::test::run_petrel;

TEST_CASE("petrel simulate reproduces the step times bench-rank measured on the H100") {
  const std::string dir = std::string(PETREL_SOURCE_DIR) + "/docs/data/bench-rank-h100/";
  auto r = run_petrel("simulate --json --kernel-times " + dir + "prefill.json --kernel-times " + dir +
                      "decode.json --validate " + dir + "prefill.json --validate " + dir + "decode.json 2>/dev/null");
  REQUIRE_MESSAGE(r.exit_code == 0, r.output);
  auto out = nlohmann::json::parse(r.output.substr(r.output.find('{')));
  auto runs = out["validation"];
  REQUIRE(runs.size() == 2);
  for (auto& run : runs) {
    CAPTURE(run["phase"].get<std::string>());
    bool found = false;
    for (auto& row : run["rows"])
      if (row["metric"] == "step") {
        found = true;
        double error = row["error"];
        CHECK(std::abs(error) < 0.10);
        CHECK(row["measured_us"].get<double>() > 0);
      }
    CHECK(found);
  }
}
