"""The package's shape: the core library imports on its own, without the experiment subpackage
or its dependencies, and every public name resolves."""

import subprocess
import sys

import torch_engram
from conftest import package_root

CORE = [
    "config",
    "hashing",
    "tokenizer",
    "ops",
    "modules",
    "table",
    "offload",
    "state",
    "fp8",
    "deepseek_v41",
    "optim",
    "checkpoint",
    "reference",
]


def test_core_does_not_import_the_experiment():
    # A fresh interpreter, so that other tests' imports do not hide an import of the experiment.
    code = (
        "import sys, importlib\n"
        f"sys.path.insert(0, {package_root()!r})\n"
        f"for m in {CORE!r}: importlib.import_module('torch_engram.' + m)\n"
        "bad = sorted(m for m in sys.modules if m.startswith('torch_engram.experiment'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the core library imports {out.stdout.strip()}"


def test_public_names_resolve():
    for name in torch_engram.__all__:
        assert getattr(torch_engram, name) is not None, name
