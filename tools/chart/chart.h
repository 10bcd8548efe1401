// tools/chart/chart.h: line charts (loss curves) for the programs, drawn with cairo into PNG or SVG files.
// Program-side: the libraries draw nothing. Without cairo at build time every call throws a clear error
// (chart_stub.cpp), and the programs go on without the picture.
#pragma once

#include <string>
#include <vector>

namespace tiedlora::chart {

struct Series {
  std::string label;
  std::vector<double> x, y;  ///< same length; non-finite points are skipped
  bool markers = false;      ///< squares at the points instead of a line (e.g. validation loss)
};

struct ChartOptions {
  std::string title, x_label, y_label;
  int width = 900, height = 540;
};

/// Draws `series` (up to 6, colours in order) on shared axes and writes `path` atomically: PNG, or SVG
/// when the name ends in .svg. Throws tiedlora::Error when there is nothing finite to plot, the name has
/// another extension, or the file cannot be written.
void write_line_chart(const std::string& path, const std::vector<Series>& series, const ChartOptions& options);

/// Loss curves from metrics.jsonl files written by the Trainer (or in its format: one JSON object per line
/// with "step" and "loss" or "validation_loss"): each file's training loss as a line and, with
/// `validation`, its validation losses as markers, labelled in the legend (label: the text beside the file).
void plot_loss_curves(const std::vector<std::pair<std::string, std::string>>& metrics_and_labels,
                      const std::string& image, const std::string& title, bool validation = true);

}  // namespace tiedlora::chart
