// finetune.cpp: fine-tune a causal language model with Tied-LoRA in about a hundred lines, over the
// library alone (tiedlora::llm). The example to copy into your own program:
//
//   finetune_example MODEL TRAIN.jsonl TEST.jsonl OUTPUT [STEPS]
//
// MODEL is a Hugging Face folder (GPT-2, Llama) or a Llama-architecture .gguf file; the JSONL lines are
// {"prompt": ..., "completion": ...}. It injects tied-abuv (the Tied-LoRA paper's TL6: A and B shared by
// all layers, per-layer u and v) into the attention input projections, trains with AdamW and a cosine
// schedule, saves the adapter (OUTPUT/adapter, loadable by load_adapter and `tiedlora merge-weights`), and
// prints held-out exact match before and after. The full program with progress, validation, Ctrl-C
// checkpoints, merging and summaries is tools/finetune/tiedlora_finetune.cpp.
#include <cstdio>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "tiedlora/llm.h"

namespace tt = tiedlora::llm::train;

namespace {

// The attention input projections, the paper's placement: GPT-2 fuses them into c_attn.
std::vector<std::string> attention_targets(const tiedlora::llm::models::CausalLM& model) {
  if (model.info().model_type == "gpt2") return {"c_attn"};
  return {"q_proj", "k_proj", "v_proj"};
}

std::vector<tt::TokenizedExample> tokenize_all(const tiedlora::Tokenizer& tokenizer,
                                               const std::vector<tt::Example>& examples,
                                               const tt::PromptFormat& format) {
  std::vector<tt::TokenizedExample> out;
  for (const auto& example : examples) out.push_back(tt::tokenize(tokenizer, example, format));
  return out;
}

double exact_match(tiedlora::llm::models::CausalLM& model, const tiedlora::Tokenizer& tokenizer,
                   const std::vector<tt::Example>& test, const tt::PromptFormat& format) {
  const tt::ExactMatch em = tt::exact_match(model, tokenizer, test, format, /*max_new_tokens=*/24, /*batch_size=*/16);
  return 100 * em.accuracy();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s MODEL TRAIN.jsonl TEST.jsonl OUTPUT [STEPS]\n", argv[0]);
    return 2;
  }
  const std::string model_path = argv[1], train_path = argv[2], test_path = argv[3], output = argv[4];
  try {
    // 1. The frozen model, its tokenizer and the prompt format (ChatML when the model's template is ChatML).
    auto model = tiedlora::llm::models::load_any(model_path);
    const auto tokenizer = tiedlora::load_tokenizer(model_path);
    const tt::PromptFormat format =
        tt::prompt_format_for(*tokenizer, tiedlora::chat_template_of(model_path), std::nullopt);

    // 2. The data: completion-only loss, so each example keeps its prompt and completion apart.
    const std::vector<tt::Example> train = tt::read_jsonl(train_path);
    const std::vector<tt::Example> test = tt::read_jsonl(test_path);

    // 3. Training options: the paper's recipe at a small scale.
    tt::TrainOptions options;
    options.max_steps = argc > 5 ? std::stoll(argv[5]) : 100;
    options.batch_size = 8;
    options.lr = 1e-3;
    options.warmup_steps = options.max_steps / 10;
    options.max_length = 384;
    options.seed = 42;
    options.output_dir = output;  // metrics.jsonl and checkpoints/
    options.validate();
    tt::prepare_output_dir(output, /*resume=*/false, /*overwrite=*/true,
                           {{"model", model_path}, {"train data", train_path}, {"test data", test_path}});

    // 4. The adapter: Tied-LoRA rank 8, alpha = rank (scale 1, as in the paper); only u, v, A, B train.
    torch::manual_seed(options.seed);
    const auto report = tiedlora::inject_adapters(*model, tiedlora::InjectOptions()
                                                              .targets(attention_targets(*model))
                                                              .method("tied-abuv")
                                                              .lora(tiedlora::LoraOptions(8).seed(options.seed)));
    std::printf(
        "%s: %lld trainable of %lld parameters (%.4f%%)\n", model_path.c_str(),
        static_cast<long long>(report.trainable_parameters), static_cast<long long>(report.total_parameters),
        100.0 * static_cast<double>(report.trainable_parameters) / static_cast<double>(report.total_parameters));
    std::printf("exact match before training: %.1f%%\n", exact_match(*model, *tokenizer, test, format));

    // 5. Train. The end-of-turn token pads batches; padding never carries a target.
    tt::Trainer trainer(*model, tokenize_all(*tokenizer, train, format), /*validation=*/{}, options,
                        /*pad_id=*/format.end_token);
    tt::TrainCallbacks callbacks;
    callbacks.on_step = [&](const tt::StepRecord& r) {
      if (r.step % 10 == 0 || r.step == options.max_steps) {
        std::printf("step %lld  loss %.4f  lr %.2e\n", static_cast<long long>(r.step), r.loss, r.lr);
      }
    };
    const tt::TrainResult result = trainer.run(callbacks);
    std::printf("trained %lld steps, %.0f tokens/s\n", static_cast<long long>(result.steps_done),
                static_cast<double>(result.tokens) / result.train_seconds);

    // 6. Save the adapter and measure again.
    tiedlora::SaveAdapterOptions save;
    save.base_model_name_or_path = model_path;
    save.fan_in_fan_out = model->info().fan_in_fan_out;
    save.overwrite = true;
    tiedlora::save_adapter(*model, output + "/adapter", save);
    std::printf("adapter saved to %s/adapter\n", output.c_str());
    std::printf("exact match after training: %.1f%%\n", exact_match(*model, *tokenizer, test, format));
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "finetune: error: %s\n", e.what());
    return 1;
  }
}
