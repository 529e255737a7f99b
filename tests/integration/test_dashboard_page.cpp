// The dashboard page as the gateway serves it: self-contained (nothing fetched from another origin) and
// carrying every panel that tests/integration/test_dashboard.sh asserts on in headless Chromium.
#include <doctest/doctest.h>

#include <regex>
#include <string>

#include "runtime/dashboard_page.hpp"

TEST_CASE("dashboard page: self-contained, no CDN, no external URL") {
  const std::string& page = petrel::dashboard_html();
  REQUIRE(page.size() > 1000);
  CHECK(page.rfind("<!doctype html>", 0) == 0);
  CHECK(page.find("</html>") != std::string::npos);
  // No external scripts, styles, fonts or images: every src/href/url()/@import stays on the gateway.
  std::regex external(R"((src|href)\s*=\s*["']?\s*(https?:)?//|url\(\s*["']?(https?:)?//|@import)", std::regex::icase);
  std::smatch m;
  CHECK_MESSAGE(!std::regex_search(page, m, external), "external reference: ", m.str());
  CHECK(page.find("<script src") == std::string::npos);
  CHECK(page.find("<link") == std::string::npos);
  // It polls the gateway's own data document, by relative path.
  CHECK(page.find("fetch('/dashboard/data'") != std::string::npos);
}

TEST_CASE("dashboard page: every panel has its id and a data-state") {
  const std::string& page = petrel::dashboard_html();
  for (const char* id : {"panel-topology", "panel-timeline", "panel-throughput", "panel-latency", "panel-queues",
                         "panel-kvpool", "panel-kv-transfers", "panel-requests", "panel-expert-load"}) {
    CAPTURE(id);
    std::regex section("<section[^>]*id=\"" + std::string(id) + "\"[^>]*data-state=\"loading\"");
    CHECK(std::regex_search(page, section));
  }
  CHECK(page.find("no expert-load data (expert parallelism not wired yet)") != std::string::npos);
  // every metric the page reads
  for (const char* metric : {"petrel_queue_depth", "petrel_running_requests", "petrel_time_to_first_token_seconds",
                             "petrel_inter_token_latency_seconds", "petrel_input_tokens_total", "petrel_output_tokens_total",
                             "petrel_kv_transfer_seconds", "petrel_kv_transfer_bytes_total", "petrel_requests_total"}) {
    CAPTURE(metric);
    CHECK(page.find(metric) != std::string::npos);
  }
}
