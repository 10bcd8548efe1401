// tiedlora/core.h: the core layer (target tiedlora::core; LibTorch alone). Defines:
//   error.h            tiedlora::Error, ConfigError, FormatError
//   method.h           AdapterMethod (LoRA, the Tied-LoRA presets, any freeze mask), parameter counts
//   module_selection.h select_modules: target patterns, layer indices, tie groups
//   options.h          LoraOptions, TiedLoraFactorsOptions, LoraLinearOptions
//   forward_context.h  Backend/BackendGuard, RowAdapters/RowAdaptersScope, DropoutGeneratorScope,
//                      ForwardContext (capture and replay of the per-thread state of a forward)
//   functional.h       lora_linear (the one choke point, 1..N adapters, routed rows), merge_into and the
//                      merge's relatives (effective_b, low_rank_delta, folded_into_lora, concatenated)
//   adapter_set.h      AdapterSlot, AdapterSet (a layer's named adapters), the naming rule of adapter modules
//   modules.h          LoraLinear / TiedLoraLinear, TiedLoraFactors
//   inject.h           inject_adapters, trainable_parameters
//   adapters.h         the model-level adapter API (activate, enable, delete, route rows, combine, merge)
#pragma once

#include "tiedlora/core/adapter_set.h"
#include "tiedlora/core/adapters.h"
#include "tiedlora/core/error.h"
#include "tiedlora/core/forward_context.h"
#include "tiedlora/core/functional.h"
#include "tiedlora/core/inject.h"
#include "tiedlora/core/method.h"
#include "tiedlora/core/module_selection.h"
#include "tiedlora/core/modules.h"
#include "tiedlora/core/options.h"
