// activation_checkpoint.cpp: see activation_checkpoint.h.
#include "llm/models/activation_checkpoint.h"

#include <utility>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/custom_class.h>

#include "tiedlora/core/forward_context.h"

namespace tiedlora::llm::models::detail {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// What the backward pass needs besides tensors: the block and the forward context it ran in (the kernel
// choice, the row routing, autocast and the dropout generator's state, per thread: on a GPU the backward
// pass runs on the device's autograd thread, and a block recomputed in another context would compute
// another forward).
struct SavedBlock : torch::CustomClassHolder {
  BlockFunction block;
  ForwardContext context;
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
      const ForwardContextReplay replay(saved->context);
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
  saved->context = ForwardContext::capture(x.device());
  return CheckpointFunction::apply(x, std::move(saved), at::TensorList(trainable))[0];
}

}  // namespace tiedlora::llm::models::detail
