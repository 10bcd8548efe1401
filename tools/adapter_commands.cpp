// adapter_commands.cpp: `tiedlora export-lora` and `tiedlora inspect`.
#include <iostream>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "tiedlora/core/error.h"
#include "tiedlora/core/functional.h"
#include "tiedlora/formats/adapter.h"
#include "tiedlora/formats/files.h"
#include "tiedlora/formats/safetensors.h"

namespace tiedlora::tools {
namespace {

struct ExportArgs {
  std::string adapter, out;
  bool force = false;
};

int run_export(const ExportArgs& args) {
  const Adapter adapter = Adapter::read(args.adapter);
  export_lora(adapter, args.out, {args.force});
  std::cout << "wrote the per-layer LoRA equivalent of " << args.adapter << " (" << adapter.modules().size()
            << " layers, rank " << adapter.config().rank << ") to " << args.out << "\n";
  return 0;
}

// One tensor's NaN / Inf count, read from the mapping and its pages released after (a large checkpoint is
// scanned one tensor at a time).
int64_t non_finite_count(const formats::SafetensorsFile& file, const std::string& name) {
  const int64_t bad = functional::count_non_finite(file.tensor(name));
  file.release_pages(name);
  return bad;
}

int64_t print_file(const formats::SafetensorsFile& file, bool scan, nlohmann::ordered_json& out) {
  nlohmann::ordered_json tensors = nlohmann::ordered_json::array();
  int64_t total_bad = 0;
  for (const auto& e : file.header().tensors) {
    nlohmann::ordered_json entry = {
        {"name", e.name}, {"dtype", formats::dtype_name(e.dtype)}, {"shape", e.shape}, {"bytes", e.end - e.begin}};
    if (scan) {
      const int64_t bad = non_finite_count(file, e.name);
      entry["non_finite"] = bad;
      total_bad += bad;
    }
    tensors.push_back(entry);
  }
  out["files"].push_back({{"path", file.path()}, {"metadata", file.metadata()}, {"tensors", tensors}});
  return total_bad;
}

int run_inspect(const std::string& path, bool header_only) {
  nlohmann::ordered_json out;
  out["path"] = path;
  out["files"] = nlohmann::ordered_json::array();
  int64_t bad = 0;
  if (formats::is_directory(path) && formats::is_regular_file(formats::join_path(path, "adapter_config.json"))) {
    // Validates config and tensors together, naming the file; NaN/Inf are counted below, not refused.
    Adapter::ReadOptions read;
    read.allow_non_finite = true;
    const Adapter adapter = Adapter::read(path, read);
    out["adapter_config"] =
        nlohmann::ordered_json::parse(formats::read_text_file(formats::join_path(path, "adapter_config.json")));
    out["adapter_layers"] = adapter.modules().size();
    bad += print_file(formats::SafetensorsFile::open(formats::join_path(path, "adapter_model.safetensors")),
                      !header_only, out);
  } else {
    const formats::Checkpoint checkpoint = formats::Checkpoint::open(path);
    for (const auto& file : checkpoint.files()) bad += print_file(file, !header_only, out);
  }
  if (!header_only) out["non_finite"] = bad;
  std::cout << out.dump(2) << "\n";
  if (bad > 0) {
    std::cerr << "tiedlora: warning: " << path << " holds " << bad
              << " NaN or Inf value(s); see \"non_finite\" per tensor (merge-weights, export-lora and "
                 "generate refuse it)\n";
  }
  return 0;
}

}  // namespace

Command add_export_command(CLI::App& app) {
  auto args = std::make_shared<ExportArgs>();
  CLI::App* cmd = app.add_subcommand("export-lora",
                                     "Write the exact per-layer LoRA equivalent (PEFT format) of a Tied-LoRA adapter");
  cmd->add_option("--adapter", args->adapter, "Tied-LoRA (or LoRA) adapter folder")->required();
  cmd->add_option("--out", args->out, "Output adapter folder")->required();
  cmd->add_flag("--force", args->force, "Replace an existing output folder");
  return [args] { return run_export(*args); };
}

Command add_inspect_command(CLI::App& app) {
  auto path = std::make_shared<std::string>();
  auto header_only = std::make_shared<bool>(false);
  CLI::App* cmd = app.add_subcommand(
      "inspect",
      "List the tensors (dtype, shape, NaN/Inf count), metadata and adapter config of a file or folder, "
      "as JSON");
  cmd->add_option("path", *path, "A .safetensors file, a Hugging Face folder, or an adapter folder")->required();
  cmd->add_flag("--header-only", *header_only,
                "Read only the headers: skip counting NaN/Inf values (fast on large files)");
  return [path, header_only] { return run_inspect(*path, *header_only); };
}

}  // namespace tiedlora::tools
