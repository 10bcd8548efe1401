// modules.cpp: LoraLinear and TiedLoraFactors (see tiedlora/core/modules.h).
#include "tiedlora/core/modules.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <ostream>
#include <sstream>

#include <ATen/ATen.h>
#include <torch/nn/init.h>

#include "core/initialization.h"
#include "tiedlora/core/error.h"
#include "tiedlora/core/functional.h"

namespace tiedlora {

using detail::initial_a;
using detail::initial_b;
using detail::Initializer;

// ---- TiedLoraFactors ------------------------------------------------------------------------------------

TiedLoraFactorsImpl::TiedLoraFactorsImpl(TiedLoraFactorsOptions options_) : options(std::move(options_)) {
  options.lora().validate();
  options.method().validate();
  if (options.method().is_plain_lora()) {
    throw ConfigError(
        "TiedLoraFactors: method 'lora' has no shared factors (hint: plain LoRA layers own their A "
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
  if (options.lora()) options.lora()->validate();
  reset();
}

LoraLinearImpl::LoraLinearImpl(const torch::nn::LinearOptions& linear)
    : LoraLinearImpl(
          LoraLinearOptions(linear.in_features(), linear.out_features()).bias(linear.bias()).lora(std::nullopt)) {}

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

LoraLinearImpl::~LoraLinearImpl() { adapters_.release_factors(); }

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
  // The adapter of the options, drawn with the layer (LoraLinear(LoraLinearOptions(...).lora(...))).
  if (options.lora() && !adapters_.contains(kDefaultAdapter)) attach_lora(*options.lora());
}

void LoraLinearImpl::freeze_base() {
  weight.requires_grad_(false);
  if (bias.defined()) bias.requires_grad_(false);
}

void LoraLinearImpl::sync_default_fields() {
  const AdapterSlot* slot = adapters_.find(kDefaultAdapter);
  lora_u = slot ? slot->u : at::Tensor();
  lora_v = slot ? slot->v : at::Tensor();
}

// Registers and initialises the tensors the slot owns on its holder: lora_A and lora_B for plain LoRA,
// lora_u and lora_v (when trained) for a tied adapter.
void LoraLinearImpl::register_adapter_tensors(const std::string& adapter, AdapterSlot& slot) {
  at::NoGradGuard no_grad;
  const int64_t in = options.in_features(), out = options.out_features(), r = slot.lora.rank();
  Initializer init(slot.lora, weight.device());
  torch::nn::Module& holder = adapters_.holder(*this, adapter);
  if (slot.kind == AdapterKind::lora) {
    slot.a = holder.register_parameter("lora_A", initial_a(init, slot.lora, in), /*requires_grad=*/true);
    slot.b = holder.register_parameter("lora_B", initial_b(init, slot.lora, slot.method, out), /*requires_grad=*/true);
  } else if (slot.kind == AdapterKind::tied) {
    // u starts at 1; v carries the zero when it trains (docs/method.md's rule).
    if (slot.method.has_u()) slot.u = holder.register_parameter("lora_u", init.full({r}, 1.0), true);
    if (slot.method.has_v()) slot.v = holder.register_parameter("lora_v", init.full({out}, 0.0), true);
  }
  sync_default_fields();
}

void LoraLinearImpl::attach_lora(const LoraOptions& lora, const std::string& adapter) {
  lora.validate();
  unmerge_();  // a merged weight must not outlive the set of adapters it was merged from
  AdapterSlot& slot = adapters_.add(*this, adapter, AdapterKind::lora);
  slot.lora = lora;
  slot.method = AdapterMethod::lora();
  freeze_base();
  register_adapter_tensors(adapter, slot);
}

void LoraLinearImpl::attach_tied(TiedLoraFactors factors, const std::string& adapter) {
  TORCH_CHECK(!factors.is_empty(), "LoraLinear::attach_tied: factors is an empty holder");
  TORCH_CHECK(factors->options.in_features() == options.in_features() &&
                  factors->options.out_features() == options.out_features(),
              "LoraLinear::attach_tied: factors are ", factors->options.in_features(), " -> ",
              factors->options.out_features(), " but the layer is ", options.in_features(), " -> ",
              options.out_features());
  TORCH_CHECK(factors->lora_A.device() == weight.device(), "LoraLinear::attach_tied: factors are on ",
              factors->lora_A.device(), " but the layer's weight is on ", weight.device(),
              " (hint: move the factors with factors->to(device) first)");
  unmerge_();
  AdapterSlot& slot = adapters_.add(*this, adapter, AdapterKind::tied);
  slot.lora = factors->options.lora();
  slot.method = factors->options.method();
  slot.factors = factors.ptr();
  if (!factors->owned()) {
    // Nobody registers these factors yet: this layer does, so that they train, save and move with it.
    adapters_.holder(*this, adapter).register_module("tied_factors", factors);
    factors->set_owned(true);
    slot.owns_factors = true;
  }
  freeze_base();
  register_adapter_tensors(adapter, slot);
}

void LoraLinearImpl::detach_adapter(const std::string& adapter) {
  adapters_.at(adapter, "detach_adapter");  // throws, naming what the layer carries, when it is not there
  unmerge_();
  adapters_.remove(*this, adapter);
  sync_default_fields();
}

void LoraLinearImpl::detach_adapter() {
  for (const auto& name : adapter_names()) detach_adapter(name);
}

std::vector<std::string> LoraLinearImpl::adapter_names() const { return adapters_.names(); }

AdapterKind LoraLinearImpl::adapter_kind(const std::string& adapter) const {
  const AdapterSlot* slot = adapters_.find(adapter);
  return slot ? slot->kind : AdapterKind::none;
}

const AdapterMethod& LoraLinearImpl::method(const std::string& adapter) const {
  return adapters_.at(adapter, "method").method;
}
const LoraOptions& LoraLinearImpl::lora_options(const std::string& adapter) const {
  return adapters_.at(adapter, "lora_options").lora;
}

bool LoraLinearImpl::same_configuration(const AdapterMethod& method, const LoraOptions& lora,
                                        const std::string& adapter) const {
  const AdapterSlot& s = adapters_.at(adapter, "same_configuration");
  return s.method == method && s.lora.rank() == lora.rank() && s.lora.effective_alpha() == lora.effective_alpha() &&
         s.lora.use_rslora() == lora.use_rslora();
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

const at::Tensor& LoraLinearImpl::lora_A(const std::string& adapter) const {
  return adapters_.at(adapter, "lora_A").lora_A();
}
const at::Tensor& LoraLinearImpl::lora_B(const std::string& adapter) const {
  return adapters_.at(adapter, "lora_B").lora_B();
}
const at::Tensor& LoraLinearImpl::lora_u_of(const std::string& adapter) const {
  return adapters_.at(adapter, "lora_u_of").u;
}
const at::Tensor& LoraLinearImpl::lora_v_of(const std::string& adapter) const {
  return adapters_.at(adapter, "lora_v_of").v;
}

functional::LowRankUpdate LoraLinearImpl::update(const std::string& adapter) const {
  return adapters_.at(adapter, "update").update();
}

TiedLoraFactors LoraLinearImpl::factors(const std::string& adapter) const {
  const AdapterSlot* slot = adapters_.find(adapter);
  return slot && slot->factors ? TiedLoraFactors(slot->factors) : TiedLoraFactors(nullptr);
}

void LoraLinearImpl::set_active_adapters(std::vector<std::string> adapters) {
  if (adapters != adapters_.active()) unmerge_();
  adapters_.set_active(std::move(adapters));
}

std::shared_ptr<torch::nn::Module> LoraLinearImpl::clone(const std::optional<torch::Device>& device) const {
  for (const auto& name : adapters_.names()) {
    TORCH_CHECK(!adapters_.find(name)->factors,
                "LoraLinear::clone: this layer uses shared Tied-LoRA factors (adapter '", name,
                "'); a clone would keep "
                "training the original's A and B (hint: clone the base model and inject adapters into the clone)");
  }
  at::NoGradGuard no_grad;
  auto copy_of = [&](const at::Tensor& t) {
    return device ? t.detach().to(*device, /*non_blocking=*/false, /*copy=*/true) : t.detach().clone();
  };
  auto copy =
      std::make_shared<LoraLinearImpl>(LoraLinearOptions(options).lora(std::nullopt).dtype(weight.scalar_type()));
  copy->options = options;
  copy->weight.set_data(copy_of(weight));
  copy->weight.requires_grad_(weight.requires_grad());
  if (bias.defined()) {
    copy->bias.set_data(copy_of(bias));
    copy->bias.requires_grad_(bias.requires_grad());
  }
  for (const auto& name : adapters_.names()) {
    const AdapterSlot& mine = *adapters_.find(name);
    copy->attach_lora(LoraOptions(mine.lora).seed(0), name);  // drawn from a fixed seed, then overwritten
    AdapterSlot& theirs = copy->adapters_.at(name, "clone");
    theirs.lora = mine.lora;
    theirs.a.set_data(copy_of(mine.a));
    theirs.b.set_data(copy_of(mine.b));
    theirs.a.requires_grad_(mine.a.requires_grad());
    theirs.b.requires_grad_(mine.b.requires_grad());
  }
  copy->adapters_.set_active(adapters_.active());
  copy->adapters_.set_enabled(adapters_.enabled());
  if (merged()) copy->original_weight_ = copy_of(original_weight_);
  return copy;
}

at::Tensor LoraLinearImpl::forward(const at::Tensor& input) {
  if (merged()) return merged_forward(input);
  const auto calls = adapters_.calls(input, is_training(), current_routing());
  const functional::StackedFactors stacked = adapters_.stacked_factors(calls, input);
  return functional::lora_linear(input, weight, bias, calls, &stacked);
}

at::Tensor LoraLinearImpl::merged_forward(const at::Tensor& input) const {
  TORCH_CHECK(!current_routing(),
              "LoraLinear: a mixed-adapter batch cannot run on a merged layer (hint: "
              "unmerge_adapters_() first; merging bakes the active adapters into every row)");
  TORCH_CHECK(!(is_training() && at::GradMode::is_enabled()),
              "LoraLinear: the adapter is merged into the weight, so training it would have no effect "
              "(hint: call unmerge_() before training, or eval() / torch::NoGradGuard for inference)");
  return at::linear(input, weight, bias);
}

void LoraLinearImpl::set_adapter_enabled(bool enabled) {
  if (!enabled) unmerge_();  // a merged weight would still carry the update
  adapters_.set_enabled(enabled);
}

void LoraLinearImpl::merge_() {
  TORCH_CHECK(!adapters_.empty(), "LoraLinear::merge_: the layer carries no adapter");
  if (merged()) return;
  std::vector<functional::LowRankUpdate> updates;
  for (const auto& name : adapters_.active_here()) updates.push_back(update(name));
  if (updates.empty()) return;  // no active adapter here: nothing to merge, whatever the weight is tied to
  if (weight_tied_) {
    throw ConfigError(
        "LoraLinear::merge_: this layer's weight is tied to another module (e.g. a language-model "
        "head tied to the token embedding), which merging would change too (hint: keep the adapter "
        "unmerged, or untie the weights first)");
  }
  at::NoGradGuard no_grad;
  // Several active adapters: their rank concatenation, so the sum of the deltas is rounded once.
  const functional::LowRankUpdate merged_update =
      updates.size() == 1 ? updates.front()
                          : functional::concatenated(updates, std::vector<double>(updates.size(), 1.0));
  at::Tensor merged_value = functional::merged_weight(weight, merged_update, "LoraLinear weight");
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
  const bool tied = adapter_kind(kDefaultAdapter) == AdapterKind::tied;
  stream << (tied ? "tiedlora::TiedLoraLinear" : "tiedlora::LoraLinear") << "(in_features=" << options.in_features()
         << ", out_features=" << options.out_features() << ", bias=" << (options.bias() ? "true" : "false");
  for (const auto& name : adapters_.names()) {
    const AdapterSlot& s = *adapters_.find(name);
    stream << ", " << (name == kDefaultAdapter ? "" : name + ": ") << "method=" << s.method.name()
           << ", rank=" << s.lora.rank() << ", alpha=" << s.lora.effective_alpha()
           << (s.lora.use_rslora() ? ", rslora" : "");
    if (s.lora.dropout() > 0) stream << ", dropout=" << s.lora.dropout();
  }
  if (!adapters_.empty()) {
    if (adapters_.active() != std::vector<std::string>{kDefaultAdapter}) {
      stream << ", active=[";
      for (size_t i = 0; i < adapters_.active().size(); ++i) stream << (i ? "," : "") << adapters_.active()[i];
      stream << "]";
    }
    if (merged()) stream << ", merged";
    if (!adapters_.enabled()) stream << ", disabled";
  }
  stream << ")";
}

}  // namespace tiedlora
