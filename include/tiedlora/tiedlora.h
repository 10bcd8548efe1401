// tiedlora/tiedlora.h: everything tiedlora offers, in one include.
#pragma once

#include "tiedlora/error.h"
#include "tiedlora/functional.h"
#include "tiedlora/hf_config.h"
#include "tiedlora/inject.h"
#include "tiedlora/io/safetensors.h"
#include "tiedlora/method.h"
#include "tiedlora/module_selection.h"
#include "tiedlora/modules.h"
