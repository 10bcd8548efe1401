#!/usr/bin/env bash
# scripts/gpu/prepare_deps.sh: run HERE (a machine with the Debian packages nlohmann-json3-dev, libcli11-dev
# and googletest). Copies the header-only dependencies and GoogleTest's sources into the git-ignored folder
# .deps/ (or the folder given as $1), laid out as cmake/TiedloraDependencies.cmake expects of
# TIEDLORA_DEPS_DIR, so that a GPU machine without those packages can build tiedlora and its tests:
#   .deps/nlohmann_json/include/nlohmann/json.hpp
#   .deps/CLI11/include/CLI/CLI.hpp
#   .deps/googletest/CMakeLists.txt   (GoogleTest's and GoogleMock's sources)
#   .deps/smollm2-tokenizer/          (SmolLM2-135M-Instruct's config.json and tokenizer files, from the GGUF
#                                      of the project's venv; the weights themselves are too large to carry)
# Then carry it along: the device tool's `run` with carry [".deps"] and scripts/gpu/check.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
deps="${1:-$root/.deps}"

need() { [[ -e "$1" ]] || { echo "prepare_deps.sh: $1 is missing (install $2)" >&2; exit 1; }; }
need /usr/include/nlohmann/json.hpp nlohmann-json3-dev
need /usr/include/CLI/CLI.hpp libcli11-dev
need /usr/src/googletest/CMakeLists.txt googletest

rm -rf "$deps"
mkdir -p "$deps/nlohmann_json/include" "$deps/CLI11/include"
cp -r /usr/include/nlohmann "$deps/nlohmann_json/include/"
cp -r /usr/include/CLI "$deps/CLI11/include/"
cp -r /usr/src/googletest "$deps/googletest"
source "$root/scripts/common.sh"
[[ -x "$TIEDLORA_VENV/bin/python" ]] || { echo "prepare_deps.sh: no venv at $TIEDLORA_VENV (run scripts/bootstrap)" >&2; exit 1; }
HF_HUB_OFFLINE=1 "$TIEDLORA_VENV/bin/python" "$root/scripts/gpu/smollm2_shaped.py" tokenizer --out "$deps/smollm2-tokenizer"
echo "prepare_deps.sh: $(du -sh "$deps" | cut -f1) in $deps"
