// gpt2.cpp: GPT-2 in the LibTorch C++ frontend with Hugging Face's module names (transformer.h.N.attn.c_attn,
// ...), so adapter targets mean what they mean in PEFT. Its linear layers are LoraLinear; checkpoints store
// them as Conv1D (in, out), which load_hf.cpp transposes.
#include <ATen/ATen.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/normalization.h>

#include "llm/models/decoder.h"

namespace tiedlora::llm::models {
namespace {

struct Gpt2Sizes {
  int64_t vocab, positions, dim, layers, heads, inner;
  double eps;
  at::ScalarType dtype;
};

struct Gpt2AttentionImpl : torch::nn::Module {
  LoraLinear c_attn{nullptr}, c_proj{nullptr};
  int64_t heads;
  Gpt2AttentionImpl(const Gpt2Sizes& s) : heads(s.heads) {
    c_attn = register_module("c_attn", linear(s.dim, 3 * s.dim, true, s.dtype));
    c_proj = register_module("c_proj", linear(s.dim, s.dim, true, s.dtype));
  }
  at::Tensor forward(const at::Tensor& x, KVCache* cache, size_t layer, const PackedLayout* packed) {
    const int64_t b = x.size(0), t = x.size(1), d = x.size(2), hd = d / heads;
    auto qkv = c_attn(x).split(d, 2);
    auto shape = [&](const at::Tensor& z) { return z.view({b, t, heads, hd}).transpose(1, 2); };
    auto y = attend(shape(qkv[0]), shape(qkv[1]), shape(qkv[2]), cache, layer, packed);
    return c_proj(y.transpose(1, 2).reshape({b, t, d}));
  }
};
TORCH_MODULE(Gpt2Attention);

struct Gpt2MlpImpl : torch::nn::Module {
  LoraLinear c_fc{nullptr}, c_proj{nullptr};
  explicit Gpt2MlpImpl(const Gpt2Sizes& s) {
    c_fc = register_module("c_fc", linear(s.dim, s.inner, true, s.dtype));
    c_proj = register_module("c_proj", linear(s.inner, s.dim, true, s.dtype));
  }
  at::Tensor forward(const at::Tensor& x) { return c_proj(at::gelu(c_fc(x), "tanh")); }
};
TORCH_MODULE(Gpt2Mlp);

struct Gpt2BlockImpl : torch::nn::Module {
  torch::nn::LayerNorm ln_1{nullptr}, ln_2{nullptr};
  Gpt2Attention attn{nullptr};
  Gpt2Mlp mlp{nullptr};
  explicit Gpt2BlockImpl(const Gpt2Sizes& s) {
    ln_1 = register_module("ln_1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({s.dim}).eps(s.eps)));
    attn = register_module("attn", Gpt2Attention(s));
    ln_2 = register_module("ln_2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({s.dim}).eps(s.eps)));
    mlp = register_module("mlp", Gpt2Mlp(s));
  }
  at::Tensor forward(at::Tensor x, KVCache* cache, size_t layer, const PackedLayout* packed) {
    x = x + attn->forward(ln_1(x), cache, layer, packed);
    return x + mlp(ln_2(x));
  }
};
TORCH_MODULE(Gpt2Block);

struct Gpt2TransformerImpl : torch::nn::Module {
  torch::nn::Embedding wte{nullptr}, wpe{nullptr};
  torch::nn::ModuleList h{nullptr};
  torch::nn::LayerNorm ln_f{nullptr};
  explicit Gpt2TransformerImpl(const Gpt2Sizes& s) {
    wte = register_module("wte", embedding(s.vocab, s.dim, s.dtype));
    wpe = register_module("wpe", embedding(s.positions, s.dim, s.dtype));
    h = register_module("h", torch::nn::ModuleList());
    for (int64_t i = 0; i < s.layers; ++i) h->push_back(Gpt2Block(s));
    ln_f = register_module("ln_f", torch::nn::LayerNorm(torch::nn::LayerNormOptions({s.dim}).eps(s.eps)));
  }
};
TORCH_MODULE(Gpt2Transformer);

class Gpt2LMHead : public DecoderOnlyLM {
 public:
  Gpt2LMHead(const ModelConfig& c, at::ScalarType dtype) : DecoderOnlyLM(c) {
    sizes_ = {c.vocab_size, c.max_positions,     c.hidden_size, c.num_layers,
              c.num_heads,  c.intermediate_size, c.norm_eps,    dtype};
    transformer_ = register_module("transformer", Gpt2Transformer(sizes_));
    register_head(sizes_.dim, transformer_->wte->weight, sizes_.dtype);
  }

 protected:
  at::Tensor forward_hidden(const at::Tensor& ids, KVCache* cache, const PackedLayout* packed) override {
    const Positions positions = positions_of(ids, cache, packed);
    TORCH_CHECK(positions.span <= sizes_.positions, "GPT-2: ", positions.span,
                " positions exceed n_positions = ", sizes_.positions);
    auto x = transformer_->wte(ids) + transformer_->wpe(positions.ids);
    BlockRunner run(*this, cache, packed);
    for (size_t i = 0; i < transformer_->h->size(); ++i) {
      auto block = transformer_->h->ptr<Gpt2BlockImpl>(i);
      x = run(x, [block, i](const at::Tensor& in, KVCache* c, const PackedLayout* p) {
        return block->forward(in, c, i, p);
      });
    }
    return transformer_->ln_f(x);
  }

 private:
  Gpt2Sizes sizes_;
  Gpt2Transformer transformer_{nullptr};
};

}  // namespace

std::shared_ptr<CausalLM> make_gpt2(const ModelConfig& config, at::ScalarType dtype) {
  return std::make_shared<Gpt2LMHead>(config, dtype);
}

}  // namespace tiedlora::llm::models
