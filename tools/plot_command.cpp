// plot_command.cpp: `tiedlora plot` — loss curves of one or more metrics.jsonl files in one PNG or SVG.
#include <iostream>

#include "chart/chart.h"
#include "commands.h"

namespace tiedlora::tools {

Command add_plot_command(CLI::App& app) {
  struct Args {
    std::vector<std::string> inputs;
    std::string out, title = "loss";
    bool no_validation = false;
  };
  auto args = std::make_shared<Args>();
  CLI::App* cmd =
      app.add_subcommand("plot", "Loss curves of metrics.jsonl files (tiedlora_finetune's) in one PNG or SVG");
  cmd->add_option("metrics", args->inputs, "metrics.jsonl files, each optionally followed by =LABEL")->required();
  cmd->add_option("-o,--out", args->out, "Image to write: .png or .svg")->required();
  cmd->add_option("--title", args->title, "Chart title")->capture_default_str();
  cmd->add_flag("--no-validation", args->no_validation, "Leave out validation losses");
  return [args] {
    std::vector<std::pair<std::string, std::string>> files;
    for (const auto& input : args->inputs) {
      const auto eq = input.rfind('=');
      files.emplace_back(input.substr(0, eq), eq == std::string::npos ? "" : input.substr(eq + 1));
    }
    chart::plot_loss_curves(files, args->out, args->title, !args->no_validation);
    std::cout << "wrote " << args->out << "\n";
    return 0;
  };
}

}  // namespace tiedlora::tools
