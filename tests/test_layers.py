"""The layers of the package: the runtime and export never import each other, engines import
neither, and importing any engines module loads no torch, onnx, onnxruntime, TensorRT or CUDA
binding (loading runs on a device with numpy and TensorRT or ONNX Runtime only)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> the scan_deploy subpackages its modules must never import, lazily or not
FORBIDDEN = {
    "runtime": ("scan_deploy.export",),
    "export": ("scan_deploy.runtime",),
    "engines": ("scan_deploy.export", "scan_deploy.runtime", "scan_deploy.calibration"),
}


def imported_modules(path: Path) -> set[str]:
    """Every module an `import` or `from ... import` anywhere in the file names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder", list(FORBIDDEN))
def test_no_import_crosses_the_layers(folder):
    crossing = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in sorted((ROOT / folder).rglob("*.py"))
        for name in sorted(imported_modules(path))
        if name.startswith(FORBIDDEN[folder])
    ]
    assert not crossing


def test_engine_modules_need_neither_torch_nor_onnx_nor_a_backend():
    code = (
        "import importlib, pkgutil, sys, scan_deploy.engines as engines;"
        "names = [m.name for m in pkgutil.iter_modules(engines.__path__)];"
        "[importlib.import_module(f'scan_deploy.engines.{name}') for name in names];"
        "heavy = {'torch', 'onnx', 'onnxruntime', 'tensorrt', 'cuda', 'pycuda'};"
        "assert {'build', 'load'} <= set(names), names;"
        "assert not heavy & set(sys.modules), heavy & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
