// tiedlora/llm/train.h: supervised fine-tuning of a CausalLM with adapters — the Tied-LoRA paper's recipe.
// An umbrella over its three parts:
//
//   tiedlora/llm/data.h        JSONL prompt/completion pairs; the prompt format (the chat template applied
//                              for instruct models, tiedlora/llm/chat.h); loss on the completion tokens only;
//                              packed batches (examples end to end, each attending only within itself: the
//                              default where it is exact) or right-padded ones (a causal model never attends to
//                              the padding that follows a sequence, so these need no attention mask).
//   tiedlora/llm/trainer.h     the recipe: AdamW, linear warmup then cosine decay, gradient accumulation (the
//                              loss is averaged over every completion token of the accumulated batch, so
//                              accumulation equals a larger batch), clipping by global norm, early stopping on
//                              validation loss with a patience (the best adapter is restored at the end);
//                              checkpoints (adapter tensors, AdamW moments, the early-stopping state, the state of
//                              the Trainer's own dropout generators; no global generator is touched)
//                              written atomically; resuming from one continues exactly: on the CPU the same
//                              losses, bit for bit, as an uninterrupted run; on a GPU as close as its
//                              nondeterministic kernels allow (CUDA generator states are saved;
//                              docs/finetuning.md lists what stays nondeterministic); data parallelism.
//   tiedlora/llm/evaluation.h  greedy decoding and exact match (SQuAD normalisation).
//
// Data order needs no saved state: the example at position k of the training stream is permutation
// number k / N (drawn from the seed and that number) at k mod N, so step s always sees the same examples.
// See docs/finetuning.md.
#pragma once

#include "tiedlora/llm/data.h"
#include "tiedlora/llm/evaluation.h"
#include "tiedlora/llm/trainer.h"
