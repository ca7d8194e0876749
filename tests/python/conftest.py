"""Test setup: import torch_engram from this checkout (or, with ENGRAM_TEST_PACKAGE=installed,
the installed package; with ENGRAM_TEST_PACKAGE=DIR, the package under DIR), and a device list
where CUDA cases are collected everywhere and skip with a reason when no GPU is visible."""

import os
import sys
from pathlib import Path

import pytest
import torch

_package = os.environ.get("ENGRAM_TEST_PACKAGE", "")
if _package != "installed":
    sys.path.insert(0, _package or str(Path(__file__).resolve().parents[2] / "python"))

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")),
]
