// modules.cpp: LoraLinear and TiedLoraFactors (see tiedlora/core/modules.h).
#include "tiedlora/core/modules.h"

#include <cmath>
#include <ostream>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/init.h>

#include "tiedlora/core/error.h"
#include "tiedlora/core/functional.h"

namespace tiedlora {
namespace {

// Initial values are drawn on the CPU from a seeded generator when a seed is given (so that a seed gives
// the same adapter on every device), else from the global generator of the target device.
// The user's seed mixed with a stream name (FNV-1a), so that layers seeded alike draw different values.
uint64_t stream_seed(uint64_t seed, const std::string& stream) {
  if (stream.empty()) return seed;
  uint64_t h = 1469598103934665603ull ^ seed;
  for (unsigned char c : stream) h = (h ^ c) * 1099511628211ull;
  return h;
}

class Initializer {
 public:
  Initializer(const LoraOptions& lora, at::Device device) : dtype_(lora.dtype()), device_(device) {
    if (lora.seed()) generator_ = at::make_generator<at::CPUGeneratorImpl>(stream_seed(*lora.seed(), lora.seed_stream()));
  }
  at::Tensor uniform(at::IntArrayRef shape, double bound) {
    if (!generator_) return at::empty(shape, at::TensorOptions(dtype_).device(device_)).uniform_(-bound, bound);
    return at::empty(shape, at::TensorOptions(dtype_)).uniform_(-bound, bound, *generator_).to(device_);
  }
  at::Tensor normal(at::IntArrayRef shape, double std) {
    if (!generator_) return at::empty(shape, at::TensorOptions(dtype_).device(device_)).normal_(0.0, std);
    return at::empty(shape, at::TensorOptions(dtype_)).normal_(0.0, std, *generator_).to(device_);
  }
  at::Tensor full(at::IntArrayRef shape, double value) {
    return at::full(shape, value, at::TensorOptions(dtype_).device(device_));
  }

 private:
  at::ScalarType dtype_;
  at::Device device_;
  std::optional<at::Generator> generator_;
};

// A per docs/method.md: kaiming-uniform (bound 1/sqrt(d_in)) or gaussian with standard deviation 1/r.
// B: zero when it carries the zero of the update, else kaiming-uniform over its fan-in r.
at::Tensor initial_a(Initializer& init, const LoraOptions& lora, int64_t in_features) {
  if (lora.init() == LoraInit::gaussian) return init.normal({lora.rank(), in_features}, 1.0 / lora.rank());
  return init.uniform({lora.rank(), in_features}, 1.0 / std::sqrt(static_cast<double>(in_features)));
}
at::Tensor initial_b(Initializer& init, const LoraOptions& lora, const AdapterMethod& method, int64_t out_features) {
  if (method.zero_factor() == AdapterMethod::ZeroFactor::b) return init.full({out_features, lora.rank()}, 0.0);
  return init.uniform({out_features, lora.rank()}, 1.0 / std::sqrt(static_cast<double>(lora.rank())));
}

}  // namespace

// ---- LoraOptions ----------------------------------------------------------------------------------------

double LoraOptions::scale() const { return adapter_scale(effective_alpha(), rank_, use_rslora_); }

void LoraOptions::validate() const {
  if (rank_ <= 0) throw ConfigError("adapter rank must be positive, got " + std::to_string(rank_));
  if (!(dropout_ >= 0.0 && dropout_ < 1.0)) {
    throw ConfigError("adapter dropout must be in [0, 1), got " + std::to_string(dropout_));
  }
  if (!at::isFloatingType(dtype_)) {
    throw ConfigError(std::string("adapter dtype must be floating point, got ") + c10::toString(dtype_));
  }
  if (alpha_ && !(std::isfinite(*alpha_) && *alpha_ > 0)) {
    throw ConfigError("adapter alpha must be a positive finite number (zero or negative disables or inverts the "
                      "adapter), got " + std::to_string(*alpha_));
  }
}

// ---- TiedLoraFactors ------------------------------------------------------------------------------------

TiedLoraFactorsImpl::TiedLoraFactorsImpl(TiedLoraFactorsOptions options_) : options(std::move(options_)) {
  options.lora().validate();
  options.method().validate();
  if (options.method().is_plain_lora()) {
    throw ConfigError("TiedLoraFactors: method 'lora' has no shared factors (hint: plain LoRA layers own their A "
                      "and B: use LoraLinear(base, LoraOptions(r)), or a tied method such as 'tied-abuv')");
  }
  TORCH_CHECK(options.in_features() > 0 && options.out_features() > 0,
              "TiedLoraFactors: in_features and out_features must be positive, got ", options.in_features(), " and ",
              options.out_features());
  reset();
}

void TiedLoraFactorsImpl::reset() {
  owned_ = false;  // a fresh (or cloned) pair of factors belongs to nobody yet
  const int64_t r = options.lora().rank();
  const auto type = at::TensorOptions(options.lora().dtype());
  lora_A = register_parameter("lora_A", at::empty({r, options.in_features()}, type), options.method().train_a);
  lora_B = register_parameter("lora_B", at::empty({options.out_features(), r}, type), options.method().train_b);
  reset_parameters();
}

void TiedLoraFactorsImpl::reset_parameters() {
  at::NoGradGuard no_grad;
  Initializer init(options.lora(), lora_A.device());
  lora_A.copy_(initial_a(init, options.lora(), options.in_features()));
  lora_B.copy_(initial_b(init, options.lora(), options.method(), options.out_features()));
}

void TiedLoraFactorsImpl::pretty_print(std::ostream& stream) const {
  stream << "tiedlora::TiedLoraFactors(in_features=" << options.in_features()
         << ", out_features=" << options.out_features() << ", rank=" << options.lora().rank()
         << ", method=" << options.method().name() << ")";
}

// ---- LoraLinear -----------------------------------------------------------------------------------------

LoraLinearImpl::LoraLinearImpl(LoraLinearOptions options_) : options(std::move(options_)) {
  TORCH_CHECK(options.in_features() > 0 && options.out_features() > 0,
              "LoraLinear: in_features and out_features must be positive, got ", options.in_features(), " and ",
              options.out_features());
  if (options.lora()) {
    options.lora()->validate();
    kind_ = AdapterKind::lora;
    lora_ = *options.lora();
  }
  reset();
}

LoraLinearImpl::LoraLinearImpl(const torch::nn::LinearOptions& linear)
    : LoraLinearImpl(LoraLinearOptions(linear.in_features(), linear.out_features()).bias(linear.bias()).lora(std::nullopt)) {}

LoraLinearImpl::LoraLinearImpl(const torch::nn::Linear& base)
    : options(LoraLinearOptions(base->options.in_features(), base->options.out_features())
                  .bias(base->options.bias())
                  .lora(std::nullopt)) {
  wrapped_weight_ = base->weight;
  wrapped_bias_ = base->bias;
  reset();
}

LoraLinearImpl::LoraLinearImpl(const torch::nn::Linear& base, const LoraOptions& lora) : LoraLinearImpl(base) {
  attach_lora(lora);
}

LoraLinearImpl::LoraLinearImpl(const torch::nn::Linear& base, TiedLoraFactors factors) : LoraLinearImpl(base) {
  attach_tied(std::move(factors));
}

LoraLinearImpl::~LoraLinearImpl() {
  if (owns_factors_ && factors_) factors_->set_owned(false);
}

void LoraLinearImpl::reset() {
  const int64_t in = options.in_features(), out = options.out_features();
  if (wrapped_weight_.defined()) {
    // Wrapping: share the base layer's tensors (no copy), so the base model sees the same weights.
    weight = register_parameter("weight", wrapped_weight_, /*requires_grad=*/wrapped_weight_.requires_grad());
    bias = options.bias() ? register_parameter("bias", wrapped_bias_, wrapped_bias_.requires_grad())
                          : register_parameter("bias", {}, false);
    wrapped_weight_ = wrapped_bias_ = at::Tensor();
  } else {
    // torch::nn::Linear's initialisation, so that LoraLinear without an adapter is a true drop-in.
    const at::TensorOptions made = options.dtype() ? at::TensorOptions(*options.dtype()) : at::TensorOptions();
    weight = register_parameter("weight", at::empty({out, in}, made));
    bias = options.bias() ? register_parameter("bias", at::empty({out}, made)) : register_parameter("bias", {}, false);
    at::NoGradGuard no_grad;
    torch::nn::init::kaiming_uniform_(weight, std::sqrt(5.0));
    if (bias.defined()) {
      const double bound = 1.0 / std::sqrt(static_cast<double>(in));
      bias.uniform_(-bound, bound);
    }
  }
  if (kind_ != AdapterKind::none) {
    freeze_base();
    register_adapter_tensors();
  }
}

void LoraLinearImpl::freeze_base() {
  weight.requires_grad_(false);
  if (bias.defined()) bias.requires_grad_(false);
}

// Registers and initialises the tensors the current adapter owns: lora_A and lora_B for plain LoRA,
// lora_u and lora_v (when trained) for a tied adapter.
void LoraLinearImpl::register_adapter_tensors() {
  at::NoGradGuard no_grad;
  const int64_t in = options.in_features(), out = options.out_features(), r = lora_.rank();
  Initializer init(lora_, weight.device());
  if (kind_ == AdapterKind::lora) {
    own_a_ = register_parameter("lora_A", initial_a(init, lora_, in), /*requires_grad=*/true);
    own_b_ = register_parameter("lora_B", initial_b(init, lora_, method_, out), /*requires_grad=*/true);
  } else if (kind_ == AdapterKind::tied) {
    // u starts at 1; v carries the zero when it trains (docs/method.md's rule).
    if (method_.has_u()) lora_u = register_parameter("lora_u", init.full({r}, 1.0), true);
    if (method_.has_v()) lora_v = register_parameter("lora_v", init.full({out}, 0.0), true);
  }
}

void LoraLinearImpl::attach_lora(const LoraOptions& lora) {
  TORCH_CHECK(kind_ == AdapterKind::none, "LoraLinear::attach_lora: the layer already carries an adapter");
  lora.validate();
  lora_ = lora;
  method_ = AdapterMethod::lora();
  kind_ = AdapterKind::lora;
  freeze_base();
  register_adapter_tensors();
}

void LoraLinearImpl::attach_tied(TiedLoraFactors factors) {
  TORCH_CHECK(kind_ == AdapterKind::none, "LoraLinear::attach_tied: the layer already carries an adapter");
  TORCH_CHECK(!factors.is_empty(), "LoraLinear::attach_tied: factors is an empty holder");
  TORCH_CHECK(factors->options.in_features() == options.in_features() &&
                  factors->options.out_features() == options.out_features(),
              "LoraLinear::attach_tied: factors are ", factors->options.in_features(), " -> ",
              factors->options.out_features(), " but the layer is ", options.in_features(), " -> ",
              options.out_features());
  TORCH_CHECK(factors->lora_A.device() == weight.device(), "LoraLinear::attach_tied: factors are on ",
              factors->lora_A.device(), " but the layer's weight is on ", weight.device(),
              " (hint: move the factors with factors->to(device) first)");
  lora_ = factors->options.lora();
  method_ = factors->options.method();
  factors_ = factors.ptr();
  if (!factors->owned()) {
    // Nobody registers these factors yet: this layer does, so that they train, save and move with it.
    register_module("tied_factors", factors);
    factors->set_owned(true);
    owns_factors_ = true;
  }
  kind_ = AdapterKind::tied;
  freeze_base();
  register_adapter_tensors();
}

void LoraLinearImpl::detach_adapter() {
  unmerge_();
  for (const char* name : {"lora_A", "lora_B", "lora_u", "lora_v"}) {
    if (parameters_.contains(name)) parameters_.erase(name);
  }
  own_a_ = own_b_ = lora_u = lora_v = at::Tensor();
  if (owns_factors_) {
    unregister_module("tied_factors");
    factors_->set_owned(false);  // layers still sharing them are refused by trainable_parameters()
    owns_factors_ = false;
  }
  factors_.reset();
  kind_ = AdapterKind::none;
}

bool LoraLinearImpl::same_configuration(const AdapterMethod& method, const LoraOptions& lora) const {
  return method_ == method && lora_.rank() == lora.rank() && lora_.effective_alpha() == lora.effective_alpha() &&
         lora_.use_rslora() == lora.use_rslora();
}

void LoraLinearImpl::merge_and_detach_() {
  merge_();
  original_weight_ = at::Tensor();  // the merged weight stays; detach_adapter() then has nothing to unmerge
  detach_adapter();
}

void LoraLinearImpl::tie_weight_(const at::Tensor& tied) {
  TORCH_CHECK(tied.sizes() == weight.sizes(), "LoraLinear::tie_weight_: the tied tensor is ", tied.sizes(),
              " but the weight is ", weight.sizes());
  TORCH_CHECK(!merged(), "LoraLinear::tie_weight_: unmerge first");
  parameters_["weight"] = tied;
  weight = tied;
  weight_tied_ = true;
}

const at::Tensor& LoraLinearImpl::lora_A() const { return factors_ ? factors_->lora_A : own_a_; }
const at::Tensor& LoraLinearImpl::lora_B() const { return factors_ ? factors_->lora_B : own_b_; }

std::shared_ptr<torch::nn::Module> LoraLinearImpl::clone(const std::optional<torch::Device>& device) const {
  TORCH_CHECK(!factors_,
              "LoraLinear::clone: this layer uses shared Tied-LoRA factors; a clone would keep training the "
              "original's A and B (hint: clone the base model and inject adapters into the clone)");
  return torch::nn::Cloneable<LoraLinearImpl>::clone(device);
}

at::Tensor LoraLinearImpl::forward(const at::Tensor& input) {
  if (kind_ == AdapterKind::none || !enabled_) return at::linear(input, weight, bias);
  if (merged()) {
    TORCH_CHECK(!(is_training() && at::GradMode::is_enabled()),
                "LoraLinear: the adapter is merged into the weight, so training it would have no effect "
                "(hint: call unmerge_() before training, or eval() / torch::NoGradGuard for inference)");
    return at::linear(input, weight, bias);
  }
  at::Tensor adapter_input;
  if (lora_.dropout() > 0.0 && is_training()) adapter_input = at::dropout(input, lora_.dropout(), /*train=*/true);
  return functional::lora_linear(input, weight, bias, {lora_A(), lora_B(), lora_u, lora_v, lora_.scale()}, adapter_input);
}

void LoraLinearImpl::set_adapter_enabled(bool enabled) {
  if (!enabled) unmerge_();  // a merged weight would still carry the update
  enabled_ = enabled;
}

void LoraLinearImpl::merge_() {
  TORCH_CHECK(kind_ != AdapterKind::none, "LoraLinear::merge_: the layer carries no adapter");
  if (merged()) return;
  if (weight_tied_) {
    throw ConfigError("LoraLinear::merge_: this layer's weight is tied to another module (e.g. a language-model "
                      "head tied to the token embedding), which merging would change too (hint: keep the adapter "
                      "unmerged, or untie the weights first)");
  }
  at::NoGradGuard no_grad;
  at::Tensor merged_value =
      functional::merged_weight(weight, {lora_A(), lora_B(), lora_u, lora_v, lora_.scale()}, "LoraLinear weight");
  original_weight_ = weight.clone();
  weight.copy_(merged_value);
}

void LoraLinearImpl::unmerge_() {
  if (!merged()) return;
  at::NoGradGuard no_grad;
  weight.copy_(original_weight_);
  original_weight_ = at::Tensor();
}

void LoraLinearImpl::pretty_print(std::ostream& stream) const {
  stream << (kind_ == AdapterKind::tied ? "tiedlora::TiedLoraLinear" : "tiedlora::LoraLinear")
         << "(in_features=" << options.in_features() << ", out_features=" << options.out_features()
         << ", bias=" << (options.bias() ? "true" : "false");
  if (kind_ != AdapterKind::none) {
    stream << ", method=" << method_.name() << ", rank=" << lora_.rank() << ", alpha=" << lora_.effective_alpha()
           << (lora_.use_rslora() ? ", rslora" : "");
    if (lora_.dropout() > 0) stream << ", dropout=" << lora_.dropout();
    if (merged()) stream << ", merged";
    if (!enabled_) stream << ", disabled";
  }
  stream << ")";
}

}  // namespace tiedlora
