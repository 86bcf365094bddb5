"""Bottom-up-attention TSV ingest: files written in the published layout (image_id, image_w,
image_h, num_boxes, base64 float32 boxes and features), streamed into a precomp split with ids,
boxes and image sizes; every malformed record a one-line error naming file, line and field,
with nothing written."""

import base64
import json
import re
import tracemalloc

import numpy as np
import pytest

from scan_deploy.bottom_up_tsv import import_tsv, read_tsv
from scan_deploy.errors import UserError
from scan_deploy.precomp import load_files
from tests.cli_runner import run_cli

BOXES, DIM = 4, 6


def b64(values) -> str:
    return base64.b64encode(np.asarray(values, np.float32).tobytes()).decode()


def record(image_id, seed: int, w: int = 640, h: int = 480, boxes: int = BOXES, dim: int = DIM):
    """One image's fields, as generate_tsv.py writes them (boxes inside the image)."""
    rng = np.random.default_rng(seed)
    x1, y1 = rng.uniform(0, w / 2, boxes), rng.uniform(0, h / 2, boxes)
    box = np.stack(
        [x1, y1, x1 + rng.uniform(1, w / 2, boxes), y1 + rng.uniform(1, h / 2, boxes)], 1
    )
    features = rng.random((boxes, dim), np.float32)
    fields = [str(image_id), str(w), str(h), str(boxes), b64(box), b64(features)]
    return fields, box.astype(np.float32), features


def write_tsv(path, rows) -> None:
    path.write_text("".join("\t".join(fields) + "\n" for fields in rows))


@pytest.fixture
def two_files(tmp_path):
    made = [record(f"COCO_{i:03d}", seed=i) for i in range(5)]
    write_tsv(tmp_path / "a.tsv", [m[0] for m in made[:3]])
    write_tsv(tmp_path / "b.tsv", [m[0] for m in made[3:]])
    return [tmp_path / "a.tsv", tmp_path / "b.tsv"], made


def test_import_writes_the_split_with_ids_boxes_and_sizes(two_files, tmp_path):
    paths, made = two_files
    captions = [f"caption {i}" for i in range(5)]
    summary = import_tsv(paths, tmp_path / "data", "test", captions)
    assert (summary.images, summary.regions, summary.features) == (5, BOXES, DIM)
    split = load_files(tmp_path / "data/test_ims.npy", tmp_path / "data/test_caps.txt")
    np.testing.assert_array_equal(split.images, np.stack([m[2] for m in made]))
    assert split.captions == captions and split.captions_per_image == 1
    ids = (tmp_path / "data/test_ids.txt").read_text().splitlines()
    assert ids == [f"COCO_{i:03d}" for i in range(5)]
    boxes = np.load(tmp_path / "data/test_boxes.npy")
    np.testing.assert_array_equal(boxes, np.stack([m[1] for m in made]))
    assert np.load(tmp_path / "data/test_image_sizes.npy").tolist() == [[640, 480]] * 5


def test_the_import_command(two_files, tmp_path):
    paths, _ = two_files
    out = tmp_path / "data"
    done = run_cli("data", "import-tsv", *paths, "--out", out, "--split", "gallery", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["images"] == 5
    again = run_cli("data", "import-tsv", *paths, "--out", out, "--split", "gallery")
    assert again.returncode == 2
    assert (
        again.stderr.strip()
        == f"error: {out / 'gallery_ims.npy'}: exists; pass --force to replace the split"
    )
    assert (
        run_cli(
            "data", "import-tsv", *paths, "--out", out, "--split", "gallery", "--force"
        ).returncode
        == 0
    )
    missing = run_cli("data", "import-tsv", tmp_path / "nope.tsv", "--out", out, "--split", "x")
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1


def _bad(fields, index, value):
    fields = list(fields)
    fields[index] = value
    return fields


CASES = {
    "fields": (
        lambda f: f[:5],
        "got 5 tab-separated fields, expected 6 "
        "(image_id, image_w, image_h, num_boxes, boxes, features)",
    ),
    "image_w": (lambda f: _bad(f, 1, "wide"), "got 'wide', expected a positive integer"),
    "num_boxes": (lambda f: _bad(f, 3, "0"), "got 0, expected a positive integer"),
    "boxes": (lambda f: _bad(f, 4, "@@not base64@@"), "not valid base64"),
    "features": (lambda f: _bad(f, 3, "5"), "holds 16 float32 values, num_boxes 5 × 4 expected"),
    "nan": (lambda f: _bad(f, 5, b64(np.full((BOXES, DIM), np.nan))), "NaN or Inf at box 0"),
    "zero": (
        lambda f: _bad(f, 5, b64(np.zeros((BOXES, DIM)))),
        "box 0 has all-zero features (an all-zero row is how padding is stored)",
    ),
    "outside": (
        lambda f: _bad(f, 4, b64([[0, 0, 700, 10]] * BOXES)),
        "box 0 (0, 0, 700, 10) lies outside the 640×480 image",
    ),
    "inverted": (
        lambda f: _bad(f, 4, b64([[50, 50, 10, 60]] * BOXES)),
        "box 0 (50, 50, 10, 60) is inverted",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_record_names_file_line_and_field_and_writes_nothing(tmp_path, case):
    spoil, message = CASES[case]
    rows = [record(f"img{i}", seed=i)[0] for i in range(3)]
    rows[1] = spoil(rows[1])
    write_tsv(tmp_path / "bad.tsv", rows)
    field = {"nan": "features", "zero": "features", "outside": "boxes", "inverted": "boxes"}
    field = field.get(case, case)
    if case == "features":
        field = "boxes"  # num_boxes 5: the boxes field is checked first
    with pytest.raises(UserError) as raised:
        import_tsv([tmp_path / "bad.tsv"], tmp_path / "data", "test")
    assert str(raised.value) == f"{tmp_path / 'bad.tsv'}: line 2: {field}: {message}"
    assert not (tmp_path / "data").exists() or not list((tmp_path / "data").iterdir())


def test_records_that_disagree_with_each_other_are_refused(tmp_path):
    cases = {
        "duplicate": (
            [record("same", 0)[0], record("same", 1)[0]],
            "line 2: image_id: 'same' again (first at",
        ),
        "dim": (
            [record("a", 0)[0], record("b", 1, dim=DIM + 2)[0]],
            "line 2: features: has 8 values per box, the first line 6",
        ),
    }
    for name, (rows, message) in cases.items():
        write_tsv(tmp_path / f"{name}.tsv", rows)
        with pytest.raises(UserError, match=re.escape(message)):
            import_tsv([tmp_path / f"{name}.tsv"], tmp_path / name, "test")
        assert not (tmp_path / name).exists() or not list((tmp_path / name).iterdir())


def test_adaptive_features_are_padded_to_the_most_boxes(tmp_path):
    """Images of 4, 10 and 2 boxes (in two files): stored as R = 10, each image's boxes then
    all-zero rows (features and boxes), which the split reads as padded."""
    made = [record("a", 0), record("b", 1, boxes=10), record("c", 2, boxes=2)]
    write_tsv(tmp_path / "a.tsv", [made[0][0]])
    write_tsv(tmp_path / "b.tsv", [m[0] for m in made[1:]])
    summary = import_tsv([tmp_path / "a.tsv", tmp_path / "b.tsv"], tmp_path / "data", "test")
    assert (summary.images, summary.regions, summary.fewest_regions) == (3, 10, 2)
    split = load_files(tmp_path / "data/test_ims.npy", None)
    boxes = np.load(tmp_path / "data/test_boxes.npy")
    assert split.images.shape == (3, 10, DIM) and boxes.shape == (3, 10, 4) and split.padded
    for i, (_, box, features) in enumerate(made):
        count = len(features)
        np.testing.assert_array_equal(split.images[i, :count], features)
        np.testing.assert_array_equal(boxes[i, :count], box)
        assert not split.images[i, count:].any() and not boxes[i, count:].any()


def test_a_truncated_last_line_is_named(tmp_path):
    rows = [record(f"img{i}", seed=i)[0] for i in range(2)]
    text = "".join("\t".join(fields) + "\n" for fields in rows)
    (tmp_path / "cut.tsv").write_text(text[: len(text) - 40])  # the file stops mid-features
    with pytest.raises(
        UserError, match=r"line 2: features: .*\(the file ends inside this line: truncated\?\)$"
    ):
        import_tsv([tmp_path / "cut.tsv"], tmp_path / "data", "test")


def test_a_last_line_cut_between_floats_is_still_refused(tmp_path):
    """A cut that leaves whole base64 floats parses (F = 3 instead of 6): the missing newline
    is what says the file was truncated."""
    fields = record("only", 0)[0]
    fields[5] = b64(np.ones((BOXES, 3)))
    (tmp_path / "cut.tsv").write_text("\t".join(fields))  # no newline
    with pytest.raises(
        UserError, match=r"line 1: features: the file ends inside this line, without"
    ):
        import_tsv([tmp_path / "cut.tsv"], tmp_path / "data", "test")


def test_importing_again_without_captions_drops_the_old_ones(two_files, tmp_path):
    paths, _ = two_files
    import_tsv(paths, tmp_path / "data", "test", [f"caption {i}" for i in range(5)])
    import_tsv(paths, tmp_path / "data", "test")
    assert not (tmp_path / "data" / "test_caps.txt").exists()


def test_captions_must_be_one_or_five_per_image(two_files, tmp_path):
    paths, _ = two_files
    with pytest.raises(
        UserError, match="^captions: 3 lines for 5 images, expected 1 or 5 per image$"
    ):
        import_tsv(paths, tmp_path / "data", "test", ["a", "b", "c"])


def test_a_large_file_is_streamed_not_read_whole(tmp_path):
    """120 images of 36 boxes × 2048 features: a 47 MB file read with a bounded footprint."""
    rows = [record(f"big{i}", seed=i, boxes=36, dim=2048)[0] for i in range(120)]
    write_tsv(tmp_path / "big.tsv", rows)
    size = (tmp_path / "big.tsv").stat().st_size
    tracemalloc.start()
    try:
        count = sum(1 for _ in read_tsv(tmp_path / "big.tsv"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 120 and size > 40e6
    assert peak < size / 10  # about one record at a time
