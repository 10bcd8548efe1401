// tiedlora/tiedlora.h: everything the libraries offer, in one include (target tiedlora::tiedlora): the core
// (modules, injection, the functional layer), the formats (adapter folders, checkpoints, safetensors, GGUF,
// merging), the models and training, and data parallelism. A program that needs only the core includes tiedlora/core.h
// and links tiedlora::core. LibTorch's own API (torch::nn, torch::optim) comes from <torch/torch.h>, which programs
// include themselves, as the README's examples do.
#pragma once

#include "tiedlora/distributed.h"
