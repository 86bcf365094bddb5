"""The distribution: the wheel maps export/, calibration/, engines/ and runtime/ into scan_deploy,
every import is declared, and `pip install scan-deploy` with no extras gives a working command
line that names the extra a command needs."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import numpy as np
import pytest
import typer

from scan_deploy.cli import app
from scan_deploy.extras import EXTRAS
from tests.export.tiny_bundle import make_bundle

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("scan_deploy", "export", "calibration", "engines", "runtime", "serve")
# Imported, but installed with TensorRT or CUDA rather than by an extra; each has its own one-line
# install hint (engines/tensorrt_api.py, engines/cuda_device.py, engines/cuda_buffers.py).
NOT_FROM_EXTRAS = {"tensorrt", "pycuda", "cuda"}
WITH_BASE = {"pydantic"}  # serve's models: installed by typer (a dependency) and by FastAPI
# The distributions that provide each third-party module.
DISTRIBUTIONS = {
    "numpy": {"numpy"},
    "typer": {"typer"},
    "rich": {"rich"},
    "torch": {"torch"},
    "safetensors": {"safetensors"},
    "onnx": {"onnx"},
    "onnxruntime": {"onnxruntime", "onnxruntime-gpu"},
    "faiss": {"faiss-cpu"},
    "matplotlib": {"matplotlib"},
    "PIL": {"pillow"},
    "fastapi": {"fastapi"},
    "starlette": {"fastapi"},  # FastAPI's own foundation, installed with it
    "uvicorn": {"uvicorn"},
    "prometheus_client": {"prometheus-client"},
    "ray": {"ray"},
}
BASE = {"numpy", "typer", "rich"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip wheel --no-deps` builds, from a copy of the sources (an in-tree build/
    folder can hold files that no longer exist)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    skip = shutil.ignore_patterns(".*", "build", "runs", "*.egg-info", "__pycache__")
    shutil.copytree(ROOT, source, ignore=skip)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(root), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = root.glob("scan_deploy-*.whl")
    return built


def test_wheel_maps_top_level_folders_into_scan_deploy(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in (
        "scan_deploy",
        "scan_deploy/export",
        "scan_deploy/calibration",
        "scan_deploy/engines",
        "scan_deploy/runtime",
        "scan_deploy/runtime/backends",
    ):
        assert f"{package}/__init__.py" in names
    top_level = ("export/", "engines/", "runtime/", "calibration/", "tests/")
    assert not any(n.startswith(top_level) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert (
        "scan-deploy = scan_deploy.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    )


def test_subpackages_import_from_the_installed_tree(tmp_path):
    code = (
        "import scan_deploy.runtime, scan_deploy.export, scan_deploy.calibration, "
        "scan_deploy.engines, sys;"
        "print(scan_deploy.runtime.__file__);"
        "assert 'torch' not in sys.modules and 'onnx' not in sys.modules"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().endswith(str(Path("runtime") / "__init__.py"))


def test_light_modules_do_not_import_torch():
    code = (
        "import sys, scan_deploy.config, scan_deploy.vocab, scan_deploy.tokenizer, "
        "scan_deploy.metrics, scan_deploy.batching, scan_deploy.precomp, scan_deploy.cli, "
        "scan_deploy.bundle, scan_deploy.jsonfile;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --- every import declared --------------------------------------------------------------------


def _imported_modules() -> set[str]:
    """The top-level modules the package's sources import, the standard library left out."""
    found = set()
    for folder in SOURCES:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    found |= {alias.name.partition(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.partition(".")[0])
    return found - set(sys.stdlib_module_names) - {"scan_deploy"}


def _declared() -> dict[str, set[str]]:
    """The distributions pyproject.toml declares: "" for the dependencies, then each extra's."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"": project["dependencies"], **project["optional-dependencies"]}

    def name(requirement: str) -> str:
        return re.match(r"[A-Za-z0-9._-]+", requirement).group().lower()

    return {group: {name(r) for r in requirements} for group, requirements in groups.items()}


def test_every_import_is_declared_and_every_extra_is_imported():
    imported, declared = _imported_modules(), _declared()
    assert imported - NOT_FROM_EXTRAS - WITH_BASE == set(DISTRIBUTIONS)
    assert set(EXTRAS) == set(DISTRIBUTIONS) - BASE
    for module in BASE:
        assert DISTRIBUTIONS[module] & declared[""], module
    for module, extra in EXTRAS.items():
        for group in extra.extras:
            assert DISTRIBUTIONS[module] & declared[group], (module, group)
    runtime_extras = {group for extra in EXTRAS.values() for group in extra.extras}
    assert runtime_extras == set(declared) - {"", "dev"}
    provided = set().union(*DISTRIBUTIONS.values())
    for group in runtime_extras:  # nothing declared that nothing imports
        assert declared[group] <= provided, group


def test_the_gpu_extra_does_not_install_the_cpu_onnxruntime():
    declared = _declared()
    assert declared["gpu"] == {"onnx", "onnxruntime-gpu"}
    assert declared["export"] == {"onnx", "onnxruntime"}


# --- pip install scan-deploy, no extras -------------------------------------------------------

# One mistake per command, and a fragment of its one-line error.
USAGE_ERRORS = {
    "data synth": (("--train", "5"), "Missing option '--out'"),
    "data import-tsv": (("f.tsv", "--out", "d"), "Missing option '--split'"),
    "explain": (("b", "--image", "x"), "'--image'"),
    "train": (("--data", "d"), "Missing option '--out'"),
    "evaluate": (("--data", "d"), "Missing argument 'checkpoint'"),
    "convert": (("x.pth.tar", "--out", "o"), "Missing option '--vocab'"),
    "export": (("--out", "b"), "Missing argument 'checkpoint'"),
    "compare": (("b", "c"), "Missing option '--data'"),
    "calibrate": (("b", "--samples", "x"), "'--samples'"),
    "check": (("b", "--dla", "yes"), "unexpected extra argument"),
    "index": (("b", "--out", "g"), "Missing option '--features'"),
    "query": (("g", "-k", "abc"), "'-k'"),
    "bench": (("g", "--batch", "x"), "'--batch'"),
    "build-engine": (("b", "--workspace", "0"), "'--workspace'"),
    "export-triton": (("b",), "Missing option '--out'"),
    "serve": (("g", "--port", "70000"), "'--port'"),
    "delete": (("g",), "Missing argument 'ids'"),
    "compact": (("g", "--nope"), "No such option"),
    "prune": (("g", "h"), "unexpected extra argument"),
}
# Commands that need an extra before they read their inputs, and what they say.
NEEDS_EXTRA = {
    "train": (("--data", "d", "--out", "o"), "PyTorch", "reference"),
    "evaluate": (("c", "--data", "d"), "PyTorch", "reference"),
    "convert": (("c.pth.tar", "--vocab", "v.json", "--out", "o"), "PyTorch", "reference"),
    "export": (("c", "--out", "b"), "PyTorch", "reference"),
    "compare": (("b", "c", "--data", "d"), "PyTorch", "reference"),
    "calibrate": (("b", "--data", "d"), "ONNX", "export"),
    "check": (("b",), "ONNX", "export"),
}


def _commands(group=None, path: tuple[str, ...] = ()) -> list[str]:
    """Every command of the CLI, as "data synth"."""
    group = group or typer.main.get_command(app)
    found = []
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            found += _commands(command, (*path, name))
        else:
            found.append(" ".join((*path, name)))
    return found


@pytest.fixture(scope="module")
def plain(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel and its dependencies only (numpy, typer, rich from PyPI,
    through pip's cache); returns its `scan-deploy` script."""
    env = tmp_path_factory.mktemp("plain") / "venv"
    venv.create(env, with_pip=False)
    python = env / ("Scripts" if os.name == "nt" else "bin") / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return python.parent / "scan-deploy"


def _run(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run(
        [str(script), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_the_plain_install_has_no_extras(plain, tmp_path):
    code = f"import importlib.util as u; print([m for m in {sorted(EXTRAS)} if u.find_spec(m)])"
    result = subprocess.run(
        [str(plain.parent / "python"), "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.stdout.strip() == "[]", result.stderr


def test_every_command_has_help_and_one_line_usage_errors(plain, tmp_path):
    commands = _commands()
    assert set(commands) == set(USAGE_ERRORS)
    for command in [[], ["data"], *(c.split() for c in commands)]:
        result = _run(plain, *command, "--help", cwd=tmp_path)
        assert result.returncode == 0 and "Usage:" in result.stdout, (command, result.stderr)
    for command, (args, fragment) in USAGE_ERRORS.items():
        line = _one_line_error(_run(plain, *command.split(), *args, cwd=tmp_path))
        assert fragment in line and f"scan-deploy {command} --help" in line, line


def test_a_command_needing_an_extra_names_it(plain, tmp_path):
    for command, (args, what, extra) in NEEDS_EXTRA.items():
        line = _one_line_error(_run(plain, command, *args, cwd=tmp_path))
        assert line.startswith(f"error: `scan-deploy {command}` needs {what}: "), line
        assert f"pip install 'scan-deploy[{extra}]'" in line, line
    assert not any(tmp_path.iterdir())  # nothing written


def test_data_synth_needs_no_extra(plain, tmp_path):
    sizes = ("--train", "5", "--dev", "5", "--test", "5", "--img-dim", "4")
    result = _run(plain, "data", "synth", "--out", "d", *sizes, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["images"] == {"train": 5, "dev": 5, "test": 5}
    assert (tmp_path / "d" / "synth_vocab.json").is_file()


def test_the_runtime_commands_name_their_extra(plain, tmp_path):
    """`index` reads a real bundle (torch-free), then needs ONNX Runtime for its default
    backend, or PyTorch for `--backend torch`."""
    bundle = make_bundle(tmp_path / "bundle")
    np.save(tmp_path / "ims.npy", np.zeros((2, 5, 10), np.float32))
    index = ("index", str(bundle), "--features", "ims.npy", "--out", "g")
    for args, extra in (
        ((), "export"),
        (("--backend", "torch", "--checkpoint", "c"), "reference"),
    ):
        line = _one_line_error(_run(plain, *index, *args, cwd=tmp_path))
        assert f"pip install 'scan-deploy[{extra}]'" in line, line
    assert not (tmp_path / "g").exists()
