"""Builds torch_engram._C with torch.utils.cpp_extension (ninja only) where CMake or the pybind11
package is missing, e.g. on a bare GPU machine; the CMake build (setup.py, dev_build.sh) stays
the primary one. Places the library in python/torch_engram/ like scripts/dev_build.sh.

Usage: python scripts/build_jit.py [--cpu-only]   (TORCH_CUDA_ARCH_LIST and MAX_JOBS are honoured)
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cpu-only", action="store_true", help="leave out csrc/cuda")
    ap.add_argument("--build-dir", default=str(ROOT / "build-jit"))
    args = ap.parse_args()
    import torch
    from torch.utils import cpp_extension

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"  # no GPU to ask: the project's default target

    with_cuda = not args.cpu_only
    sources = [
        str(p)
        for pattern in ("csrc/*.cpp", "csrc/cpu/*.cpp", "csrc/autograd/*.cpp")
        for p in sorted(ROOT.glob(pattern))
    ]
    sources.append(str(ROOT / "csrc/python/bindings.cpp"))
    if with_cuda:
        sources += sorted(glob.glob(str(ROOT / "csrc/cuda/*.cu")))
    defines = ["-DENGRAM_WITH_CUDA"] if with_cuda else []
    build_dir = Path(args.build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    # cpp_extension names objects by file name alone (cpu/x.cpp and autograd/x.cpp would clash):
    # compile one-line wrappers named after the path instead.
    wrap_dir = build_dir / "src"
    wrap_dir.mkdir(exist_ok=True)
    wrappers = []
    for src in sources:
        rel = Path(src).relative_to(ROOT / "csrc")
        wrapper = wrap_dir / "_".join(rel.parts)
        text = f'#include "{src}"\n'
        if not wrapper.exists() or wrapper.read_text() != text:
            wrapper.write_text(text)
        wrappers.append(str(wrapper))
    cpp_extension.load(
        name="_C",
        sources=wrappers,
        build_directory=str(build_dir),
        with_cuda=with_cuda,
        verbose=True,
        extra_include_paths=[str(ROOT / "csrc/include"), str(ROOT / "csrc")],
        extra_cflags=["-O3", "-std=c++20", *defines],
        extra_cuda_cflags=["-O3", "-std=c++20", "--expt-relaxed-constexpr", "--expt-extended-lambda", *defines],
    )
    built = build_dir / "_C.so"
    dest = ROOT / "python/torch_engram/_C.so"
    for old in dest.parent.glob("_C*.so"):
        old.unlink()
    shutil.copy2(built, dest)
    print(f"build_jit: {dest} ({'CPU+CUDA' if with_cuda else 'CPU'})", file=sys.stderr)


def guess_cuda_home() -> None:
    """cpp_extension takes the toolkit from CUDA_HOME or from nvcc's directory; a wrapper script
    on PATH (/usr/local/bin/nvcc) would point it at the wrong prefix, so prefer the toolkit's own
    directory when /usr/local/cuda exists."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for candidate in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = os.path.realpath(candidate)
            return


if __name__ == "__main__":
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    guess_cuda_home()  # before torch.utils.cpp_extension is imported: it reads CUDA_HOME once
    main()
