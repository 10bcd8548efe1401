// tiedlora_main.cpp: entry point of the `tiedlora` command-line tool. Errors become one line on stderr
// and exit code 1; only this function catches.
#include <cstdio>
#include <exception>
#include <iostream>
#include <map>

#include <c10/util/Exception.h>

#include "commands.h"

int main(int argc, char** argv) {
  CLI::App app{"tiedlora: LoRA and Tied-LoRA adapters for LibTorch"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "tiedlora " TIEDLORA_VERSION);
  std::map<CLI::App*, tiedlora::tools::Command> commands;
  auto add = [&](tiedlora::tools::Command (*adder)(CLI::App&)) {
    const std::size_t before = app.get_subcommands({}).size();
    tiedlora::tools::Command run = adder(app);
    commands[app.get_subcommands({}).at(before)] = std::move(run);
  };
  add(tiedlora::tools::add_params_command);
  add(tiedlora::tools::add_merge_command);
  add(tiedlora::tools::add_export_command);
  add(tiedlora::tools::add_inspect_command);
  add(tiedlora::tools::add_generate_command);
  add(tiedlora::tools::add_tokenize_command);
  add(tiedlora::tools::add_plot_command);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    for (auto* sub : app.get_subcommands()) return commands.at(sub)();
  } catch (const c10::Error& e) {
    std::cerr << "tiedlora: error: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "tiedlora: error: " << e.what() << "\n";
    return 1;
  }
  return 1;
}
