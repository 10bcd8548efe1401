// tiedlora/chart.h: line charts written as PNG files with no dependency (a 5x7 bitmap font, an 8-bit
// palette image, a run-length deflate encoder), for loss curves at the end of fine-tuning and in benchmarks.
// Torch-free.
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

/// Draws `series` (up to 6, colours in order) on shared axes and writes the PNG atomically. Throws
/// tiedlora::Error when there is nothing finite to plot or the file cannot be written.
void write_line_chart_png(const std::string& path, const std::vector<Series>& series, const ChartOptions& options);

}  // namespace tiedlora::chart
