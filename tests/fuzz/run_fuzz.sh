#!/usr/bin/env bash
# run_fuzz.sh <source dir> <work dir> <seconds> [GGUF seed folder] [fmt include dir]: builds tests/fuzz/fuzz_parsers.cpp with clang's libFuzzer,
# AddressSanitizer and UndefinedBehaviorSanitizer, seeds a corpus from tests/data/malformed and valid
# files, and fuzzes for a bounded time. Exit 0: nothing found; 1: a finding (the crashing input is kept in
# the work dir, or the build failed); 77: no clang/libFuzzer on this machine (CTest reports it skipped).
set -euo pipefail
src="$1"; work="$2"; seconds="${3:-30}"; gguf_seeds="${4:-}"; fmt_include="${5:-/usr/include}"
clangxx="$(command -v clang++ || command -v clang++-14 || true)"
if [ -z "$clangxx" ]; then echo "run_fuzz: clang++ not found, skipping"; exit 77; fi
mkdir -p "$work/corpus"
fuzzer="$work/fuzz_parsers"
# Skip only when the toolchain lacks libFuzzer; a failing build of our sources is a failure.
printf 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }\n' > "$work/probe.cpp"
"$clangxx" -fsanitize=fuzzer "$work/probe.cpp" -o "$work/probe" 2>/dev/null || { echo "run_fuzz: no libFuzzer runtime, skipping"; exit 77; }
"$clangxx" -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -DFMT_HEADER_ONLY=1 -I"$src/include" -I"$src/src" -I/usr/include -isystem "$fmt_include" \
  "$src/tests/fuzz/fuzz_parsers.cpp" "$src/src/formats/safetensors_format.cpp" "$src/src/formats/adapter_config.cpp" \
  "$src/src/core/method.cpp" "$src/src/core/module_selection.cpp" "$src/src/formats/gguf.cpp" "$src/src/util/text.cpp" "$src/src/util/python_regex.cpp" -o "$fuzzer"
# Seeds: parser byte + content. 0: safetensors headers, 1: adapter configs.
for f in "$src"/tests/data/malformed/*.safetensors; do { printf '\x00'; cat "$f"; } > "$work/corpus/st-$(basename "$f")"; done
for f in "$src"/tests/data/malformed/*.json; do { printf '\x01'; cat "$f"; } > "$work/corpus/cfg-$(basename "$f")"; done
# GGUF seeds: the small files the GGUF reference made (every metadata type, alignments), if given.
if [ -n "$gguf_seeds" ]; then
  for f in "$gguf_seeds"/*.gguf; do
    [ -f "$f" ] && [ "$(stat -c %s "$f")" -le 65536 ] && { printf '\x02'; cat "$f"; } > "$work/corpus/gguf-$(basename "$f")"
  done
fi
printf '\x00' > "$work/corpus/st-valid"; python3 - "$work/corpus/st-valid" <<'PY'
import json, struct, sys
h = json.dumps({"__metadata__": {"format": "pt"}, "a": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
                "b": {"dtype": "F32", "shape": [], "data_offsets": [12, 16]}}, separators=(",", ":")).encode()
h += b" " * (-len(h) % 8)
open(sys.argv[1], "ab").write(struct.pack("<Q", len(h)) + h + bytes(16))
PY
printf '\x01{"peft_type": "TIEDLORA", "format_version": 1, "r": 4, "method": "tied-abuv", "tie_groups": [{"name": "g", "key": "g", "modules": ["a.b"]}]}' > "$work/corpus/cfg-valid-tied"
printf '\x01{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "rank_pattern": {"q": 4}}' > "$work/corpus/cfg-valid-lora"
printf '\x01{"peft_type": "LORA", "r": 8, "target_modules": "model\\\\.layers\\\\.\\\\d+\\\\.(q|v)_proj", "alpha_pattern": {"(?P<x>layers\\\\.[0-3]\\\\.)?q_proj": 4, "[^]a-]{2,}_proj": 2}}' > "$work/corpus/cfg-valid-patterns"
cd "$work"
export ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1
"$fuzzer" -max_total_time="$seconds" -max_len=16384 -timeout=10 -print_final_stats=1 corpus
