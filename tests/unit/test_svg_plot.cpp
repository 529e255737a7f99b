// tools/svg_plot: the SVG writer behind `petrel bench --plot` and `petrel simulate --plot`.
// The tools/ sources are linked into the petrel executable only, so the writer (which has no dependencies)
// is compiled into this test directly.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <string>

#include "tools/svg_plot.cpp"

using namespace petrel::plot;

namespace {

size_t count(const std::string& s, const std::string& what) {
  size_t n = 0;
  for (size_t p = s.find(what); p != std::string::npos; p = s.find(what, p + 1)) ++n;
  return n;
}

// A minimal well-formedness check: every element opened is closed in order, and no raw '<' or '&' sits
// in text. (tests/unit/test_svg_plot.sh checks the real files with a real XML parser.)
bool balanced_tags(const std::string& s) {
  std::vector<std::string> stack;
  size_t p = 0;
  while ((p = s.find('<', p)) != std::string::npos) {
    size_t e = s.find('>', p);
    if (e == std::string::npos) return false;
    std::string tag = s.substr(p + 1, e - p - 1);
    p = e + 1;
    if (tag.empty()) return false;
    if (tag[0] == '?' || tag[0] == '!') continue;
    if (tag.back() == '/') continue;
    if (tag[0] == '/') {
      if (stack.empty() || stack.back() != tag.substr(1)) return false;
      stack.pop_back();
      continue;
    }
    stack.push_back(tag.substr(0, tag.find(' ')));
  }
  return stack.empty();
}

} // namespace

TEST_CASE("nice_ticks cover the range with 1/2/5 steps") {
  auto t = nice_ticks(0, 57674);
  REQUIRE(t.size() >= 3);
  CHECK(t.front() <= 0);
  CHECK(t.back() >= 57674);
  CHECK(t[1] - t[0] == doctest::Approx(10000));
  auto u = nice_ticks(0.12, 0.97, 5);
  CHECK(u.front() <= 0.12);
  CHECK(u.back() >= 0.97);
  CHECK(u[1] - u[0] == doctest::Approx(0.2));
  CHECK(nice_ticks(-1, 1).front() == doctest::Approx(-1));
}

TEST_CASE("empirical_cdf is a non-decreasing step from 0 to 1 and stays small for long runs") {
  auto s = empirical_cdf("x", {3, 1, 2, 2, std::numeric_limits<double>::quiet_NaN()});
  REQUIRE(s.x.size() == s.y.size());
  CHECK(s.y.front() == 0);
  CHECK(s.y.back() == doctest::Approx(1.0));
  CHECK(s.x.back() == 3);
  // The tie at 2 jumps once, to 3/4.
  for (size_t i = 0; i < s.x.size(); ++i)
    if (s.x[i] == 2 && i > 0) CHECK(s.y[i] == doctest::Approx(0.75));
  for (size_t i = 1; i < s.x.size(); ++i) {
    CHECK(s.x[i] >= s.x[i - 1]);
    CHECK(s.y[i] >= s.y[i - 1]);
  }
  std::vector<double> many(100000);
  for (size_t i = 0; i < many.size(); ++i) many[i] = double(i % 977) + 0.5;
  auto big = empirical_cdf("many", many);
  CHECK(big.x.size() < 2100);
  CHECK(big.y.back() == doctest::Approx(1.0));
  CHECK(empirical_cdf("none", {}).x.empty());
}

TEST_CASE("a line chart has one path per series, the axis labels and a legend, and escapes text") {
  line_chart c;
  c.title = "Latency CDF <run & \"one\">";
  c.x_label = "latency (ms), log scale";
  c.y_label = "fraction of requests";
  c.x_log = true;
  c.step = true;
  c.series.push_back(empirical_cdf("TTFT", {12, 15, 40, 90}));
  c.series.push_back(empirical_cdf("ITL", {1.5, 2, 2.5, 3}));
  c.series.push_back(empirical_cdf("E2E", {200, 250, 900, 1200}));
  auto svg = render_svg({c});
  CHECK(svg.rfind("<?xml", 0) == 0);
  CHECK(balanced_tags(svg));
  CHECK(count(svg, "<path class=\"series\"") == 3);
  CHECK(svg.find("data-series=\"TTFT\"") != std::string::npos);
  CHECK(svg.find("data-series=\"E2E\"") != std::string::npos);
  CHECK(svg.find(">latency (ms), log scale</text>") != std::string::npos);
  CHECK(svg.find(">fraction of requests</text>") != std::string::npos);
  CHECK(svg.find("Latency CDF &lt;run &amp; &quot;one&quot;&gt;") != std::string::npos);
  CHECK(svg.find("<run &") == std::string::npos);
  // Log ticks span the data's decades: 1 ms to 10 s.
  CHECK(svg.find(">1</text>") != std::string::npos);
  CHECK(svg.find(">1000</text>") != std::string::npos);
  CHECK(svg.find(">10k</text>") != std::string::npos);
  // Coordinates stay inside the document.
  CHECK(svg.find("nan") == std::string::npos);
  CHECK(svg.find("inf") == std::string::npos);
}

TEST_CASE("a grouped bar chart has one group of bars per series and skips missing values") {
  bar_chart b;
  b.title = "Simulated vs published";
  b.y_label = "tok/s per node";
  b.series_names = {"simulated", "published"};
  b.groups = {{"prefill 1K", {90958, 57674}},
              {"prefill 4K", {79908, 50302}},
              {"decode", {28825, std::numeric_limits<double>::quiet_NaN()}}};
  auto svg = render_svg({b});
  CHECK(balanced_tags(svg));
  CHECK(count(svg, "<g class=\"series\"") == 2);
  CHECK(count(svg, "</title></rect>") == 5); // bars: 3 simulated + 2 published
  CHECK(svg.find(">tok/s per node</text>") != std::string::npos);
  CHECK(svg.find(">prefill 1K</tspan>") != std::string::npos);
  CHECK(svg.find(">91.0k</text>") != std::string::npos);
  CHECK(svg.find("nan") == std::string::npos);
}

TEST_CASE("several panels share one document; an empty chart still renders") {
  line_chart empty;
  empty.title = "nothing yet";
  empty.x_label = "x";
  empty.y_label = "y";
  empty.series.push_back({"none", {}, {}});
  bar_chart b;
  b.series_names = {"a"};
  b.groups = {{"g", {1}}};
  auto svg = render_svg({empty, b, empty}, 2, 500, 300);
  CHECK(balanced_tags(svg));
  CHECK(svg.find("width=\"1000\" height=\"600\"") != std::string::npos);
  CHECK(count(svg, "<g class=\"panel\"") == 3);
  CHECK(svg.find("no data") != std::string::npos);
  CHECK(svg.find("nan") == std::string::npos);
}

TEST_CASE("write_svg_file names the file it cannot write") {
  auto err = write_svg_file("/nonexistent-dir/x.svg", "<svg/>");
  CHECK(err.find("/nonexistent-dir/x.svg") != std::string::npos);
}
