#!/usr/bin/env bash
# scripts/gpu/build_and_test.sh: run THERE, on the GPU machine (torch 2.11 + CUDA 13 + cmake + ninja, none of
# our Debian packages). Builds tiedlora against the machine's python3 torch with the CUDA kernels and the
# dependencies carried in .deps/ (made here by scripts/gpu/prepare_deps.sh), then runs the stages asked for:
#
#   test_cuda   the GPU tests (tests/test_cuda), every case printed
#   sanitize    compute-sanitizer memcheck (all GPU tests) and racecheck (the tests of our own kernels)
#   bench       build/bench/bench_lora_cuda, the kernel-lab table
#   ctest       the whole test suite (GPU tests included)
#   all         all of the above, in this order (the default)
#
# Example, through the device tool: run(command="scripts/gpu/build_and_test.sh test_cuda sanitize",
# carry=[".deps"]). Logs go to $OUT (at most 8 files come back): build.log, test_cuda.log, memcheck.log,
# racecheck.log, bench.md, ctest.log and summary.txt, whose table is also printed last. The build folder
# (build-gpu/, git-ignored) survives between calls only while the machine stays warm; the build stage always
# runs first and is a no-op when it is up to date. Each stage runs under a time limit (seconds, overridable
# as TIEDLORA_GPU_<STAGE>_TIMEOUT) so that one hung step cannot eat the 10-minute call.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="${OUT:-$root/build-gpu-logs}"
build="${TIEDLORA_GPU_BUILD_DIR:-$root/build-gpu}"
jobs="${TIEDLORA_GPU_JOBS:-$(nproc)}"
mkdir -p "$out"
stages=("$@")
[[ ${#stages[@]} -eq 0 || " ${stages[*]} " == *" all "* ]] && stages=(test_cuda sanitize bench ctest)

summary="$out/summary.txt"
: > "$summary"
record() { printf '%-10s %-8s %s\n' "$1" "$2" "$3" | tee -a "$summary"; }
limit() { local var="TIEDLORA_GPU_${1^^}_TIMEOUT"; echo "${!var:-$2}"; }

# ---- build ------------------------------------------------------------------------------------------------
build_log="$out/build.log"
{
  echo "== environment ($(date -u '+%Y-%m-%d %H:%M:%S UTC'))"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
  command -v nvcc && nvcc --version | tail -2
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
  cmake --version | head -1
  echo "ninja $(ninja --version)"
} > "$build_log" 2>&1

if [[ ! -f "$root/.deps/nlohmann_json/include/nlohmann/json.hpp" ]]; then
  record build FAILED ".deps/ is missing: run scripts/gpu/prepare_deps.sh here first and carry [\".deps\"]"
  exit 1
fi
# nvcc may not be on PATH where the toolkit sits in /usr/local/cuda.
if ! command -v nvcc > /dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then export PATH="/usr/local/cuda/bin:$PATH"; fi
torch_prefix="$(python3 -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
start=$SECONDS
if [[ ! -f "$build/build.ninja" ]]; then
  echo "== configure" >> "$build_log"
  cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$torch_prefix" \
    -DTIEDLORA_CUDA=ON -DTIEDLORA_DEPS_DIR="$root/.deps" -DTIEDLORA_PYTHON=python3 \
    -DTIEDLORA_BUILD_BENCHMARKS=ON >> "$build_log" 2>&1 \
    || { record build FAILED "configure: see build.log"; tail -30 "$build_log"; exit 1; }
fi
echo "== build (-j$jobs)" >> "$build_log"
if ! timeout "$(limit build 420)" ninja -C "$build" -j "$jobs" >> "$build_log" 2>&1; then
  record build FAILED "ninja: see build.log"
  grep -m20 -B2 -A6 "error" "$build_log" | tail -60
  exit 1
fi
record build ok "$((SECONDS - start)) s"

# ---- stages -------------------------------------------------------------------------------------------------
sanitizer="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer /opt/nvidia/*/compute-sanitizer/compute-sanitizer 2>/dev/null | head -1)"
# Our own kernels (the rest of the GPU tests run NVIDIA's cuBLASLt kernels, which racecheck need not audit).
own_kernel_tests='CudaEffectiveB.*:CudaMerge.*:CudaLoraGemm.AdapterInputGetsItsOwnGradient:CudaLoraGemm.OddFeatureSizesAndRowStridedInputs'

run_stage() {  # name, log, timeout, command...
  local name=$1 log=$2 seconds=$3
  shift 3
  local t0=$SECONDS rc
  timeout "$seconds" "$@" > "$log" 2>&1
  rc=$?
  local status=ok
  [[ $rc -eq 124 ]] && status=TIMEOUT
  [[ $rc -ne 0 && $rc -ne 124 ]] && status=FAILED
  record "$name" "$status" "rc $rc, $((SECONDS - t0)) s, $(basename "$log")"
}

for stage in "${stages[@]}"; do
  case "$stage" in
    test_cuda)
      run_stage test_cuda "$out/test_cuda.log" "$(limit test_cuda 300)" "$build/tests/test_cuda" --gtest_color=no
      grep -m10 -A4 "Failure" "$out/test_cuda.log"
      tail -n 12 "$out/test_cuda.log"
      ;;
    sanitize)
      if [[ -z "$sanitizer" ]]; then
        record sanitize FAILED "compute-sanitizer not found"
        continue
      fi
      # Without PyTorch's caching allocator every tensor is its own allocation, so out-of-bounds accesses
      # inside a cached block are caught too.
      run_stage memcheck "$out/memcheck.log" "$(limit memcheck 420)" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        "$sanitizer" --tool memcheck --error-exitcode 1 --print-limit 50 "$build/tests/test_cuda" --gtest_color=no \
        --gtest_filter='Cuda*'
      run_stage racecheck "$out/racecheck.log" "$(limit racecheck 300)" "$sanitizer" --tool racecheck \
        --error-exitcode 1 --print-limit 50 "$build/tests/test_cuda" --gtest_color=no --gtest_filter="$own_kernel_tests"
      tail -3 "$out/memcheck.log" "$out/racecheck.log"
      ;;
    bench)
      # shellcheck disable=SC2086 # the extra arguments are meant to split
      run_stage bench "$out/bench.md" "$(limit bench 420)" "$build/bench/bench_lora_cuda" ${TIEDLORA_GPU_BENCH_ARGS:-}
      cat "$out/bench.md"
      ;;
    ctest)
      run_stage ctest "$out/ctest.log" "$(limit ctest 540)" ctest --test-dir "$build" --output-on-failure \
        -j "${TIEDLORA_GPU_CTEST_JOBS:-8}" --timeout 500
      grep -E "tests passed|tests failed|\*\*\*Failed|Not Run|Timeout" "$out/ctest.log" | head -30
      ;;
    *)
      record "$stage" FAILED "unknown stage (test_cuda, sanitize, bench, ctest, all)"
      ;;
  esac
done

echo
echo "== summary"
cat "$summary"
! grep -qE " (FAILED|TIMEOUT) " "$summary"
