// tiedlora/llm.h: the models-and-training layer (target tiedlora::llm; over the formats): GPT-2 and Llama
// models with generation, tokenizers, and the trainer with its data, evaluation and checkpoints.
#pragma once

#include "tiedlora/formats.h"
#include "tiedlora/llm/causal_lm.h"
#include "tiedlora/llm/chat.h"
#include "tiedlora/llm/data.h"
#include "tiedlora/llm/distributed.h"
#include "tiedlora/llm/evaluation.h"
#include "tiedlora/llm/tokenizer.h"
#include "tiedlora/llm/train.h"
#include "tiedlora/llm/trainer.h"

namespace tiedlora {
/// The llm layer's namespaces before they were nested under its folder and target; kept for one release.
namespace models = llm::models;
namespace train = llm::train;
}  // namespace tiedlora
