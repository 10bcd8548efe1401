#!/usr/bin/env python3
"""Writes the malformed inputs of this folder and expected.json (file -> kind and the words its error must
contain). Run from this folder; the files are committed, so this only documents how they were made."""
import json
import struct

expected = {}


def safetensors(name, header, data=b"", raw_header=None, length=None, expect=""):
    body = raw_header if raw_header is not None else json.dumps(header, separators=(",", ":")).encode()
    n = len(body) if length is None else length
    with open(name, "wb") as f:
        f.write(struct.pack("<Q", n) + body + data)
    expected[name] = {"kind": "safetensors", "expect": expect}


def config(name, text, expect):
    with open(name, "w") as f:
        f.write(text)
    expected[name] = {"kind": "adapter_config", "expect": expect}


good = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
safetensors("truncated_data.safetensors", good, b"\0" * 8, expect="'w'")
safetensors("header_past_end.safetensors", good, b"\0" * 16, length=4096, expect="past the end")
safetensors("bad_json.safetensors", None, b"", raw_header=b'{"w": {"dtype": "F32",', expect="JSON")
safetensors("not_object.safetensors", None, b"", raw_header=b'["w"]     ', expect="'{'")
safetensors("size_mismatch.safetensors", {"w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 16]}},
            b"\0" * 16, expect="'w'")
safetensors("overlap.safetensors", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12,
            expect="'b'")
safetensors("unknown_dtype.safetensors", {"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}},
            b"\0" * 16, expect="F128")
safetensors("negative_shape.safetensors", {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
            b"\0" * 4, expect="'w'")
safetensors("duplicate_name.safetensors", None, b"\0" * 8,
            raw_header=b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                       b'"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', expect="'w'")
safetensors("metadata_not_strings.safetensors", {"__metadata__": {"k": 1}, **good}, b"\0" * 16, expect="__metadata__")
safetensors("huge_header.safetensors", good, b"", length=1 << 40, expect="header")
config("config_bad_json.json", '{"peft_type": "LORA", "r": ', "not valid JSON")
config("config_unknown_type.json", '{"peft_type": "PREFIX_TUNING", "r": 8}', "PREFIX_TUNING")
config("config_rank_zero.json", '{"peft_type": "LORA", "r": 0}', "field 'r'")
config("config_rank_string.json", '{"peft_type": "LORA", "r": "8"}', "field 'r'")
config("config_dora.json", '{"peft_type": "LORA", "r": 8, "use_dora": true}', "DoRA")
config("config_duplicate_key.json", '{"peft_type": "LORA", "r": 8, "r": 4}', "appears twice")
config("config_targets_numbers.json", '{"peft_type": "LORA", "r": 8, "target_modules": [1, 2]}', "target_modules")
config("config_tied_bad_method.json",
       '{"peft_type": "TIEDLORA", "format_version": 1, "r": 8, "method": "tied-au", "tie_groups": []}', "method")
config("config_tied_no_groups.json",
       '{"peft_type": "TIEDLORA", "format_version": 1, "r": 8, "method": "tied-abuv", "tie_groups": []}', "tie_groups")
config("config_tied_module_twice.json",
       '{"peft_type": "TIEDLORA", "format_version": 1, "r": 8, "method": "tied-abuv", "tie_groups": ['
       '{"name": "a", "key": "a", "modules": ["m.x"]}, {"name": "b", "key": "b", "modules": ["m.x"]}]}',
       "in two groups")
config("config_tied_future_version.json",
       '{"peft_type": "TIEDLORA", "format_version": 2, "r": 8, "method": "tied-abuv"}', "format_version")
config("config_vera_bias.json", '{"peft_type": "VERA", "r": 8, "bias": "all"}', "bias")
# Patterns PEFT reads as Python regexes that std::regex cannot run with the same meaning: refused, never
# matched as plain names (which would merge with another scale).
config("config_alpha_pattern_lookbehind.json",
       '{"peft_type": "LORA", "r": 8, "alpha_pattern": {"(?<=layers\\\\.0\\\\.)q_proj": 16}}', "cannot be matched exactly")
config("config_rank_pattern_unbalanced.json", '{"peft_type": "LORA", "r": 8, "rank_pattern": {"q_proj(": 4}}',
       "cannot be matched exactly")
config("config_alpha_pattern_inline_flag.json", '{"peft_type": "LORA", "r": 8, "alpha_pattern": {"(?i)Q_PROJ": 4}}',
       "cannot be matched exactly")
config("config_alpha_pattern_nan.json", '{"peft_type": "LORA", "r": 8, "alpha_pattern": {"q_proj": NaN}}',
       "not valid JSON")
config("config_target_regex_lookbehind.json", '{"peft_type": "LORA", "r": 8, "target_modules": "(?<!k)_proj"}',
       "cannot be matched exactly")
with open("expected.json", "w") as f:
    json.dump(expected, f, indent=2, sort_keys=True)
    f.write("\n")
