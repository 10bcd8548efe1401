// forward_context.cpp: the per-thread state of adapted forwards, its scopes, and its capture and replay
// (see tiedlora/core/forward_context.h).
#include "tiedlora/core/forward_context.h"

#include <algorithm>
#include <cctype>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>

#include "tiedlora/core/error.h"

namespace tiedlora {
namespace {

// The one thread-local record; every scope below swaps one of its fields.
struct ThreadState {
  functional::Backend backend = functional::Backend::aten;
  std::shared_ptr<const RowAdapters> routing;
  std::vector<at::Generator> dropout_generators;
};
thread_local ThreadState t_state;

at::Generator default_generator(at::Device device) {
  if (device.is_cpu()) return at::detail::getDefaultCPUGenerator();
  return at::globalContext().defaultGenerator(device);
}

}  // namespace

// ---- backend ----------------------------------------------------------------------------------------------

namespace functional {
BackendGuard::BackendGuard(Backend backend) : previous_(t_state.backend) { t_state.backend = backend; }
BackendGuard::~BackendGuard() { t_state.backend = previous_; }
Backend current_backend() { return t_state.backend; }
}  // namespace functional

// ---- adapter names and row routing ------------------------------------------------------------------------

void check_adapter_name(const std::string& name) {
  const bool valid_chars =
      std::all_of(name.begin(), name.end(), [](unsigned char c) { return std::isalnum(c) || c == '_' || c == '-'; });
  if (name.empty() || name.size() > 64 || !valid_chars || name == "__base__") {
    throw ConfigError("invalid adapter name '" + name +
                      "' (hint: 1 to 64 letters, digits, '_' or '-'; it names a "
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
    if (list.back() - list.front() + 1 == static_cast<int64_t>(list.size())) {
      ranges_[name] = {list.front(), list.back() + 1};  // consecutive: a slice, no gather
    }
    rows_[name] = at::tensor(list, at::kLong);
  }
}

std::optional<std::pair<int64_t, int64_t>> RowAdapters::range_of(const std::string& adapter) const {
  auto it = ranges_.find(adapter);
  if (it == ranges_.end()) return std::nullopt;
  return it->second;
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

std::shared_ptr<const RowAdapters> RowAdapters::current() { return t_state.routing; }
const RowAdapters* current_routing() { return t_state.routing.get(); }

RowAdaptersScope::RowAdaptersScope(std::shared_ptr<const RowAdapters> routing) : previous_(std::move(t_state.routing)) {
  t_state.routing = std::move(routing);
}
RowAdaptersScope::~RowAdaptersScope() { t_state.routing = std::move(previous_); }

// ---- adapter dropout --------------------------------------------------------------------------------------

DropoutGeneratorScope::DropoutGeneratorScope(std::vector<at::Generator> generators)
    : previous_(std::move(t_state.dropout_generators)) {
  t_state.dropout_generators = std::move(generators);
}
DropoutGeneratorScope::~DropoutGeneratorScope() { t_state.dropout_generators = std::move(previous_); }

namespace {

// The generator of `generators` for tensors on `device`, else the device's default generator.
at::Generator generator_for(const std::vector<at::Generator>& generators, at::Device device) {
  for (const at::Generator& g : generators) {
    if (g.defined() && g.device().type() == device.type() &&
        (device.is_cpu() || !device.has_index() || g.device().index() == device.index())) {
      return g;
    }
  }
  return default_generator(device);
}

}  // namespace

at::Generator dropout_generator(at::Device device) { return generator_for(t_state.dropout_generators, device); }

at::Tensor adapter_dropout(const at::Tensor& input, double p) {
  // at::dropout's CPU formula (a Bernoulli(1 - p) mask divided by 1 - p, times the input), with the
  // generator chosen here; on the CPU with the default generator it draws exactly at::dropout's mask.
  at::Tensor noise = at::empty_like(input).bernoulli_(1.0 - p, dropout_generator(input.device()));
  noise.div_(1.0 - p);
  return input * noise;
}

// ---- capture and replay -----------------------------------------------------------------------------------

ForwardContext ForwardContext::capture(at::Device device) {
  ForwardContext c;
  c.backend = t_state.backend;
  c.routing = t_state.routing;
  c.dropout_generators = t_state.dropout_generators;
  c.autocast = {at::autocast::is_autocast_enabled(at::kCPU), at::autocast::is_autocast_enabled(at::kCUDA),
                at::autocast::is_autocast_cache_enabled(), at::autocast::get_autocast_dtype(at::kCPU),
                at::autocast::get_autocast_dtype(at::kCUDA)};
  c.device = device;
  c.random_state = dropout_generator(device).get_state();
  return c;
}

namespace {

void apply_autocast(const ForwardContext::Autocast& a) {
  at::autocast::set_autocast_enabled(at::kCPU, a.cpu);
  at::autocast::set_autocast_enabled(at::kCUDA, a.cuda);
  at::autocast::set_autocast_cache_enabled(a.cache);
  at::autocast::set_autocast_dtype(at::kCPU, a.cpu_dtype);
  at::autocast::set_autocast_dtype(at::kCUDA, a.cuda_dtype);
}

}  // namespace

ForwardContextReplay::ForwardContextReplay(const ForwardContext& context)
    : previous_(ForwardContext::capture(context.device)),
      generator_(generator_for(context.dropout_generators, context.device)) {
  // The generator first: if setting its state throws, nothing has been changed yet.
  previous_.random_state = generator_.get_state();
  generator_.set_state(context.random_state);
  t_state.backend = context.backend;
  t_state.routing = context.routing;
  t_state.dropout_generators = context.dropout_generators;
  apply_autocast(context.autocast);
  at::autocast::increment_nesting();
}

ForwardContextReplay::~ForwardContextReplay() {
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  apply_autocast(previous_.autocast);
  t_state.backend = previous_.backend;
  t_state.routing = std::move(previous_.routing);
  t_state.dropout_generators = std::move(previous_.dropout_generators);
  generator_.set_state(previous_.random_state);
}

}  // namespace tiedlora
