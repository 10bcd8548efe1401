// chart_stub.cpp: chart/chart.h in a build without cairo (Debian: libcairo2-dev); scripts/bootstrap installs it.
#include "chart/chart.h"
#include "tiedlora/core/error.h"

namespace tiedlora::chart {

void write_line_chart(const std::string& path, const std::vector<Series>&, const ChartOptions&) {
  throw Error(path + ": this build has no charts (hint: install libcairo2-dev and reconfigure)");
}

}  // namespace tiedlora::chart
