// adapter_commands.cpp: `tiedlora export-lora` and `tiedlora inspect`.
#include <iostream>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "tiedlora/adapter.h"
#include "tiedlora/error.h"
#include "tiedlora/io/safetensors.h"
#include "util/files.h"

namespace tiedlora::tools {
namespace {

struct ExportArgs {
  std::string adapter, out;
  bool force = false;
};

int run_export(const ExportArgs& args) {
  const Adapter adapter = Adapter::read(args.adapter);
  export_lora(adapter, args.out, args.force);
  std::cout << "wrote the per-layer LoRA equivalent of " << args.adapter << " (" << adapter.modules().size()
            << " layers, rank " << adapter.config().rank << ") to " << args.out << "\n";
  return 0;
}

void print_file(const io::SafetensorsFile& file, nlohmann::ordered_json& out) {
  nlohmann::ordered_json tensors = nlohmann::ordered_json::array();
  for (const auto& e : file.header().tensors) {
    tensors.push_back({{"name", e.name}, {"dtype", io::dtype_name(e.dtype)}, {"shape", e.shape},
                       {"bytes", e.end - e.begin}});
  }
  out["files"].push_back({{"path", file.path()}, {"metadata", file.metadata()}, {"tensors", tensors}});
}

int run_inspect(const std::string& path) {
  nlohmann::ordered_json out;
  out["path"] = path;
  out["files"] = nlohmann::ordered_json::array();
  if (util::is_directory(path) && util::is_regular_file(util::join_path(path, "adapter_config.json"))) {
    const Adapter adapter = Adapter::read(path);  // validates config and tensors together, naming the file
    out["adapter_config"] =
        nlohmann::ordered_json::parse(util::read_text_file(util::join_path(path, "adapter_config.json")));
    out["adapter_layers"] = adapter.modules().size();
    print_file(io::SafetensorsFile::open(util::join_path(path, "adapter_model.safetensors")), out);
  } else {
    const io::Checkpoint checkpoint = io::Checkpoint::open(path);
    for (const auto& file : checkpoint.files()) print_file(file, out);
  }
  std::cout << out.dump(2) << "\n";
  return 0;
}

}  // namespace

Command add_export_command(CLI::App& app) {
  auto args = std::make_shared<ExportArgs>();
  CLI::App* cmd = app.add_subcommand(
      "export-lora", "Write the exact per-layer LoRA equivalent (PEFT format) of a Tied-LoRA adapter");
  cmd->add_option("--adapter", args->adapter, "Tied-LoRA (or LoRA) adapter folder")->required();
  cmd->add_option("--out", args->out, "Output adapter folder")->required();
  cmd->add_flag("--force", args->force, "Replace an existing output folder");
  return [args] { return run_export(*args); };
}

Command add_inspect_command(CLI::App& app) {
  auto path = std::make_shared<std::string>();
  CLI::App* cmd = app.add_subcommand(
      "inspect", "List the tensors (dtype, shape), metadata and adapter config of a file or folder, as JSON");
  cmd->add_option("path", *path, "A .safetensors file, a Hugging Face folder, or an adapter folder")->required();
  return [path] { return run_inspect(*path); };
}

}  // namespace tiedlora::tools
