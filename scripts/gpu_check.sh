#!/usr/bin/env bash
# GPU check on a fresh CUDA machine: build the extension once with CUDA kernels (CMake, falling
# back to torch.utils.cpp_extension if CMake fails or is missing), run the CUDA tests (the
# shared-memory shape grid included), compute-sanitizer memcheck on a short run of every op and
# the GPU benchmarks, and write everything to a results directory, within 10 minutes on a 16-core
# machine. Step limits add up to the budget; every step runs under its own limit and the script
# keeps going after a failure; the benchmark writes its JSON after every measurement, so a step
# cut short still leaves what it measured. Exit codes go to summary.txt; the script exits
# non-zero if any step failed.
#
# Usage: bash scripts/gpu_check.sh [RESULTS_DIR]     (default ./results/gpu)
# Knobs: PYTHON, TORCH_CUDA_ARCH_LIST (default: the visible GPU's), GPU_CHECK_BUDGET_S (600),
# GPU_CHECK_OFFLOAD_S (100, the offload benchmark's share),
# GPU_CHECK_BUILD=cmake|jit (default: cmake when cmake and pybind11 exist), GPU_CHECK_WHEELS (.whl).
#
# torch_engram needs numpy and tokenizers. A machine without network access installs the missing
# ones from a wheel directory prepared beforehand on a connected machine, e.g. for Python 3.12:
#   pip download --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 numpy tokenizers -d .whl
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RES=${1:-./results/gpu}
mkdir -p "$RES"
RES=$(cd "$RES" && pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-600}
# Step limits (seconds) are ceilings, capped by the budget left: build 240, import 60, CUDA tests
# 150 + 60, the NCCL run 45, memcheck 75. Measured steps take far less (the CMake build of the
# CUDA kernels is the long one); whatever a slow step takes comes out of the benchmarks' time.
START=$(date +%s)
SUMMARY="$RES/summary.txt"
: >"$SUMMARY"
FAILED=0

left() { echo $((BUDGET - ($(date +%s) - START))); }
note() { echo "[gpu_check $(($(date +%s) - START))s] $*" | tee -a "$SUMMARY"; }

# step NAME LIMIT_S LOG CMD...: runs CMD with a time limit (capped by the budget left), logs
# stdout+stderr to LOG, records the exit code.
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local remain
  remain=$(left)
  if [ "$remain" -le 5 ] || [ "$limit" -lt 1 ]; then
    note "$name: SKIPPED (time budget spent)"
    FAILED=1
    return 1
  fi
  [ "$limit" -gt "$remain" ] && limit=$remain
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  local took=$(($(date +%s) - t0))
  if [ $rc -eq 0 ]; then
    note "$name: ok (${took}s, log $(basename "$log"))"
  else
    [ $rc -eq 124 ] && note "$name: TIMEOUT after ${limit}s (log $(basename "$log"))" \
      || note "$name: FAILED rc=$rc (${took}s, log $(basename "$log"))"
    FAILED=1
  fi
  return $rc
}

{
  echo "date: $(date -u)"
  echo "host: $(hostname)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1
  command -v nvcc >/dev/null && nvcc --version | tail -2
  command -v cmake >/dev/null && cmake --version | head -1 || echo "cmake: not found"
  command -v ninja >/dev/null && echo "ninja $(ninja --version)" || echo "ninja: not found"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
  "$PY" -c "import pybind11; print('pybind11', pybind11.__version__)" 2>&1 | tail -1
} >"$RES/env.txt" 2>&1
note "environment in env.txt"

missing=$("$PY" -c "
import importlib.util
print(' '.join(m for m in ('numpy', 'tokenizers') if importlib.util.find_spec(m) is None))")
if [ -n "$missing" ]; then
  WHEELS=${GPU_CHECK_WHEELS:-.whl}
  step "install $missing from $WHEELS" 60 "$RES/deps.log" \
    "$PY" -m pip install --no-index --find-links "$WHEELS" $missing
fi

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)
fi
export TORCH_CUDA_ARCH_LIST
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

# Build: CMake (scripts/dev_build.sh, tests off) when cmake and the pybind11 package exist, else
# torch.utils.cpp_extension (scripts/build_jit.py), which needs neither.
BUILD=${GPU_CHECK_BUILD:-}
if [ -z "$BUILD" ]; then
  BUILD=jit
  command -v cmake >/dev/null && "$PY" -c "import pybind11" 2>/dev/null && BUILD=cmake
fi
built=1
if [ "$BUILD" = cmake ]; then
  step "build (cmake, arch $TORCH_CUDA_ARCH_LIST)" 240 "$RES/build.log" \
    env ENGRAM_CUDA=1 ENGRAM_BUILD_TESTS=0 PYTHON="$PY" bash scripts/dev_build.sh || built=0
fi
if [ "$BUILD" = jit ] || [ $built = 0 ]; then
  # The JIT build needs neither CMake nor pybind11's CMake files; after a failed CMake build it
  # gets whatever time the build budget has left.
  step "build (cpp_extension, arch $TORCH_CUDA_ARCH_LIST)" 240 "$RES/build_jit.log" "$PY" scripts/build_jit.py
fi
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
step "import" 60 "$RES/import.log" "$PY" -c \
  "import torch, torch_engram as te; assert te._C.cuda_built(), 'built without CUDA'; print(torch._C._dispatch_dump('engram::multihead_gather'))"

# Tests: the CUDA suite first (shape grids near the shared-memory limit included), then the CUDA
# cases of every other test file.
step "pytest test_cuda.py" 150 "$RES/pytest_cuda.log" \
  "$PY" -m pytest -q -ra -p no:cacheprovider --junitxml="$RES/pytest_cuda.xml" tests/python/test_cuda.py
step "pytest -k cuda (other files)" 60 "$RES/pytest_other_cuda.log" \
  "$PY" -m pytest -q -ra -p no:cacheprovider --junitxml="$RES/pytest_other_cuda.xml" tests/python \
  --ignore=tests/python/test_cuda.py -k cuda

# The NCCL path of sharded tables on one rank (exchange buffers on the GPU, DDP over NCCL): the
# data-parallel example for a few steps under torchrun.
step "torchrun train_sharded.py --device cuda (NCCL, 1 rank)" 45 "$RES/nccl.log" \
  "$PY" -m torch.distributed.run --nproc-per-node 1 examples/train_sharded.py --device cuda --steps 10 \
  --max-bytes 400000 --json "$RES/nccl.json"

# Memory errors: every op once under compute-sanitizer's memcheck.
if command -v compute-sanitizer >/dev/null; then
  step "compute-sanitizer memcheck" 75 "$RES/memcheck.log" \
    compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" scripts/gpu_ops_smoke.py
else
  note "compute-sanitizer: not found (CUDA toolkit bin not on PATH?); memcheck skipped"
fi

# Benchmarks: the kernels (the full run if the budget allows, else the quick one), then the
# offload one (a 30 GiB bfloat16 table in pinned host memory behind a device cache against the
# same table in HBM, the sweep's transformer, inference and training), which keeps the last
# OFFLOAD_S seconds (a smaller table when less is left).
OFFLOAD_S=${GPU_CHECK_OFFLOAD_S:-100}
if [ "$(left)" -gt $((150 + OFFLOAD_S)) ]; then
  step "bench_gpu" $(( $(left) - OFFLOAD_S - 10 )) "$RES/bench_gpu.log" "$PY" benchmarks/bench_gpu.py --json "$RES/bench_gpu.json"
else
  step "bench_gpu --quick" $(( $(left) - OFFLOAD_S - 5 )) "$RES/bench_gpu.log" \
    "$PY" benchmarks/bench_gpu.py --quick --json "$RES/bench_gpu.json"
fi
GIB=30
[ "$(left)" -lt $((OFFLOAD_S - 20)) ] && GIB=8
step "bench_offload --parts model ($GIB GiB)" $(( $(left) - 5 )) "$RES/bench_offload.log" \
  "$PY" benchmarks/bench_offload.py --parts model --device cuda --model-table-gib $GIB --json "$RES/bench_offload.json"

for log in pytest_cuda pytest_other_cuda memcheck; do
  [ -f "$RES/$log.log" ] && note "$log: $(tail -1 "$RES/$log.log")"
done
note "total $(($(date +%s) - START))s; $([ $FAILED -eq 0 ] && echo 'all steps ok' || echo 'some steps FAILED')"
exit $FAILED
