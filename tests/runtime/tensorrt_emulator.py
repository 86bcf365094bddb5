"""The TensorRT API emulator (tests/emulators: fake `tensorrt` and `cuda.bindings.runtime`, a test
double, never a TensorRT result) installed for a test: in this process, and through PYTHONPATH
in the CLI processes it starts."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest
from scan_deploy.engines import cuda_buffers

EMULATORS = Path(__file__).resolve().parents[1] / "emulators"
VERSIONS = ("10.3", "10.16", "11.1")
VERSION_ENV = "SCAN_DEPLOY_EMULATED_TENSORRT"
DEVICE_ENV = "SCAN_DEPLOY_EMULATED_GPU"
DEVICE = "Emulated GPU (test double)"
EMULATED_MODULES = ("tensorrt", "cuda", "emulated_device")


def _forget() -> None:
    """Drop the emulator's modules (another version's, or this test's) from sys.modules."""
    for name in list(sys.modules):
        if name.split(".")[0] in EMULATED_MODULES:
            del sys.modules[name]


@contextmanager
def emulated_tensorrt(
    version: str = "10.3", compute_capability: str = "9.0"
) -> Iterator[ModuleType]:
    """The emulated `tensorrt` module of `version` on an emulated GPU of `compute_capability`."""
    if version not in VERSIONS:
        raise ValueError(f"TensorRT {version} is not emulated ({', '.join(VERSIONS)})")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(VERSION_ENV, version)
        patch.setenv(DEVICE_ENV, f"{DEVICE}@{compute_capability}")
        paths = [str(EMULATORS), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        patch.setenv("PYTHONPATH", os.pathsep.join(paths))
        patch.syspath_prepend(str(EMULATORS))
        patch.setattr(cuda_buffers, "_API", None)  # the binding is chosen again, emulated
        _forget()
        try:
            yield importlib.import_module("tensorrt")
        finally:
            _forget()
