// main.cpp: the consumer project's program, linked against the core component alone (tiedlora::core). Through
// the installed headers and library: wraps a Linear
// with Tied-LoRA, trains one step and checks the update is live; and removes a non-empty folder with
// std::filesystem::remove_all, which crashes in programs linked against the torch wheel unless libstdc++
// comes first (the option tiedlora's package adds; README "Known problems").
#include <filesystem>
#include <fstream>
#include <iostream>

#include <tiedlora/core.h>
#include <torch/torch.h>

int main(int argc, char** argv) {
  torch::manual_seed(0);
  torch::nn::Linear base(6, 4);
  tiedlora::TiedLoraFactors factors(6, 4, tiedlora::AdapterMethod::parse("tied-abuv"), tiedlora::LoraOptions(2));
  tiedlora::TiedLoraLinear layer(base, factors);
  auto x = torch::randn({3, 6});
  auto loss = layer->forward(x).square().sum();
  loss.backward();
  const bool ok = layer->lora_v.grad().defined() && layer->lora_v.grad().abs().sum().item<double>() > 0;
  std::cout << "consumer: " << layer << " gradient " << (ok ? "ok" : "missing") << "\n";

  const std::filesystem::path scratch = argc > 1 ? argv[1] : "consumer_scratch";
  std::filesystem::create_directories(scratch / "sub");
  std::ofstream(scratch / "sub" / "file") << "x";
  const auto removed = std::filesystem::remove_all(scratch);
  std::cout << "consumer: std::filesystem::remove_all removed " << removed << " entries\n";
  return ok && removed == 3 ? 0 : 1;
}
