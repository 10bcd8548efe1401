// chart.cpp: chart/chart.h drawn with cairo (Debian's libcairo2: anti-aliased lines, real fonts through
// fontconfig, PNG and SVG writers). Built only when cairo is found; chart_stub.cpp otherwise.
#include "chart/chart.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>

#include <cairo-svg.h>
#include <cairo.h>
#include <fmt/format.h>

#include "tiedlora/core/error.h"
#include "tiedlora/formats/files.h"

namespace tiedlora::chart {
namespace {

struct Rgb {
  double r, g, b;
};
// Tableau's first six colours: distinguishable, and the order matplotlib users expect.
constexpr Rgb kColours[] = {{0.12, 0.47, 0.71}, {1.00, 0.50, 0.05}, {0.17, 0.63, 0.17},
                            {0.84, 0.15, 0.16}, {0.58, 0.40, 0.74}, {0.55, 0.34, 0.29}};
constexpr size_t kMaxSeries = sizeof kColours / sizeof kColours[0];

double nice_step(double span, int count) {
  const double raw = span / count;
  const double power = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 5.0, 10.0}) {
    if (raw <= m * power) return m * power;
  }
  return 10 * power;
}

std::string tick_label(double v, double step) {
  if (std::fabs(v) >= 1e5 || (v != 0 && std::fabs(v) < 1e-3)) return fmt::format("{:.2g}", v);
  const int decimals = std::max(0, static_cast<int>(-std::floor(std::log10(step) + 1e-9)));
  return fmt::format("{:.{}f}", v, std::min(decimals, 6));
}

cairo_status_t append_to_string(void* closure, const unsigned char* data, unsigned int length) {
  static_cast<std::string*>(closure)->append(reinterpret_cast<const char*>(data), length);
  return CAIRO_STATUS_SUCCESS;
}

struct Bounds {
  double x0, x1, y0, y1;
};

Bounds bounds_of(const std::string& path, const std::vector<Series>& series) {
  Bounds b{std::numeric_limits<double>::infinity(), -std::numeric_limits<double>::infinity(),
           std::numeric_limits<double>::infinity(), -std::numeric_limits<double>::infinity()};
  for (const Series& s : series) {
    if (s.x.size() != s.y.size()) {
      throw Error(
          fmt::format("{}: series '{}' has {} x values and {} y values", path, s.label, s.x.size(), s.y.size()));
    }
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i])) continue;
      b.x0 = std::min(b.x0, s.x[i]), b.x1 = std::max(b.x1, s.x[i]);
      b.y0 = std::min(b.y0, s.y[i]), b.y1 = std::max(b.y1, s.y[i]);
    }
  }
  if (!std::isfinite(b.x0)) throw Error(path + ": nothing to plot (no finite points)");
  if (b.x1 == b.x0) b.x0 -= 1, b.x1 += 1;
  if (b.y1 == b.y0) b.y0 -= 1, b.y1 += 1;
  return b;
}

void draw(cairo_t* cr, const std::vector<Series>& series, const ChartOptions& options, Bounds b) {
  const double ystep = nice_step(b.y1 - b.y0, 6), xstep = nice_step(b.x1 - b.x0, 8);
  b.y0 = std::floor(b.y0 / ystep) * ystep, b.y1 = std::ceil(b.y1 / ystep) * ystep;
  b.x0 = std::floor(b.x0 / xstep) * xstep, b.x1 = std::ceil(b.x1 / xstep) * xstep;
  const double left = 80, right = options.width - 20, top = 50, bottom = options.height - 55;
  auto px = [&](double x) { return left + (x - b.x0) / (b.x1 - b.x0) * (right - left); };
  auto py = [&](double y) { return bottom - (y - b.y0) / (b.y1 - b.y0) * (bottom - top); };
  auto text = [&](double x, double y, const std::string& s, double size, double anchor_x) {
    cairo_set_font_size(cr, size);
    cairo_text_extents_t e;
    cairo_text_extents(cr, s.c_str(), &e);
    cairo_move_to(cr, x - anchor_x * e.x_advance, y);
    cairo_show_text(cr, s.c_str());
  };

  cairo_set_source_rgb(cr, 1, 1, 1);
  cairo_paint(cr);
  cairo_select_font_face(cr, "DejaVu Sans", CAIRO_FONT_SLANT_NORMAL, CAIRO_FONT_WEIGHT_NORMAL);
  // Grid and tick labels. Ticks by index: adding the step to a running value could stall on a span of ulps.
  const int yticks = std::min(100, static_cast<int>(std::lround((b.y1 - b.y0) / ystep)));
  const int xticks = std::min(100, static_cast<int>(std::lround((b.x1 - b.x0) / xstep)));
  cairo_set_line_width(cr, 1);
  for (int i = 0; i <= yticks; ++i) {
    const double y = b.y0 + i * ystep;
    cairo_set_source_rgb(cr, 0.88, 0.88, 0.88);
    cairo_move_to(cr, left, py(y)), cairo_line_to(cr, right, py(y)), cairo_stroke(cr);
    cairo_set_source_rgb(cr, 0.15, 0.15, 0.15);
    text(left - 8, py(y) + 4, tick_label(y, ystep), 11, 1.0);
  }
  for (int i = 0; i <= xticks; ++i) {
    const double x = b.x0 + i * xstep;
    cairo_set_source_rgb(cr, 0.88, 0.88, 0.88);
    cairo_move_to(cr, px(x), top), cairo_line_to(cr, px(x), bottom), cairo_stroke(cr);
    cairo_set_source_rgb(cr, 0.15, 0.15, 0.15);
    text(px(x), bottom + 18, tick_label(x, xstep), 11, 0.5);
  }
  cairo_set_source_rgb(cr, 0, 0, 0);
  cairo_rectangle(cr, left, top, right - left, bottom - top), cairo_stroke(cr);
  text(options.width / 2.0, 30, options.title, 16, 0.5);
  text((left + right) / 2, bottom + 42, options.x_label, 12, 0.5);
  cairo_save(cr);
  cairo_translate(cr, 22, (top + bottom) / 2);
  cairo_rotate(cr, -std::acos(0.0));  // a quarter turn back: the y label reads upwards
  text(0, 0, options.y_label, 12, 0.5);
  cairo_restore(cr);

  // Series, clipped to the plot area, then the legend (top right).
  for (size_t k = 0; k < series.size(); ++k) {
    const Series& s = series[k];
    const Rgb c = kColours[k];
    cairo_save(cr);
    cairo_rectangle(cr, left - 4, top - 4, right - left + 8, bottom - top + 8),
        cairo_clip(cr);  // markers on the frame stay whole
    cairo_set_source_rgb(cr, c.r, c.g, c.b);
    cairo_set_line_width(cr, 2);
    bool drawing = false;
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i])) {  // a gap in the line
        if (drawing && !s.markers) cairo_stroke(cr);
        drawing = false;
        continue;
      }
      if (s.markers) {
        cairo_rectangle(cr, px(s.x[i]) - 3.5, py(s.y[i]) - 3.5, 7, 7), cairo_fill(cr);
      } else if (drawing) {
        cairo_line_to(cr, px(s.x[i]), py(s.y[i]));
      } else {
        cairo_move_to(cr, px(s.x[i]), py(s.y[i]));
        drawing = true;
      }
    }
    if (drawing && !s.markers) cairo_stroke(cr);
    cairo_restore(cr);
    const double ly = top + 18 + 18 * static_cast<double>(k), lx = right - 190;
    cairo_set_source_rgb(cr, c.r, c.g, c.b);
    if (s.markers)
      cairo_rectangle(cr, lx + 6.5, ly - 7.5, 7, 7), cairo_fill(cr);
    else
      cairo_rectangle(cr, lx, ly - 5, 20, 3), cairo_fill(cr);
    cairo_set_source_rgb(cr, 0, 0, 0);
    text(lx + 28, ly, s.label, 11, 0.0);
  }
}

}  // namespace

void write_line_chart(const std::string& path, const std::vector<Series>& series, const ChartOptions& options) {
  if (series.size() > kMaxSeries) throw Error(fmt::format("{}: at most {} series per chart", path, kMaxSeries));
  const Bounds bounds = bounds_of(path, series);
  auto ends_with = [&](const std::string& suffix) {
    return path.size() >= suffix.size() && path.compare(path.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  const bool svg = ends_with(".svg");
  if (!svg && !ends_with(".png")) throw Error(path + ": the chart's file name must end in .png or .svg");
  std::string bytes;
  const std::unique_ptr<cairo_surface_t, decltype(&cairo_surface_destroy)> surface(
      svg ? cairo_svg_surface_create_for_stream(append_to_string, &bytes, options.width, options.height)
          : cairo_image_surface_create(CAIRO_FORMAT_RGB24, options.width, options.height),
      cairo_surface_destroy);
  const std::unique_ptr<cairo_t, decltype(&cairo_destroy)> cr(cairo_create(surface.get()), cairo_destroy);
  draw(cr.get(), series, options, bounds);
  cairo_surface_flush(surface.get());
  cairo_status_t status = cairo_status(cr.get());
  if (status == CAIRO_STATUS_SUCCESS) {
    if (svg)
      cairo_surface_finish(surface.get());
    else
      status = cairo_surface_write_to_png_stream(surface.get(), append_to_string, &bytes);
  }
  if (status == CAIRO_STATUS_SUCCESS) status = cairo_surface_status(surface.get());
  if (status != CAIRO_STATUS_SUCCESS)
    throw Error(path + ": cairo could not draw the chart: " + cairo_status_to_string(status));
  formats::write_text_file(path, bytes);
}

}  // namespace tiedlora::chart
