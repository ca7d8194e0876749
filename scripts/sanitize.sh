#!/usr/bin/env bash
# The CPU ops under AddressSanitizer and UndefinedBehaviorSanitizer: builds them (no CUDA) into
# build-sanitize/, runs the GoogleTest suite, then a pytest subset (every op, forward and
# backward, and the table optimizers) against that build with libasan preloaded into Python.
# Any report fails the run. Usage: bash scripts/sanitize.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUILD=${SANITIZE_BUILD_DIR:-build-sanitize}
flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S . -B "$BUILD" "${generator[@]}" -DENGRAM_CUDA=0 -DENGRAM_BUILD_TESTS=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DENGRAM_PYTHON_EXECUTABLE="$("$PY" -c 'import sys; print(sys.executable)')" \
  -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address,undefined" \
  >/dev/null
cmake --build "$BUILD" --parallel "${MAX_JOBS:-$(nproc)}"

# libtorch keeps allocations until exit: leak reports would be torch's, not ours.
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
"$BUILD"/engram_tests --gtest_brief=1

# The package with the sanitized extension, beside the source tree's Python files.
pkg="$BUILD/package"
rm -rf "$pkg" && mkdir -p "$pkg/torch_engram"
for f in python/torch_engram/*; do
  case "$f" in *.so) ;; *) ln -s "$PWD/$f" "$pkg/torch_engram/" ;; esac
done
cp "$BUILD"/_C*.so "$pkg/torch_engram/"
LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)" ENGRAM_TEST_PACKAGE="$pkg" \
  "$PY" -m pytest -q -p no:cacheprovider tests/python/test_gather.py tests/python/test_gate.py \
  tests/python/test_short_conv.py tests/python/test_table.py tests/python/test_hashing.py \
  tests/python/test_fuzz.py tests/python/test_fp8.py tests/python/test_offload.py -k "not compile and not kill and not large and not larger_than_ram" "$@"
echo "sanitize: GoogleTest and the op tests ran clean under ASan and UBSan"
