"""The distribution maps export/, calibration/ and runtime/ into scan_deploy (wheel, editable)."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_maps_top_level_folders_into_scan_deploy(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("scan_deploy-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in (
        "scan_deploy",
        "scan_deploy/export",
        "scan_deploy/calibration",
        "scan_deploy/runtime",
        "scan_deploy/runtime/backends",
    ):
        assert f"{package}/__init__.py" in names
    assert not any(n.startswith(("export/", "runtime/", "calibration/", "tests/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert (
        "scan-deploy = scan_deploy.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    )


def test_subpackages_import_from_the_installed_tree(tmp_path):
    code = (
        "import scan_deploy.runtime, scan_deploy.export, scan_deploy.calibration, sys;"
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
