#!/usr/bin/env python3
"""PEFT runs the exported form of the Tied-LoRA adapters that tests/test_models.cpp injected into our C++
GPT-2 and Llama by Hugging Face names; its logits must equal the ones our C++ model computed."""
import argparse
import os
import subprocess
import sys
import tempfile

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiedlora", required=True)
    parser.add_argument("--reference", required=True)
    args = parser.parse_args()
    failures = 0
    for name in ["gpt2", "llama", "llama_tied"]:
        folder = os.path.join(args.reference, "models", name)
        tied = folder + "_cpp_tied"
        exported = tempfile.mkdtemp(prefix="tied_export_") + "/lora"
        subprocess.run([args.tiedlora, "export-lora", "--adapter", tied, "--out", exported], check=True)
        expected = load_file(tied + "_logits.safetensors")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), exported).eval()
        with torch.no_grad():
            logits = model(expected["ids"]).logits
        err = (logits - expected["logits"]).abs().max().item()
        tol = 1e-5 * expected["logits"].abs().max().item()
        ok = err <= tol
        failures += not ok
        print(f"{name}: PEFT on the exported Tied-LoRA vs our C++ model: max |diff| {err:.3g} (tolerance {tol:.3g}) "
              f"{'ok' if ok else 'FAILED'}")
    print(f"{3 - failures} passed, {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
