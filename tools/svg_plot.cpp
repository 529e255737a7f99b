// The SVG writer behind `--plot` (tools/svg_plot.hpp). Hand-written SVG 1.1: one <g> per panel, a plot area with
// grid lines and ticks, the series, and a legend row between the title and the plot area so it never hides data.
#include "tools/svg_plot.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <sstream>

namespace petrel::plot {

namespace {

constexpr const char* palette[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728",
                                   "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"};
constexpr int palette_size = sizeof(palette) / sizeof(palette[0]);

// Panel layout, in pixels from the panel's corner.
constexpr double margin_left = 72, margin_right = 20, margin_top = 62, margin_bottom = 58;

std::string escape(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    switch (c) {
    case '&': out += "&amp;"; break;
    case '<': out += "&lt;"; break;
    case '>': out += "&gt;"; break;
    case '"': out += "&quot;"; break;
    case '\'': out += "&apos;"; break;
    default:
      // Control characters are not allowed in XML 1.0 text.
      if (static_cast<unsigned char>(c) >= 0x20 || c == '\t' || c == '\n') out += c;
    }
  }
  return out;
}

std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f", v);
  return buf;
}

/// Tick labels: at most 4 significant digits, thousands as k and millions as M.
std::string tick_label(double v) {
  char buf[32];
  double a = std::fabs(v);
  if (a >= 1e6)
    std::snprintf(buf, sizeof buf, "%gM", std::round(v / 1e6 * 1000) / 1000);
  else if (a >= 1e4)
    std::snprintf(buf, sizeof buf, "%gk", std::round(v / 1e3 * 1000) / 1000);
  else if (a < 1e-12)
    return "0";
  else
    std::snprintf(buf, sizeof buf, "%.4g", v);
  return buf;
}

/// Value printed above a bar: 3 significant digits, k for thousands.
std::string value_label(double v) {
  char buf[32];
  if (std::fabs(v) >= 1e4)
    std::snprintf(buf, sizeof buf, "%.1fk", v / 1e3);
  else
    std::snprintf(buf, sizeof buf, "%.3g", v);
  return buf;
}

/// Splits a label into lines of at most `max_chars` at spaces (a longer word stays whole).
std::vector<std::string> wrap(const std::string& s, size_t max_chars) {
  std::vector<std::string> lines;
  std::istringstream in(s);
  std::string word, line;
  while (in >> word) {
    if (!line.empty() && line.size() + 1 + word.size() > max_chars) {
      lines.push_back(line);
      line.clear();
    }
    line += (line.empty() ? "" : " ") + word;
  }
  if (!line.empty()) lines.push_back(line);
  return lines;
}

struct axis {
  double lo = 0, hi = 1; // domain, in axis units (log10 of the value for a log axis)
  bool log = false;
  std::vector<double> ticks; // values (not logs)
  double pos(double v, double px0, double px1) const {
    double t = log ? std::log10(v) : v;
    return px0 + (t - lo) / (hi - lo) * (px1 - px0);
  }
};

axis linear_axis(double lo, double hi) {
  axis a;
  if (!(lo <= hi) || !std::isfinite(lo) || !std::isfinite(hi)) lo = 0, hi = 1;
  if (hi - lo < 1e-12 * std::max(1.0, std::fabs(hi))) {
    double pad = lo == 0 ? 1 : std::fabs(lo) * 0.1;
    lo -= pad;
    hi += pad;
  }
  a.ticks = nice_ticks(lo, hi);
  a.lo = a.ticks.front();
  a.hi = a.ticks.back();
  return a;
}

axis log_axis(double lo, double hi) {
  axis a;
  a.log = true;
  int d0 = static_cast<int>(std::floor(std::log10(lo))), d1 = static_cast<int>(std::ceil(std::log10(hi)));
  if (d1 <= d0) d1 = d0 + 1;
  a.lo = d0;
  a.hi = d1;
  for (int d = d0; d <= d1; ++d) {
    a.ticks.push_back(std::pow(10.0, d));
    if (d1 - d0 <= 2 && d < d1) {
      a.ticks.push_back(2 * std::pow(10.0, d));
      a.ticks.push_back(5 * std::pow(10.0, d));
    }
  }
  std::sort(a.ticks.begin(), a.ticks.end());
  return a;
}

struct frame {
  double x0, y0, x1, y1; // plot area: x0 left, x1 right, y0 bottom, y1 top (SVG y grows downwards)
};

void title_and_legend(std::ostringstream& o, double w, const std::string& title,
                      const std::vector<std::string>& names, bool lines) {
  o << "<text x=\"" << num(w / 2) << "\" y=\"22\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">"
    << escape(title) << "</text>\n";
  // Legend: one row of swatches, centred; each entry's width estimated from its text.
  double total = 0;
  std::vector<double> widths;
  for (const auto& n : names) {
    widths.push_back(26 + 6.6 * double(n.size()) + 14);
    total += widths.back();
  }
  double x = std::max(margin_left, (w - total) / 2);
  o << "<g class=\"legend\">\n";
  for (size_t i = 0; i < names.size(); ++i) {
    const char* c = palette[i % palette_size];
    if (lines)
      o << "<line x1=\"" << num(x) << "\" y1=\"42\" x2=\"" << num(x + 20) << "\" y2=\"42\" stroke=\"" << c
        << "\" stroke-width=\"2.5\"/>";
    else
      o << "<rect x=\"" << num(x + 4) << "\" y=\"36\" width=\"12\" height=\"12\" fill=\"" << c << "\"/>";
    o << "<text x=\"" << num(x + 26) << "\" y=\"46\" font-size=\"12\">" << escape(names[i]) << "</text>\n";
    x += widths[i];
  }
  o << "</g>\n";
}

void y_axis(std::ostringstream& o, const frame& f, const axis& ay, const std::string& label) {
  for (double t : ay.ticks) {
    double y = ay.pos(t, f.y0, f.y1);
    o << "<line x1=\"" << num(f.x0) << "\" y1=\"" << num(y) << "\" x2=\"" << num(f.x1) << "\" y2=\"" << num(y)
      << "\" stroke=\"#e4e4e4\"/>";
    o << "<line x1=\"" << num(f.x0 - 5) << "\" y1=\"" << num(y) << "\" x2=\"" << num(f.x0) << "\" y2=\"" << num(y)
      << "\" stroke=\"#333\"/>";
    o << "<text class=\"tick\" x=\"" << num(f.x0 - 8) << "\" y=\"" << num(y + 4)
      << "\" text-anchor=\"end\" font-size=\"11\">" << escape(tick_label(t)) << "</text>\n";
  }
  double cy = (f.y0 + f.y1) / 2;
  o << "<text class=\"axis-label\" x=\"16\" y=\"" << num(cy) << "\" text-anchor=\"middle\" font-size=\"12\" "
    << "transform=\"rotate(-90 16 " << num(cy) << ")\">" << escape(label) << "</text>\n";
}

void axes_box(std::ostringstream& o, const frame& f) {
  o << "<line x1=\"" << num(f.x0) << "\" y1=\"" << num(f.y0) << "\" x2=\"" << num(f.x1) << "\" y2=\"" << num(f.y0)
    << "\" stroke=\"#333\"/>";
  o << "<line x1=\"" << num(f.x0) << "\" y1=\"" << num(f.y0) << "\" x2=\"" << num(f.x0) << "\" y2=\"" << num(f.y1)
    << "\" stroke=\"#333\"/>\n";
}

void render_line(std::ostringstream& o, const line_chart& c, double w, double h, int clip_id) {
  frame f{margin_left, h - margin_bottom, w - margin_right, margin_top};
  // The domain, from the finite points (and x > 0 on a log axis).
  auto usable = [&](double x, double y) { return std::isfinite(x) && std::isfinite(y) && (!c.x_log || x > 0); };
  double xlo = std::numeric_limits<double>::infinity(), xhi = -xlo, ylo = xlo, yhi = -xlo;
  for (const auto& s : c.series)
    for (size_t i = 0; i < std::min(s.x.size(), s.y.size()); ++i)
      if (usable(s.x[i], s.y[i])) {
        xlo = std::min(xlo, s.x[i]);
        xhi = std::max(xhi, s.x[i]);
        ylo = std::min(ylo, s.y[i]);
        yhi = std::max(yhi, s.y[i]);
      }
  const bool empty = !(xlo <= xhi);
  axis ax = empty ? linear_axis(0, 1) : c.x_log ? log_axis(xlo, xhi) : linear_axis(xlo, xhi);
  axis ay = empty ? linear_axis(0, 1) : linear_axis(std::min(0.0, ylo), yhi);

  std::vector<std::string> names;
  for (const auto& s : c.series) names.push_back(s.name);
  title_and_legend(o, w, c.title, names, true);
  y_axis(o, f, ay, c.y_label);
  for (double t : ax.ticks) {
    double x = ax.pos(t, f.x0, f.x1);
    o << "<line x1=\"" << num(x) << "\" y1=\"" << num(f.y0) << "\" x2=\"" << num(x) << "\" y2=\"" << num(f.y1)
      << "\" stroke=\"#e4e4e4\"/>";
    o << "<line x1=\"" << num(x) << "\" y1=\"" << num(f.y0) << "\" x2=\"" << num(x) << "\" y2=\"" << num(f.y0 + 5)
      << "\" stroke=\"#333\"/>";
    o << "<text class=\"tick\" x=\"" << num(x) << "\" y=\"" << num(f.y0 + 18)
      << "\" text-anchor=\"middle\" font-size=\"11\">" << escape(tick_label(t)) << "</text>\n";
  }
  o << "<text class=\"axis-label\" x=\"" << num((f.x0 + f.x1) / 2) << "\" y=\"" << num(h - 14)
    << "\" text-anchor=\"middle\" font-size=\"12\">" << escape(c.x_label) << "</text>\n";
  axes_box(o, f);
  if (empty)
    o << "<text x=\"" << num((f.x0 + f.x1) / 2) << "\" y=\"" << num((f.y0 + f.y1) / 2)
      << "\" text-anchor=\"middle\" font-size=\"13\" fill=\"#888\">no data</text>\n";

  o << "<clipPath id=\"plot-area-" << clip_id << "\"><rect x=\"" << num(f.x0) << "\" y=\"" << num(f.y1 - 2)
    << "\" width=\"" << num(f.x1 - f.x0 + 2) << "\" height=\"" << num(f.y0 - f.y1 + 4) << "\"/></clipPath>\n";
  for (size_t k = 0; k < c.series.size(); ++k) {
    const auto& s = c.series[k];
    std::string d;
    bool first = true;
    for (size_t i = 0; i < std::min(s.x.size(), s.y.size()); ++i) {
      if (!usable(s.x[i], s.y[i])) continue;
      double x = ax.pos(s.x[i], f.x0, f.x1), y = ay.pos(s.y[i], f.y0, f.y1);
      if (first)
        d += "M" + num(x) + " " + num(y);
      else if (c.step)
        d += "H" + num(x) + "V" + num(y);
      else
        d += "L" + num(x) + " " + num(y);
      first = false;
    }
    o << "<path class=\"series\" data-series=\"" << escape(s.name) << "\" d=\"" << d << "\" fill=\"none\" stroke=\""
      << palette[k % palette_size] << "\" stroke-width=\"2\" clip-path=\"url(#plot-area-" << clip_id << ")\"/>\n";
    // Markers on a plain line: a sweep has few points, and the reader should see where they are.
    if (!c.step) {
      o << "<g class=\"markers\" fill=\"" << palette[k % palette_size] << "\">";
      for (size_t i = 0; i < std::min(s.x.size(), s.y.size()); ++i)
        if (usable(s.x[i], s.y[i]))
          o << "<circle cx=\"" << num(ax.pos(s.x[i], f.x0, f.x1)) << "\" cy=\"" << num(ay.pos(s.y[i], f.y0, f.y1))
            << "\" r=\"3\"/>";
      o << "</g>\n";
    }
  }
}

void render_bars(std::ostringstream& o, const bar_chart& c, double w, double h) {
  frame f{margin_left, h - margin_bottom, w - margin_right, margin_top};
  double lo = 0, hi = 0;
  bool any = false;
  for (const auto& g : c.groups)
    for (double v : g.values)
      if (std::isfinite(v)) {
        lo = std::min(lo, v);
        hi = std::max(hi, v);
        any = true;
      }
  axis ay = linear_axis(lo, any && hi > lo ? hi * 1.08 : 1); // headroom for the value labels
  title_and_legend(o, w, c.title, c.series_names, false);
  y_axis(o, f, ay, c.y_label);

  const size_t ng = std::max<size_t>(1, c.groups.size()), ns = std::max<size_t>(1, c.series_names.size());
  const double group_w = (f.x1 - f.x0) / double(ng), bar_w = group_w * 0.8 / double(ns);
  const double zero = ay.pos(0, f.y0, f.y1);
  for (size_t g = 0; g < c.groups.size(); ++g) {
    double cx = f.x0 + group_w * (double(g) + 0.5);
    auto lines = wrap(c.groups[g].label, std::max<size_t>(6, size_t(group_w / 6.4)));
    o << "<text class=\"tick\" x=\"" << num(cx) << "\" y=\"" << num(f.y0 + 16)
      << "\" text-anchor=\"middle\" font-size=\"11\">";
    for (size_t i = 0; i < lines.size() && i < 3; ++i)
      o << "<tspan x=\"" << num(cx) << "\" dy=\"" << (i ? "13" : "0") << "\">" << escape(lines[i]) << "</tspan>";
    o << "</text>\n";
  }
  for (size_t s = 0; s < c.series_names.size(); ++s) {
    o << "<g class=\"series\" data-series=\"" << escape(c.series_names[s]) << "\" fill=\"" << palette[s % palette_size]
      << "\">\n";
    for (size_t g = 0; g < c.groups.size(); ++g) {
      if (s >= c.groups[g].values.size() || !std::isfinite(c.groups[g].values[s])) continue;
      double v = c.groups[g].values[s];
      double x = f.x0 + group_w * double(g) + group_w * 0.1 + bar_w * double(s);
      double y = ay.pos(v, f.y0, f.y1);
      double top = std::min(y, zero), height = std::fabs(zero - y);
      o << "<rect x=\"" << num(x) << "\" y=\"" << num(top) << "\" width=\"" << num(bar_w * 0.92) << "\" height=\""
        << num(height) << "\"><title>" << escape(c.groups[g].label + ", " + c.series_names[s] + ": " + value_label(v))
        << "</title></rect>";
      o << "<text x=\"" << num(x + bar_w * 0.46) << "\" y=\"" << num(top - 4)
        << "\" text-anchor=\"middle\" font-size=\"10\" fill=\"#333\">" << escape(value_label(v)) << "</text>\n";
    }
    o << "</g>\n";
  }
  axes_box(o, f);
}

} // namespace

std::vector<double> nice_ticks(double lo, double hi, int target) {
  if (!(hi > lo) || !std::isfinite(lo) || !std::isfinite(hi)) return {lo, lo + 1};
  double raw = (hi - lo) / std::max(1, target);
  double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (m * mag >= raw) {
      step = m * mag;
      break;
    }
  std::vector<double> ticks;
  double first = std::floor(lo / step) * step, last = std::ceil(hi / step) * step;
  for (int i = 0; first + i * step <= last + step * 1e-9 && i < 1000; ++i) {
    double t = first + i * step;
    if (std::fabs(t) < step * 1e-9) t = 0; // no "-0" or 1e-17 labels
    ticks.push_back(t);
  }
  return ticks;
}

line_series empirical_cdf(std::string name, std::vector<double> values) {
  line_series s;
  s.name = std::move(name);
  values.erase(std::remove_if(values.begin(), values.end(), [](double v) { return !std::isfinite(v); }),
               values.end());
  if (values.empty()) return s;
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  s.x.push_back(values.front());
  s.y.push_back(0);
  // At most ~2000 steps: a long run's ITLs would otherwise make a path of megabytes.
  const size_t stride = std::max<size_t>(1, n / 2000);
  for (size_t i = 0; i < n; i += stride) {
    size_t j = std::min(n - 1, i + stride - 1);
    while (j + 1 < n && values[j + 1] == values[j]) ++j; // a tie jumps once, to its full height
    s.x.push_back(values[j]);
    s.y.push_back(double(j + 1) / double(n));
    i = j + 1 - stride;
  }
  return s;
}

std::string render_svg(const std::vector<chart>& panels, int columns, int panel_width, int panel_height) {
  columns = std::max(1, std::min<int>(columns, std::max<int>(1, int(panels.size()))));
  const int rows = std::max<int>(1, int((panels.size() + size_t(columns) - 1) / size_t(columns)));
  const int W = columns * panel_width, H = rows * panel_height;
  std::ostringstream o;
  o << "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" version=\"1.1\" width=\"" << W << "\" height=\"" << H
    << "\" viewBox=\"0 0 " << W << " " << H << "\" font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\">\n";
  o << "<rect width=\"" << W << "\" height=\"" << H << "\" fill=\"white\"/>\n";
  for (size_t i = 0; i < panels.size(); ++i) {
    int col = int(i) % columns, row = int(i) / columns;
    o << "<g class=\"panel\" transform=\"translate(" << col * panel_width << " " << row * panel_height << ")\">\n";
    if (const auto* lc = std::get_if<line_chart>(&panels[i]))
      render_line(o, *lc, panel_width, panel_height, int(i));
    else
      render_bars(o, std::get<bar_chart>(panels[i]), panel_width, panel_height);
    o << "</g>\n";
  }
  o << "</svg>\n";
  return o.str();
}

std::string write_svg_file(const std::string& path, const std::string& svg) {
  std::ofstream out(path, std::ios::binary);
  if (!out) return "cannot write the plot file '" + path + "'";
  out << svg;
  out.close();
  if (!out) return "error while writing the plot file '" + path + "'";
  return {};
}

} // namespace petrel::plot
