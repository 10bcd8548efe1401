// llama.cpp: the Llama family (also Mistral and Qwen2) in the LibTorch C++ frontend with Hugging Face's module
// names (model.layers.N.self_attn.q_proj, ...): RMSNorm, rotary positions (rotate_half), grouped-query
// attention, the gated MLP, optional q/k/v biases and a sliding window honoured up to its length.
#include <ATen/ATen.h>
#include <torch/nn/modules/container/modulelist.h>

#include "llm/models/decoder.h"

namespace tiedlora::llm::models {
namespace {

struct LlamaSizes {
  int64_t vocab, dim, layers, heads, kv_heads, head_dim, ffn;
  double eps, rope_theta;
  bool qkv_bias, o_bias, mlp_bias;
  int64_t sliding_window;
  at::ScalarType dtype;
};

// RMSNorm as transformers computes it: in fp32 at least (an fp64 model, the tests' exact reference, stays in
// fp64), then back to the input dtype before the weight.
struct RmsNormImpl : torch::nn::Module {
  at::Tensor weight;
  double eps;
  RmsNormImpl(int64_t dim, double eps_) : eps(eps_) { weight = register_parameter("weight", at::ones({dim})); }
  at::Tensor forward(const at::Tensor& x) {
    const auto x32 = x.to(at::promote_types(x.scalar_type(), at::kFloat));
    const auto normed = x32 * at::rsqrt(x32.pow(2).mean(-1, true) + eps);
    return weight * normed.to(x.scalar_type());
  }
};
TORCH_MODULE(RmsNorm);

// HF's rotate_half RoPE: the halves of each head are the two coordinates of each rotation.
at::Tensor rotate_half(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}

struct LlamaAttentionImpl : torch::nn::Module {
  LoraLinear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
  LlamaSizes s;
  explicit LlamaAttentionImpl(const LlamaSizes& sizes) : s(sizes) {
    q_proj = register_module("q_proj", linear(s.dim, s.heads * s.head_dim, s.qkv_bias, s.dtype));
    k_proj = register_module("k_proj", linear(s.dim, s.kv_heads * s.head_dim, s.qkv_bias, s.dtype));
    v_proj = register_module("v_proj", linear(s.dim, s.kv_heads * s.head_dim, s.qkv_bias, s.dtype));
    o_proj = register_module("o_proj", linear(s.heads * s.head_dim, s.dim, s.o_bias, s.dtype));
  }
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, KVCache* cache, size_t layer,
                     const PackedLayout* packed) {
    const int64_t b = x.size(0), t = x.size(1);
    auto q = q_proj(x).view({b, t, s.heads, s.head_dim}).transpose(1, 2);
    auto k = k_proj(x).view({b, t, s.kv_heads, s.head_dim}).transpose(1, 2);
    auto v = v_proj(x).view({b, t, s.kv_heads, s.head_dim}).transpose(1, 2);
    q = q * cos + rotate_half(q) * sin;
    k = k * cos + rotate_half(k) * sin;
    auto y = attend(q, k, v, cache, layer, packed);
    return o_proj(y.transpose(1, 2).reshape({b, t, s.heads * s.head_dim}));
  }
};
TORCH_MODULE(LlamaAttention);

struct LlamaMlpImpl : torch::nn::Module {
  LoraLinear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
  explicit LlamaMlpImpl(const LlamaSizes& s) {
    gate_proj = register_module("gate_proj", linear(s.dim, s.ffn, s.mlp_bias, s.dtype));
    up_proj = register_module("up_proj", linear(s.dim, s.ffn, s.mlp_bias, s.dtype));
    down_proj = register_module("down_proj", linear(s.ffn, s.dim, s.mlp_bias, s.dtype));
  }
  at::Tensor forward(const at::Tensor& x) { return down_proj(at::silu(gate_proj(x)) * up_proj(x)); }
};
TORCH_MODULE(LlamaMlp);

struct LlamaDecoderLayerImpl : torch::nn::Module {
  RmsNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
  LlamaAttention self_attn{nullptr};
  LlamaMlp mlp{nullptr};
  explicit LlamaDecoderLayerImpl(const LlamaSizes& s) {
    self_attn = register_module("self_attn", LlamaAttention(s));
    mlp = register_module("mlp", LlamaMlp(s));
    input_layernorm = register_module("input_layernorm", RmsNorm(s.dim, s.eps));
    post_attention_layernorm = register_module("post_attention_layernorm", RmsNorm(s.dim, s.eps));
  }
  at::Tensor forward(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, KVCache* cache, size_t layer,
                     const PackedLayout* packed) {
    x = x + self_attn->forward(input_layernorm(x), cos, sin, cache, layer, packed);
    return x + mlp(post_attention_layernorm(x));
  }
};
TORCH_MODULE(LlamaDecoderLayer);

struct LlamaBodyImpl : torch::nn::Module {
  torch::nn::Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr};
  RmsNorm norm{nullptr};
  explicit LlamaBodyImpl(const LlamaSizes& s) {
    embed_tokens = register_module("embed_tokens", embedding(s.vocab, s.dim, s.dtype));
    layers = register_module("layers", torch::nn::ModuleList());
    for (int64_t i = 0; i < s.layers; ++i) layers->push_back(LlamaDecoderLayer(s));
    norm = register_module("norm", RmsNorm(s.dim, s.eps));
  }
};
TORCH_MODULE(LlamaBody);

class LlamaForCausalLM : public DecoderOnlyLM {
 public:
  LlamaForCausalLM(const ModelConfig& c, at::ScalarType dtype)
      : DecoderOnlyLM(c),
        s_{c.vocab_size, c.hidden_size,       c.num_layers,     c.num_heads,  c.num_kv_heads,
           c.head_dim,   c.intermediate_size, c.norm_eps,       c.rope_theta, c.qkv_bias,
           c.o_bias,     c.mlp_bias,          c.sliding_window, dtype},
        source_(c.source) {
    model_ = register_module("model", LlamaBody(s_));
    register_head(s_.dim, model_->embed_tokens->weight, s_.dtype);
  }

 protected:
  at::Tensor forward_hidden(const at::Tensor& ids, KVCache* cache, const PackedLayout* packed) override {
    const Positions positions = positions_of(ids, cache, packed);
    // Within the window, sliding-window attention is full attention; beyond it, refused rather than wrong.
    TORCH_CHECK(s_.sliding_window == 0 || positions.span <= s_.sliding_window, source_, ": ", positions.span,
                " positions exceed the model's sliding_window of ", s_.sliding_window,
                "; sliding-window attention beyond the window is not supported (hint: shorten the sequences)");
    auto x = model_->embed_tokens(ids);
    // cos/sin in fp32 as transformers computes them, then cast to the activations' dtype.
    const auto inv_freq =
        1.0 / at::pow(s_.rope_theta, at::arange(0, s_.head_dim, 2, ids.options().dtype(at::kLong)).to(at::kFloat) /
                                         static_cast<double>(s_.head_dim));
    // (1 or batch, 1, t, head_dim / 2): broadcast over the heads of q and k.
    const auto freqs = (positions.ids.to(at::kFloat).unsqueeze(-1) * inv_freq).unsqueeze(1);
    const auto emb = at::cat({freqs, freqs}, -1);
    const auto cos = emb.cos().to(x.scalar_type()), sin = emb.sin().to(x.scalar_type());
    BlockRunner run(*this, cache, packed);
    for (size_t i = 0; i < model_->layers->size(); ++i) {
      auto layer = model_->layers->ptr<LlamaDecoderLayerImpl>(i);
      x = run(x, [layer, cos, sin, i](const at::Tensor& in, KVCache* c, const PackedLayout* p) {
        return layer->forward(in, cos, sin, c, i, p);
      });
    }
    return model_->norm(x);
  }

 private:
  LlamaSizes s_;
  std::string source_;
  LlamaBody model_{nullptr};
};

}  // namespace

std::shared_ptr<CausalLM> make_llama(const ModelConfig& config, at::ScalarType dtype) {
  return std::make_shared<LlamaForCausalLM>(config, dtype);
}

}  // namespace tiedlora::llm::models
