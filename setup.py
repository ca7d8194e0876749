"""Thin driver for CMake: builds torch_engram._C against the installed torch.

Install with ``pip install --no-build-isolation -e .`` so the build sees (and never replaces) the
torch you already have. Environment knobs: ENGRAM_CUDA=auto|0|1, TORCH_CUDA_ARCH_LIST,
ENGRAM_BUILD_TESTS=1 (also builds the GoogleTest binary in ./build for ctest),
ENGRAM_BUILD_DIR (default ./build), MAX_JOBS.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def check_build_tools() -> None:
    """With --no-build-isolation pip installs none of pyproject's build requirements, so a
    missing one would otherwise fail deep inside CMake; name them all at once instead."""
    missing = []
    for module in ("torch", "pybind11"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if shutil.which("cmake") is None:
        missing.append("cmake")
    if missing:
        hint = "" if "torch" not in missing else " (torch: install the build you want first; it is never installed here)"
        raise SystemExit(
            f"torch-engram: the build needs {', '.join(missing)}, not found in this environment{hint}. "
            f"Install them, e.g. `pip install {' '.join(m for m in missing if m != 'torch')} ninja`, and "
            "rerun `pip install --no-build-isolation -e .`")


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        check_build_tools()
        build_dir = Path(os.environ.get("ENGRAM_BUILD_DIR", ROOT / "build")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        cfg = [
            "cmake",
            str(ROOT),
            *generator,
            f"-DENGRAM_PYTHON_EXECUTABLE={sys.executable}",
            f"-DENGRAM_CUDA={os.environ.get('ENGRAM_CUDA', 'auto')}",
            f"-DENGRAM_BUILD_TESTS={'ON' if os.environ.get('ENGRAM_BUILD_TESTS', '0') == '1' else 'OFF'}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('ENGRAM_BUILD_TYPE', 'Release')}",
        ]
        subprocess.run(cfg, cwd=build_dir, check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)
        built = next(build_dir.glob("_C*.so"))
        dest = Path(self.get_ext_fullpath(ext.name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, dest)


setup(
    ext_modules=[CMakeExtension("torch_engram._C")],
    cmdclass={"build_ext": CMakeBuild},
)
