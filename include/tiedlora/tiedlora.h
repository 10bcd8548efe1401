// tiedlora/tiedlora.h: everything tiedlora offers, in one include: the modules and injection, adapter
// folders and merging, safetensors and GGUF, the GPT-2 / Llama models, tokenizers and the trainer.
// LibTorch's own API (torch::nn, torch::optim) comes from <torch/torch.h>, which programs include
// themselves, as the README's examples do.
#pragma once

#include "tiedlora/adapter.h"
#include "tiedlora/adapter_config.h"
#include "tiedlora/chart.h"
#include "tiedlora/error.h"
#include "tiedlora/functional.h"
#include "tiedlora/hf_config.h"
#include "tiedlora/inject.h"
#include "tiedlora/io/gguf.h"
#include "tiedlora/io/safetensors.h"
#include "tiedlora/merge.h"
#include "tiedlora/method.h"
#include "tiedlora/models/causal_lm.h"
#include "tiedlora/module_selection.h"
#include "tiedlora/modules.h"
#include "tiedlora/tokenizer.h"
#include "tiedlora/train.h"
