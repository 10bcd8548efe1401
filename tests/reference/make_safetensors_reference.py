#!/usr/bin/env python3
"""Reference files for tests/test_safetensors.cpp, written by the real Python `safetensors` package.

Writes into <out>/safetensors/:
  <case>.safetensors   written by safetensors.torch.save_file (every dtype, 0-element and scalar tensors,
                       odd names, metadata with 0, 1 and several keys, and the empty metadata object);
  <case>.json          what the C++ test checks independently of any safetensors parsing: for each tensor
                       its dtype, shape, raw little-endian bytes (hex) and values (floats as float64,
                       integers exact), plus the metadata (null when none was given);
  transposed.safetensors   {"f32_t": dtypes["f32"].T.contiguous()}, which the C++ writer must reproduce
                       from the non-contiguous view;
  sharded/ and single/ checkpoints split by huggingface_hub.split_torch_state_dict_into_shards, shards
                       saved with save_file(metadata={"format": "pt"}) and the index written as
                       transformers does (json.dumps(index, indent=2, sort_keys=True) + "\\n"), with
                       checkpoint.json giving the tensor order and the shard size limit.
Values are random (seeded), never all zero.
"""
import argparse
import json
import os

import numpy as np
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

DTYPE_NAMES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32",
    torch.int64: "I64", torch.uint64: "U64", torch.float64: "F64",
}
INT_NUMPY = {
    torch.uint8: np.uint8, torch.int8: np.int8, torch.int16: np.int16, torch.uint16: np.uint16,
    torch.int32: np.int32, torch.uint32: np.uint32, torch.int64: np.int64, torch.uint64: np.uint64,
}


class Maker:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(seed)

    def tensor(self, dtype, shape):
        n = int(np.prod(shape, dtype=np.int64))
        if dtype == torch.bool:
            bits = self.rng.integers(0, 2, size=n).astype(bool)
            if n >= 2:
                bits[0], bits[1] = True, False
            return torch.from_numpy(bits.reshape(shape))
        if dtype in INT_NUMPY:
            np_dtype = INT_NUMPY[dtype]
            info = np.iinfo(np_dtype)
            v = self.rng.integers(info.min, info.max, size=n, dtype=np_dtype, endpoint=True)
            v[v == 0] = 1
            return torch.from_numpy(v.reshape(shape).copy())
        v = torch.randn(shape, generator=self.gen, dtype=torch.float64) * 3
        v = torch.where(v.to(dtype).to(torch.float64) == 0, torch.ones_like(v), v)
        return v.to(dtype)


def describe(t):
    raw = t.contiguous().view(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    if t.dtype.is_floating_point:
        values = t.to(torch.float64).flatten().tolist()
    elif t.dtype == torch.bool:
        values = [bool(x) for x in t.flatten().tolist()]
    else:
        values = [int(x) for x in t.numpy().flatten().tolist()]
    return {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "hex": raw.numpy().tobytes().hex(),
            "values": values}


def write_case(folder, case, tensors, metadata):
    save_file(tensors, os.path.join(folder, case + ".safetensors"), metadata=metadata)
    with open(os.path.join(folder, case + ".json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": metadata, "tensors": {k: describe(v) for k, v in tensors.items()}}, f, indent=1)


def write_checkpoint(folder, tensors, max_shard_size):
    os.makedirs(folder, exist_ok=True)
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({k: tensors[k] for k in names}, os.path.join(folder, filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    with open(os.path.join(folder, "checkpoint.json"), "w", encoding="utf-8") as f:
        json.dump({"order": list(tensors), "max_shard_size": max_shard_size, "metadata": {"format": "pt"},
                   "files": sorted(split.filename_to_tensors) +
                   (["model.safetensors.index.json"] if split.is_sharded else [])}, f, indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    folder = os.path.join(args.out, "safetensors")
    os.makedirs(folder, exist_ok=True)
    m = Maker(1234)

    shapes = {torch.bool: [2, 5], torch.uint8: [7], torch.int8: [3, 3], torch.float8_e5m2: [2, 4],
              torch.float8_e4m3fn: [5], torch.int16: [2, 3], torch.uint16: [3], torch.float16: [4, 2],
              torch.bfloat16: [3, 5], torch.int32: [6], torch.uint32: [2, 2], torch.float32: [3, 5],
              torch.int64: [4], torch.uint64: [3], torch.float64: [2, 3]}
    # Insertion order deliberately unsorted: the package sorts by dtype, then name.
    dtypes = {DTYPE_NAMES[d].lower(): m.tensor(d, s) for d, s in reversed(list(shapes.items()))}
    dtypes["scalar"] = m.tensor(torch.float64, [])
    dtypes["empty"] = m.tensor(torch.float32, [0, 3])
    dtypes["empty_bf16"] = m.tensor(torch.bfloat16, [2, 0])
    for name in ["h.10.w", "h.2.w", "H.1.w", "h_1", "h.1.w"]:
        dtypes[name] = m.tensor(torch.float32, [2])
    write_case(folder, "dtypes", dtypes, None)

    small = {"b.weight": m.tensor(torch.float32, [2, 3]), "a.bias": m.tensor(torch.bfloat16, [3])}
    write_case(folder, "meta_one", small, {"format": "pt"})
    write_case(folder, "meta_many", small, {"format": "pt", "b": "1", "a": "zwei", "\u00fcn\u00ef": "c\u00f6d\u00e9 \U0001F600",
                                            "esc": "q\"b\\s/n\nt\tc\x01d\x7f"})
    write_case(folder, "meta_empty", small, {})

    names = {'quote"name': m.tensor(torch.float16, [2]), "back\\slash": m.tensor(torch.float16, [1]),
             "nl\nname": m.tensor(torch.float16, [3]), "ctl\x01\x1f": m.tensor(torch.float16, [1]),
             "\u00fcn\u00ef.weight": m.tensor(torch.float16, [2]), "\U0001F600": m.tensor(torch.int8, [4]),
             "": m.tensor(torch.int8, [1]), "slash/and space": m.tensor(torch.int8, [2])}
    write_case(folder, "names", names, {"format": "pt"})
    write_case(folder, "no_tensors", {}, None)

    save_file({"f32_t": dtypes["f32"].T.contiguous()}, os.path.join(folder, "transposed.safetensors"))

    ckpt = {}
    for i, (d, s) in enumerate([(torch.float32, [8, 4]), (torch.bfloat16, [16, 3]), (torch.float32, [5]),
                                (torch.int64, [6]), (torch.float16, [9, 9]), (torch.float32, [4, 4]),
                                (torch.uint8, [33]), (torch.float64, [7])]):
        ckpt[f"layers.{i}.w" if i != 4 else "\u00fcn\u00ef.weight"] = m.tensor(d, s)
    write_checkpoint(os.path.join(folder, "sharded"), ckpt, 200)
    write_checkpoint(os.path.join(folder, "single"), ckpt, 10_000)


if __name__ == "__main__":
    main()
