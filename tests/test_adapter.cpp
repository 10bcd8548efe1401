// test_adapter.cpp: adapter folders against PEFT's files (tests/reference/make_adapter_reference.py):
// loading PEFT LoRA and VeRA into a C++ module tree with Hugging Face names, saving and re-loading LoRA and
// Tied-LoRA, export to LoRA, and every malformed or mismatched input with its message. It also writes the
// adapters (cpp_llama_lora, cpp_llama_tied) that tests/merge/test_merge.py hands to PEFT.
#include <sys/stat.h>

#include <fstream>
#include <limits>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "test_support.h"
#include "tiedlora/core/error.h"
#include "tiedlora/core/functional.h"
#include "tiedlora/core/inject.h"
#include "tiedlora/formats/adapter.h"
#include "tiedlora/formats/hf_config.h"
#include "tiedlora/formats/safetensors.h"
#include "util/files.h"

namespace {

using tiedlora::testing::all_close;
using tiedlora::testing::error_of;

std::string ref(const std::string& name) { return tiedlora::testing::reference_dir() + "/adapters/" + name; }

std::string scratch(const std::string& name) {
  const std::string dir = tiedlora::testing::reference_dir() + "/adapter_scratch";
  ::mkdir(dir.c_str(), 0755);
  const std::string path = dir + "/" + name;
  tiedlora::util::remove_tree(path);
  return path;
}

// A module tree with the Hugging Face names and shapes of a config.json; linear layers are LoraLinear.
std::shared_ptr<torch::nn::Module> tree_from_config(const std::string& config) {
  auto root = std::make_shared<torch::nn::Module>();
  std::map<std::string, std::shared_ptr<torch::nn::Module>> nodes{{"", root}};
  for (const auto& m : tiedlora::describe_hf_model(config)) {
    const auto dot = m.name.rfind('.');
    const std::string parent = dot == std::string::npos ? "" : m.name.substr(0, dot);
    const std::string key = dot == std::string::npos ? m.name : m.name.substr(dot + 1);
    std::shared_ptr<torch::nn::Module> node =
        m.is_linear
            ? tiedlora::LoraLinear(torch::nn::LinearOptions(m.shape.in_features, m.shape.out_features).bias(false))
                  .ptr()
            : std::make_shared<torch::nn::Module>();
    nodes.at(parent)->register_module(key, node);
    nodes[m.name] = node;
  }
  return root;
}

void copy_folder(const std::string& from, const std::string& to) {
  ::mkdir(to.c_str(), 0755);
  for (const auto& name : tiedlora::util::list_directory(from)) {
    tiedlora::util::copy_file(from + "/" + name, to + "/" + name);
  }
}

void write_text(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

void randomize(torch::nn::Module& model) {
  torch::NoGradGuard no_grad;
  for (auto& p : model.parameters()) {
    if (p.requires_grad()) p.normal_(0.5, 0.3);
  }
}

// A copy of `good`, broken by `break_it`, must be refused by load_adapter with `expected` and the folder
// in the message, and leave the model without an adapter.
struct BrokenFolder {
  std::string name;
  std::function<void(const std::string&)> break_it;
  std::string expected;
};

void expect_each_refused(const std::string& good, const std::string& prefix, const std::vector<BrokenFolder>& cases) {
  for (const auto& c : cases) {
    const std::string dir = scratch(prefix + c.name);
    copy_folder(good, dir);
    c.break_it(dir);
    auto model = tree_from_config(ref("llama_base/config.json"));
    const auto message = error_of([&] { tiedlora::load_adapter(*model, dir); });
    EXPECT_NE(message.find(c.expected), std::string::npos) << c.name << ": " << message;
    EXPECT_NE(message.find(dir), std::string::npos) << c.name << " does not name the folder: " << message;
    EXPECT_TRUE(tiedlora::adapted_layers(*model).empty()) << c.name;
  }
}

TEST(Adapter, LoadsPeftLoraIntoATreeWithHuggingFaceNames) {
  auto model = tree_from_config(ref("llama_base/config.json"));
  tiedlora::load_adapter(*model, ref("llama_lora"));
  const auto layers = tiedlora::adapted_layers(*model);
  ASSERT_EQ(layers.size(), 6u);
  const auto file = tiedlora::formats::load_safetensors(ref("llama_lora/adapter_model.safetensors"));
  for (const auto& [name, layer] : layers) {
    EXPECT_TRUE(torch::equal(layer->lora_A(), file.at("base_model.model." + name + ".lora_A.weight"))) << name;
    EXPECT_TRUE(torch::equal(layer->lora_B(), file.at("base_model.model." + name + ".lora_B.weight"))) << name;
    EXPECT_DOUBLE_EQ(layer->scale(), 16.0 / std::sqrt(8.0)) << "rsLoRA scale";
  }
}

TEST(Adapter, LoadsPeftVeraAsTiedUvWithPeftsDeltas) {
  auto model = tree_from_config(ref("llama_base/config.json"));
  tiedlora::load_adapter(*model, ref("llama_vera"));
  const auto deltas = tiedlora::formats::load_safetensors(ref("llama_vera_deltas.safetensors"));
  const auto layers = tiedlora::adapted_layers(*model);
  ASSERT_EQ(layers.size(), deltas.size());
  for (const auto& [name, layer] : layers) {
    EXPECT_EQ(layer->method().name(), "tied-uv");
    const auto ours = tiedlora::functional::low_rank_delta(
        {layer->lora_A(), layer->lora_B(), layer->lora_u, layer->lora_v, layer->scale()});
    EXPECT_TRUE(all_close(ours, deltas.at(name), 1e-5, 1e-6, "VeRA delta of " + name));
  }
}

TEST(Adapter, TiedAdapterRoundTripsAndExportsExactly) {
  torch::manual_seed(3);
  auto model = tree_from_config(ref("llama_base/config.json"));
  tiedlora::inject_adapters(*model, tiedlora::InjectOptions()
                                        .targets({"q_proj", "v_proj", "down_proj"})
                                        .method("tied-abuv")
                                        .lora(tiedlora::LoraOptions(4).alpha(6.0).seed(11)));
  randomize(*model);
  const std::string folder = ref("cpp_llama_tied");
  tiedlora::util::remove_tree(folder);
  tiedlora::save_adapter(*model, folder, {"tiny-llama", false, false});

  const auto adapter = tiedlora::Adapter::read(folder);
  EXPECT_EQ(adapter.config().type, tiedlora::AdapterType::tiedlora);
  EXPECT_EQ(adapter.config().method.name(), "tied-abuv");
  EXPECT_EQ(adapter.config().groups.size(), 3u);
  EXPECT_EQ(adapter.config().init_seed.value_or(0), 11u);
  EXPECT_EQ(adapter.config().groups[0].name, "model.layers.*.self_attn.q_proj");

  auto fresh = tree_from_config(ref("llama_base/config.json"));
  tiedlora::load_adapter(*fresh, folder);
  const auto a = tiedlora::adapted_layers(*model), b = tiedlora::adapted_layers(*fresh);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].first, b[i].first);
    EXPECT_TRUE(torch::equal(a[i].second->lora_A(), b[i].second->lora_A()));
    EXPECT_TRUE(torch::equal(a[i].second->lora_B(), b[i].second->lora_B()));
    EXPECT_TRUE(torch::equal(a[i].second->lora_u, b[i].second->lora_u));
    EXPECT_TRUE(torch::equal(a[i].second->lora_v, b[i].second->lora_v));
  }
  // Shared factors stay shared after loading.
  EXPECT_EQ(b[0].second->lora_A().data_ptr(), b[3].second->lora_A().data_ptr());  // layers 0 and 1 q_proj

  // export-lora: per-layer LoRA whose deltas equal the tied deltas.
  const std::string exported = ref("cpp_llama_tied_exported");
  tiedlora::util::remove_tree(exported);
  tiedlora::export_lora(adapter, exported);
  const auto lora = tiedlora::Adapter::read(exported);
  EXPECT_EQ(lora.config().type, tiedlora::AdapterType::lora);
  for (const auto& module : adapter.modules()) {
    const auto shape = *adapter.stored_shape(module);
    EXPECT_TRUE(all_close(tiedlora::functional::low_rank_delta(lora.layer(module, shape)),
                          tiedlora::functional::low_rank_delta(adapter.layer(module, shape)), 1e-6, 1e-6,
                          "exported delta of " + module));
  }
}

TEST(Adapter, Gpt2TiedAdapterRecordsFanInFanOut) {
  torch::manual_seed(5);
  auto model = tree_from_config(ref("gpt2_base/config.json"));
  tiedlora::inject_adapters(*model, tiedlora::InjectOptions()
                                        .targets({"c_attn", "mlp.c_fc"})
                                        .method("tied-abuv")
                                        .lora(tiedlora::LoraOptions(4).alpha(4.0).seed(1)));
  randomize(*model);
  const std::string folder = ref("cpp_gpt2_tied");
  tiedlora::util::remove_tree(folder);
  tiedlora::save_adapter(*model, folder, {"tiny-gpt2", /*fan_in_fan_out=*/true, false});
  const auto adapter = tiedlora::Adapter::read(folder);
  EXPECT_TRUE(adapter.config().fan_in_fan_out);
  EXPECT_EQ(adapter.modules().size(), 4u);
}

TEST(Adapter, LoraIsSavedInPeftsLayout) {
  torch::manual_seed(4);
  auto model = tree_from_config(ref("llama_base/config.json"));
  tiedlora::inject_adapters(
      *model,
      tiedlora::InjectOptions().targets({"q_proj", "v_proj"}).method("lora").lora(tiedlora::LoraOptions(4).alpha(8.0)));
  randomize(*model);
  const std::string folder = ref("cpp_llama_lora");
  tiedlora::util::remove_tree(folder);
  tiedlora::save_adapter(*model, folder);
  const auto file = tiedlora::formats::load_safetensors(folder + "/adapter_model.safetensors");
  EXPECT_EQ(file.size(), 8u);
  EXPECT_TRUE(file.count("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"));
  const auto config =
      tiedlora::parse_adapter_config(tiedlora::util::read_text_file(folder + "/adapter_config.json"), "x");
  EXPECT_EQ(config.type, tiedlora::AdapterType::lora);
  EXPECT_EQ(config.rank, 4);
  EXPECT_DOUBLE_EQ(config.alpha, 8.0);
  // Saving over an existing folder is refused unless asked.
  const auto message = error_of([&] { tiedlora::save_adapter(*model, folder); });
  EXPECT_NE(message.find("already exists"), std::string::npos) << message;
}

TEST(Adapter, WrongBaseModelIsRefusedAndTheModelIsUnchanged) {
  auto llama = tree_from_config(ref("llama_base/config.json"));
  auto message = error_of([&] { tiedlora::load_adapter(*llama, ref("gpt2_lora")); });
  EXPECT_NE(message.find("does not exist in the model"), std::string::npos) << message;
  EXPECT_NE(message.find("maybe wrong base model"), std::string::npos) << message;
  EXPECT_TRUE(tiedlora::adapted_layers(*llama).empty());
  for (const auto& p : llama->parameters()) EXPECT_TRUE(p.requires_grad());

  // Same names, other widths.
  const std::string config = scratch("wide_config.json");
  write_text(config, R"({"model_type": "llama", "hidden_size": 64, "intermediate_size": 48, "num_hidden_layers": 2,
      "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 97})");
  auto wide = tree_from_config(config);
  message = error_of([&] { tiedlora::load_adapter(*wide, ref("llama_lora")); });
  EXPECT_NE(message.find("in the base model but the adapter's A"), std::string::npos) << message;
  EXPECT_TRUE(tiedlora::adapted_layers(*wide).empty());
}

// Malformed adapter folders, each made from a good one with one defect, and the words its error must hold.
TEST(Adapter, MalformedFoldersGetClearErrors) {
  const std::string good = ref("llama_lora");
  const std::string config = tiedlora::util::read_text_file(good + "/adapter_config.json");
  auto replace = [](std::string text, const std::string& from, const std::string& to) {
    const auto at = text.find(from);
    return at == std::string::npos ? text : text.replace(at, from.size(), to);
  };
  auto drop_tensor = [](const std::string& dir, const std::string& name) {
    auto tensors = tiedlora::formats::load_safetensors(dir + "/adapter_model.safetensors");
    tensors.erase(name);
    tiedlora::formats::save_safetensors(dir + "/adapter_model.safetensors", tensors);
  };
  auto add_tensor = [](const std::string& dir, const std::string& name, const torch::Tensor& t) {
    auto tensors = tiedlora::formats::load_safetensors(dir + "/adapter_model.safetensors");
    tensors[name] = t;
    tiedlora::formats::save_safetensors(dir + "/adapter_model.safetensors", tensors);
  };
  const std::vector<BrokenFolder> cases = {
      {"bad_json", [&](const std::string& d) { write_text(d + "/adapter_config.json", "{\"r\": 8,"); },
       "not valid JSON"},
      {"not_object", [&](const std::string& d) { write_text(d + "/adapter_config.json", "[1, 2]"); },
       "must be a JSON object"},
      {"no_type", [&](const std::string& d) { write_text(d + "/adapter_config.json", "{\"r\": 8}"); },
       "field 'peft_type' is missing"},
      {"unknown_type",
       [&](const std::string& d) { write_text(d + "/adapter_config.json", replace(config, "\"LORA\"", "\"IA3\"")); },
       "\"IA3\" is not supported"},
      {"dora",
       [&](const std::string& d) {
         write_text(d + "/adapter_config.json", replace(config, "\"use_dora\": false", "\"use_dora\": true"));
       },
       "DoRA"},
      {"rank_is_text",
       [&](const std::string& d) {
         write_text(d + "/adapter_config.json", replace(config, "\"r\": 8", "\"r\": \"8\""));
       },
       "field 'r' must be a positive integer"},
      {"duplicate_key",
       [&](const std::string& d) {
         write_text(d + "/adapter_config.json", replace(config, "\"r\": 8", "\"r\": 8, \"r\": 4"));
       },
       "key 'r' appears twice"},
      {"wrong_rank",
       [&](const std::string& d) { write_text(d + "/adapter_config.json", replace(config, "\"r\": 8", "\"r\": 4")); },
       "has rank 8 but the config says r = 4"},
      {"missing_b",
       [&](const std::string& d) { drop_tensor(d, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"); },
       "lora_B.weight' is missing"},
      {"unexpected_tensor",
       [&](const std::string& d) { add_tensor(d, "base_model.model.lm_head.lora_embedding_A", torch::ones({2})); },
       "is not a LoRA A/B tensor"},
      {"integer_tensor",
       [&](const std::string& d) {
         add_tensor(d, "base_model.model.x.lora_A.weight", torch::ones({8, 2}, torch::kInt));
       },
       "must be floating point"},
      {"no_weights", [&](const std::string& d) { ::unlink((d + "/adapter_model.safetensors").c_str()); },
       "missing adapter_model.safetensors"},
      {"truncated_weights", [&](const std::string& d) { ::truncate((d + "/adapter_model.safetensors").c_str(), 100); },
       "adapter_model.safetensors"},
  };
  expect_each_refused(good, "malformed_", cases);
}

TEST(Adapter, NonFiniteValuesTargetModulesAndPatternsAreCheckedAtLoad) {
  const std::string good = ref("llama_lora");
  auto edit_config = [](const std::string& dir, const std::function<void(nlohmann::json&)>& edit) {
    auto j = nlohmann::json::parse(tiedlora::util::read_text_file(dir + "/adapter_config.json"));
    edit(j);
    write_text(dir + "/adapter_config.json", j.dump(2));
  };
  const std::string b_name = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight";
  const std::vector<BrokenFolder> cases = {
      {"nan",
       [&](const std::string& d) {
         auto tensors = tiedlora::formats::load_safetensors(d + "/adapter_model.safetensors");
         tensors[b_name] = tensors.at(b_name).clone();
         tensors[b_name][0][0] = std::numeric_limits<float>::quiet_NaN();
         tensors[b_name][1][0] = std::numeric_limits<float>::infinity();
         tiedlora::formats::save_safetensors(d + "/adapter_model.safetensors", tensors);
       },
       "tensor '" + b_name + "' holds 2 NaN or Inf"},
      {"other_targets",
       [&](const std::string& d) { edit_config(d, [](auto& j) { j["target_modules"] = {"x_proj"}; }); },
       "target_modules ['x_proj'] does not select layer 'model.layers.0.mlp.down_proj'"},
      {"target_regex",
       [&](const std::string& d) { edit_config(d, [](auto& j) { j["target_modules"] = R"(.*\.(q|v)_proj)"; }); },
       "does not select layer 'model.layers.0.mlp.down_proj'"},
      {"python_only_pattern",
       [&](const std::string& d) {
         edit_config(d, [](auto& j) { j["alpha_pattern"] = {{"(?<=layers\\.0\\.)q_proj", 4}}; });
       },
       "lookbehind"},
  };
  expect_each_refused(good, "checked_", cases);
  // An explicit option reads a non-finite adapter (for inspection).
  tiedlora::Adapter::ReadOptions allow;
  allow.allow_non_finite = true;
  EXPECT_NO_THROW(tiedlora::Adapter::read(tiedlora::testing::reference_dir() + "/adapter_scratch/checked_nan", allow));
  // The regex target_modules that selects exactly the adapted layers passes.
  const std::string regex_ok = scratch("checked_regex_ok");
  copy_folder(good, regex_ok);
  edit_config(regex_ok,
              [](auto& j) { j["target_modules"] = R"(model\.layers\.\d+\.(self_attn\.(q|v)_proj|mlp\.down_proj))"; });
  EXPECT_EQ(tiedlora::Adapter::read(regex_ok).modules().size(), 6u);
}

TEST(Adapter, PatternsAndVeraExportAreRefusedWhereUnsupported) {
  auto model = tree_from_config(ref("llama_base/config.json"));
  auto message = error_of([&] { tiedlora::load_adapter(*model, ref("llama_lora_rank_pattern")); });
  EXPECT_NE(message.find("rank_pattern"), std::string::npos) << message;
  message =
      error_of([&] { tiedlora::export_lora(tiedlora::Adapter::read(ref("llama_vera")), scratch("vera_export")); });
  EXPECT_NE(message.find("merge-weights"), std::string::npos) << message;
}

}  // namespace
