"""`load_bundle`'s checks of the manifest: shape ranges and file entries of the wrong type or
out of range are one line naming manifest.json and the field (KeyError, TypeError, ValueError or
OverflowError tracebacks, or a bundle accepted with a word limit no caption fits, before)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from scan_deploy.bundle import MANIFEST, load_bundle
from scan_deploy.errors import UserError

pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    from tests.export.tiny_bundle import make_bundle

    return make_bundle(tmp_path_factory.mktemp("bundle") / "bundle")


def edited(exported: Path, target: Path, edit) -> Path:
    """A copy of the bundle whose manifest `edit` changed (in place)."""
    shutil.copytree(exported, target)
    manifest = json.loads((target / MANIFEST).read_text())
    edit(manifest)
    (target / MANIFEST).write_text(json.dumps(manifest))
    return target


def setter(*keys: str, value=None, delete: bool = False):
    def edit(manifest: dict) -> None:
        node = manifest
        for key in keys[:-1]:
            node = node[key]
        if delete:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value

    return edit


def test_the_exported_bundle_loads(exported):
    ranges = load_bundle(exported).manifest["shape_ranges"]
    assert ranges["words"] == {"min": 1, "opt": 7, "max": 7}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (setter("shape_ranges", value={}), "shape_ranges.batch: expected an object, got null"),
        (setter("shape_ranges", value=[1, 2]), "shape_ranges: expected an object, got a list"),
        (
            setter("shape_ranges", "words", "max", value="x"),
            "shape_ranges.words.max: expected an integer, got a string",
        ),
        (
            setter("shape_ranges", "words", "max", value=None),
            "shape_ranges.words.max: expected an integer, got null",
        ),
        (
            setter("shape_ranges", "words", "max", value=float("nan")),
            "shape_ranges.words.max: expected an integer, got a number",
        ),
        (
            setter("shape_ranges", "regions", "opt", delete=True),
            "shape_ranges.regions.opt: expected an integer, got null",
        ),
        (
            setter("shape_ranges", "batch", "min", value=True),
            "shape_ranges.batch.min: expected an integer, got a boolean",
        ),
        (
            setter("shape_ranges", "batch", "opt", value=9),
            "shape_ranges.batch: got min 1, opt 9, max 8, expected 1 <= min <= opt <= max",
        ),
        (
            setter("shape_ranges", "regions", value={"min": 0, "opt": 0, "max": 0}),
            "shape_ranges.regions: got min 0, opt 0, max 0, expected 1 <= min <= opt <= max",
        ),
        (
            setter("shape_ranges", "words", "min", value=-5),
            "shape_ranges.words: got min -5, opt 7, max 7, expected 1 <= min <= opt <= max",
        ),
        (
            setter("vocab", "sha256", delete=True),
            "vocab.sha256: expected a string, got null",
        ),
        (setter("vocab", "file", value=3), "vocab.file: expected a string, got an integer"),
        (
            setter("vocab", "words_sha256", value=None),
            "vocab.words_sha256: expected a string, got null",
        ),
        (setter("vocab", value="vocab.json"), "vocab: expected an object, got a string"),
        (setter("graphs", value=["scorer"]), "graphs: expected an object, got a list"),
        (
            setter("graphs", "scorer", "sha256", value=7),
            "graphs.scorer.sha256: expected a string, got an integer",
        ),
        (
            setter("graphs", "text_encoder", "file", value=None),
            "graphs.text_encoder.file: expected a string, got null",
        ),
        (setter("variants", value=[]), "variants: expected an object, got a list"),
        (setter("variants", value={"fp16": 1}), "variants.fp16: expected an object, got an"),
    ],
)
def test_manifest_fields_of_the_wrong_type_are_one_line(exported, tmp_path, edit, message):
    bundle = edited(exported, tmp_path / "bundle", edit)
    with pytest.raises(UserError) as info:
        load_bundle(bundle)
    assert str(info.value).startswith(f"{bundle / MANIFEST}: {message}"), str(info.value)
    assert "\n" not in str(info.value)


def test_a_number_beyond_floats_is_one_line(exported, tmp_path):
    """1e400 is read as inf: int(inf) raised OverflowError."""
    bundle = tmp_path / "bundle"
    shutil.copytree(exported, bundle)
    text = (bundle / MANIFEST).read_text()
    manifest = json.loads(text)
    manifest["shape_ranges"]["words"]["max"] = "HUGE"
    (bundle / MANIFEST).write_text(json.dumps(manifest).replace('"HUGE"', "1e400"))
    with pytest.raises(UserError, match="shape_ranges.words.max: expected an integer, got a numb"):
        load_bundle(bundle)


@pytest.mark.parametrize("words", [2, 1])
def test_a_word_limit_no_caption_fits_is_refused(exported, tmp_path, words):
    """<start> and <end> take two tokens: a limit below 3 leaves no word."""
    value = {"min": 1, "opt": words, "max": words}
    bundle = edited(exported, tmp_path / "bundle", setter("shape_ranges", "words", value=value))
    with pytest.raises(UserError) as info:
        load_bundle(bundle)
    assert str(info.value) == (
        f"{bundle / MANIFEST}: shape_ranges.words.max: got {words}, expected at least 3 "
        "(<start>, a word and <end>)"
    )


def test_features_must_fit_the_bundles_region_range(exported, tmp_path):
    """R within the exported range (5 here); padded images only for graphs that mask them (a
    bundle exported before has no `padded_regions`)."""
    bundle = load_bundle(exported)
    assert bundle.manifest["padded_regions"] == "masked"
    bundle.check_regions(5, True, None, "shape")
    with pytest.raises(UserError) as info:
        bundle.check_regions(6, False, Path("ims.npy"), "shape")
    assert str(info.value) == (
        "ims.npy: shape: has 6 regions per image, the bundle takes 5 (re-export with "
        "--regions/--min-regions/--max-regions to change it)"
    )
    old = load_bundle(edited(exported, tmp_path / "old", setter("padded_regions", delete=True)))
    old.check_regions(5, False, None, "shape")
    with pytest.raises(
        UserError, match="^ims.npy: shape: has images of fewer regions .* re-export it$"
    ):
        old.check_regions(5, True, Path("ims.npy"), "shape")
