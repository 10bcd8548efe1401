// modules.cpp: LoraLinear and TiedLoraFactors (see tiedlora/core/modules.h).
#include "tiedlora/core/modules.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <ostream>
#include <sstream>

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

// ---- adapter names and row routing ----------------------------------------------------------------------

void check_adapter_name(const std::string& name) {
  const bool valid_chars = std::all_of(name.begin(), name.end(), [](unsigned char c) {
    return std::isalnum(c) || c == '_' || c == '-';
  });
  if (name.empty() || name.size() > 64 || !valid_chars || name == "__base__") {
    throw ConfigError("invalid adapter name '" + name + "' (hint: 1 to 64 letters, digits, '_' or '-'; it names a "
                      "module and a subfolder; \"__base__\" is PEFT's word for no adapter)");
  }
}

RowAdapters::RowAdapters(std::vector<std::string> adapter_of_row) : adapter_of_row_(std::move(adapter_of_row)) {
  std::map<std::string, std::vector<int64_t>> rows;
  for (size_t i = 0; i < adapter_of_row_.size(); ++i) {
    const std::string& name = adapter_of_row_[i];
    if (name.empty()) continue;
    check_adapter_name(name);
    rows[name].push_back(static_cast<int64_t>(i));
  }
  for (auto& [name, list] : rows) {
    adapters_.push_back(name);
    rows_[name] = at::tensor(list, at::kLong);
  }
}

at::Tensor RowAdapters::rows_of(const std::string& adapter, at::Device device) const {
  auto it = rows_.find(adapter);
  if (it == rows_.end()) return {};
  if (device.is_cpu()) return it->second;
  const std::lock_guard<std::mutex> lock(mutex_);
  at::Tensor& cached = on_device_[{adapter, device.str()}];
  if (!cached.defined()) cached = it->second.to(device);
  return cached;
}

namespace {
thread_local std::shared_ptr<const RowAdapters> t_routing;
}  // namespace

std::shared_ptr<const RowAdapters> RowAdapters::current() { return t_routing; }

RowAdaptersScope::RowAdaptersScope(std::shared_ptr<const RowAdapters> routing) : previous_(std::move(t_routing)) {
  t_routing = std::move(routing);
}
RowAdaptersScope::~RowAdaptersScope() { t_routing = std::move(previous_); }

// ---- LoraLinear -----------------------------------------------------------------------------------------

LoraLinearImpl::LoraLinearImpl(LoraLinearOptions options_) : options(std::move(options_)) {
  TORCH_CHECK(options.in_features() > 0 && options.out_features() > 0,
              "LoraLinear: in_features and out_features must be positive, got ", options.in_features(), " and ",
              options.out_features());
  if (options.lora()) {
    options.lora()->validate();
    Slot& slot = adapters_[kDefaultAdapter];
    slot.kind = AdapterKind::lora;
    slot.lora = *options.lora();
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
  for (auto& [name, slot] : adapters_) {
    if (slot.owns_factors && slot.factors) slot.factors->set_owned(false);
  }
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
  // Only a plain LoRA default adapter reaches here (the constructor's, or a clone's: clone() refuses
  // shared factors and named adapters), and it is drawn again.
  if (auto it = adapters_.find(kDefaultAdapter); it != adapters_.end()) {
    freeze_base();
    register_adapter_tensors(kDefaultAdapter, it->second);
  }
}

void LoraLinearImpl::freeze_base() {
  weight.requires_grad_(false);
  if (bias.defined()) bias.requires_grad_(false);
}

void LoraLinearImpl::sync_default_fields() {
  auto it = adapters_.find(kDefaultAdapter);
  lora_u = it == adapters_.end() ? at::Tensor() : it->second.u;
  lora_v = it == adapters_.end() ? at::Tensor() : it->second.v;
}

// A new slot named `adapter`, its holder ready: this layer for the default adapter, else the module
// `lora_adapters.<adapter>`.
LoraLinearImpl::Slot& LoraLinearImpl::new_slot(const std::string& adapter, AdapterKind kind) {
  check_adapter_name(adapter);
  TORCH_CHECK(!adapters_.count(adapter), "LoraLinear: the layer already carries an adapter named '", adapter, "'");
  unmerge_();  // a merged weight must not outlive the set of adapters it was merged from
  if (adapter != kDefaultAdapter) {
    if (!named_holders_) named_holders_ = register_module("lora_adapters", std::make_shared<torch::nn::Module>("LoraAdapters"));
    named_holders_->register_module(adapter, std::make_shared<torch::nn::Module>("LoraAdapter"));
  }
  Slot slot;
  slot.kind = kind;
  return adapters_.emplace(adapter, std::move(slot)).first->second;
}

torch::nn::Module& LoraLinearImpl::holder(const std::string& adapter) {
  if (adapter == kDefaultAdapter) return *this;
  TORCH_INTERNAL_ASSERT(named_holders_, "LoraLinear: no holder for the adapter ", adapter);
  for (const auto& item : named_holders_->named_children()) {
    if (item.key() == adapter) return *item.value();
  }
  TORCH_INTERNAL_ASSERT(false, "LoraLinear: no holder for the adapter ", adapter);
}

const LoraLinearImpl::Slot& LoraLinearImpl::slot(const std::string& adapter, const char* what) const {
  auto it = adapters_.find(adapter);
  if (it != adapters_.end()) return it->second;
  std::string carried;
  for (const auto& [name, s] : adapters_) carried += (carried.empty() ? "" : ", ") + name;
  throw ConfigError(std::string("LoraLinear::") + what + ": the layer carries no adapter named '" + adapter + "' (it carries " +
                    (carried.empty() ? std::string("none") : carried) + ")");
}

// Registers and initialises the tensors the slot owns: lora_A and lora_B for plain LoRA, lora_u and lora_v
// (when trained) for a tied adapter.
void LoraLinearImpl::register_adapter_tensors(const std::string& adapter, Slot& slot) {
  at::NoGradGuard no_grad;
  const int64_t in = options.in_features(), out = options.out_features(), r = slot.lora.rank();
  Initializer init(slot.lora, weight.device());
  torch::nn::Module& holder = this->holder(adapter);
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
  Slot& slot = new_slot(adapter, AdapterKind::lora);
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
  Slot& slot = new_slot(adapter, AdapterKind::tied);
  slot.lora = factors->options.lora();
  slot.method = factors->options.method();
  slot.factors = factors.ptr();
  if (!factors->owned()) {
    // Nobody registers these factors yet: this layer does, so that they train, save and move with it.
    holder(adapter).register_module("tied_factors", factors);
    factors->set_owned(true);
    slot.owns_factors = true;
  }
  freeze_base();
  register_adapter_tensors(adapter, slot);
}

// Unregisters the slot's tensors from its holder (the slot itself is erased by the caller).
void LoraLinearImpl::release(const std::string& adapter, Slot& slot) {
  if (adapter == kDefaultAdapter) {
    for (const char* name : {"lora_A", "lora_B", "lora_u", "lora_v"}) {
      if (parameters_.contains(name)) parameters_.erase(name);
    }
    if (slot.owns_factors) unregister_module("tied_factors");
  }
  if (slot.owns_factors) slot.factors->set_owned(false);  // layers still sharing them are refused by trainable_parameters()
}

void LoraLinearImpl::detach_adapter(const std::string& adapter) {
  slot(adapter, "detach_adapter");  // throws, naming what the layer carries, when it is not there
  unmerge_();
  release(adapter, adapters_.at(adapter));
  adapters_.erase(adapter);
  if (adapter != kDefaultAdapter) {
    named_holders_->unregister_module(adapter);
    if (named_holders_->children().empty()) {
      unregister_module("lora_adapters");
      named_holders_.reset();
    }
  }
  sync_default_fields();
}

void LoraLinearImpl::detach_adapter() {
  for (const auto& name : adapter_names()) detach_adapter(name);
}

std::vector<std::string> LoraLinearImpl::adapter_names() const {
  std::vector<std::string> out;
  for (const auto& [name, s] : adapters_) out.push_back(name);
  return out;
}

AdapterKind LoraLinearImpl::adapter_kind(const std::string& adapter) const {
  auto it = adapters_.find(adapter);
  return it == adapters_.end() ? AdapterKind::none : it->second.kind;
}

const AdapterMethod& LoraLinearImpl::method(const std::string& adapter) const { return slot(adapter, "method").method; }
const LoraOptions& LoraLinearImpl::lora_options(const std::string& adapter) const {
  return slot(adapter, "lora_options").lora;
}

bool LoraLinearImpl::same_configuration(const AdapterMethod& method, const LoraOptions& lora,
                                        const std::string& adapter) const {
  const Slot& s = slot(adapter, "same_configuration");
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
  const Slot& s = slot(adapter, "lora_A");
  return s.factors ? s.factors->lora_A : s.a;
}
const at::Tensor& LoraLinearImpl::lora_B(const std::string& adapter) const {
  const Slot& s = slot(adapter, "lora_B");
  return s.factors ? s.factors->lora_B : s.b;
}
const at::Tensor& LoraLinearImpl::lora_u_of(const std::string& adapter) const { return slot(adapter, "lora_u_of").u; }
const at::Tensor& LoraLinearImpl::lora_v_of(const std::string& adapter) const { return slot(adapter, "lora_v_of").v; }

functional::LowRankUpdate LoraLinearImpl::update(const std::string& adapter) const {
  const Slot& s = slot(adapter, "update");
  return {lora_A(adapter), lora_B(adapter), s.u, s.v, s.lora.scale()};
}

TiedLoraFactors LoraLinearImpl::factors(const std::string& adapter) const {
  auto it = adapters_.find(adapter);
  return it != adapters_.end() && it->second.factors ? TiedLoraFactors(it->second.factors) : TiedLoraFactors(nullptr);
}

void LoraLinearImpl::set_active_adapters(std::vector<std::string> adapters) {
  for (const auto& name : adapters) check_adapter_name(name);
  if (adapters != active_) unmerge_();
  active_ = std::move(adapters);
}

std::shared_ptr<torch::nn::Module> LoraLinearImpl::clone(const std::optional<torch::Device>& device) const {
  for (const auto& [name, s] : adapters_) {
    TORCH_CHECK(!s.factors,
                "LoraLinear::clone: this layer uses shared Tied-LoRA factors; a clone would keep training the "
                "original's A and B (hint: clone the base model and inject adapters into the clone)");
    TORCH_CHECK(name == kDefaultAdapter, "LoraLinear::clone: the layer carries the named adapter '", name,
                "', which cloning does not copy (hint: clone the base model and load the adapters into the clone)");
  }
  return torch::nn::Cloneable<LoraLinearImpl>::clone(device);
}

at::Tensor LoraLinearImpl::adapter_input(const at::Tensor& input, const Slot& s) {
  if (s.lora.dropout() > 0.0 && is_training()) return at::dropout(input, s.lora.dropout(), /*train=*/true);
  return {};
}

at::Tensor LoraLinearImpl::routed_forward(const at::Tensor& input, const RowAdapters& routing) {
  TORCH_CHECK(!merged(), "LoraLinear: a mixed-adapter batch cannot run on a merged layer (hint: unmerge_adapters_() "
                         "first; merging bakes the active adapters into every row)");
  std::vector<std::string> here;  // the routed adapters this layer carries; rows of others get the base only
  for (const auto& name : routing.adapters()) {
    if (adapters_.count(name)) here.push_back(name);
  }
  if (here.empty()) return at::linear(input, weight, bias);
  if (input.dim() < 2 || input.size(0) != routing.rows()) {
    std::ostringstream shape;
    shape << input.sizes();
    throw ConfigError("LoraLinear (" + std::to_string(options.in_features()) + " -> " + std::to_string(options.out_features()) +
                      "): the input " + shape.str() + " has " + std::to_string(input.dim() < 2 ? 1 : input.size(0)) +
                      " rows in its first dimension, but the row routing (RowAdaptersScope) names adapters for " +
                      std::to_string(routing.rows()) + " (hint: route the rows of the batch; a layer applied to "
                      "flattened tokens, such as a head over selected positions, cannot serve a mixed batch)");
  }
  std::vector<functional::RoutedUpdate> updates;
  for (const auto& name : here) {
    const Slot& s = adapters_.at(name);
    const at::Tensor rows = routing.rows_of(name, input.device());
    // Dropout on this adapter's rows only (its own mask, as each adapter has its own dropout in PEFT).
    at::Tensor dropped;
    if (s.lora.dropout() > 0.0 && is_training()) dropped = at::dropout(input.index_select(0, rows), s.lora.dropout(), true);
    updates.push_back({update(name), rows, dropped});
  }
  return functional::lora_linear_routed(input, weight, bias, updates);
}

at::Tensor LoraLinearImpl::forward(const at::Tensor& input) {
  if (adapters_.empty() || !enabled_) return at::linear(input, weight, bias);
  // The routing's raw pointer: the scope that set it outlives this call (no reference count per layer).
  if (const RowAdapters* routing = t_routing.get()) return routed_forward(input, *routing);
  if (merged()) {
    TORCH_CHECK(!(is_training() && at::GradMode::is_enabled()),
                "LoraLinear: the adapter is merged into the weight, so training it would have no effect "
                "(hint: call unmerge_() before training, or eval() / torch::NoGradGuard for inference)");
    return at::linear(input, weight, bias);
  }
  const std::string* first = nullptr;  // the first active adapter this layer carries
  bool several = false;
  for (const auto& name : active_) {
    if (!adapters_.count(name)) continue;
    several = first != nullptr;
    if (several) break;
    first = &name;
  }
  if (!first) return at::linear(input, weight, bias);
  if (!several) return functional::lora_linear(input, weight, bias, update(*first), adapter_input(input, adapters_.at(*first)));
  std::vector<functional::RoutedUpdate> updates;
  for (const auto& name : active_) {
    if (adapters_.count(name)) updates.push_back({update(name), {}, adapter_input(input, adapters_.at(name))});
  }
  return functional::lora_linear_routed(input, weight, bias, updates);
}

void LoraLinearImpl::set_adapter_enabled(bool enabled) {
  if (!enabled) unmerge_();  // a merged weight would still carry the update
  enabled_ = enabled;
}

void LoraLinearImpl::merge_() {
  TORCH_CHECK(!adapters_.empty(), "LoraLinear::merge_: the layer carries no adapter");
  if (merged()) return;
  std::vector<functional::LowRankUpdate> updates;
  for (const auto& name : active_) {
    if (adapters_.count(name)) updates.push_back(update(name));
  }
  if (updates.empty()) return;  // no active adapter here: nothing to merge, whatever the weight is tied to
  if (weight_tied_) {
    throw ConfigError("LoraLinear::merge_: this layer's weight is tied to another module (e.g. a language-model "
                      "head tied to the token embedding), which merging would change too (hint: keep the adapter "
                      "unmerged, or untie the weights first)");
  }
  at::NoGradGuard no_grad;
  // Several active adapters: their rank concatenation, so the sum of the deltas is rounded once.
  const functional::LowRankUpdate merged_update =
      updates.size() == 1 ? updates.front() : functional::concatenated(updates, std::vector<double>(updates.size(), 1.0));
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
  for (const auto& [name, s] : adapters_) {
    stream << ", " << (name == kDefaultAdapter ? "" : name + ": ") << "method=" << s.method.name()
           << ", rank=" << s.lora.rank() << ", alpha=" << s.lora.effective_alpha() << (s.lora.use_rslora() ? ", rslora" : "");
    if (s.lora.dropout() > 0) stream << ", dropout=" << s.lora.dropout();
  }
  if (!adapters_.empty()) {
    if (active_ != std::vector<std::string>{kDefaultAdapter}) {
      stream << ", active=[";
      for (size_t i = 0; i < active_.size(); ++i) stream << (i ? "," : "") << active_[i];
      stream << "]";
    }
    if (merged()) stream << ", merged";
    if (!enabled_) stream << ", disabled";
  }
  stream << ")";
}

}  // namespace tiedlora
