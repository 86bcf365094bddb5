"""A tiny synthetic data set for the calibration tests (the trained model: tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from scan_deploy.synth import write_synthetic


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_synthetic(out, train=40, dev=10, test=60, img_dim=12, regions=6, seed=3)
    return out
