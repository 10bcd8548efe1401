// main.cpp: the consumer project's program: wraps a Linear with Tied-LoRA through the installed headers
// and library, trains one step, and checks the update is live.
#include <iostream>

#include <torch/torch.h>
#include <tiedlora/tiedlora.h>

int main() {
  torch::manual_seed(0);
  torch::nn::Linear base(6, 4);
  tiedlora::TiedLoraFactors factors(6, 4, tiedlora::AdapterMethod::parse("tied-abuv"), tiedlora::LoraOptions(2));
  tiedlora::TiedLoraLinear layer(base, factors);
  auto x = torch::randn({3, 6});
  auto loss = layer->forward(x).square().sum();
  loss.backward();
  const bool ok = layer->lora_v.grad().defined() && layer->lora_v.grad().abs().sum().item<double>() > 0;
  std::cout << "consumer: " << layer << " gradient " << (ok ? "ok" : "missing") << "\n";
  return ok ? 0 : 1;
}
