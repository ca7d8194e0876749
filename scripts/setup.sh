#!/usr/bin/env bash
# Sets up a fresh machine for torch-engram and builds it once, in place:
#   - torch (kept if already installed; else TORCH_SPEC, default torch==2.14.1),
#   - Python deps (numpy, tokenizers, safetensors, transformers, accelerate, pybind11, pytest,
#     hypothesis, matplotlib, tqdm),
#   - Debian's libgtest-dev (GoogleTest) and offline text corpora when apt-get is available,
#   - the extension: pip install --no-build-isolation -e . (CMake build in ./build).
# ENGRAM_BUILD_TESTS=1 also builds the GoogleTest binary for ctest. Idempotent: a second run
# only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
log() { printf '[setup] %s\n' "$*"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  log "installing ${TORCH_SPEC:=torch==2.14.1}"
  "$PY" -m pip install -q "$TORCH_SPEC"
fi
log "torch $("$PY" -c 'import torch; print(torch.__version__)')"

need=()
for mod in numpy tokenizers safetensors transformers accelerate pybind11 pytest hypothesis matplotlib tqdm setuptools wheel; do
  "$PY" -c "import $mod" 2>/dev/null || need+=("$mod")
done
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  "$PY" -m pip install -q "${need[@]}"
fi
# The linters CI runs (scripts/lint.sh); ruff is pinned because its formatting changes between releases.
# (Set on its own line: an assignment inside the pipeline would vanish with its subshell.)
RUFF_VERSION=${RUFF_VERSION:-0.17.6}
"$PY" -m ruff --version 2>/dev/null | grep -q "^ruff ${RUFF_VERSION}$" || "$PY" -m pip install -q "ruff==$RUFF_VERSION"
command -v cmake >/dev/null || "$PY" -m pip install -q cmake
command -v ninja >/dev/null || "$PY" -m pip install -q ninja

# GoogleTest and the optional offline corpora come from Debian's packages.
apt_pkgs=()
[ "${ENGRAM_BUILD_TESTS:-0}" = 1 ] && [ ! -f /usr/include/gtest/gtest.h ] && apt_pkgs+=(libgtest-dev)
[ "${ENGRAM_BUILD_TESTS:-0}" = 1 ] && ! command -v clang-format >/dev/null && apt_pkgs+=(clang-format)
[ -d /usr/share/doc/python3.11/html ] || apt_pkgs+=(python3.11-doc)
[ -d /usr/share/games/fortunes ] || apt_pkgs+=(fortunes)
[ -e /usr/share/jargon ] || [ -d /usr/share/doc/jargon-text ] || apt_pkgs+=(jargon-text)
if [ ${#apt_pkgs[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    log "apt-get install ${apt_pkgs[*]}"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_pkgs[@]}"; } >/dev/null \
      || log "apt-get failed; continuing (GoogleTest tests need libgtest-dev)"
  else
    log "cannot apt-get ${apt_pkgs[*]} here; continuing without them"
  fi
fi

log "building torch-engram (ENGRAM_CUDA=${ENGRAM_CUDA:-auto}, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:=9.0})"
export TORCH_CUDA_ARCH_LIST
start=$(date +%s)
"$PY" -m pip install -q --no-build-isolation --no-deps -e . 
log "build took $(( $(date +%s) - start ))s"
