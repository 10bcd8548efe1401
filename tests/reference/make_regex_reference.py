#!/usr/bin/env python3
"""Python's `re` verdicts on PEFT-style patterns, for tests/test_python_regex.cpp.

Writes <out>/regex/cases.json: for each pattern, whether Python compiles it, and for each module name
whether PEFT's key rule (re.match(rf"(.*\\.)?({key})$", name), rank_pattern / alpha_pattern) and the
target_modules string rule (re.fullmatch) select it. The C++ translator must refuse what Python refuses,
and where it accepts a pattern, agree with Python on every name. `exact` lists patterns it must accept.
"""
import argparse
import json
import os
import random
import re
import warnings

NAMES = [
    "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.12.self_attn.v_proj",
    "model.layers.3.mlp.down_proj", "model.layers.3.mlp.up_proj", "transformer.h.0.attn.c_attn",
    "transformer.h.11.attn.c_proj", "transformer.h.2.mlp.c_proj", "h.0.attn.c_attn", "lm_head", "q_proj",
    "model.layers.0.self_attn.k_proj", "a.b", "a-b.c", "x{2}", "decoder.block.5.layer.0.SelfAttention.q",
    "model.layers.10.self_attn.o_proj", "model.layers.01.self_attn.q_proj", "encoder.layer.3.attention.self.query",
]

# Patterns a translator must run exactly (PEFT configs in the wild, and Python-only syntax with an exact
# ECMAScript equivalent).
EXACT = [
    "q_proj", "layers.1.self_attn.q_proj", r"layers\.1\.self_attn\.q_proj", r".*\.(q|v)_proj", r"(q|k|v)_proj",
    r"model\.layers\.\d+\.self_attn\.(q|v)_proj", r"(?P<layer>layers\.1\.)self_attn\.q_proj",
    r"layers\.[0-3]\.mlp\.(up|down)_proj", r"layers\.\d{1,2}\..*", r"layers\.\d{,1}\..*", r"[^.]+_proj",
    r"[]a-z_]+", r"[a-]_proj", r"[\w.]+q_proj", r"x{2}", r"x\{2\}", r"a{}", r"a{,}b", r"c_(attn|proj)",
    r"\Atransformer\.h\.\d+\.attn\.c_attn\Z", r"(?:attn|mlp)\.c_proj", r"(?=.*attn).*c_proj", r"(?!lm_head).*",
    r"h\.[02468]\.attn\.c_attn", r"a(?#comment)*", r"[-a]\.b", r"a-b\.c", r"(?P<one>q)_proj", r"\bq_proj",
    r"layers\.1[0-9]?\.self_attn\.v_proj", r".*?q_proj", r"(a|)q_proj", r"(?:)q_proj", r"lm_head|q_proj",
    r"[\]]", r"[\-a]", r"\.\*", r"\x71_proj", r"[\x61-\x7a.]+", r"SelfAttention\.[qkvo]",
]

# Patterns Python refuses or that have no exact translation: refused either way.
REFUSED_OR_INVALID = [
    "q_proj(", "(?<=layers\\.0\\.)q_proj", "(?<!k)_proj", "(?i)Q_PROJ", "(?P=x)", "(?P<x>q)(?P=x)",
    "(?P<x>a)(?P<x>b)", "*q", "q**", "q{2}*", "q{3,2}", "[z-a]", "[a", "\\", "\\q", "a\\1", "(?>q)_proj",
    "q*+", "(?(1)a|b)", ")q", "[\\d-z]", "\\N{DIGIT ONE}", "(?s:.)", "^*", "(?P<1x>q)", "é",
    "a*(?#c)?",
]


def verdicts(pattern):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            key = re.compile(rf"(.*\.)?({pattern})$")
            full = re.compile(pattern)
        except (re.error, OverflowError, RecursionError):
            return {"pattern": pattern, "python_error": True}
    return {"pattern": pattern, "python_error": False,
            "key": {n: bool(key.match(n)) for n in NAMES},
            "fullmatch": {n: bool(full.fullmatch(n)) for n in NAMES}}


def random_patterns(count, seed):
    """Small random patterns over the syntax module-name patterns use, valid or not."""
    rng = random.Random(seed)
    atoms = ["q", "_", "proj", ".", r"\.", r"\d", r"\w", "[a-z]", "[^.]", "(q|v)", "(?:attn|mlp)", "layers",
             "1", "0", "h", "c_", "(", ")", "[", "]", "{", "}", "{2}", "{1,2}", "{,3}", "*", "+", "?", "|", "^", "$",
             "-", "attn", "self_attn", r"\b", "(?=q)", "(?P<n>a)"]
    return ["".join(rng.choice(atoms) for _ in range(rng.randint(1, 6))) for _ in range(count)]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = os.path.join(args.out, "regex")
    os.makedirs(out, exist_ok=True)
    cases = [verdicts(p) for p in EXACT + REFUSED_OR_INVALID + random_patterns(3000, 11)]
    for p in EXACT:
        assert not verdicts(p)["python_error"], p
    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump({"names": NAMES, "exact": EXACT, "refused": REFUSED_OR_INVALID, "cases": cases}, f)
    print(f"wrote {len(cases)} regex cases to {out}")


if __name__ == "__main__":
    main()
