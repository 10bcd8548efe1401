#!/usr/bin/env python3
"""Reference data for tests/test_multi_adapter.cpp: several LoRA adapters on one tiny random Llama, run by PEFT.

- <out>/multi/base: the Llama checkpoint (transformers, random weights);
- <out>/multi/peft_adapters: PEFT's multi-adapter folder of two LoRA adapters ("default" at the top,
  "second" in its subfolder) with random non-zero B, on overlapping targets, of different ranks and alphas;
- <out>/multi/mixed.safetensors: random ids, the per-row adapter of a mixed batch (0 = default, 1 = second,
  -1 = base), PEFT's logits for that batch (`adapter_names=`), PEFT's greedy continuation of equal-length
  prompts with mixed adapters (generate(..., adapter_names=)), and the logits of the "cat" combination;
- <out>/multi/peft_mix: PEFT's add_weighted_adapter(["default", "second"], [0.7, -0.4], "mix", "cat"), saved.
"""
import argparse
import json
import os

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 97
WEIGHTS = [0.7, -0.4]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = os.path.join(args.out, "multi")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(5)
    g = torch.Generator().manual_seed(11)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                         rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1,
                                         eos_token_id=2, max_position_embeddings=128)).eval()
    model.save_pretrained(os.path.join(out, "base"), safe_serialization=True)

    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft.add_adapter("second", LoraConfig(r=2, lora_alpha=6, target_modules=["k_proj", "v_proj", "o_proj", "gate_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    peft.eval()
    peft.save_pretrained(os.path.join(out, "peft_adapters"))

    ids = torch.randint(3, VOCAB, (5, 9), generator=g)
    rows = ["default", "second", "__base__", "second", "default"]
    code = {"default": 0, "second": 1, "__base__": -1}
    prompts = torch.randint(3, VOCAB, (4, 6), generator=g)
    prompt_rows = ["second", "__base__", "default", "second"]
    with torch.no_grad():
        logits = peft(input_ids=ids, adapter_names=rows).logits
        generated = peft.generate(input_ids=prompts, adapter_names=prompt_rows, max_new_tokens=8, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[:, prompts.shape[1]:]
        peft.add_weighted_adapter(["default", "second"], WEIGHTS, "mix", combination_type="cat")
        peft.set_adapter("mix")
        logits_mix = peft(input_ids=ids).logits
    peft.save_pretrained(os.path.join(out, "peft_mix"), selected_adapters=["mix"])
    save_file({"ids": ids, "rows": torch.tensor([code[r] for r in rows]), "logits": logits.contiguous(),
               "prompts": prompts, "prompt_rows": torch.tensor([code[r] for r in prompt_rows]),
               "generated": generated.contiguous(), "logits_mix": logits_mix.contiguous()},
              os.path.join(out, "mixed.safetensors"))
    with open(os.path.join(out, "weights.json"), "w") as f:
        json.dump({"weights": WEIGHTS}, f)


if __name__ == "__main__":
    main()
