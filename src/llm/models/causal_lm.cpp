// causal_lm.cpp: GPT-2 and Llama in the LibTorch C++ frontend with Hugging Face names, their config
// parsing, checkpoint loading and greedy generation (see tiedlora/llm/causal_lm.h).
#include "tiedlora/llm/causal_lm.h"


#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <map>
#include <numeric>
#include <optional>
#include <set>
#include <sstream>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/normalization.h>

#include "llm/models/activation_checkpoint.h"
#include "tiedlora/core/error.h"
#include "tiedlora/core/inject.h"
#include "tiedlora/formats/gguf.h"
#include "tiedlora/formats/gguf_tensor.h"
#include "tiedlora/formats/hf_config.h"
#include "tiedlora/formats/safetensors.h"
#include "tiedlora/core/modules.h"
#include "util/files.h"
#include "util/text.h"

namespace tiedlora::models {
namespace {

using nlohmann::json;

// The architecture-independent facts, from the one description of the model (tiedlora/formats/hf_config.h).
ModelInfo info_from(const ModelConfig& c) {
  ModelInfo info;
  info.model_type = c.family == ModelConfig::Family::gpt2 ? "gpt2" : "llama";
  info.vocab_size = c.vocab_size;
  info.num_layers = c.num_layers;
  info.max_positions = c.max_positions;
  info.eos_token_ids = c.eos_token_ids;
  info.bos_token_id = c.bos_token_id;
  info.tie_word_embeddings = c.tie_word_embeddings;
  info.fan_in_fan_out = c.family == ModelConfig::Family::gpt2;
  info.config_json = c.json_text;
  return info;
}

// Layers whose tensors are made in the model's dtype (a bf16 model never exists in fp32 first, which would
// set the peak memory; transformers' from_pretrained(torch_dtype=...) does the same). The norms are small
// and are converted after construction.
LoraLinear linear(int64_t in, int64_t out, bool bias, at::ScalarType dtype) {
  return LoraLinear(LoraLinearOptions(in, out).bias(bias).dtype(dtype));
}

torch::nn::Embedding embedding(int64_t count, int64_t dim, at::ScalarType dtype) {
  at::Tensor weight = at::empty({count, dim}, at::TensorOptions(dtype));
  {
    at::NoGradGuard no_grad;
    weight.normal_();  // torch::nn::Embedding's initialisation
  }
  return torch::nn::Embedding(torch::nn::EmbeddingOptions(count, dim)._weight(weight));
}

// Causal mask for `tokens` new positions after `past` cached ones: position i sees keys 0..past+i.
at::Tensor causal_mask(int64_t tokens, int64_t past, const at::TensorOptions& options) {
  const auto rows = at::arange(tokens, options.dtype(at::kLong)).unsqueeze(1) + past;
  const auto cols = at::arange(past + tokens, options.dtype(at::kLong)).unsqueeze(0);
  return cols <= rows;  // bool, true = attend
}

// Positions of the t tokens that follow `past` cached ones: (1, t) past..past+t-1, or (batch, t) from the
// cache's attention mask, where real tokens count from 0 and padding sits at 0.
at::Tensor token_positions(const at::Tensor& ids, const KVCache* cache, int64_t past, int64_t t) {
  if (!cache || !cache->attention_mask.defined()) return at::arange(past, past + t, ids.options().dtype(at::kLong)).unsqueeze(0);
  const at::Tensor& mask = cache->attention_mask;
  TORCH_CHECK(mask.dim() == 2 && mask.size(1) == past + t, "KVCache::attention_mask must be (batch, ", past + t,
              "), got ", mask.sizes());
  return (mask.to(at::kLong).cumsum(1) - 1).clamp_min(0).narrow(1, past, t);
}

// Positions of packed rows, restarting at 0 in each segment, 0 in the padding after them: (rows, width).
at::Tensor packed_positions(const PackedLayout& layout, int64_t width, const at::Device& device) {
  std::vector<int64_t> positions;
  positions.reserve(layout.segment_lengths.size() * static_cast<size_t>(width));
  for (const auto& row : layout.segment_lengths) {
    const size_t row_start = positions.size();
    for (int64_t length : row) {
      for (int64_t j = 0; j < length; ++j) positions.push_back(j);
    }
    positions.resize(row_start + static_cast<size_t>(width), 0);
  }
  return at::tensor(positions, at::kLong).view({static_cast<int64_t>(layout.segment_lengths.size()), width}).to(device);
}

int64_t longest_segment(const PackedLayout& layout) {
  int64_t longest = 0;
  for (const auto& row : layout.segment_lengths) {
    for (int64_t length : row) longest = std::max(longest, length);
  }
  return longest;
}

// The positions of the tokens of one forward pass and the longest run of positions any sequence in it
// spans (what a learned position table or a sliding window must cover).
struct Positions {
  at::Tensor ids;
  int64_t span = 0;
};
Positions positions_of(const at::Tensor& input_ids, const KVCache* cache, const PackedLayout* packed) {
  const int64_t t = input_ids.size(1);
  if (packed) return {packed_positions(*packed, t, input_ids.device()), longest_segment(*packed)};
  const int64_t past = cache ? cache->length() : 0;
  return {token_positions(input_ids, cache, past, t), past + t};
}

// Causal attention within each segment of packed rows, one segment at a time: the work is the sum of the
// squared segment lengths, never the square of the row (a block-diagonal mask over the row would compute
// every masked score).
at::Tensor attend_packed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const PackedLayout& layout) {
  std::vector<at::Tensor> rows;
  for (int64_t r = 0; r < q.size(0); ++r) {
    // One split per tensor (its backward is one concatenation), not a narrow per segment (whose backward
    // would write a zero tensor of the whole row for every segment).
    const auto& examples = layout.segment_lengths[static_cast<size_t>(r)];
    const int64_t padding = q.size(2) - std::accumulate(examples.begin(), examples.end(), int64_t{0});
    std::vector<int64_t> lengths = examples;
    if (padding > 0) lengths.push_back(padding);
    auto segments = [&](const at::Tensor& z) {
      return (q.size(0) == 1 ? z : z.narrow(0, r, 1)).split_with_sizes(lengths, 2);  // one row: no narrow (its backward copies)
    };
    const auto qs = segments(q), ks = segments(k), vs = segments(v);
    std::vector<at::Tensor> parts;
    for (size_t i = 0; i < examples.size(); ++i) {
      parts.push_back(at::scaled_dot_product_attention(qs[i], ks[i], vs[i], {}, 0.0, /*is_causal=*/examples[i] > 1));
    }
    if (padding > 0) parts.push_back(at::zeros_like(qs.back()));  // the padding: no attention work
    rows.push_back(parts.size() == 1 ? parts.front() : at::cat(parts, 2));
  }
  return rows.size() == 1 ? rows.front() : at::cat(rows, 0);
}

// Attention over (batch, heads, tokens, head_dim) with the cache extended in place, or within the segments
// of packed rows.
at::Tensor attend(at::Tensor q, at::Tensor k, at::Tensor v, KVCache* cache, size_t layer, const PackedLayout* packed) {
  int64_t past = 0;
  if (cache) {
    if (cache->keys.size() <= layer) {
      cache->keys.resize(layer + 1);
      cache->values.resize(layer + 1);
    }
    if (cache->keys[layer].defined()) {
      past = cache->keys[layer].size(2);
      k = at::cat({cache->keys[layer], k}, 2);
      v = at::cat({cache->values[layer], v}, 2);
    }
    cache->keys[layer] = k;
    cache->values[layer] = v;
  }
  if (k.size(1) != q.size(1)) {  // grouped-query attention: each kv head serves q_heads / kv_heads heads
    const int64_t repeat = q.size(1) / k.size(1);
    k = k.repeat_interleave(repeat, 1);
    v = v.repeat_interleave(repeat, 1);
  }
  if (packed) return attend_packed(q, k, v, *packed);
  const int64_t tokens = q.size(2);
  if (cache && cache->attention_mask.defined()) {
    // Left-padded rows: no query sees a padding key; each query also sees itself, so a padding query
    // (whose outputs nobody reads) never has an all-masked row, which would give NaN.
    const auto& keep = cache->attention_mask;
    TORCH_CHECK(keep.dim() == 2 && keep.size(0) == q.size(0) && keep.size(1) == past + tokens,
                "KVCache::attention_mask must be (batch, ", past + tokens, "), got ", keep.sizes());
    const auto causal = causal_mask(tokens, past, q.options());
    const auto self = at::arange(past + tokens, q.options().dtype(at::kLong)).unsqueeze(0) ==
                      (at::arange(tokens, q.options().dtype(at::kLong)).unsqueeze(1) + past);
    const auto mask = (causal.unsqueeze(0) & keep.to(at::kBool).unsqueeze(1)) | self.unsqueeze(0);
    return at::scaled_dot_product_attention(q, k, v, mask.unsqueeze(1));
  }
  if (past == 0) return at::scaled_dot_product_attention(q, k, v, {}, 0.0, /*is_causal=*/tokens > 1);
  if (tokens == 1) return at::scaled_dot_product_attention(q, k, v);
  return at::scaled_dot_product_attention(q, k, v, causal_mask(tokens, past, q.options()));
}

// Runs the decoder blocks of one forward pass, each under activation checkpointing when the model asks for
// it (training with gradients, no KV cache), else directly.
class BlockRunner {
 public:
  BlockRunner(const CausalLM& model, KVCache* cache, const PackedLayout* packed) : cache_(cache), packed_(packed) {
    if (!model.activation_checkpointing() || !model.is_training() || !at::GradMode::is_enabled() || cache) return;
    checkpoint_ = true;
    // The recomputation runs after this call returns: it keeps its own copy of the layout.
    if (packed) packed_copy_ = std::make_shared<const PackedLayout>(*packed);
    trainable_ = trainable_parameters(model);  // each tensor once: a tie group's shared factors too
  }
  // `block(x, cache, packed)`; a template, so the common path (no checkpointing: inference, decoding) calls
  // it directly, without a std::function per layer; only the checkpointed one keeps a copy for backward.
  template <class Block>
  at::Tensor operator()(const at::Tensor& x, const Block& block) {
    if (!checkpoint_) return block(x, cache_, packed_);
    return detail::checkpointed([block, layout = packed_copy_](const at::Tensor& in) { return block(in, nullptr, layout.get()); },
                                x, trainable_);
  }

 private:
  KVCache* cache_;
  const PackedLayout* packed_;
  bool checkpoint_ = false;
  std::shared_ptr<const PackedLayout> packed_copy_;
  std::vector<at::Tensor> trainable_;
};

// ---- GPT-2 ----------------------------------------------------------------------------------------------

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

class Gpt2LMHead : public CausalLM {
 public:
  Gpt2LMHead(const ModelConfig& c, at::ScalarType dtype) {
    sizes_ = {c.vocab_size, c.max_positions, c.hidden_size, c.num_layers, c.num_heads, c.intermediate_size, c.norm_eps, dtype};
    info_ = info_from(c);
    transformer_ = register_module("transformer", Gpt2Transformer(sizes_));
    lm_head_ = register_module("lm_head", linear(sizes_.dim, sizes_.vocab, false, sizes_.dtype));
    if (info_.tie_word_embeddings) lm_head_->tie_weight_(transformer_->wte->weight);
  }
  at::Tensor logits(const at::Tensor& hidden) override { return lm_head_(hidden); }
  const ModelInfo& info() const override { return info_; }

 protected:
  at::Tensor decode(const at::Tensor& ids, KVCache* cache, const PackedLayout* packed) override {
    const Positions positions = positions_of(ids, cache, packed);
    TORCH_CHECK(positions.span <= sizes_.positions, "GPT-2: ", positions.span, " positions exceed n_positions = ",
                sizes_.positions);
    auto x = transformer_->wte(ids) + transformer_->wpe(positions.ids);
    BlockRunner run(*this, cache, packed);
    for (size_t i = 0; i < transformer_->h->size(); ++i) {
      auto block = transformer_->h->ptr<Gpt2BlockImpl>(i);
      x = run(x, [block, i](const at::Tensor& in, KVCache* c, const PackedLayout* p) { return block->forward(in, c, i, p); });
    }
    return transformer_->ln_f(x);
  }

 private:
  Gpt2Sizes sizes_;
  ModelInfo info_;
  Gpt2Transformer transformer_{nullptr};
  LoraLinear lm_head_{nullptr};
};

// ---- Llama ----------------------------------------------------------------------------------------------

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

class LlamaForCausalLM : public CausalLM {
 public:
  LlamaForCausalLM(const ModelConfig& c, at::ScalarType dtype)
      : s_{c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size,
           c.norm_eps, c.rope_theta, c.qkv_bias, c.o_bias, c.mlp_bias, c.sliding_window, dtype},
        source_(c.source) {
    info_ = info_from(c);
    model_ = register_module("model", LlamaBody(s_));
    lm_head_ = register_module("lm_head", linear(s_.dim, s_.vocab, false, s_.dtype));
    if (info_.tie_word_embeddings) lm_head_->tie_weight_(model_->embed_tokens->weight);
  }
  at::Tensor logits(const at::Tensor& hidden) override { return lm_head_(hidden); }
  const ModelInfo& info() const override { return info_; }

 protected:
  at::Tensor decode(const at::Tensor& ids, KVCache* cache, const PackedLayout* packed) override {
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
  ModelInfo info_;
  LlamaBody model_{nullptr};
  LoraLinear lm_head_{nullptr};
};

// GPT-2's Conv1D layers store their weight (in, out).
bool is_conv1d_weight(const std::string& name) {
  static const std::vector<std::string> suffixes = {".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight",
                                                    ".mlp.c_proj.weight"};
  for (const auto& s : suffixes) {
    if (name.size() >= s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0) return true;
  }
  return false;
}

}  // namespace

at::Tensor CausalLM::hidden_states(const at::Tensor& input_ids, const PackedLayout& layout) {
  TORCH_CHECK(input_ids.dim() == 2, "hidden_states: input_ids must be (rows, tokens), got ", input_ids.sizes());
  if (static_cast<int64_t>(layout.segment_lengths.size()) != input_ids.size(0)) {
    throw ConfigError("PackedLayout: " + std::to_string(layout.segment_lengths.size()) + " rows of segments for " +
                      std::to_string(input_ids.size(0)) + " rows of input_ids");
  }
  for (size_t r = 0; r < layout.segment_lengths.size(); ++r) {
    int64_t sum = 0;
    for (int64_t length : layout.segment_lengths[r]) {
      if (length <= 0) throw ConfigError("PackedLayout: row " + std::to_string(r) + " has a segment of length " + std::to_string(length));
      sum += length;
    }
    if (sum > input_ids.size(1)) {
      throw ConfigError("PackedLayout: the segments of row " + std::to_string(r) + " cover " + std::to_string(sum) +
                        " tokens, the row has " + std::to_string(input_ids.size(1)));
    }
  }
  return decode(input_ids, nullptr, &layout);
}

std::shared_ptr<CausalLM> build_model_from(const ModelConfig& config, at::ScalarType dtype) {
  TORCH_CHECK(at::isFloatingType(dtype), "build_model: dtype must be floating point, got ", dtype);
  std::shared_ptr<CausalLM> model;
  if (config.family == ModelConfig::Family::gpt2) {
    model = std::make_shared<Gpt2LMHead>(config, dtype);
  } else {
    model = std::make_shared<LlamaForCausalLM>(config, dtype);
  }
  model->to(dtype);
  return model;
}

std::shared_ptr<CausalLM> build_model(const std::string& config_path, at::ScalarType dtype) {
  return build_model_from(read_model_config(config_path), dtype);
}

// ---- GGUF -----------------------------------------------------------------------------------------------

namespace {

// llama.cpp's tensor names -> Hugging Face's, per layer and global.
std::string hf_name_of(const std::string& gguf) {
  static const std::vector<std::pair<std::string, std::string>> global = {
      {"token_embd.weight", "model.embed_tokens.weight"},
      {"output_norm.weight", "model.norm.weight"},
      {"output.weight", "lm_head.weight"}};
  for (const auto& [from, to] : global) {
    if (gguf == from) return to;
  }
  static const std::vector<std::pair<std::string, std::string>> per_layer = {
      {"attn_norm.weight", "input_layernorm.weight"},   {"ffn_norm.weight", "post_attention_layernorm.weight"},
      {"attn_q.weight", "self_attn.q_proj.weight"},     {"attn_k.weight", "self_attn.k_proj.weight"},
      {"attn_v.weight", "self_attn.v_proj.weight"},     {"attn_output.weight", "self_attn.o_proj.weight"},
      {"ffn_gate.weight", "mlp.gate_proj.weight"},      {"ffn_up.weight", "mlp.up_proj.weight"},
      {"ffn_down.weight", "mlp.down_proj.weight"}};
  if (gguf.rfind("blk.", 0) != 0) return "";
  const auto dot = gguf.find('.', 4);
  if (dot == std::string::npos) return "";
  const std::string layer = gguf.substr(4, dot - 4), rest = gguf.substr(dot + 1);
  for (const auto& [from, to] : per_layer) {
    if (rest == from) return "model.layers." + layer + "." + to;
  }
  return "";
}

}  // namespace

std::shared_ptr<CausalLM> load_gguf_model(const std::string& path, at::ScalarType dtype) {
  const io::GgufFile file = io::GgufFile::open(path);
  const std::string arch = file.get_string("general.architecture");
  if (arch != "llama") {
    throw FormatError(path + ": general.architecture is '" + arch + "'; tiedlora loads Llama-architecture GGUF files");
  }
  auto key = [&](const std::string& name) { return arch + "." + name; };
  json config;
  config["model_type"] = "llama";
  config["hidden_size"] = file.get_uint(key("embedding_length"));
  config["num_hidden_layers"] = file.get_uint(key("block_count"));
  config["intermediate_size"] = file.get_uint(key("feed_forward_length"));
  const uint64_t heads = file.get_uint(key("attention.head_count"));
  const uint64_t kv_heads = file.get_uint(key("attention.head_count_kv"), heads);
  config["num_attention_heads"] = heads;
  config["num_key_value_heads"] = kv_heads;
  if (file.has_key(key("rope.dimension_count"))) config["head_dim"] = file.get_uint(key("rope.dimension_count"));
  config["rope_theta"] = file.get_float(key("rope.freq_base"), 10000.0);
  config["rms_norm_eps"] = file.get_float(key("attention.layer_norm_rms_epsilon"), 1e-6);
  config["vocab_size"] = file.has_key(key("vocab_size")) ? file.get_uint(key("vocab_size"))
                                                         : file.get_strings("tokenizer.ggml.tokens").size();
  config["tie_word_embeddings"] = !file.has_tensor("output.weight");
  if (file.has_key("tokenizer.ggml.bos_token_id")) config["bos_token_id"] = file.get_uint("tokenizer.ggml.bos_token_id");
  if (file.has_key("tokenizer.ggml.eos_token_id")) config["eos_token_id"] = file.get_uint("tokenizer.ggml.eos_token_id");
  // Built in the requested dtype: each tensor is dequantized to fp32 alone and converted as it is copied,
  // so a bf16 load never holds an fp32 model.
  auto model = build_model_from(model_config_from_json(config.dump(), path + " (metadata)"), dtype);

  // Map every tensor first, so that a file that does not fit is refused before anything is copied.
  std::map<std::string, std::string> source_of;  // HF name -> GGUF name
  std::vector<std::string> unexpected;
  for (const auto& info : file.tensors()) {
    const std::string hf = hf_name_of(info.name);
    if (hf.empty()) {
      if (info.name != "rope_freqs.weight") unexpected.push_back(info.name);  // llama.cpp's cache of inv_freq
      continue;
    }
    source_of[hf] = info.name;
  }
  std::vector<std::string> missing;
  std::set<const void*> seen;
  const auto params = model->named_parameters();
  for (const auto& item : params) {
    if (!seen.insert(item.value().unsafeGetTensorImpl()).second) continue;  // the tied head
    if (!source_of.count(item.key())) missing.push_back(item.key());
  }
  for (auto it = source_of.begin(); it != source_of.end();) {  // e.g. blk.N.* beyond block_count
    if (params.contains(it->first)) {
      ++it;
    } else {
      unexpected.push_back(it->second);
      it = source_of.erase(it);
    }
  }
  if (!missing.empty() || !unexpected.empty()) {
    std::string message = path + ": the GGUF does not fit a Llama model of its own metadata;";
    for (const auto& m : missing) message += " missing '" + m + "'";
    for (const auto& u : unexpected) message += " unexpected '" + u + "'";
    throw FormatError(message + " (hint: is it a Llama-architecture file written by llama.cpp's converter?)");
  }
  at::NoGradGuard no_grad;
  for (const auto& [hf, gguf] : source_of) {
    at::Tensor value = io::load_gguf_tensor(file, gguf, at::kFloat);
    // llama.cpp permutes Q and K rows for its RoPE; HF's rotate_half layout needs them back.
    if (hf.find("self_attn.q_proj.weight") != std::string::npos) value = io::unpermute_llama_qk_rows(value, heads);
    if (hf.find("self_attn.k_proj.weight") != std::string::npos) value = io::unpermute_llama_qk_rows(value, kv_heads);
    const at::Tensor& param = params[hf];
    if (value.sizes() != param.sizes()) {
      std::ostringstream msg;
      msg << path << ": tensor '" << gguf << "' is " << value.sizes() << " but '" << hf << "' needs " << param.sizes();
      throw FormatError(msg.str());
    }
    param.copy_(value);
  }
  return model;
}

void load_hf_weights(CausalLM& model, const std::string& checkpoint_path) {
  const io::Checkpoint checkpoint = io::Checkpoint::open(checkpoint_path);
  const bool gpt2 = model.info().model_type == "gpt2";
  std::set<std::string> unused;
  for (const auto& n : checkpoint.names()) unused.insert(n);
  std::vector<std::string> missing, misshapen;
  std::vector<std::pair<at::Tensor, std::string>> plan;  // parameter, checkpoint name
  std::set<const void*> seen;
  for (const auto& item : model.named_parameters()) {
    const std::string& name = item.key();
    const at::Tensor& param = item.value();
    if (!seen.insert(param.unsafeGetTensorImpl()).second) continue;  // a tied weight, loaded once
    std::string source;
    // Original GPT-2 checkpoints omit the "transformer." prefix.
    for (const std::string& candidate : {name, name.substr(name.find('.') + 1)}) {
      if (checkpoint.contains(candidate)) {
        source = candidate;
        break;
      }
    }
    if (source.empty()) {
      missing.push_back(name);
      continue;
    }
    unused.erase(source);
    auto shape = checkpoint.entry(source).shape;
    if (gpt2 && is_conv1d_weight(name) && shape.size() == 2) std::swap(shape[0], shape[1]);
    if (shape != param.sizes().vec()) {
      std::ostringstream msg;
      msg << source << " is " << at::IntArrayRef(checkpoint.entry(source).shape) << ", the model expects " << param.sizes();
      misshapen.push_back(msg.str());
      continue;
    }
    plan.emplace_back(param, source);
  }
  // A tied model's checkpoint may store the head as well (transformers writes and reads such files): the
  // head is the embedding, so it is accepted when it holds the embedding's values and refused otherwise.
  // (A checkpoint that does not fit at all gets the general error below.)
  if (model.info().tie_word_embeddings && unused.count("lm_head.weight") && missing.empty() && misshapen.empty()) {
    std::string embedding;
    for (const char* candidate : {"model.embed_tokens.weight", "transformer.wte.weight", "wte.weight"}) {
      if (checkpoint.contains(candidate)) embedding = candidate;
    }
    if (embedding.empty() || !at::equal(checkpoint.tensor("lm_head.weight"), checkpoint.tensor(embedding))) {
      throw FormatError(checkpoint_path + ": config.json ties lm_head to the token embedding, but the checkpoint's "
                        "'lm_head.weight' is not the embedding" + (embedding.empty() ? "" : " '" + embedding + "'") +
                        " (hint: set tie_word_embeddings to false in config.json if the head is its own)");
    }
    unused.erase("lm_head.weight");
  }
  // Buffers some checkpoints carry: GPT-2's attention masks, rotary inverse frequencies.
  for (auto it = unused.begin(); it != unused.end();) {
    const std::string& n = *it;
    const bool buffer = n.find("attn.bias") != std::string::npos || n.find("attn.masked_bias") != std::string::npos ||
                        n.find("rotary_emb.inv_freq") != std::string::npos;
    it = buffer ? unused.erase(it) : std::next(it);
  }
  if (!missing.empty() || !misshapen.empty() || !unused.empty()) {
    std::ostringstream msg;
    msg << checkpoint_path << ": the checkpoint does not fit the " << model.info().model_type << " model";
    auto list = [&](const char* what, const auto& items) {
      if (items.empty()) return;
      msg << "; " << items.size() << " " << what << ":";
      size_t shown = 0;
      for (const auto& i : items) {
        if (shown++ == 8) {
          msg << " ...";
          break;
        }
        msg << " '" << i << "'";
      }
    };
    list("missing", missing);
    list("misshapen", misshapen);
    list("unexpected", unused);
    msg << " (hint: is config.json the checkpoint's own?)";
    throw FormatError(msg.str());
  }
  at::NoGradGuard no_grad;
  for (auto& [param, source] : plan) {
    at::Tensor value = checkpoint.tensor(source);
    if (gpt2 && is_conv1d_weight(source)) value = value.t();
    param.copy_(value);
  }
}

std::shared_ptr<CausalLM> load_pretrained(const std::string& folder, at::ScalarType dtype) {
  auto model = build_model(folder, dtype);
  load_hf_weights(*model, folder);
  return model;
}

bool is_gguf_path(const std::string& path) {
  return path.size() > 5 && path.compare(path.size() - 5, 5, ".gguf") == 0;
}

std::shared_ptr<CausalLM> load_any(const std::string& path, at::ScalarType dtype) {
  return is_gguf_path(path) ? load_gguf_model(path, dtype) : load_pretrained(path, dtype);
}

namespace {

// Adapter tensors (a LoraLinear's lora_A/B/u/v, the tie groups' shared factors) are not base weights.
bool is_adapter_tensor(const std::string& name) {
  if (name.rfind("tiedlora_groups.", 0) == 0) return true;
  const auto dot = name.rfind('.');
  return name.compare(dot == std::string::npos ? 0 : dot + 1, 5, "lora_") == 0;
}

}  // namespace

void save_pretrained(const CausalLM& model, const std::string& folder, const SavePretrainedOptions& options) {
  const auto& [dtype, overwrite, max_shard_bytes] = options;
  if (util::path_exists(folder) && !overwrite) {
    throw ConfigError(folder + ": already exists (hint: choose another folder or allow overwriting)");
  }
  const ModelInfo& info = model.info();
  if (info.config_json.empty()) throw ConfigError("save_pretrained: the model carries no config.json to write");
  const bool gpt2 = info.model_type == "gpt2";
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  std::set<const void*> seen;
  for (const auto& item : model.named_parameters()) {
    const std::string& name = item.key();
    if (is_adapter_tensor(name)) continue;
    if (!seen.insert(item.value().unsafeGetTensorImpl()).second) continue;  // a tied head: stored once
    at::Tensor value = item.value().detach().to(at::kCPU);
    if (dtype && value.is_floating_point()) value = value.to(*dtype);
    if (gpt2 && is_conv1d_weight(name)) value = value.t();
    tensors.emplace_back(name, value.contiguous());
  }
  util::StagedDirectory staged(folder);
  const std::string config = info.config_json + "\n";
  util::write_file_atomically(util::join_path(staged.path(), "config.json"),
                              [&](const util::ByteWriter& write) { write(config.data(), config.size()); });
  io::save_sharded_safetensors(staged.path(), tensors, max_shard_bytes, {{"format", "pt"}});
  staged.publish(overwrite);
}

std::string chat_template_of(const std::string& model) {
  if (is_gguf_path(model)) {
    const io::GgufFile file = io::GgufFile::open(model);
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

std::vector<std::vector<int64_t>> generate_greedy_batch(CausalLM& model, const std::vector<std::vector<int64_t>>& prompts,
                                                        const GenerateOptions& options) {
  if (prompts.empty()) return {};
  const std::vector<int64_t> stops = options.stop_token_ids.empty() ? model.info().eos_token_ids : options.stop_token_ids;
  at::NoGradGuard no_grad;
  const EvalModeGuard eval_mode(model);
  const auto device = model.parameters().front().device();
  const int64_t n = static_cast<int64_t>(prompts.size());
  size_t longest = 0, shortest = SIZE_MAX;
  for (const auto& p : prompts) {
    TORCH_CHECK(!p.empty(), "generate_greedy_batch: prompt ", &p - prompts.data(), " is empty");
    longest = std::max(longest, p.size());
    shortest = std::min(shortest, p.size());
  }
  // Left padding (with token 0, never attended) puts every prompt's last token in the last column.
  at::Tensor ids = at::zeros({n, static_cast<int64_t>(longest)}, at::kLong);
  at::Tensor mask = at::zeros({n, static_cast<int64_t>(longest)}, at::kBool);
  for (int64_t i = 0; i < n; ++i) {
    const auto& p = prompts[i];
    const int64_t offset = static_cast<int64_t>(longest - p.size());
    ids[i].narrow(0, offset, static_cast<int64_t>(p.size())).copy_(at::tensor(p, at::kLong));
    mask[i].narrow(0, offset, static_cast<int64_t>(p.size())).fill_(true);
  }
  // Each prompt's adapter for every forward of the decoding, prefill and steps alike (the batch keeps its
  // rows until the end, so the routing never changes).
  // Without prompt adapters, the active adapters for every row, whatever routing the caller has in force.
  if (!options.prompt_adapters.empty() && static_cast<int64_t>(options.prompt_adapters.size()) != n) {
    throw ConfigError("generate_greedy_batch: " + std::to_string(options.prompt_adapters.size()) +
                      " prompt adapters for " + std::to_string(n) + " prompts");
  }
  const RowAdaptersScope routing(options.prompt_adapters.empty() ? nullptr : route_rows(model, options.prompt_adapters));
  KVCache cache;
  const bool padded = shortest < longest;  // without padding, no mask: each row runs exactly as alone
  if (padded) cache.attention_mask = mask.to(device);
  at::Tensor input = ids.to(device);
  std::vector<std::vector<int64_t>> out(n);
  std::vector<bool> done(n, false);
  int64_t remaining = n;
  const int64_t limit = model.info().max_positions;
  for (int64_t step = 0; step < options.max_new_tokens && remaining > 0; ++step) {
    if (limit > 0 && cache.length() + input.size(1) > limit) break;
    const at::Tensor logits = model.forward(input, &cache);
    const at::Tensor next = logits.select(1, logits.size(1) - 1).argmax(-1).cpu();
    const auto next_ids = next.accessor<int64_t, 1>();
    for (int64_t i = 0; i < n; ++i) {
      if (done[i]) continue;
      out[i].push_back(next_ids[i]);
      if (std::find(stops.begin(), stops.end(), next_ids[i]) != stops.end()) {
        done[i] = true;
        --remaining;
      }
    }
    input = next.unsqueeze(1).to(device);
    if (padded) cache.attention_mask = at::cat({cache.attention_mask, at::ones({n, 1}, cache.attention_mask.options())}, 1);
  }
  return out;
}

std::vector<int64_t> generate_greedy(CausalLM& model, const std::vector<int64_t>& prompt, const GenerateOptions& options) {
  TORCH_CHECK(!prompt.empty(), "generate_greedy: the prompt is empty");
  return generate_greedy_batch(model, {prompt}, options).front();
}

}  // namespace tiedlora::models
