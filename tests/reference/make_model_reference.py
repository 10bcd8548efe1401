#!/usr/bin/env python3
"""Reference data for tests/test_models.cpp: tiny random GPT-2 and Llama checkpoints made with
transformers (GQA on, rope_theta not default, tied and untied heads, one of them sharded), random token ids, the logits
transformers computes in fp32 and in bf16, its greedy continuation, and PEFT LoRA adapters with the
logits PEFT computes through them. Writes into <out>/models/."""
import argparse
import os

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 101


def models():
    yield "gpt2", GPT2LMHeadModel(GPT2Config(n_embd=48, n_layer=3, n_head=4, vocab_size=VOCAB, n_positions=96,
                                             bos_token_id=0, eos_token_id=0)), ["c_attn", "c_fc"]
    yield "llama", LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                                                num_attention_heads=6, num_key_value_heads=2, vocab_size=VOCAB,
                                                rope_theta=500000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
                                                bos_token_id=1, eos_token_id=2, max_position_embeddings=256)), \
        ["q_proj", "v_proj", "gate_proj"]
    yield "llama_tied", LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB,
                                                     rope_theta=20000.0, tie_word_embeddings=True,
                                                     bos_token_id=1, eos_token_id=2)), ["o_proj", "down_proj"]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = os.path.join(args.out, "models")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(77)
    for name, model, targets in models():
        model.eval()
        folder = os.path.join(out, name)
        # The untied Llama is saved in shards, so loading goes through model.safetensors.index.json too.
        model.save_pretrained(folder, safe_serialization=True, max_shard_size="200KB" if name == "llama" else "5GB")
        ids = torch.randint(3, VOCAB, (2, 13), generator=g)
        prompt = torch.randint(3, VOCAB, (1, 5), generator=g)
        with torch.no_grad():
            logits = model(ids).logits
            generated = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None,
                                       pad_token_id=0)[0, prompt.shape[1]:]
            bf16 = type(model)(model.config)
            bf16.load_state_dict(model.state_dict())
            bf16 = bf16.to(torch.bfloat16).eval()
            logits_bf16 = bf16(ids).logits
        tensors = {"ids": ids, "logits": logits.contiguous(), "logits_bf16": logits_bf16.contiguous(),
                   "prompt": prompt[0].contiguous(), "generated": generated.contiguous()}
        # PEFT LoRA with random non-zero B, and the logits through it.
        peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                fan_in_fan_out=name == "gpt2"))
        with torch.no_grad():
            for pname, p in peft.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            tensors["logits_lora"] = peft(ids).logits.contiguous()
        peft.save_pretrained(os.path.join(out, name + "_lora"))
        save_file(tensors, os.path.join(out, name + "_reference.safetensors"))
    print(f"wrote model references to {out}")


if __name__ == "__main__":
    main()
