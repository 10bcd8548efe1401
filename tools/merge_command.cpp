// merge_command.cpp: `tiedlora merge-weights` — an adapter merged into a base checkpoint, streamed.
#include <unistd.h>

#include <cstdio>
#include <iostream>

#include <fmt/format.h>

#include "commands.h"
#include "signals.h"
#include "tiedlora/core/error.h"
#include "tiedlora/formats/merge_checkpoint.h"
#include "tiedlora/formats/safetensors.h"

namespace tiedlora::tools {
namespace {

struct MergeArgs {
  MergeOptions options;
  std::string dtype = "keep";
  std::string max_shard_size = "5GB";
  bool quiet = false;
};

uint64_t parse_size(const std::string& text) {
  size_t used = 0;
  double value = 0;
  try {
    value = std::stod(text, &used);
  } catch (const std::exception&) {
    throw std::invalid_argument("--max-shard-size: '" + text + "' is not a size like 5GB or 500MB");
  }
  const std::string unit = text.substr(used);
  double scale = 1;
  if (unit == "GB")
    scale = 1e9;
  else if (unit == "MB")
    scale = 1e6;
  else if (unit == "KB")
    scale = 1e3;
  else if (unit == "GiB")
    scale = 1073741824.0;
  else if (unit == "MiB")
    scale = 1048576.0;
  else if (!unit.empty() && unit != "B")
    throw std::invalid_argument("--max-shard-size: unknown unit '" + unit + "'");
  if (!(value > 0)) throw std::invalid_argument("--max-shard-size must be positive");
  return static_cast<uint64_t>(value * scale);
}

void draw_progress(size_t done, size_t total, uint64_t bytes) {
  const int width = 30;
  const int filled = total ? static_cast<int>(width * done / total) : width;
  fmt::print(stderr, "\r[{:=<{}}{:<{}}] {}/{} tensors, {:.1f} MB written", "", filled, "", width - filled, done, total,
             static_cast<double>(bytes) / 1e6);
  if (done == total) fmt::print(stderr, "\n");
  std::fflush(stderr);
}

int run_merge(MergeArgs& args) {
  if (args.dtype != "keep") args.options.dtype = formats::float_dtype_from_name(args.dtype, "--dtype (or keep)");
  args.options.max_shard_bytes = parse_size(args.max_shard_size);
  if (!args.quiet && ::isatty(STDERR_FILENO)) args.options.on_progress = draw_progress;
  args.options.on_notice = [](const std::string& note) { fmt::print(stderr, "tiedlora: {}\n", note); };
  const StopOnSignals signals;  // Ctrl-C, SIGTERM, SIGHUP: the merge removes its temporary folder and stops
  args.options.stop_requested = StopOnSignals::requested;
  MergeReport report;
  try {
    report = merge_checkpoint(args.options);
  } catch (const Cancelled&) {
    throw Error("merge-weights: interrupted by signal " + std::to_string(StopOnSignals::received()) +
                "; nothing was written to " + args.options.out);
  }
  fmt::print("merged {} layers into {} ({} tensors written)\n", report.merged.size(), args.options.out,
             report.tensors_written);
  if (!args.quiet) {
    for (const auto& t : report.merged) {
      fmt::print("  {:<60} max|dW| {:.3e}  rounding error {:.3e}\n", t.name, t.max_abs_delta, t.rounding_error);
    }
  }
  fmt::print("overall: max|dW| {:.3e}, max rounding error against the fp32 merge {:.3e}\n", report.max_abs_delta(),
             report.max_rounding_error());
  const double mb_read = static_cast<double>(report.bytes_read) / 1e6,
               mb_written = static_cast<double>(report.bytes_written) / 1e6;
  fmt::print("{:.2f} s, {:.1f} MB read, {:.1f} MB written ({:.1f} MB/s); largest tensor {:.1f} MB\n", report.seconds,
             mb_read, mb_written, report.seconds > 0 ? mb_written / report.seconds : 0.0,
             static_cast<double>(report.largest_tensor_bytes) / 1e6);
  return 0;
}

}  // namespace

Command add_merge_command(CLI::App& app) {
  auto args = std::make_shared<MergeArgs>();
  CLI::App* cmd = app.add_subcommand(
      "merge-weights", "Merge an adapter into a base checkpoint, one tensor at a time (W + dW in fp32, rounded once)");
  cmd->add_option("--base", args->options.base, "Base model: Hugging Face folder or one .safetensors file")->required();
  cmd->add_option("--adapter", args->options.adapter, "Adapter folder (PEFT LoRA, PEFT VeRA or tiedlora Tied-LoRA)")
      ->required();
  cmd->add_option("--out", args->options.out, "Output folder (written beside it, then renamed into place)")->required();
  cmd->add_option("--dtype", args->dtype, "dtype of floating-point tensors written: keep, bf16, f16, f32")
      ->capture_default_str();
  cmd->add_option("--device", args->options.device, "Where to compute W + dW: cpu or cuda")->capture_default_str();
  cmd->add_option("--max-shard-size", args->max_shard_size, "Largest output shard (5GB, 500MB, ...)")
      ->capture_default_str();
  cmd->add_flag("--force", args->options.force, "Replace an existing output folder");
  cmd->add_flag("--quiet", args->quiet, "Print only the summary");
  return [args] { return run_merge(*args); };
}

}  // namespace tiedlora::tools
