// adapter.cpp: adapter folders (PEFT LoRA, PEFT VeRA, TIEDLORA), export to LoRA, save/load into models.
#include "tiedlora/formats/adapter.h"

#include <algorithm>
#include <fstream>
#include <regex>
#include <set>
#include <unordered_map>

#include <ATen/ATen.h>
#include <torch/nn/modules/container/moduledict.h>

#include "tiedlora/core/error.h"
#include "tiedlora/core/functional.h"
#include "tiedlora/core/inject.h"
#include "tiedlora/formats/safetensors.h"
#include "util/files.h"
#include "util/text.h"

namespace tiedlora {
namespace {

constexpr const char* kConfigName = "adapter_config.json";
constexpr const char* kWeightsName = "adapter_model.safetensors";
constexpr const char* kModelPrefix = "base_model.model.";
constexpr const char* kGroupsPrefix = "tiedlora_groups.";

std::string shape_text(const at::Tensor& t) { return util::list_text(t.sizes()); }

// The module path inside "base_model.model.<module>.<suffix>", or "" when `name` is not of that form.
std::string module_of(const std::string& name, const std::string& suffix) {
  const std::string prefix = kModelPrefix;
  if (name.rfind(prefix, 0) != 0 || !util::ends_with(name, suffix) || name.size() <= prefix.size() + suffix.size())
    return "";
  return name.substr(prefix.size(), name.size() - prefix.size() - suffix.size());
}

}  // namespace

// ---- reading ------------------------------------------------------------------------------------------

Adapter Adapter::read(const std::string& folder, const ReadOptions& options) {
  Adapter adapter;
  adapter.source_ = folder;
  const std::string config_path = util::join_path(folder, kConfigName);
  const std::string weights_path = util::join_path(folder, kWeightsName);
  if (!util::is_directory(folder)) throw FormatError(folder + ": not an adapter folder (no such folder)");
  if (!util::is_regular_file(config_path)) {
    throw FormatError(folder + ": missing " + std::string(kConfigName) + " (hint: an adapter folder holds " +
                      kConfigName + " and " + kWeightsName + ")");
  }
  if (!util::is_regular_file(weights_path)) {
    throw FormatError(folder + ": missing " + std::string(kWeightsName) +
                      " (hint: adapters saved as .bin are not read; re-save with safetensors)");
  }
  adapter.config_ = parse_adapter_config(util::read_text_file(config_path), config_path);
  const auto file = formats::SafetensorsFile::open(weights_path);
  for (const auto& name : file.names()) {
    at::Tensor t = file.tensor(name);
    if (!at::isFloatingType(t.scalar_type())) {
      throw FormatError(weights_path + ": tensor '" + name + "' is " + c10::toString(t.scalar_type()) +
                        "; adapter tensors must be floating point");
    }
    if (!options.allow_non_finite) {
      const int64_t bad = functional::count_non_finite(t);
      if (bad > 0) {
        throw FormatError(weights_path + ": tensor '" + name + "' holds " + std::to_string(bad) +
                          " NaN or Inf value(s) (hint: the adapter comes from a diverged or broken run; "
                          "`tiedlora inspect` counts them per tensor)");
      }
    }
    adapter.tensors_[name] = t;
  }
  const AdapterConfig& c = adapter.config_;
  auto fail = [&](const std::string& tensor, const std::string& message) -> void {
    throw FormatError(weights_path + ": tensor '" + tensor + "' " + message);
  };
  auto expect_shape = [&](const std::string& name, std::vector<int64_t> shape, const std::string& hint) {
    auto it = adapter.tensors_.find(name);
    if (it == adapter.tensors_.end()) fail(name, "is missing" + hint);
    if (it->second.sizes().vec() != shape) {
      fail(name, "has shape " + shape_text(it->second) + ", expected " + util::list_text(shape) + hint);
    }
  };
  std::set<std::string> expected;
  if (c.type == AdapterType::lora) {
    for (const auto& [name, t] : adapter.tensors_) {
      const std::string a_module = module_of(name, ".lora_A.weight"), b_module = module_of(name, ".lora_B.weight");
      if (a_module.empty() && b_module.empty()) {
        fail(name,
             "is not a LoRA A/B tensor (hint: embedding adapters, DoRA magnitudes and trained biases are not "
             "supported)");
      }
      if (a_module.empty()) continue;
      const std::string b_name = std::string(kModelPrefix) + a_module + ".lora_B.weight";
      if (t.dim() != 2) fail(name, "must be 2-D (r, in), got " + shape_text(t));
      int64_t rank = c.rank;
      for (const auto& [pattern, r] : c.rank_pattern) {
        if (peft_pattern_matches(a_module, pattern)) {
          rank = r;
          break;
        }
      }
      if (t.size(0) != rank) {
        fail(name, "has rank " + std::to_string(t.size(0)) + " but the config says r = " + std::to_string(rank) +
                       " (hint: adapter_config.json and the weights disagree)");
      }
      auto b = adapter.tensors_.find(b_name);
      if (b == adapter.tensors_.end()) fail(b_name, "is missing (every lora_A needs its lora_B)");
      if (b->second.dim() != 2 || b->second.size(1) != rank) {
        fail(b_name, "has shape " + shape_text(b->second) + ", expected [out, " + std::to_string(rank) + "]");
      }
      expected.insert(name);
      expected.insert(b_name);
    }
  } else if (c.type == AdapterType::vera) {
    if (!c.vera_save_projection) {
      throw FormatError(config_path +
                        ": VeRA adapter saved without its projections (save_projection = false); "
                        "tiedlora does not regenerate them from projection_prng_key (hint: save it with "
                        "VeraConfig(save_projection=True))");
    }
    const at::Tensor* a = nullptr;
    for (const char* n : {"base_model.vera_A", "base_model.vera_B"}) {
      auto it = adapter.tensors_.find(n);
      if (it == adapter.tensors_.end()) fail(n, "is missing (VeRA's shared projection)");
      if (it->second.dim() != 2) fail(n, "must be 2-D, got " + shape_text(it->second));
      expected.insert(n);
      if (!a) a = &it->second;
    }
    if (a->size(0) != c.rank)
      fail("base_model.vera_A", "has rank " + std::to_string(a->size(0)) + " but r = " + std::to_string(c.rank));
    expect_shape("base_model.vera_B", {adapter.tensors_.at("base_model.vera_B").size(0), c.rank}, "");
    for (const auto& [name, t] : adapter.tensors_) {
      const std::string module = module_of(name, ".vera_lambda_d");
      if (module.empty()) continue;
      expect_shape(name, {c.rank}, "");
      const std::string b_name = std::string(kModelPrefix) + module + ".vera_lambda_b";
      auto b = adapter.tensors_.find(b_name);
      if (b == adapter.tensors_.end()) fail(b_name, "is missing (every vera_lambda_d needs its vera_lambda_b)");
      if (b->second.dim() != 1 || b->second.size(0) > adapter.tensors_.at("base_model.vera_B").size(0)) {
        fail(b_name, "has shape " + shape_text(b->second) + ", longer than vera_B's rows");
      }
      expected.insert(name);
      expected.insert(b_name);
    }
  } else {
    for (const auto& group : c.groups) {
      const std::string a_name = kGroupsPrefix + group.key + ".lora_A", b_name = kGroupsPrefix + group.key + ".lora_B";
      auto a = adapter.tensors_.find(a_name), b = adapter.tensors_.find(b_name);
      if (a == adapter.tensors_.end()) fail(a_name, "is missing (group '" + group.name + "')");
      if (b == adapter.tensors_.end()) fail(b_name, "is missing (group '" + group.name + "')");
      if (a->second.dim() != 2 || a->second.size(0) != c.rank) {
        fail(a_name, "has shape " + shape_text(a->second) + ", expected [r = " + std::to_string(c.rank) + ", in]");
      }
      const int64_t out = b->second.dim() == 2 ? b->second.size(0) : -1;
      expect_shape(b_name, {out, c.rank}, "");
      expected.insert(a_name);
      expected.insert(b_name);
      for (const auto& module : group.modules) {
        adapter.group_key_of_[module] = group.key;
        if (c.method.has_u()) expect_shape(kModelPrefix + module + ".lora_u", {c.rank}, " (the method trains u)");
        if (c.method.has_v()) expect_shape(kModelPrefix + module + ".lora_v", {out}, " (the method trains v)");
        if (c.method.has_u()) expected.insert(kModelPrefix + module + ".lora_u");
        if (c.method.has_v()) expected.insert(kModelPrefix + module + ".lora_v");
      }
    }
  }
  for (const auto& [name, t] : adapter.tensors_) {
    if (!expected.count(name))
      fail(name, "is not part of a " +
                     std::string(c.type == AdapterType::vera   ? "VeRA"
                                 : c.type == AdapterType::lora ? "LoRA"
                                                               : "TIEDLORA") +
                     " adapter of this config (unexpected tensor)");
  }
  std::set<std::string> modules;
  if (c.type == AdapterType::tiedlora) {
    for (const auto& [module, key] : adapter.group_key_of_) modules.insert(module);
  } else {
    const std::string suffix = c.type == AdapterType::lora ? ".lora_A.weight" : ".vera_lambda_d";
    for (const auto& [name, t] : adapter.tensors_) {
      const std::string m = module_of(name, suffix);
      if (!m.empty()) modules.insert(m);
    }
  }
  adapter.modules_.assign(modules.begin(), modules.end());
  if (adapter.modules_.empty()) throw FormatError(weights_path + ": the adapter holds no layer");
  // The config's target_modules must select every layer the weights hold (PEFT would not create the
  // layer, so its weights would be ignored there while merge-weights applied them).
  for (const auto& module : adapter.modules_) {
    if (!c.targets(module)) {
      throw FormatError(config_path + ": target_modules " + c.target_modules_text() + " does not select layer '" +
                        module + "', whose weights are in " + weights_path +
                        " (hint: adapter_config.json and the weights disagree)");
    }
  }
  return adapter;
}

bool Adapter::contains(const std::string& module) const {
  return std::binary_search(modules_.begin(), modules_.end(), module);
}

functional::LowRankUpdate Adapter::layer(const std::string& module, LinearShape base) const {
  if (!contains(module)) throw FormatError(source_ + ": the adapter has no layer '" + module + "'");
  functional::LowRankUpdate f;
  const std::string p = kModelPrefix + module;
  if (config_.type == AdapterType::lora) {
    f.lora_a = tensors_.at(p + ".lora_A.weight");
    f.lora_b = tensors_.at(p + ".lora_B.weight");
    f.scale = config_.scale_for(module, f.lora_a.size(0));
  } else if (config_.type == AdapterType::vera) {
    const at::Tensor& a = tensors_.at("base_model.vera_A");
    const at::Tensor& b = tensors_.at("base_model.vera_B");
    f.u = tensors_.at(p + ".vera_lambda_d");
    f.v = tensors_.at(p + ".vera_lambda_b");
    if (base.in_features > a.size(1) || base.out_features > b.size(0) || f.v.size(0) != base.out_features) {
      throw FormatError(source_ + ": layer '" + module + "' is " + std::to_string(base.in_features) + " -> " +
                        std::to_string(base.out_features) + " in the base model but the VeRA adapter holds A " +
                        shape_text(a) + ", B " + shape_text(b) + ", lambda_b " + shape_text(f.v) +
                        " (hint: maybe wrong base model?)");
    }
    f.lora_a = a.slice(1, 0, base.in_features);  // PEFT's VeRA slices its shared projections per layer
    f.lora_b = b.slice(0, 0, base.out_features);
    f.scale = 1.0;
  } else {
    const std::string& key = group_key_of_.at(module);
    f.lora_a = tensors_.at(kGroupsPrefix + key + ".lora_A");
    f.lora_b = tensors_.at(kGroupsPrefix + key + ".lora_B");
    if (config_.method.has_u()) f.u = tensors_.at(p + ".lora_u");
    if (config_.method.has_v()) f.v = tensors_.at(p + ".lora_v");
    f.scale = adapter_scale(config_.alpha, config_.rank, config_.use_rslora);
  }
  if (f.lora_a.size(1) != base.in_features || f.lora_b.size(0) != base.out_features) {
    throw FormatError(source_ + ": layer '" + module + "' is " + std::to_string(base.in_features) + " -> " +
                      std::to_string(base.out_features) + " in the base model but the adapter's A is " +
                      shape_text(f.lora_a) + " and B is " + shape_text(f.lora_b) + " (hint: maybe wrong base model?)");
  }
  return f;
}

// ---- writing ------------------------------------------------------------------------------------------

namespace {

// The two files of an adapter, into `folder` (which exists: a staged folder, published by the caller).
void write_adapter_files(const std::string& folder, const AdapterConfig& config,
                         const std::vector<std::pair<std::string, at::Tensor>>& tensors) {
  const std::string text = adapter_config_json(config);
  formats::save_safetensors(util::join_path(folder, kWeightsName), tensors, {{"format", "pt"}});
  util::write_file_atomically(util::join_path(folder, kConfigName),
                              [&](const util::ByteWriter& write) { write(text.data(), text.size()); });
}

}  // namespace

void write_adapter_folder(const std::string& folder, const AdapterConfig& config,
                          const std::vector<std::pair<std::string, at::Tensor>>& tensors, bool overwrite) {
  if (util::path_exists(folder) && !overwrite) {
    throw Error(folder + ": already exists (hint: choose another folder or allow overwriting)");
  }
  util::StagedDirectory staged(folder);
  write_adapter_files(staged.path(), config, tensors);
  staged.publish(overwrite);
}

void export_lora(const Adapter& adapter, const std::string& out_folder, const ExportLoraOptions& options) {
  const bool overwrite = options.overwrite;
  util::check_output_apart_from_inputs("the output folder", out_folder, {{"adapter folder", adapter.source()}});
  if (util::path_exists(out_folder) && !overwrite) {
    throw Error(out_folder + ": already exists (hint: choose another output folder or pass --force)");
  }
  const AdapterConfig& in = adapter.config();
  if (in.type == AdapterType::vera) {
    throw ConfigError(adapter.source() +
                      ": export-lora needs a LoRA or TIEDLORA adapter; VeRA layers take their "
                      "shapes from the base model (hint: merge it with merge-weights instead)");
  }
  AdapterConfig out;
  out.type = AdapterType::lora;
  out.method = AdapterMethod::lora();
  out.rank = in.rank;
  out.alpha = static_cast<double>(in.rank);  // PEFT's scale alpha / r is 1: the scale is folded into B_l
  out.dropout = in.dropout;
  out.fan_in_fan_out = in.fan_in_fan_out;
  out.base_model_name_or_path = in.base_model_name_or_path;
  out.target_modules = adapter.modules();
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  at::NoGradGuard no_grad;
  for (const auto& module : adapter.modules()) {
    const functional::LowRankUpdate f = adapter.layer(module, *adapter.stored_shape(module));
    if (f.lora_a.size(0) != in.rank) {
      throw ConfigError(adapter.source() + ": layer '" + module + "' has rank " + std::to_string(f.lora_a.size(0)) +
                        " (rank_pattern); export-lora writes one rank for all layers");
    }
    // A_l = diag(u) A and B_l = s diag(v) B in fp32, rounded once to the stored dtypes.
    const functional::LowRankUpdate lora = functional::folded_into_lora(f);
    tensors.emplace_back(kModelPrefix + module + ".lora_A.weight", lora.lora_a.to(f.lora_a.scalar_type()).contiguous());
    tensors.emplace_back(kModelPrefix + module + ".lora_B.weight", lora.lora_b.to(f.lora_b.scalar_type()).contiguous());
  }
  write_adapter_folder(out_folder, out, tensors, overwrite);
}

std::optional<LinearShape> Adapter::stored_shape(const std::string& module) const {
  const std::string p = kModelPrefix + module;
  if (config_.type == AdapterType::lora) {
    return LinearShape{tensors_.at(p + ".lora_A.weight").size(1), tensors_.at(p + ".lora_B.weight").size(0)};
  }
  if (config_.type == AdapterType::tiedlora) {
    const std::string& key = group_key_of_.at(module);
    return LinearShape{tensors_.at(kGroupsPrefix + key + ".lora_A").size(1),
                       tensors_.at(kGroupsPrefix + key + ".lora_B").size(0)};
  }
  return std::nullopt;  // VeRA: the input width comes from the base model
}

// ---- models -------------------------------------------------------------------------------------------

namespace {

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

// The config and tensors of adapter `adapter` of `model`, as save_adapter writes them.
std::pair<AdapterConfig, NamedTensors> collect_adapter(const torch::nn::Module& model, const std::string& adapter,
                                                       const SaveAdapterOptions& options) {
  const auto layers = adapted_layers(model, adapter);
  if (layers.empty()) {
    throw ConfigError("save_adapter: the model carries no adapter named '" + adapter +
                      "' (hint: call inject_adapters "
                      "first; adapter_names() lists what it carries)");
  }
  trainable_parameters(model);  // refuses tied factors that no module registers (they never trained)
  const LoraLinearImpl& first = *layers.front().second;
  const AdapterMethod method = first.method(adapter);
  const LoraOptions& lora = first.lora_options(adapter);
  for (const auto& [name, layer] : layers) {
    const LoraOptions& o = layer->lora_options(adapter);
    if (!layer->same_configuration(method, lora, adapter)) {
      throw ConfigError("save_adapter: layer '" + name + "' (" + layer->method(adapter).name() + ", rank " +
                        std::to_string(o.rank()) + ") differs from '" + layers.front().first + "' (" + method.name() +
                        ", rank " + std::to_string(lora.rank()) + "); one adapter file holds one configuration");
    }
  }
  AdapterConfig c;
  c.method = method;
  c.rank = lora.rank();
  c.alpha = lora.effective_alpha();
  c.use_rslora = lora.use_rslora();
  c.dropout = lora.dropout();
  c.fan_in_fan_out = options.fan_in_fan_out;
  c.base_model_name_or_path = options.base_model_name_or_path;
  c.init_seed = lora.seed();
  NamedTensors tensors;
  for (const auto& [name, layer] : layers) c.target_modules.push_back(name);
  if (method.is_plain_lora()) {
    c.type = AdapterType::lora;
    for (const auto& [name, layer] : layers) {
      tensors.emplace_back(kModelPrefix + name + ".lora_A.weight", layer->lora_A(adapter).detach());
      tensors.emplace_back(kModelPrefix + name + ".lora_B.weight", layer->lora_B(adapter).detach());
    }
  } else {
    c.type = AdapterType::tiedlora;
    std::unordered_map<const TiedLoraFactorsImpl*, size_t> group_of;
    for (const auto& [name, layer] : layers) {
      const TiedLoraFactors factors = layer->factors(adapter);
      auto [it, inserted] = group_of.emplace(factors.get(), c.groups.size());
      if (inserted) {
        AdapterGroup group;
        group.name =
            factors->options.name().empty() ? "group" + std::to_string(c.groups.size()) : factors->options.name();
        group.key = group.name;
        for (char& ch : group.key) {
          if (ch == '.') ch = '-';
        }
        for (const auto& other : c.groups) {
          if (other.key == group.key)
            throw ConfigError("save_adapter: two tie groups are both named '" + group.name + "'");
        }
        tensors.emplace_back(kGroupsPrefix + group.key + ".lora_A", factors->lora_A.detach());
        tensors.emplace_back(kGroupsPrefix + group.key + ".lora_B", factors->lora_B.detach());
        c.groups.push_back(std::move(group));
      }
      c.groups[it->second].modules.push_back(name);
      const at::Tensor &u = layer->lora_u_of(adapter), &v = layer->lora_v_of(adapter);
      if (u.defined()) tensors.emplace_back(kModelPrefix + name + ".lora_u", u.detach());
      if (v.defined()) tensors.emplace_back(kModelPrefix + name + ".lora_v", v.detach());
    }
  }
  return {c, tensors};
}

}  // namespace

void save_adapter(const torch::nn::Module& model, const std::string& folder, const SaveAdapterOptions& options) {
  const auto [config, tensors] = collect_adapter(model, options.adapter_name, options);
  write_adapter_folder(folder, config, tensors, options.overwrite);
}

void save_adapters(const torch::nn::Module& model, const std::string& folder, const SaveAdapterOptions& options) {
  const std::vector<std::string> names = adapter_names(model);
  if (names.empty())
    throw ConfigError("save_adapters: the model carries no adapter (hint: call inject_adapters first)");
  if (util::path_exists(folder) && !options.overwrite) {
    throw Error(folder + ": already exists (hint: choose another folder or allow overwriting)");
  }
  std::vector<std::pair<std::string, std::pair<AdapterConfig, NamedTensors>>> collected;
  for (const auto& name : names) collected.emplace_back(name, collect_adapter(model, name, options));
  util::StagedDirectory staged(folder);
  for (const auto& [name, adapter] : collected) {
    // PEFT's layout: the default adapter at the top, every other one in the subfolder of its name.
    std::string dir = staged.path();
    if (name != kDefaultAdapter) {
      dir = util::join_path(dir, name);
      util::make_directories(dir);
    }
    write_adapter_files(dir, adapter.first, adapter.second);
  }
  staged.publish(options.overwrite);
}

void load_adapter(torch::nn::Module& model, const std::string& folder, const std::string& adapter_name) {
  check_adapter_name(adapter_name);
  const Adapter adapter = Adapter::read(folder);
  const AdapterConfig& c = adapter.config();
  if (!adapted_layers(model, adapter_name).empty()) {
    throw ConfigError(folder + ": the model already carries an adapter named '" + adapter_name + "' (on '" +
                      adapted_layers(model, adapter_name).front().first +
                      "') (hint: load it under another name, or "
                      "delete_adapter() the one there)");
  }
  // Check every layer against the model before anything changes.
  std::map<std::string, LinearShape> linear;
  std::map<std::string, std::string> other;
  for (const auto& item : model.named_modules("", /*include_self=*/false)) {
    if (auto* l = item.value()->as<torch::nn::LinearImpl>()) {
      linear[item.key()] = {l->options.in_features(), l->options.out_features()};
    } else if (auto* l = item.value()->as<LoraLinearImpl>()) {
      linear[item.key()] = {l->options.in_features(), l->options.out_features()};
    } else {
      other[item.key()] = item.value()->name();
    }
  }
  for (const auto& module : adapter.modules()) {
    auto it = linear.find(module);
    if (it == linear.end()) {
      const std::string what =
          other.count(module) ? "is a " + other.at(module) + ", not a linear layer" : "does not exist in the model";
      throw FormatError(folder + ": layer '" + module + "' " + what + " (hint: maybe wrong base model?)");
    }
    const functional::LowRankUpdate f = adapter.layer(module, it->second);  // checks the shapes
    if (c.type == AdapterType::lora && f.lora_a.size(0) != c.rank) {
      throw ConfigError(folder + ": layer '" + module + "' has rank " + std::to_string(f.lora_a.size(0)) +
                        " from rank_pattern; loading per-layer ranks into a model is not supported (hint: merge "
                        "it with merge-weights)");
    }
    if (c.type == AdapterType::lora && f.scale != adapter_scale(c.alpha, c.rank, c.use_rslora)) {
      throw ConfigError(folder + ": layer '" + module +
                        "' has its own alpha from alpha_pattern; loading per-layer "
                        "alphas into a model is not supported (hint: merge it with merge-weights)");
    }
  }
  InjectOptions options;
  options.adapter_name(adapter_name);
  options.targets(adapter.modules());
  options.method(c.method);
  options.lora(LoraOptions(c.rank).alpha(c.alpha).use_rslora(c.use_rslora).dropout(c.dropout).seed(c.init_seed));
  if (c.type == AdapterType::tiedlora && c.method.tied) {
    TieGroups groups;
    for (const auto& g : c.groups) {
      for (const auto& m : g.modules) groups.emplace_back(m, g.name);
    }
    options.tie_groups(groups);
  }
  inject_adapters(model, options);  // all-or-nothing itself
  at::NoGradGuard no_grad;
  for (const auto& [name, layer] :
       adapted_layers(model, adapter_name)) {  // exactly the adapter's modules (checked above)
    const functional::LowRankUpdate f = adapter.layer(name, linear.at(name));
    if (layer->adapter_kind(adapter_name) == AdapterKind::lora) {
      layer->lora_A(adapter_name).copy_(f.lora_a);
      layer->lora_B(adapter_name).copy_(f.lora_b);
      continue;
    }
    layer->factors(adapter_name)->lora_A.copy_(f.lora_a);  // shared: every layer of the group copies the same values
    layer->factors(adapter_name)->lora_B.copy_(f.lora_b);
    if (layer->lora_u_of(adapter_name).defined()) layer->lora_u_of(adapter_name).copy_(f.u);
    if (layer->lora_v_of(adapter_name).defined()) layer->lora_v_of(adapter_name).copy_(f.v);
  }
}

std::vector<std::string> adapter_folders(const std::string& folder) {
  if (!util::is_directory(folder)) throw FormatError(folder + ": not an adapter folder (no such folder)");
  std::vector<std::string> names;
  if (util::is_regular_file(util::join_path(folder, kConfigName))) names.push_back(kDefaultAdapter);
  std::vector<std::string> entries = util::list_directory(folder);
  std::sort(entries.begin(), entries.end());
  for (const auto& entry : entries) {
    if (entry == kDefaultAdapter && !names.empty()) continue;
    const std::string sub = util::join_path(folder, entry);
    if (util::is_directory(sub) && util::is_regular_file(util::join_path(sub, kConfigName))) names.push_back(entry);
  }
  if (names.empty()) {
    throw FormatError(folder + ": holds no adapter (no " + std::string(kConfigName) +
                      " at the top or in a subfolder) "
                      "(hint: an adapter folder holds " +
                      kConfigName + " and " + kWeightsName + ")");
  }
  return names;
}

std::vector<std::string> load_adapters(torch::nn::Module& model, const std::string& folder) {
  const std::vector<std::string> names = adapter_folders(folder);
  for (const auto& name : names) {
    try {
      check_adapter_name(name);
    } catch (const ConfigError& e) {
      throw FormatError(util::join_path(folder, name) +
                        ": holds an adapter, but its folder name cannot name one: " + e.what());
    }
  }
  // What loading may change, to put back if a later adapter fails: the adapters, which tensors train
  // (injection freezes the rest of the model), the active set, merged layers (adding an adapter unmerges).
  const std::vector<std::string> before = adapter_names(model);
  std::vector<std::pair<LoraLinearImpl*, std::vector<std::string>>> active;  // every layer's own list
  for (const auto& module : model.modules(/*include_self=*/false)) {
    if (auto* layer = module->as<LoraLinearImpl>()) active.emplace_back(layer, layer->active_adapters());
  }
  std::vector<std::pair<at::Tensor, bool>> trainable;
  for (const auto& p : model.parameters()) trainable.emplace_back(p, p.requires_grad());
  std::vector<LoraLinear> merged;
  for (const auto& [name, layer] : adapted_layers(model)) {
    if (layer->merged()) merged.push_back(layer);
  }
  try {
    for (const auto& name : names) {
      load_adapter(model,
                   name == kDefaultAdapter && util::is_regular_file(util::join_path(folder, kConfigName))
                       ? folder
                       : util::join_path(folder, name),
                   name);
    }
  } catch (...) {
    for (const auto& name : adapter_names(model)) {
      if (std::find(before.begin(), before.end(), name) == before.end()) delete_adapter(model, name);
    }
    for (auto& [p, requires_grad] : trainable) p.requires_grad_(requires_grad);
    for (auto& [layer, list] : active) layer->set_active_adapters(list);
    for (auto& layer : merged) layer->merge_();
    throw;
  }
  return names;
}

}  // namespace tiedlora
