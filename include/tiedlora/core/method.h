// tiedlora/core/method.h: the adapter method — tied or not, and which of A, B, u, v train — and the
// parameter counts that follow from it (docs/method.md). Torch-free.
//
//   LoRA:      y = x W^T + s (x A^T) B^T
//   Tied-LoRA: y = x W^T + s (((x A^T) * u) B^T) * v      A, B shared by a tie group; u, v per layer
//
// A method is written `lora`, or `tied-<trained>` / `untied-<trained>` where <trained> lists the trained
// components among a, b, u, v in any order: `tied-ab` (the paper's TL5), `tied-abuv` (TL6), `tied-uv`
// (VeRA-like), `tied-bv`, `untied-abuv`, ... `lora` is `untied-ab`. A frozen u or v is fixed at 1 and not
// stored; a frozen A or B keeps its random initial value and is stored (it is part of the adapter).
#pragma once

#include <cstdint>
#include <string>

namespace tiedlora {

/// Which components of the adapter exist as trained parameters, and whether A and B are shared.
struct AdapterMethod {
  bool tied = false;
  bool train_a = true;
  bool train_b = true;
  bool train_u = false;
  bool train_v = false;

  AdapterMethod() = default;
  /// The method named `name` (parse()); implicit, as torch::Device is from "cuda", so that options read
  /// `.method("tied-abuv")`.
  AdapterMethod(const std::string& name) : AdapterMethod(parse(name)) {}  // NOLINT(google-explicit-constructor)
  AdapterMethod(const char* name) : AdapterMethod(parse(name)) {}         // NOLINT(google-explicit-constructor)

  /// Parses `lora`, `tied-ab`, `tied-abuv`, `tied-uv`, `tied-<mask>` or `untied-<mask>`; throws
  /// tiedlora::ConfigError naming the text and listing the accepted forms.
  static AdapterMethod parse(const std::string& text);
  static AdapterMethod lora() { return {}; }

  /// The canonical name: `lora` for untied-ab, otherwise `tied-`/`untied-` and the mask in a, b, u, v order.
  std::string name() const;
  /// True for plain per-layer LoRA (untied, A and B trained, no u or v).
  bool is_plain_lora() const { return !tied && train_a && train_b && !train_u && !train_v; }
  /// u and v exist (as tensors) only when they train; frozen ones are fixed at 1.
  bool has_u() const { return train_u; }
  bool has_v() const { return train_v; }

  /// Initialisation rule (docs/method.md): the zero goes on exactly one trained output-side factor, v when v
  /// trains, else B when B trains. With neither, the delta cannot start at 0 with a gradient: the method
  /// is refused (ConfigError with the reason and the fix).
  enum class ZeroFactor { v, b };
  ZeroFactor zero_factor() const;
  /// Throws ConfigError when the method trains nothing or cannot start from a zero delta.
  void validate() const;

  bool operator==(const AdapterMethod& o) const {
    return tied == o.tied && train_a == o.train_a && train_b == o.train_b && train_u == o.train_u &&
           train_v == o.train_v;
  }
};

/// Shape of one adapted linear layer, d_in -> d_out.
struct LinearShape {
  int64_t in_features = 0;
  int64_t out_features = 0;
};

/// Trainable parameters of a group of `layers` layers of one shape under `method` at rank `rank`
/// (docs/method.md's table). For an untied method each layer has its own A and B.
int64_t trainable_parameter_count(const AdapterMethod& method, int64_t rank, int64_t layers, LinearShape shape);

/// Parameters the adapter stores (trained and frozen: a frozen random A or B is stored once per group).
int64_t stored_parameter_count(const AdapterMethod& method, int64_t rank, int64_t layers, LinearShape shape);

/// Scale s of the low-rank update: alpha / rank, or alpha / sqrt(rank) with rsLoRA.
double adapter_scale(double alpha, int64_t rank, bool use_rslora);

}  // namespace tiedlora
