// src/llm/tokenizer/chat.cpp: chat and prompt formatting (tiedlora/llm/chat.h): a model's template found in
// its folder or GGUF file, the ChatML template (SmolLM2, Qwen, ...) as plain string building, recognition of
// ChatML in a Jinja template, and the prompt format that training, evaluation and generation share.
// Not a Jinja interpreter, deliberately: ChatML is all the models tiedlora runs need, and a partial Jinja
// would silently render other templates wrongly.
#include "tiedlora/llm/chat.h"

#include "tiedlora/core/error.h"
#include "tiedlora/formats/gguf.h"
#include "tiedlora/llm/causal_lm.h"
#include "tiedlora/llm/tokenizer.h"
#include "util/files.h"
#include "util/text.h"

namespace tiedlora {

std::string apply_chatml_template(const std::vector<ChatMessage>& messages, bool add_generation_prompt,
                                  const std::optional<std::string>& default_system_prompt) {
  std::string out;
  auto add = [&](const std::string& role, const std::string& content) {
    out += "<|im_start|>";
    out += role;
    out += '\n';
    out += content;
    out += "<|im_end|>\n";
  };
  if (default_system_prompt && (messages.empty() || messages.front().role != "system")) {
    // SmolLM2's template checks `loop.first`, so an empty conversation gets no system message.
    if (!messages.empty()) add("system", *default_system_prompt);
  }
  for (const auto& m : messages) add(m.role, m.content);
  if (add_generation_prompt) out += "<|im_start|>assistant\n";
  return out;
}

ChatTemplateInfo inspect_chat_template(const std::string& jinja) {
  ChatTemplateInfo info;
  info.is_chatml = jinja.find("<|im_start|>") != std::string::npos && jinja.find("<|im_end|>") != std::string::npos;
  if (!info.is_chatml) return info;
  // A literal system message: '<|im_start|>system' then a newline (real or escaped), text, '<|im_end|>'.
  const std::string marker = "<|im_start|>system";
  for (std::size_t at = jinja.find(marker); at != std::string::npos; at = jinja.find(marker, at + 1)) {
    std::size_t start = at + marker.size();
    if (jinja.compare(start, 1, "\n") == 0) {
      start += 1;
    } else if (jinja.compare(start, 2, "\\n") == 0) {
      start += 2;
    } else {
      continue;
    }
    const std::size_t end = jinja.find("<|im_end|>", start);
    if (end == std::string::npos) continue;
    const std::string text = jinja.substr(start, end - start);
    // Only a plain literal counts: quotes, Jinja delimiters or escapes mean the text is computed.
    if (text.empty() || text.find_first_of("'\"{}\\") != std::string::npos) continue;
    info.default_system_prompt = text;
    break;
  }
  return info;
}

std::string chat_template_of(const std::string& model) {
  if (llm::models::is_gguf_path(model)) {
    const formats::GgufFile file = formats::GgufFile::open(model);
    return file.has_key("tokenizer.chat_template") ? file.get_string("tokenizer.chat_template") : "";
  }
  // transformers 5 (and 4.43+ by default) saves the template as its own file beside the tokenizer.
  const std::string jinja = util::join_path(model, "chat_template.jinja");
  if (util::is_regular_file(jinja)) return util::read_text_file(jinja);
  const std::string config = util::join_path(model, "tokenizer_config.json");
  if (!util::is_regular_file(config)) return "";
  const auto j = util::parse_json_strict(util::read_text_file(config), config);  // malformed: FormatError
  if (!j.is_object() || !j.contains("chat_template") || j.at("chat_template").is_null()) return "";
  const auto& value = j.at("chat_template");
  if (value.is_string()) return value.get<std::string>();
  if (value.is_array()) {  // named templates (older transformers): the one named "default", if any
    for (const auto& entry : value) {
      if (entry.is_object() && entry.value("name", "") == "default" && entry.contains("template") &&
          entry.at("template").is_string()) {
        return entry.at("template").get<std::string>();
      }
    }
    return "";
  }
  throw FormatError(config + ": field 'chat_template' must be a string or a list of named templates");
}

PromptFormat prompt_format_for(const Tokenizer& tokenizer, const std::string& chat_template,
                               std::optional<bool> use_chat) {
  PromptFormat format;
  const ChatTemplateInfo info = inspect_chat_template(chat_template);
  if (use_chat.value_or(info.is_chatml) && !info.is_chatml) {
    throw ConfigError("the model's chat template is " + std::string(chat_template.empty() ? "missing" : "not ChatML") +
                      " (hint: train on plain text without the chat option)");
  }
  format.chat = use_chat.value_or(info.is_chatml);
  if (format.chat) {
    format.default_system_prompt = info.default_system_prompt;
    const auto end = tokenizer.token_to_id("<|im_end|>");
    if (!end) throw ConfigError("ChatML needs the <|im_end|> token, which the tokenizer lacks");
    format.end_token = *end;
  } else {
    const auto eos = tokenizer.eos_id();
    if (!eos) throw ConfigError("the tokenizer has no end-of-sequence token to end completions with");
    format.end_token = *eos;
  }
  return format;
}

std::string prompt_text(const std::string& prompt, const std::string& system, const PromptFormat& format) {
  if (!format.chat) return prompt;
  std::vector<ChatMessage> messages;
  if (!system.empty()) messages.push_back({"system", system});
  messages.push_back({"user", prompt});
  return apply_chatml_template(messages, /*add_generation_prompt=*/true, format.default_system_prompt);
}

std::vector<int64_t> prompt_ids(const Tokenizer& tokenizer, const std::string& prompt, const std::string& system,
                                const PromptFormat& format) {
  // Special tokens of the template are in the text; a plain prompt gets what the tokenizer adds (a BOS).
  const auto ids = tokenizer.encode(prompt_text(prompt, system, format), /*add_special_tokens=*/!format.chat);
  return {ids.begin(), ids.end()};
}

}  // namespace tiedlora
