// attention.cpp: the positions of a forward pass (learned or rotary, with a KV cache, left padding or packed
// rows), causal attention over them (the cache extended in place, grouped-query heads, per-segment attention
// of packed rows), and the check of a PackedLayout (CausalLM::hidden_states).
#include <algorithm>
#include <numeric>
#include <string>

#include <ATen/ATen.h>

#include "llm/models/decoder.h"
#include "tiedlora/core/error.h"

namespace tiedlora::llm::models {
namespace {

// Causal mask for `tokens` new positions after `past` cached ones: position i sees keys 0..past+i.
at::Tensor causal_mask(int64_t tokens, int64_t past, const at::TensorOptions& options) {
  const auto rows = at::arange(tokens, options.dtype(at::kLong)).unsqueeze(1) + past;
  const auto cols = at::arange(past + tokens, options.dtype(at::kLong)).unsqueeze(0);
  return cols <= rows;  // bool, true = attend
}

// Positions of the t tokens that follow `past` cached ones: (1, t) past..past+t-1, or (batch, t) from the
// cache's attention mask, where real tokens count from 0 and padding sits at 0.
at::Tensor token_positions(const at::Tensor& ids, const KVCache* cache, int64_t past, int64_t t) {
  if (!cache || !cache->attention_mask.defined())
    return at::arange(past, past + t, ids.options().dtype(at::kLong)).unsqueeze(0);
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
      return (q.size(0) == 1 ? z : z.narrow(0, r, 1))
          .split_with_sizes(lengths, 2);  // one row: no narrow (its backward copies)
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

}  // namespace

Positions positions_of(const at::Tensor& input_ids, const KVCache* cache, const PackedLayout* packed) {
  const int64_t t = input_ids.size(1);
  if (packed) return {packed_positions(*packed, t, input_ids.device()), longest_segment(*packed)};
  const int64_t past = cache ? cache->length() : 0;
  return {token_positions(input_ids, cache, past, t), past + t};
}

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

at::Tensor CausalLM::hidden_states(const at::Tensor& input_ids, const PackedLayout& layout) {
  TORCH_CHECK(input_ids.dim() == 2, "hidden_states: input_ids must be (rows, tokens), got ", input_ids.sizes());
  if (static_cast<int64_t>(layout.segment_lengths.size()) != input_ids.size(0)) {
    throw ConfigError("PackedLayout: " + std::to_string(layout.segment_lengths.size()) + " rows of segments for " +
                      std::to_string(input_ids.size(0)) + " rows of input_ids");
  }
  for (size_t r = 0; r < layout.segment_lengths.size(); ++r) {
    int64_t sum = 0;
    for (int64_t length : layout.segment_lengths[r]) {
      if (length <= 0)
        throw ConfigError("PackedLayout: row " + std::to_string(r) + " has a segment of length " +
                          std::to_string(length));
      sum += length;
    }
    if (sum > input_ids.size(1)) {
      throw ConfigError("PackedLayout: the segments of row " + std::to_string(r) + " cover " + std::to_string(sum) +
                        " tokens, the row has " + std::to_string(input_ids.size(1)));
    }
  }
  return forward_hidden(input_ids, nullptr, &layout);
}

}  // namespace tiedlora::llm::models
