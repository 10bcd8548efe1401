// trainer.cpp: the training loop (tiedlora/llm/trainer.h): the learning-rate schedule, the loss, the data order,
// the step with its all-reduce, validation and early stopping. Checkpoints: checkpoint.cpp.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <random>
#include <set>

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <torch/nn/utils/clip_grad.h>

#include "llm/train/trainer_state.h"
#include "tiedlora/core/error.h"
#include "tiedlora/core/inject.h"

namespace tiedlora::llm::train {
namespace {

void check_examples(const std::vector<TokenizedExample>& examples, const char* set, int64_t max_length) {
  for (size_t i = 0; i < examples.size(); ++i) {
    const auto& e = examples[i];
    if (e.prompt.empty())
      throw ConfigError(std::string(set) + " example " + std::to_string(i + 1) + " has an empty prompt");
    if (e.completion.empty()) {
      throw ConfigError(std::string(set) + " example " + std::to_string(i + 1) +
                        " has an empty completion (nothing to learn)");
    }
    if (static_cast<int64_t>(e.completion.size()) + 1 > max_length) {
      throw ConfigError(std::string(set) + " example " + std::to_string(i + 1) + " has a completion of " +
                        std::to_string(e.completion.size()) + " tokens, more than max_length " +
                        std::to_string(max_length) + " allows (hint: raise --max-length or shorten it)");
    }
  }
}

// bf16 autocast on CUDA for one forward pass; the caller's autocast state (enabled flag, dtype, nesting
// and its cast cache) comes back however the pass ends, as torch.autocast's __exit__ does.
class CudaBf16Autocast {
 public:
  explicit CudaBf16Autocast(bool on) : on_(on) {
    if (!on_) return;
    was_enabled_ = at::autocast::is_autocast_enabled(at::kCUDA);
    previous_dtype_ = at::autocast::get_autocast_dtype(at::kCUDA);
    at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
    at::autocast::set_autocast_enabled(at::kCUDA, true);
    at::autocast::increment_nesting();
  }
  ~CudaBf16Autocast() {
    if (!on_) return;
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(at::kCUDA, was_enabled_);
    at::autocast::set_autocast_dtype(at::kCUDA, previous_dtype_);
  }
  CudaBf16Autocast(const CudaBf16Autocast&) = delete;
  CudaBf16Autocast& operator=(const CudaBf16Autocast&) = delete;

 private:
  bool on_;
  bool was_enabled_ = false;
  at::ScalarType previous_dtype_ = at::kBFloat16;
};

}  // namespace

at::Tensor flatten(const std::vector<at::Tensor>& tensors) {
  std::vector<at::Tensor> flat;
  for (const auto& t : tensors) {
    if (t.scalar_type() != tensors.front().scalar_type()) {
      throw ConfigError("Trainer: the trainable parameters have different dtypes (" +
                        std::string(c10::toString(t.scalar_type())) + ", " +
                        std::string(c10::toString(tensors.front().scalar_type())) + "); data parallelism needs one");
    }
    flat.push_back(t.detach().reshape(-1));
  }
  return at::cat(flat);
}
void unflatten(const at::Tensor& flat, const std::vector<at::Tensor>& tensors) {
  at::NoGradGuard no_grad;
  int64_t offset = 0;
  for (const auto& t : tensors) {
    t.copy_(flat.narrow(0, offset, t.numel()).view(t.sizes()));
    offset += t.numel();
  }
}

double cosine_with_warmup(int64_t step, int64_t total, int64_t warmup, double peak, double min_ratio) {
  TORCH_CHECK(total > 0 && step >= 0, "cosine_with_warmup: step ", step, " of ", total);
  // Warmup counts the step being taken, so the first update is not wasted at lr 0.
  if (step < warmup) return peak * static_cast<double>(step + 1) / static_cast<double>(warmup);
  const double span = static_cast<double>(std::max<int64_t>(1, total - warmup));
  const double progress = std::min(1.0, static_cast<double>(step - warmup) / span);
  return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + std::cos(M_PI * progress)));
}

at::Tensor completion_loss_sum(llm::models::CausalLM& model, const Batch& batch) {
  const auto device = model.parameters().front().device();
  const at::Tensor ids = batch.input_ids.to(device);
  const at::Tensor labels = batch.labels.to(device);
  const at::Tensor hidden = batch.packed() ? model.hidden_states(ids, batch.layout) : model.hidden_states(ids);
  const at::Tensor mask = labels.ne(-100);
  // The head (vocab x dim) runs on the completion positions only.
  // fp32 at least (an fp64 model, the tests' exact reference, stays in fp64).
  const at::Tensor logits = model.logits(hidden.index({mask}));
  const at::Tensor wide = logits.to(at::promote_types(logits.scalar_type(), at::kFloat));
  return at::cross_entropy_loss(wide, labels.masked_select(mask), {}, at::Reduction::Sum);
}

std::vector<int64_t> epoch_order(const std::vector<TokenizedExample>& train, const TrainOptions& options,
                                 int64_t epoch) {
  const int64_t n = static_cast<int64_t>(train.size());
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  // Fisher-Yates with our own draws: std::shuffle's algorithm is not specified across libraries.
  std::mt19937_64 rng(options.seed * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(epoch) + 1);
  for (int64_t i = n - 1; i > 0; --i) std::swap(order[i], order[rng() % static_cast<uint64_t>(i + 1)]);
  if (options.group_by_length) {
    // transformers' LengthGroupedSampler idea: within runs of 50 micro-batches of the shuffle, longest first,
    // so that a micro-batch holds examples of similar length; still a function of the seed and the epoch.
    const int64_t run = 50 * options.batch_size;
    for (int64_t first = 0; first < n; first += run) {
      std::stable_sort(order.begin() + first, order.begin() + std::min(n, first + run), [&](int64_t a, int64_t b) {
        return batch_length(train[a], options.max_length) > batch_length(train[b], options.max_length);
      });
    }
  }
  return order;
}

// ---- Trainer ------------------------------------------------------------------------------------------------

Trainer::Trainer(llm::models::CausalLM& model, std::vector<TokenizedExample> train,
                 std::vector<TokenizedExample> validation, TrainOptions options, int64_t pad_id)
    : s_(std::make_unique<State>(model, std::move(train), std::move(validation), std::move(options), pad_id)) {
  const TrainOptions& o = s_->options;
  if (s_->train.empty()) throw ConfigError("Trainer: no training examples");
  o.validate();
  if (o.patience > 0 && s_->validation.empty()) {
    throw ConfigError("Trainer: early stopping (patience) needs validation data and eval_every > 0");
  }
  check_examples(s_->train, "training", o.max_length);
  check_examples(s_->validation, "validation", o.max_length);
  std::set<const void*> seen;
  for (const auto& item : model.named_parameters()) {
    if (item.value().requires_grad() && seen.insert(item.value().unsafeGetTensorImpl()).second) {
      // Checkpoints keep the names of the layout before one naming rule held for every adapter, so
      // checkpoints written earlier still resume (tiedlora/core/adapter_set.h).
      s_->params.emplace_back(stored_parameter_name(item.key()), item.value());
    }
  }
  if (s_->params.empty())
    throw ConfigError("Trainer: the model has no trainable parameters (hint: inject adapters first)");
  const at::Device device = s_->params.front().second.device();
  if (device.is_cuda()) {  // adapter dropout on that GPU draws from a generator of the Trainer's own too
    s_->device_dropout = at::detail::getCUDAHooks().getNewGenerator(device.index());
    s_->device_dropout.set_current_seed(o.seed);
  }
  // Every adapter with trainable tensors takes part in the forward, or the optimizer would hold it without
  // ever a gradient (a reference adapter loaded beside the one to train must be frozen or made active).
  const std::vector<std::string> active = active_adapters(model);
  bool dropout = false;
  for (const auto& [name, layer] : adapted_layers(model)) {
    for (const auto& adapter : layer->adapter_names()) {
      if (std::find(active.begin(), active.end(), adapter) != active.end()) {
        dropout = dropout || layer->lora_options(adapter).dropout() > 0;  // only what the forward runs counts
        continue;
      }
      for (const auto& t : layer->update(adapter).tensors()) {
        if (t.requires_grad()) {
          throw ConfigError("Trainer: adapter '" + adapter + "' has trainable tensors (on '" + name +
                            "') but is not "
                            "active, so it would never get a gradient (hint: set_active_adapters() to train it, or "
                            "set_adapter_trainable(model, \"" +
                            adapter + "\", false) to keep it fixed)");
        }
      }
    }
  }
  if (!s_->options.packing) s_->options.packing = !dropout;  // automatic: packed wherever that equals padding
  if (o.batch_size < s_->world()) {
    throw ConfigError("Trainer: batch_size " + std::to_string(o.batch_size) +
                      " (the global micro-batch) is smaller than the " + std::to_string(s_->world()) +
                      " processes: each rank needs an example of every micro-batch (hint: "
                      "--batch-size " +
                      std::to_string(s_->world()) + " or more, or fewer processes)");
  }
  std::vector<at::Tensor> tensors;
  for (const auto& p : s_->params) tensors.push_back(p.second);
  s_->optimizer = std::make_unique<torch::optim::AdamW>(
      tensors, torch::optim::AdamWOptions(o.lr).betas({o.beta1, o.beta2}).eps(o.eps).weight_decay(o.weight_decay));
  if (!o.output_dir.empty() && s_->group->is_main()) util::make_directories(o.output_dir);  // rank 0 writes the run
  // Every rank starts from rank 0's adapter (equal anyway when every rank seeds alike; this makes it so).
  s_->share(tensors, "the initial adapter");
}

void TrainOptions::validate() const {
  auto positive = [](const char* name, double value) {
    if (!(value > 0) || !std::isfinite(value)) {
      throw ConfigError(std::string("train options: ") + name + " must be a positive number, got " +
                        std::to_string(value));
    }
  };
  auto in_unit = [](const char* name, double value, bool one_allowed) {
    if (!(value >= 0 && (one_allowed ? value <= 1 : value < 1))) {
      throw ConfigError(std::string("train options: ") + name + " must be in [0, 1" + (one_allowed ? "]" : ")") +
                        ", got " + std::to_string(value));
    }
  };
  positive("max_steps", static_cast<double>(max_steps));
  positive("batch_size", static_cast<double>(batch_size));
  positive("grad_accum", static_cast<double>(grad_accum));
  positive("max_length", static_cast<double>(max_length));
  positive("lr", lr);
  positive("eps", eps);
  in_unit("min_lr_ratio", min_lr_ratio, true);
  in_unit("beta1", beta1, false);
  in_unit("beta2", beta2, false);
  if (warmup_steps < 0) throw ConfigError("train options: warmup_steps must not be negative");
  if (pack_length < 0)
    throw ConfigError("train options: pack_length must not be negative (0: one row per micro-batch)");
  if (!(weight_decay >= 0) || !std::isfinite(weight_decay)) {
    throw ConfigError("train options: weight_decay must be a non-negative number");
  }
  if (!std::isfinite(max_grad_norm)) throw ConfigError("train options: max_grad_norm must be finite");
  if (patience > 0 && eval_every <= 0) {
    throw ConfigError("train options: early stopping (patience) needs eval_every > 0 and validation data");
  }
}

Trainer::~Trainer() = default;

// One all-reduce per step, in fp64 (adapter gradients are small; the sum and the loss keep their digits): the
// gradients (zeros where this rank's share left a tensor without one), then per tensor whether this rank had a
// gradient (a tensor no rank touched stays without one, as in one process, so AdamW skips it alike), the loss
// sum and the stop requests.
void Trainer::State::all_reduce_step(std::vector<at::Tensor>& tensors, double& loss_sum, bool& stop_requested,
                                     int64_t step_number) {
  const int64_t count = static_cast<int64_t>(tensors.size());
  std::vector<at::Tensor> parts;
  std::vector<double> tail;
  for (const auto& t : tensors) {
    parts.push_back(t.grad().defined() ? t.grad().to(at::kDouble) : at::zeros_like(t, at::kDouble));
    tail.push_back(t.grad().defined() ? 1.0 : 0.0);
  }
  tail.push_back(loss_sum);
  tail.push_back(stop_requested ? 1.0 : 0.0);
  parts.push_back(at::tensor(tail, tensors.front().options().dtype(at::kDouble)));
  at::Tensor flat = flatten(parts);
  group->all_reduce_sum(flat, "the gradients of step " + std::to_string(step_number));
  const at::Tensor sums = flat.narrow(0, flat.numel() - count - 2, count + 2).cpu();
  const auto reduced = sums.accessor<double, 1>();
  int64_t offset = 0;
  for (int64_t i = 0; i < count; ++i) {
    at::Tensor& t = tensors[i];
    if (reduced[i] > 0) {
      if (!t.grad().defined()) t.mutable_grad() = at::zeros_like(t);
      t.mutable_grad().copy_(flat.narrow(0, offset, t.numel()).view(t.sizes()));
    } else {
      t.mutable_grad().reset();
    }
    offset += t.numel();
  }
  loss_sum = reduced[count];
  stop_requested = reduced[count + 1] > 0;
}

const TrainOptions& Trainer::options() const { return s_->options; }

double Trainer::validation_loss() {
  State& s = *s_;
  if (s.validation.empty()) throw ConfigError("Trainer: no validation data");
  at::NoGradGuard no_grad;
  const llm::models::EvalModeGuard eval_mode(s.model);  // the training mode comes back even when a batch throws
  double sum = 0;
  int64_t count = 0;
  // Each rank its contiguous share of the set, in batches as one process would make them.
  const auto [begin, end] =
      distributed::shard_range(static_cast<int64_t>(s.validation.size()), s.group->rank(), s.world());
  for (int64_t i = begin; i < end; i += s.options.batch_size) {
    std::vector<const TokenizedExample*> items;
    for (int64_t j = i; j < std::min(end, i + s.options.batch_size); ++j) items.push_back(&s.validation[j]);
    const Batch batch = s.make_micro_batch(items);
    sum += completion_loss_sum(s.model, batch).item<double>();
    count += batch.target_tokens;
  }
  if (s.world() > 1) {
    at::Tensor totals = at::tensor({sum, static_cast<double>(count)}, at::kDouble);
    s.group->all_reduce_sum(totals, "the validation loss");
    sum = totals[0].item<double>();
    count = static_cast<int64_t>(totals[1].item<double>());
  }
  return sum / static_cast<double>(count);
}

TrainResult Trainer::run(const TrainCallbacks& callbacks) {
  State& s = *s_;
  const TrainOptions& o = s.options;
  TrainResult result;
  const bool cuda = s.params.front().second.is_cuda();
  std::vector<at::Tensor> tensors;
  for (const auto& p : s.params) tensors.push_back(p.second);
  s.model.train();
  // Adapter dropout draws from the Trainer's generators; ranks other than 0 draw masks of their own (rank 0
  // keeps the stream a checkpoint saved).
  if (!s.group->is_main()) {
    const uint64_t seed = o.seed + 1000003ULL * static_cast<uint64_t>(s.group->rank()) + static_cast<uint64_t>(s.step);
    for (at::Generator& g : s.dropout_generators()) g.set_current_seed(seed);
  }
  const DropoutGeneratorScope dropout_generators(s.dropout_generators());
  // Checkpointing is this run's choice: the model gets its own setting back however the run ends.
  struct CheckpointingScope {
    llm::models::CausalLM& model;
    bool before;
    ~CheckpointingScope() { model.set_activation_checkpointing(before); }
  } checkpointing{s.model, s.model.activation_checkpointing()};
  s.model.set_activation_checkpointing(o.checkpoint_activations);
  auto finish = [&](TrainResult r) {
    r.steps_done = s.step;
    r.best_step = s.best_step;
    r.best_validation_loss = s.best_validation_loss;
    r.tokens = s.tokens;
    r.train_seconds = s.train_seconds;
    return r;
  };
  result.stopped_early = s.stopped_early;
  while (!s.stopped_early && s.step < o.max_steps) {
    if (callbacks.on_step_begin) callbacks.on_step_begin(s.step + 1);
    const auto start = std::chrono::steady_clock::now();
    // Every rank walks the whole global micro-batch (for the global counts) and keeps its share.
    std::vector<Batch> micro;
    int64_t targets = 0;
    StepRecord record;
    const auto [share_begin, share_end] = distributed::shard_range(o.batch_size, s.group->rank(), s.world());
    for (int64_t m = 0; m < o.grad_accum; ++m) {
      std::vector<const TokenizedExample*> items;
      const int64_t first = (s.step * o.grad_accum + m) * o.batch_size;
      for (int64_t k = 0; k < o.batch_size; ++k) {
        const TokenizedExample& example = s.stream_example(first + k);
        targets += static_cast<int64_t>(example.completion.size());  // make_batch keeps the completion whole
        record.tokens += batch_length(example, o.max_length);
        if (k >= share_begin && k < share_end) items.push_back(&example);
      }
      micro.push_back(s.make_micro_batch(items));
    }
    s.optimizer->zero_grad();
    double loss_sum = 0;
    for (const Batch& batch : micro) {
      at::Tensor loss;
      {
        const CudaBf16Autocast autocast(o.autocast_bf16 && cuda);
        loss = completion_loss_sum(s.model, batch);
      }
      // Every completion token of the accumulated global batch weighs the same.
      (loss / static_cast<double>(targets)).backward();
      loss_sum += loss.item<double>();
    }
    // With several processes a stop request counts when every rank knows of it: it rides on the step's
    // all-reduce (one process asks once the step is done, below).
    bool stop_requested = s.world() > 1 && callbacks.stop_requested && callbacks.stop_requested();
    if (s.world() > 1) s.all_reduce_step(tensors, loss_sum, stop_requested, s.step + 1);
    record.loss = loss_sum / static_cast<double>(targets);
    if (!std::isfinite(record.loss)) {
      throw Error("training diverged at step " + std::to_string(s.step + 1) + ": the loss is " +
                  std::to_string(record.loss) + " (hint: lower --lr or raise --warmup-steps)");
    }
    record.grad_norm = o.max_grad_norm > 0 ? torch::nn::utils::clip_grad_norm_(tensors, o.max_grad_norm)
                                           : torch::nn::utils::clip_grad_norm_(tensors, INFINITY);
    if (!std::isfinite(record.grad_norm)) {
      throw Error("training diverged at step " + std::to_string(s.step + 1) + ": the gradient norm is " +
                  std::to_string(record.grad_norm) + " (nothing was updated; hint: lower --lr)");
    }
    record.lr = cosine_with_warmup(s.step, o.max_steps, o.warmup_steps, o.lr, o.min_lr_ratio);
    for (auto& group : s.optimizer->param_groups())
      static_cast<torch::optim::AdamWOptions&>(group.options()).lr(record.lr);
    s.optimizer->step();
    ++s.step;
    record.step = s.step;
    record.target_tokens = targets;
    record.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    s.tokens += record.tokens;
    s.train_seconds += record.seconds;
    s.append_metrics({{"step", record.step},
                      {"loss", record.loss},
                      {"lr", record.lr},
                      {"grad_norm", record.grad_norm},
                      {"tokens", record.tokens},
                      {"target_tokens", record.target_tokens},
                      {"seconds", record.seconds},
                      {"tokens_per_second", record.tokens / record.seconds}});
    if (callbacks.on_step) callbacks.on_step(record);

    if (o.eval_every > 0 && !s.validation.empty() && (s.step % o.eval_every == 0 || s.step == o.max_steps)) {
      const double loss = validation_loss();
      const bool improved = s.best_step == 0 || loss < s.best_validation_loss - o.min_delta;
      if (improved) {
        s.best_step = s.step;
        s.best_validation_loss = loss;
        s.bad_evaluations = 0;
        s.best.clear();
        for (const auto& p : s.params) s.best.push_back(p.second.detach().clone());
      } else {
        ++s.bad_evaluations;
      }
      s.append_metrics({{"step", s.step}, {"validation_loss", loss}, {"improved", improved}});
      if (callbacks.on_validation) callbacks.on_validation(s.step, loss, improved);
      if (o.patience > 0 && s.bad_evaluations >= o.patience) {
        s.stopped_early = result.stopped_early = true;
        break;
      }
    }
    const bool stop = stop_requested || (s.world() == 1 && callbacks.stop_requested && callbacks.stop_requested()) ||
                      (o.stop_at_step > 0 && s.step == o.stop_at_step);
    if (!o.output_dir.empty() && (stop || (o.checkpoint_every > 0 && s.step % o.checkpoint_every == 0))) {
      result.last_checkpoint = s.write_checkpoint();
    }
    if (stop) {
      result.interrupted = true;
      return finish(result);
    }
  }
  if (!o.output_dir.empty()) result.last_checkpoint = s.write_checkpoint();
  // Early stopping's promise: the adapter of the best validation loss.
  if (!s.best.empty()) {
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < s.params.size(); ++i) s.params[i].second.copy_(s.best[i]);
  }
  s.model.eval();
  return finish(result);
}

}  // namespace tiedlora::llm::train
