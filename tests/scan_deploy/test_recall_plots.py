"""The Recall@K pictures of `evaluate --plot` and `calibrate --plot`."""

import pytest

from scan_deploy.recall_plots import write_gate_png, write_recall_png

RESULTS = {
    "i2t": {"r1": 85.1, "r5": 98.3, "r10": 99.8},
    "t2i": {"r1": 67.4, "r5": 89.6, "r10": 94.8},
    "rsum": 535.0,
}


def test_recall_and_gate_pictures_are_written_whole(tmp_path):
    image = pytest.importorskip("PIL.Image")
    write_recall_png(tmp_path / "recall.png", RESULTS, "demo")
    deltas = {f"{d}_r{k}": 0.1 * k for d in ("i2t", "t2i") for k in (1, 5, 10)}
    write_gate_png(tmp_path / "gate.png", {"fp16": deltas, "broken": None}, 0.3, "gate")
    for name, size in (("recall.png", (600, 360)), ("gate.png", (700, 360))):
        with image.open(tmp_path / name) as picture:
            assert picture.format == "PNG" and picture.size == size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gate.png", "recall.png"]
