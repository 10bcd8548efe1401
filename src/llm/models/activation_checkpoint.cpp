// activation_checkpoint.cpp: see activation_checkpoint.h.
#include "llm/models/activation_checkpoint.h"

#include <utility>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/custom_class.h>

#include "tiedlora/core/functional.h"
#include "tiedlora/core/modules.h"

namespace tiedlora::models::detail {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Autocast as the forward found it, for the recomputation: the backward pass runs outside the caller's
// autocast scope, and a block recomputed in another precision would give other gradients.
struct AutocastState {
  bool cpu = false, cuda = false, cache = true;
  at::ScalarType cpu_dtype = at::kBFloat16, cuda_dtype = at::kHalf;
  static AutocastState current() {
    return {at::autocast::is_autocast_enabled(at::kCPU), at::autocast::is_autocast_enabled(at::kCUDA),
            at::autocast::is_autocast_cache_enabled(), at::autocast::get_autocast_dtype(at::kCPU),
            at::autocast::get_autocast_dtype(at::kCUDA)};
  }
  void apply() const {
    at::autocast::set_autocast_enabled(at::kCPU, cpu);
    at::autocast::set_autocast_enabled(at::kCUDA, cuda);
    at::autocast::set_autocast_cache_enabled(cache);
    at::autocast::set_autocast_dtype(at::kCPU, cpu_dtype);
    at::autocast::set_autocast_dtype(at::kCUDA, cuda_dtype);
  }
};

// What the backward pass needs besides tensors: the block, the random states and the autocast state it
// started from.
struct SavedBlock : torch::CustomClassHolder {
  BlockFunction block;
  at::Tensor cpu_rng;
  at::Tensor cuda_rng;  // undefined unless the input is on a GPU
  c10::Device device = at::kCPU;
  AutocastState autocast;
  // The kernel choice is per thread, and on a GPU the backward pass runs on the device's autograd thread:
  // the recomputation must use the forward's, or it computes another forward (and loses the kernels).
  functional::Backend backend = functional::Backend::aten;
  // Likewise the row routing of a mixed-adapter batch (per thread too): each row's adapter again.
  std::shared_ptr<const RowAdapters> routing;
};

at::Generator cuda_generator(const c10::Device& device) { return at::globalContext().defaultGenerator(device); }

// For the recomputation: the random states, the autocast state and the kernel choice of the forward, then
// the caller's back, however the recomputation ends.
class ReplayScope {
 public:
  explicit ReplayScope(const SavedBlock& saved)
      : saved_(saved), autocast_(AutocastState::current()), backend_(saved.backend), routing_(saved.routing) {
    // The CUDA generator first: if it throws, nothing has been changed yet. The CPU generator's calls do
    // not throw for a state it produced itself.
    if (saved.cuda_rng.defined()) {
      cuda_rng_ = cuda_generator(saved.device).get_state();
      cuda_generator(saved.device).set_state(saved.cuda_rng);
    }
    at::Generator cpu = at::detail::getDefaultCPUGenerator();
    cpu_rng_ = cpu.get_state();
    cpu.set_state(saved.cpu_rng);
    saved.autocast.apply();
    at::autocast::increment_nesting();
  }
  ~ReplayScope() {
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    autocast_.apply();
    at::Generator cpu = at::detail::getDefaultCPUGenerator();
    cpu.set_state(cpu_rng_);
    if (cuda_rng_.defined()) cuda_generator(saved_.device).set_state(cuda_rng_);
  }
  ReplayScope(const ReplayScope&) = delete;
  ReplayScope& operator=(const ReplayScope&) = delete;

 private:
  const SavedBlock& saved_;
  AutocastState autocast_;
  functional::BackendGuard backend_;
  RowAdaptersScope routing_;
  at::Tensor cpu_rng_, cuda_rng_;
};

struct CheckpointFunction : torch::autograd::Function<CheckpointFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, c10::intrusive_ptr<SavedBlock> saved,
                               at::TensorList trainable) {
    // Runs without gradients (Function::apply disables them): nothing inside the block is kept.
    at::Tensor y = saved->block(x);
    std::vector<at::Tensor> keep{x};
    keep.insert(keep.end(), trainable.begin(), trainable.end());
    ctx->save_for_backward(keep);
    ctx->saved_data["block"] = at::IValue::make_capsule(std::move(saved));
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list kept = ctx->get_saved_variables();
    auto saved = c10::static_intrusive_pointer_cast<SavedBlock>(ctx->saved_data["block"].toCapsule());
    const at::Tensor input = kept[0].detach().requires_grad_(kept[0].requires_grad());
    at::Tensor output;
    {
      const ReplayScope replay(*saved);
      const at::AutoGradMode with_grad(true);
      output = saved->block(input);
    }

    // Gradients for the input (when it needs one) and for every trainable tensor the block touched.
    variable_list wrt;
    std::vector<size_t> slot;  // position in this function's inputs: 0 = x, 2 + i = trainable[i]
    if (input.requires_grad()) {
      wrt.push_back(input);
      slot.push_back(0);
    }
    for (size_t i = 1; i < kept.size(); ++i) {
      if (kept[i].requires_grad()) {
        wrt.push_back(kept[i]);
        slot.push_back(i + 1);
      }
    }
    variable_list grads(kept.size() + 1);  // x, the block (no gradient), the trainable tensors
    if (wrt.empty() || !output.requires_grad()) return grads;
    const variable_list found = torch::autograd::grad({output}, wrt, {grad_outputs[0]}, /*retain_graph=*/false,
                                                      /*create_graph=*/false, /*allow_unused=*/true);
    for (size_t i = 0; i < found.size(); ++i) grads[slot[i]] = found[i];
    return grads;
  }
};

}  // namespace

at::Tensor checkpointed(BlockFunction block, const at::Tensor& x, const std::vector<at::Tensor>& trainable) {
  auto saved = c10::make_intrusive<SavedBlock>();
  saved->block = std::move(block);
  saved->cpu_rng = at::detail::getDefaultCPUGenerator().get_state();
  saved->autocast = AutocastState::current();
  saved->backend = functional::current_backend();
  saved->routing = RowAdapters::current();
  if (x.is_cuda()) {
    saved->device = x.device();
    saved->cuda_rng = cuda_generator(x.device()).get_state();
  }
  return CheckpointFunction::apply(x, std::move(saved), at::TensorList(trainable))[0];
}

}  // namespace tiedlora::models::detail
