// tiedlora/llm/chat.h: chat and prompt formatting, in one place for training, evaluation and generation:
//   chat_template_of       the model's own Jinja chat template (GGUF metadata or the Hugging Face folder)
//   inspect_chat_template  whether it is ChatML, and its default system prompt
//   apply_chatml_template  ChatML as plain string building
//   PromptFormat           how a prompt becomes text and token ids (ChatML or plain), prompt_format_for
//   prompt_text/prompt_ids the prompt as the model sees it, so an adapter sees at generation time the ids it
//                          was trained on
// Included by tiedlora/llm/tokenizer.h. Sources: src/llm/tokenizer/chat.cpp.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace tiedlora {

class Tokenizer;

// ---- chat templates ---------------------------------------------------------------------------------------

struct ChatMessage {
  std::string role;  ///< "system", "user", "assistant"
  std::string content;
};

/// ChatML, the template of SmolLM2, Qwen and many instruction models:
///   <|im_start|>{role}\n{content}<|im_end|>\n   per message, then <|im_start|>assistant\n   when
/// add_generation_prompt. When `default_system_prompt` is set and the first message is not a system one,
/// a system message with it comes first (SmolLM2's template does this). This is ChatML only, not a Jinja
/// interpreter: use it for models whose template is ChatML (inspect_chat_template tells).
std::string apply_chatml_template(const std::vector<ChatMessage>& messages, bool add_generation_prompt,
                                  const std::optional<std::string>& default_system_prompt = std::nullopt);

/// What a Jinja chat template (tokenizer.chat_template, tokenizer_config.json) says about ChatML.
struct ChatTemplateInfo {
  bool is_chatml = false;                            ///< built from <|im_start|>role\n ... <|im_end|>
  std::optional<std::string> default_system_prompt;  ///< the system message it inserts when none is given
};
/// Recognises ChatML templates by their markers and extracts a literal default system prompt; it does not
/// interpret Jinja.
ChatTemplateInfo inspect_chat_template(const std::string& jinja_template);

/// The model's Jinja chat template: `tokenizer.chat_template` of a GGUF file, or `chat_template` in
/// tokenizer_config.json of a folder; "" when there is none.
std::string chat_template_of(const std::string& model_path);

// ---- prompts ----------------------------------------------------------------------------------------------

/// How examples become token ids.
struct PromptFormat {
  /// ChatML (SmolLM2, Qwen): the prompt as a user message, the completion as the assistant's reply ended by
  /// <|im_end|>. Otherwise plain text: prompt then completion then the end-of-sequence token.
  bool chat = false;
  std::optional<std::string> default_system_prompt;
  /// Token that ends a completion (ChatML: <|im_end|>; plain: the tokenizer's eos).
  int64_t end_token = -1;
};

/// The format a model's tokenizer and chat template call for: ChatML when `chat_template` is ChatML (and
/// `use_chat` is not false), else plain. Throws ConfigError when the end token is missing.
PromptFormat prompt_format_for(const Tokenizer& tokenizer, const std::string& chat_template,
                               std::optional<bool> use_chat);

/// The prompt text (template applied, ready for generation) of a user `prompt` with a `system` message
/// (empty: the template's default system prompt, if any).
std::string prompt_text(const std::string& prompt, const std::string& system, const PromptFormat& format);
/// Its token ids, as training and generation see them (a plain prompt gets what the tokenizer adds, a BOS).
std::vector<int64_t> prompt_ids(const Tokenizer& tokenizer, const std::string& prompt, const std::string& system,
                                const PromptFormat& format);

}  // namespace tiedlora
