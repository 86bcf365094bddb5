"""The tiny bundle, and engines built from it."""

from pathlib import Path

import pytest
from scan_deploy.engines.build import BuildOptions, build_engines

from scan_deploy.bundle import load_bundle

from ..export.tiny_bundle import make_bundle


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny bundle and its ONNX Runtime CPU artifacts (build-engine --backend onnxruntime):
    (bundle, graph -> summary row)."""
    path = make_bundle(tmp_path_factory.mktemp("ort") / "bundle")
    bundle = load_bundle(path)
    rows = build_engines(bundle, BuildOptions(backend="onnxruntime", provider="cpu"))
    return bundle, {row["graph"]: row for row in rows}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The tiny bundle's folder, shared by a module's tests: copy it before building into it."""
    return make_bundle(tmp_path_factory.mktemp("engines") / "bundle")


def engine_files(bundle: Path, **options) -> dict[str, Path]:
    """Build the bundle's engines with `BuildOptions(**options)` (on the emulated TensorRT in
    use, for TensorRT): graph -> engine file."""
    rows = build_engines(load_bundle(bundle), BuildOptions(**options))
    return {row["graph"]: Path(row["file"]) for row in rows}
