#!/usr/bin/env python3
"""Checks that the Python `safetensors` package reads the files tiedlora's C++ writer produced.

Run after tests/test_safetensors.cpp (CTest fixture). Every *.safetensors under --written is loaded with
safetensors.torch.load_file and safe_open; where --reference holds a file at the same relative path (the
file Python wrote for the same tensors), tensors (bitwise) and metadata must be equal. Sharded
checkpoints are checked through their index as transformers reads them.
"""
import argparse
import json
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file


def same(a, b):
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def metadata(path):
    with safe_open(path, "pt") as f:
        return f.metadata() or {}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True)
    parser.add_argument("--written", required=True)
    args = parser.parse_args()
    failures, loaded, compared = [], 0, 0
    for root, _, files in os.walk(args.written):
        for name in sorted(files):
            if not name.endswith(".safetensors"):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, args.written)
            try:
                ours = load_file(path)
                our_meta = metadata(path)
            except Exception as e:  # noqa: BLE001 - report every file
                failures.append(f"{rel}: Python cannot read it: {e}")
                continue
            loaded += 1
            ref_path = os.path.join(args.reference, rel)
            if not os.path.exists(ref_path):
                continue
            ref = load_file(ref_path)
            if set(ref) != set(ours):
                failures.append(f"{rel}: tensor names differ: {sorted(set(ref) ^ set(ours))}")
            for k in set(ref) & set(ours):
                if not same(ref[k], ours[k]):
                    failures.append(f"{rel}: tensor {k!r} differs")
            if metadata(ref_path) != our_meta:
                failures.append(f"{rel}: metadata {our_meta} != {metadata(ref_path)}")
            compared += 1
    for root, _, files in os.walk(args.written):
        if "model.safetensors.index.json" in files:
            with open(os.path.join(root, "model.safetensors.index.json"), encoding="utf-8") as f:
                index = json.load(f)
            for tensor, shard in index["weight_map"].items():
                with safe_open(os.path.join(root, shard), "pt") as f:
                    if tensor not in f.keys():
                        failures.append(f"{root}: index puts {tensor!r} in {shard}, which lacks it")
    print(f"loaded {loaded} files written by tiedlora, compared {compared} with the Python reference")
    if loaded == 0 or compared == 0:
        failures.append("nothing was checked: did test_safetensors run?")
    for f in failures:
        print("FAIL:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
