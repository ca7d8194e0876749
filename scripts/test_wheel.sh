#!/usr/bin/env bash
# The test suite against a built wheel, not the source tree: builds a wheel from the in-place
# build (ENGRAM_BUILD_DIR, default ./build, so nothing is compiled twice), installs it with its
# [test] extra into a fresh virtual environment (the same torch version as the build's, from the
# package index), and runs tests/python there from a copy outside the checkout with
# ENGRAM_TEST_PACKAGE=installed. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

start=$(date +%s)
# Same configuration as the in-place build, so the shared build directory is reused as it is.
ENGRAM_BUILD_TESTS=${ENGRAM_BUILD_TESTS:-1} "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$work/dist" .
wheel=$(ls "$work"/dist/torch_engram-*.whl)
echo "[wheel] built $(basename "$wheel") in $(($(date +%s) - start))s"

start=$(date +%s)
"$PY" -m venv "$work/venv"
vpy="$work/venv/bin/python"
torch_version=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
"$vpy" -m pip install -q "torch==$torch_version"
"$vpy" -m pip install -q "$wheel[test]"
echo "[wheel] fresh venv with torch $torch_version and the wheel in $(($(date +%s) - start))s"

repo=$PWD
cp -r tests "$work/tests"
cp -r examples "$work/examples"  # the tests run the Python examples too
cd "$work"
# The package under test must be the installed one: fail loudly if the checkout leaks in.
"$vpy" -c "import torch_engram, sys; p = torch_engram.__file__; print('[wheel] testing', p); sys.exit(p.startswith('$repo/'))"
status=0
ENGRAM_TEST_PACKAGE=installed TORCHINDUCTOR_CACHE_DIR="$work/inductor" "$vpy" -m pytest -q -p no:cacheprovider \
  tests/python "$@" || status=$?
exit $status
