"""The explain picture: brightness maps of known boxes and weights, and the PNG file."""

import numpy as np
import pytest

from scan_deploy.attention_picture import attention_map, grid_boxes, write_explain_png


def test_the_heaviest_box_is_the_brightest_place():
    boxes = np.array([[0, 0, 100, 100], [300, 200, 400, 300], [150, 0, 200, 50]], np.float32)
    light = attention_map(boxes, np.array([0.1, 0.7, 0.2]), (400, 300), width=80)
    assert light.shape == (60, 80)  # the image's aspect ratio
    brightest = np.unravel_index(np.argmax(light), light.shape)
    assert 40 <= brightest[0] < 60 and 60 <= brightest[1] < 80  # inside box 1, scaled by 1/5
    assert light[5, 5] == pytest.approx(0.1) and light[5, 35] == pytest.approx(0.2)
    overlapping = attention_map(boxes[:1].repeat(2, 0), np.array([0.3, 0.4]), (400, 300), 80)
    assert overlapping.max() == pytest.approx(0.7)  # weights of overlapping boxes add up


def test_regions_without_boxes_are_a_grid():
    boxes, size = grid_boxes(36)
    assert size == (6, 6) and boxes[7].tolist() == [1, 1, 2, 2]
    boxes, size = grid_boxes(10)
    assert size == (4, 3) and len(boxes) == 10


def test_the_png_has_a_panel_per_word_and_is_written_whole(tmp_path):
    image = pytest.importorskip("PIL.Image")
    tokens = ["<start>", "a", "red", "dog", "<end>"]
    weights = np.random.default_rng(0).dirichlet(np.ones(8), size=len(tokens)).astype(np.float32)
    path = tmp_path / "explain.png"
    write_explain_png(path, tokens, weights, "a title")
    with image.open(path) as picture:
        assert picture.format == "PNG" and picture.size == (900, 520)  # 3 panels + heat map
    assert [p.name for p in tmp_path.iterdir()] == ["explain.png"]  # no temp file left
