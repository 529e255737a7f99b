// A tiny SVG writer for the plots `petrel bench --plot` and `petrel simulate --plot` write: line charts
// (latency CDFs, throughput against concurrency) and grouped bar charts (simulated next to published figures),
// each with axes, ticks, axis labels and a legend. No dependencies, no service: the output is a plain
// self-contained SVG file any browser or image viewer opens.
#pragma once

#include <string>
#include <variant>
#include <vector>

namespace petrel::plot {

// -- line charts --------------------------------------------------------------------------------------------

/// One line: points (x[i], y[i]); x and y have the same length. Drawn as one <path>.
struct line_series {
  std::string name;
  std::vector<double> x, y;
};

struct line_chart {
  std::string title, x_label, y_label;
  std::vector<line_series> series;
  bool x_log = false; // log10 x axis (all x must then be > 0; others are dropped)
  bool step = false;  // draw as a step function (for empirical CDFs)
};

/// The empirical CDF of `values` as a step series: x sorted, y = fraction of values <= x, in (0, 1].
line_series empirical_cdf(std::string name, std::vector<double> values);

// -- grouped bar charts -------------------------------------------------------------------------------------

/// One category on the x axis, with one value per series (NaN: no bar, e.g. no published figure).
struct bar_group {
  std::string label;
  std::vector<double> values;
};

struct bar_chart {
  std::string title, y_label;
  std::vector<std::string> series_names; // one colour each; every group's values follow this order
  std::vector<bar_group> groups;
};

using chart = std::variant<line_chart, bar_chart>;

// -- rendering ----------------------------------------------------------------------------------------------

/// Renders the charts as panels of one SVG document, `columns` per row, each panel width x height pixels.
/// Every series is one element with class "series" and a data-series attribute naming it (a <path> for a line,
/// a <g> of <rect>s for bars), so tests and scripts can find them.
std::string render_svg(const std::vector<chart>& panels, int columns = 1, int panel_width = 640,
                       int panel_height = 400);

/// Writes `svg` to `path`; returns an empty string, or a message naming the file when it cannot be written.
std::string write_svg_file(const std::string& path, const std::string& svg);

/// "Nice" tick positions (steps of 1, 2 or 5 times a power of ten) covering [lo, hi], about `target` of them.
std::vector<double> nice_ticks(double lo, double hi, int target = 6);

} // namespace petrel::plot
