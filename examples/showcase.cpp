// showcase.cpp: tiedlora in one minute. Builds a small transformer-shaped model with the LibTorch C++
// frontend, injects Tied-LoRA (tied-abuv) into its attention and MLP projections, trains a few steps on a
// synthetic next-token task, merges the adapters into the weights, and shows that the merged model gives
// the adapted model's outputs and that unmerging restores the original weights bit for bit.
//
// Run: scripts/demo --showcase   (or build/examples/tiedlora_showcase after scripts/bootstrap)
#include <chrono>
#include <cstdio>
#include <iostream>
#include <map>

#include <torch/torch.h>

#include "tiedlora/core.h"

namespace {

constexpr int64_t kVocab = 64, kDim = 96, kHidden = 256, kLayers = 4, kSeq = 32, kBatch = 16;

// Layers are tiedlora::LoraLinear: a drop-in for torch::nn::Linear that receives adapters in place.
struct BlockImpl : torch::nn::Module {
  torch::nn::LayerNorm norm1{nullptr}, norm2{nullptr};
  tiedlora::LoraLinear q_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
  BlockImpl() {
    norm1 = register_module("norm1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kDim})));
    q_proj = register_module("q_proj", tiedlora::LoraLinear(torch::nn::LinearOptions(kDim, kDim)));
    v_proj = register_module("v_proj", tiedlora::LoraLinear(torch::nn::LinearOptions(kDim, kDim)));
    o_proj = register_module("o_proj", tiedlora::LoraLinear(torch::nn::LinearOptions(kDim, kDim)));
    norm2 = register_module("norm2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kDim})));
    up_proj = register_module("up_proj", tiedlora::LoraLinear(torch::nn::LinearOptions(kDim, kHidden)));
    down_proj = register_module("down_proj", tiedlora::LoraLinear(torch::nn::LinearOptions(kHidden, kDim)));
  }
  // A causal mixing layer (a running mean of v gated by q) keeps the example small and dependency-free.
  torch::Tensor forward(torch::Tensor x) {
    auto h = norm1(x);
    auto counts = torch::arange(1, x.size(1) + 1, x.options()).view({1, -1, 1});
    auto mixed = torch::sigmoid(q_proj(h)) * (torch::cumsum(v_proj(h), 1) / counts);
    x = x + o_proj(mixed);
    return x + down_proj(torch::gelu(up_proj(norm2(x))));
  }
};
TORCH_MODULE(Block);

struct TinyLmImpl : torch::nn::Module {
  torch::nn::Embedding embed{nullptr};
  torch::nn::ModuleList blocks{nullptr};
  torch::nn::Linear lm_head{nullptr};
  TinyLmImpl() {
    embed = register_module("embed", torch::nn::Embedding(kVocab, kDim));
    blocks = register_module("blocks", torch::nn::ModuleList());
    for (int i = 0; i < kLayers; ++i) blocks->push_back(Block());
    lm_head = register_module("lm_head", torch::nn::Linear(torch::nn::LinearOptions(kDim, kVocab).bias(false)));
  }
  torch::Tensor forward(const torch::Tensor& ids) {
    auto x = embed(ids);
    for (const auto& block : *blocks) x = block->as<BlockImpl>()->forward(x);
    return lm_head(x);
  }
};
TORCH_MODULE(TinyLm);

// Sequences that follow a fixed permutation of the vocabulary: next = perm[current]. The frozen random
// model knows nothing of it; the adapters must learn it.
torch::Tensor make_batch(const torch::Tensor& perm, torch::Generator& gen) {
  auto ids = torch::empty({kBatch, kSeq + 1}, torch::kLong);
  ids.select(1, 0).copy_(torch::randint(0, kVocab, {kBatch}, gen));
  for (int64_t t = 1; t <= kSeq; ++t) ids.select(1, t).copy_(perm.index_select(0, ids.select(1, t - 1)));
  return ids;
}

double loss_of(TinyLm& model, const torch::Tensor& ids) {
  auto logits = model->forward(ids.slice(1, 0, kSeq));
  return torch::nn::functional::cross_entropy(logits.reshape({-1, kVocab}), ids.slice(1, 1).reshape({-1}))
      .item<double>();
}

}  // namespace

int main() {
  try {
    torch::manual_seed(0);
    auto gen = at::make_generator<at::CPUGeneratorImpl>(1234);
    const auto perm = torch::randperm(kVocab, gen);
    TinyLm model;

    auto report = tiedlora::inject_adapters(*model, tiedlora::InjectOptions()
                                                        .targets({"q_proj", "v_proj", "o_proj", "up_proj", "down_proj"})
                                                        .method("tied-abuv")
                                                        .lora(tiedlora::LoraOptions(8).alpha(16.0).seed(7)));
    std::cout << report.summary();

    const auto eval_ids = make_batch(perm, gen);
    torch::optim::AdamW optimizer(tiedlora::trainable_parameters(*model), torch::optim::AdamWOptions(3e-3));
    const double initial = loss_of(model, eval_ids);
    const auto start = std::chrono::steady_clock::now();
    const int steps = 150;
    for (int step = 1; step <= steps; ++step) {
      const auto ids = make_batch(perm, gen);
      optimizer.zero_grad();
      auto logits = model->forward(ids.slice(1, 0, kSeq));
      auto loss = torch::nn::functional::cross_entropy(logits.reshape({-1, kVocab}), ids.slice(1, 1).reshape({-1}));
      loss.backward();
      optimizer.step();
      if (step % 25 == 0) std::printf("step %3d  train loss %.4f\n", step, loss.item<double>());
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const double trained = loss_of(model, eval_ids);
    std::printf("held-out loss: %.4f before training, %.4f after %d steps (%.1f s, %.0f tokens/s)\n", initial, trained,
                steps, seconds, steps * kBatch * kSeq / seconds);

    model->eval();
    torch::NoGradGuard no_grad;
    const auto input = eval_ids.slice(1, 0, kSeq);
    const auto adapted = model->forward(input);
    std::map<std::string, torch::Tensor> original;
    for (const auto& p : model->named_parameters()) original[p.key()] = p.value().clone();
    tiedlora::merge_adapters_(*model);
    const auto merged = model->forward(input);
    const double max_diff = (merged - adapted).abs().max().item<double>();
    const double max_ref = adapted.abs().max().item<double>();
    std::printf("merged vs adapted logits: max |diff| %.3g (max |logit| %.3g, relative %.2g)\n", max_diff, max_ref,
                max_diff / max_ref);
    tiedlora::unmerge_adapters_(*model);
    bool restored = true;
    for (const auto& p : model->named_parameters())
      restored = restored && torch::equal(p.value(), original.at(p.key()));
    std::printf("unmerge restores every weight bit for bit: %s\n", restored ? "yes" : "NO");
    const bool ok = trained < initial && max_diff <= 1e-5 * max_ref && restored;
    std::printf("%s\n", ok ? "showcase: OK" : "showcase: FAILED");
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::cerr << "showcase: error: " << e.what() << "\n";
    return 1;
  }
}
