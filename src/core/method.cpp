// method.cpp: parsing of adapter methods and the parameter counts of docs/method.md.
#include "tiedlora/core/method.h"

#include <cmath>

#include "tiedlora/core/error.h"

namespace tiedlora {
namespace {

constexpr const char* kAcceptedForms =
    "accepted: lora, tied-ab, tied-abuv, tied-uv, or tied-<mask> / untied-<mask> where <mask> lists the "
    "trained components among a, b, u, v (e.g. tied-bv, untied-abuv)";

}  // namespace

AdapterMethod AdapterMethod::parse(const std::string& text) {
  if (text == "lora") return lora();
  AdapterMethod method;
  std::string mask;
  if (text.rfind("tied-", 0) == 0) {
    method.tied = true;
    mask = text.substr(5);
  } else if (text.rfind("untied-", 0) == 0) {
    method.tied = false;
    mask = text.substr(7);
  } else {
    throw ConfigError("unknown adapter method '" + text + "' (" + kAcceptedForms + ")");
  }
  method.train_a = method.train_b = method.train_u = method.train_v = false;
  for (char c : mask) {
    bool* flag = nullptr;
    switch (c) {
      case 'a':
      case 'A': flag = &method.train_a; break;
      case 'b':
      case 'B': flag = &method.train_b; break;
      case 'u':
      case 'U': flag = &method.train_u; break;
      case 'v':
      case 'V': flag = &method.train_v; break;
      default:
        throw ConfigError("adapter method '" + text + "': '" + std::string(1, c) + "' is not one of a, b, u, v (" +
                          kAcceptedForms + ")");
    }
    if (*flag) throw ConfigError("adapter method '" + text + "' names '" + std::string(1, c) + "' twice");
    *flag = true;
  }
  method.validate();
  return method;
}

std::string AdapterMethod::name() const {
  if (is_plain_lora()) return "lora";
  std::string out = tied ? "tied-" : "untied-";
  if (train_a) out += 'a';
  if (train_b) out += 'b';
  if (train_u) out += 'u';
  if (train_v) out += 'v';
  return out;
}

AdapterMethod::ZeroFactor AdapterMethod::zero_factor() const {
  validate();
  return train_v ? ZeroFactor::v : ZeroFactor::b;
}

void AdapterMethod::validate() const {
  if (!train_a && !train_b && !train_u && !train_v) {
    throw ConfigError("adapter method '" + name() + "' trains none of A, B, u, v");
  }
  if (!train_v && !train_b) {
    throw ConfigError("adapter method '" + name() +
                      "' trains neither B nor v: tiedlora starts the update at zero by zeroing a trained "
                      "output-side factor (v, else B, as PEFT zeros B), and a non-zero start would change the "
                      "model before training (hint: add b or v to the mask, e.g. '" +
                      std::string(tied ? "tied-" : "untied-") + (train_a ? "a" : "") + "b" + (train_u ? "u" : "") +
                      "')");
  }
}

int64_t trainable_parameter_count(const AdapterMethod& method, int64_t rank, int64_t layers, LinearShape shape) {
  const int64_t factor_copies = method.tied ? 1 : layers;
  int64_t count = 0;
  if (method.train_a) count += factor_copies * rank * shape.in_features;
  if (method.train_b) count += factor_copies * rank * shape.out_features;
  if (method.train_u) count += layers * rank;
  if (method.train_v) count += layers * shape.out_features;
  return count;
}

int64_t stored_parameter_count(const AdapterMethod& method, int64_t rank, int64_t layers, LinearShape shape) {
  const int64_t factor_copies = method.tied ? 1 : layers;
  return factor_copies * rank * (shape.in_features + shape.out_features) + (method.has_u() ? layers * rank : 0) +
         (method.has_v() ? layers * shape.out_features : 0);
}

double adapter_scale(double alpha, int64_t rank, bool use_rslora) {
  if (rank <= 0) throw ConfigError("adapter rank must be positive, got " + std::to_string(rank));
  return use_rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / static_cast<double>(rank);
}

}  // namespace tiedlora
