// loss_plot.cpp: loss curves from metrics.jsonl files (chart/chart.h).
#include <fstream>

#include <nlohmann/json.hpp>

#include "chart/chart.h"
#include "tiedlora/core/error.h"

namespace tiedlora::chart {

void plot_loss_curves(const std::vector<std::pair<std::string, std::string>>& metrics_and_labels,
                      const std::string& image, const std::string& title, bool validation) {
  std::vector<Series> series;
  for (const auto& [path, label] : metrics_and_labels) {
    std::ifstream in(path);
    if (!in) throw FormatError(path + ": cannot be read (hint: a metrics.jsonl written by the trainer)");
    Series train{label.empty() ? "train loss" : label + " train", {}, {}, false};
    Series valid{label.empty() ? "validation loss" : label + " validation", {}, {}, true};
    std::string line;
    int64_t number = 0;
    while (std::getline(in, line)) {
      ++number;
      const auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (!j.is_object() || !j.contains("step") || !j.at("step").is_number()) {
        throw FormatError(path + ":" + std::to_string(number) + ": not a metrics line (a JSON object with \"step\")");
      }
      const double step = j.at("step").get<double>();
      if (j.contains("loss") && j.at("loss").is_number())
        train.x.push_back(step), train.y.push_back(j.at("loss").get<double>());
      if (validation && j.contains("validation_loss") && j.at("validation_loss").is_number()) {
        valid.x.push_back(step), valid.y.push_back(j.at("validation_loss").get<double>());
      }
    }
    series.push_back(std::move(train));
    if (!valid.x.empty()) series.push_back(std::move(valid));
  }
  write_line_chart(image, series, {title, "optimizer step", "loss per completion token"});
}

}  // namespace tiedlora::chart
