// tiedlora/core.h: the core layer (target tiedlora::core; LibTorch alone): the method and its parameter
// counts, module selection, the functional choke point (lora_linear, the merge) with its CUDA dispatch,
// the LoraLinear / TiedLoraLinear modules and injection into any torch::nn::Module tree.
#pragma once

#include "tiedlora/core/error.h"
#include "tiedlora/core/functional.h"
#include "tiedlora/core/inject.h"
#include "tiedlora/core/method.h"
#include "tiedlora/core/module_selection.h"
#include "tiedlora/core/modules.h"
