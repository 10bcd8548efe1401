// params_command.cpp: `tiedlora params` — how many parameters an adapter trains, from config.json alone.
#include <iostream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "tiedlora/core/method.h"
#include "tiedlora/core/module_selection.h"
#include "tiedlora/formats/hf_config.h"

namespace tiedlora::tools {
namespace {

struct ParamsArgs {
  std::string config;
  std::string targets;
  std::string exclude;
  std::string method = "lora";
  int64_t rank = 8;
  bool fused_qkv = false;
};

int run_params(const ParamsArgs& args) {
  const AdapterMethod method = AdapterMethod::parse(args.method);
  if (args.rank <= 0) throw std::invalid_argument("--rank must be positive, got " + std::to_string(args.rank));
  HfDescribeOptions describe;
  describe.fused_qkv = args.fused_qkv;
  const auto modules = describe_hf_model(args.config, describe);
  SelectionOptions selection;
  selection.targets = split_pattern_list(args.targets);
  selection.exclude = split_pattern_list(args.exclude);
  const auto groups = select_modules(modules, selection, method);

  nlohmann::ordered_json out;
  out["method"] = method.name();
  out["rank"] = args.rank;
  int64_t total = 0, lora_total = 0;
  auto& groups_json = out["groups"] = nlohmann::ordered_json::array();
  for (const auto& group : groups) {
    const auto layers = static_cast<int64_t>(group.modules.size());
    const int64_t count = trainable_parameter_count(method, args.rank, layers, group.shape);
    const int64_t lora_count = trainable_parameter_count(AdapterMethod::lora(), args.rank, layers, group.shape);
    total += count;
    lora_total += lora_count;
    groups_json.push_back({{"name", group.name},
                           {"layers", layers},
                           {"in_features", group.shape.in_features},
                           {"out_features", group.shape.out_features},
                           {"trainable_parameters", count},
                           {"lora_parameters", lora_count}});
  }
  out["trainable_parameters"] = total;
  out["lora_parameters"] = lora_total;
  out["ratio_to_lora"] = lora_total ? static_cast<double>(total) / static_cast<double>(lora_total) : 0.0;
  std::cout << out.dump(2) << "\n";
  return 0;
}

}  // namespace

Command add_params_command(CLI::App& app) {
  auto args = std::make_shared<ParamsArgs>();
  CLI::App* cmd = app.add_subcommand(
      "params", "Count the parameters an adapter trains, from a Hugging Face config.json (no weights loaded)");
  cmd->add_option("--config", args->config, "config.json of a gpt2 or llama model, or the folder holding it")
      ->required();
  cmd->add_option("--targets", args->targets,
                  "Comma-separated module names or suffixes (q_proj,v_proj), 're:<regex>', or all-linear")
      ->required();
  cmd->add_option("--exclude", args->exclude, "Comma-separated patterns to leave out");
  cmd->add_option("--method", args->method,
                  "lora, tied-ab (TL5), tied-abuv (TL6), tied-uv (VeRA-like), or tied-/untied-<mask of a,b,u,v>")
      ->capture_default_str();
  cmd->add_option("--rank", args->rank, "Adapter rank r")->capture_default_str();
  cmd->add_flag("--fused-qkv", args->fused_qkv,
                "Describe Llama attention as one fused qkv_proj (Megatron/NeMo layout, as in the Tied-LoRA paper)");
  return [args] { return run_params(*args); };
}

}  // namespace tiedlora::tools
