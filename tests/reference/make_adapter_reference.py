#!/usr/bin/env python3
"""Reference checkpoints and adapters for the adapter and merge tests (tests/test_adapter.cpp,
tests/merge/test_merge.py), made with transformers and PEFT.

Writes into <out>/adapters/:
  gpt2_base/           tiny GPT2LMHeadModel (fp32; Conv1D weights stored (in, out))
  llama_base/          tiny LlamaForCausalLM (fp32, GQA, rope_theta 5e5, untied head), sharded
  llama_base_bf16/     the same weights in bf16, one file
  gpt2_lora/           PEFT LoRA on c_attn, attn.c_proj, mlp.c_fc (fan_in_fan_out), random non-zero B
  llama_lora/          PEFT LoRA on q_proj, v_proj, down_proj, rsLoRA, random non-zero B
  llama_lora_rank_pattern/  PEFT LoRA with rank_pattern and alpha_pattern
  llama_lora_python_patterns/  PEFT LoRA whose pattern keys use Python-only syntax ((?P<name>...)) and
                       overlap in an unsorted order (first match wins, as PEFT reads the file)
  llama_vera/          PEFT VeRA on q_proj, v_proj (save_projection=True), random lambdas
  *_peft_merged/       PEFT merge_and_unload() of each, saved with save_pretrained
  llama_vera_deltas.safetensors  PEFT's per-layer VeRA delta (get_delta_weight), float32
  llama_lora_bf16_peft_merged/   PEFT merge of llama_lora into the bf16 base
"""
import argparse
import json
import os

import torch
from peft import LoraConfig, PeftModel, VeraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


def tiny_gpt2():
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=97, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))


def tiny_llama():
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                        rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1,
                                        eos_token_id=2, max_position_embeddings=128))


def randomize_adapter(model, generator):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_A" in name or "vera_lambda" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


def save_merged(peft_model, path):
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(path, safe_serialization=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = os.path.join(args.out, "adapters")
    os.makedirs(out, exist_ok=True)
    g = torch.Generator().manual_seed(2024)
    torch.manual_seed(0)

    gpt2 = tiny_gpt2()
    gpt2.save_pretrained(os.path.join(out, "gpt2_base"), safe_serialization=True)
    peft_gpt2 = get_peft_model(gpt2, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "attn.c_proj", "c_fc"],
                                                fan_in_fan_out=True))
    randomize_adapter(peft_gpt2, g)
    peft_gpt2.save_pretrained(os.path.join(out, "gpt2_lora"))
    save_merged(peft_gpt2, os.path.join(out, "gpt2_lora_peft_merged"))

    llama = tiny_llama()
    llama.save_pretrained(os.path.join(out, "llama_base"), safe_serialization=True, max_shard_size="40KB")
    llama_bf16 = tiny_llama()
    llama_bf16.load_state_dict(llama.state_dict())
    llama_bf16 = llama_bf16.to(torch.bfloat16)
    llama_bf16.save_pretrained(os.path.join(out, "llama_base_bf16"), safe_serialization=True)

    lora_config = LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_llama = get_peft_model(llama, lora_config)
    randomize_adapter(peft_llama, g)
    peft_llama.save_pretrained(os.path.join(out, "llama_lora"))
    save_merged(peft_llama, os.path.join(out, "llama_lora_peft_merged"))

    # The same adapter merged by PEFT into the bf16 base.
    base_bf16 = LlamaForCausalLM.from_pretrained(os.path.join(out, "llama_base_bf16"), torch_dtype=torch.bfloat16)
    peft_bf16 = PeftModel.from_pretrained(base_bf16, os.path.join(out, "llama_lora"))
    save_merged(peft_bf16, os.path.join(out, "llama_lora_bf16_peft_merged"))

    llama2 = LlamaForCausalLM.from_pretrained(os.path.join(out, "llama_base"))
    pattern_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                                rank_pattern={"o_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3})
    peft_pattern = get_peft_model(llama2, pattern_config)
    randomize_adapter(peft_pattern, g)
    peft_pattern.save_pretrained(os.path.join(out, "llama_lora_rank_pattern"))
    save_merged(peft_pattern, os.path.join(out, "llama_lora_rank_pattern_peft_merged"))

    # Python-only regex syntax and overlapping alpha_pattern keys in an order that is not sorted: PEFT takes
    # the first key that matches, in the order of the file it reads (PEFT itself writes keys sorted, so the
    # file is rewritten in the intended order and the reference made from that file).
    llama4 = LlamaForCausalLM.from_pretrained(os.path.join(out, "llama_base"))
    alphas = {r"(?P<layer>layers\.1\.)self_attn\.q_proj": 2, r"self_attn\.(q|v)_proj": 5, "q_proj": 16}
    python_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], alpha_pattern=alphas,
                               rank_pattern={r"layers\.\d\.self_attn\.v_(?=proj)proj": 2})
    peft_python = get_peft_model(llama4, python_config)
    randomize_adapter(peft_python, g)
    folder = os.path.join(out, "llama_lora_python_patterns")
    peft_python.save_pretrained(folder)
    config_path = os.path.join(folder, "adapter_config.json")
    config = json.load(open(config_path))
    config["alpha_pattern"] = alphas
    json.dump(config, open(config_path, "w"), indent=2)  # no sort_keys: the file's order is the point
    reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(os.path.join(out, "llama_base")), folder)
    scales = {name: m.scaling["default"] for name, m in reloaded.named_modules()
              if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling}
    # layers.0 q_proj: 5/4 (the second key, not q_proj's 16); layers.1 q_proj: 2/4; v_proj (r 2 from rank_pattern): 5/2
    assert sorted(set(scales.values())) == [0.5, 1.25, 2.5], scales
    save_merged(reloaded, os.path.join(out, "llama_lora_python_patterns_peft_merged"))

    llama3 = LlamaForCausalLM.from_pretrained(os.path.join(out, "llama_base"))
    peft_vera = get_peft_model(llama3, VeraConfig(r=4, target_modules=["q_proj", "v_proj"], save_projection=True,
                                                  projection_prng_key=7))
    randomize_adapter(peft_vera, g)
    peft_vera.save_pretrained(os.path.join(out, "llama_vera"))
    deltas = {}
    for name, module in peft_vera.named_modules():
        if hasattr(module, "vera_lambda_b") and "default" in getattr(module, "vera_lambda_b", {}):
            deltas[name.removeprefix("base_model.model.")] = module.get_delta_weight("default").detach().float().contiguous()
    save_file(deltas, os.path.join(out, "llama_vera_deltas.safetensors"))
    save_merged(peft_vera, os.path.join(out, "llama_vera_peft_merged"))
    print(f"wrote adapter references to {out}")


if __name__ == "__main__":
    main()
