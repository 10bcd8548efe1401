#!/usr/bin/env python3
"""PEFT loads the multi-adapter folder tests/test_multi_adapter.cpp wrote (<reference>/multi/cpp_saved: the two
LoRA adapters read from PEFT's folder, saved again, and the "cat" combination "mix" tiedlora made), and the
combination gives the logits PEFT's own add_weighted_adapter gave (mixed.safetensors, logits_mix)."""
import argparse
import os
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reference", required=True)
    args = parser.parse_args()
    multi = os.path.join(args.reference, "multi")
    saved = os.path.join(multi, "cpp_saved")
    ref = load_file(os.path.join(multi, "mixed.safetensors"))
    base = LlamaForCausalLM.from_pretrained(os.path.join(multi, "base")).eval()
    model = PeftModel.from_pretrained(base, saved)  # the top of the folder: "default"
    for name in sorted(os.listdir(saved)):
        if os.path.isfile(os.path.join(saved, name, "adapter_config.json")):
            model.load_adapter(os.path.join(saved, name), adapter_name=name)
    assert set(model.peft_config) == {"default", "second", "mix"}, sorted(model.peft_config)
    failures = []
    with torch.no_grad():
        model.set_adapter("mix")
        got = model(input_ids=ref["ids"]).logits
        err = (got - ref["logits_mix"]).abs().max().item()
        if not err <= 1e-5 * ref["logits_mix"].abs().max().item():
            failures.append(f"mix logits differ by {err}")
        # The re-saved originals still give PEFT's mixed batch.
        codes = {0: "default", 1: "second", -1: "__base__"}
        rows = [codes[int(c)] for c in ref["rows"]]
        got = model(input_ids=ref["ids"], adapter_names=rows).logits
        err = (got - ref["logits"]).abs().max().item()
        if not err <= 1e-5 * ref["logits"].abs().max().item():
            failures.append(f"mixed-batch logits through the re-saved adapters differ by {err}")
    for f in failures:
        print("FAIL:", f)
    print("PEFT loaded tiedlora's multi-adapter folder:", "ok" if not failures else "FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
