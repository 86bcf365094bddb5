from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from scan_deploy.errors import UserError
from scan_deploy.precomp import (
    PrecompSplit,
    check_feature_dim,
    check_feature_values,
    find_vocab,
    load_files,
    load_split,
    open_npy,
    read_npy_header,
    write_split,
    write_split_chunks,
)


def _features(n: int, regions: int = 4, dim: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, regions, dim), dtype=np.float32)


def _captions(n: int) -> list[str]:
    return [f"caption number {j}" for j in range(n)]


@pytest.mark.parametrize("per_image", [5, 1])
def test_roundtrip_is_memory_mapped_and_equal(tmp_path: Path, per_image: int) -> None:
    images = _features(3)
    captions = _captions(3 * per_image)
    write_split(tmp_path, "dev", images, captions)

    split = load_split(tmp_path, "dev")

    assert isinstance(split.images, np.memmap)
    assert split.images.dtype == np.float32
    np.testing.assert_array_equal(split.images, images)
    assert split.captions == captions
    assert split.captions_per_image == per_image
    assert (split.num_images, split.num_captions) == (3, 3 * per_image)
    assert (split.num_regions, split.feature_dim) == (4, 3)
    assert split.features_path == tmp_path / "dev_ims.npy"


def test_image_of_caption_five_per_image(tmp_path: Path) -> None:
    write_split(tmp_path, "test", _features(2), _captions(10))
    split = load_split(tmp_path, "test")
    assert [split.image_of_caption(j) for j in range(10)] == [0] * 5 + [1] * 5
    with pytest.raises(IndexError):
        split.image_of_caption(10)


def test_image_of_caption_one_per_image(tmp_path: Path) -> None:
    write_split(tmp_path, "test", _features(3), _captions(3))
    split = load_split(tmp_path, "test")
    assert [split.image_of_caption(j) for j in range(3)] == [0, 1, 2]


def test_written_npy_matches_numpy_save(tmp_path: Path) -> None:
    images = _features(5)
    write_split(tmp_path, "train", images, _captions(5))
    np.save(tmp_path / "reference.npy", images)
    assert (tmp_path / "train_ims.npy").read_bytes() == (tmp_path / "reference.npy").read_bytes()
    assert (tmp_path / "train_caps.txt").read_text() == "".join(c + "\n" for c in _captions(5))


def test_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    write_split(tmp_path, "train", _features(2), _captions(10))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_caps.txt", "train_ims.npy"]


def test_write_split_chunks_streams_in_order(tmp_path: Path) -> None:
    images = _features(5)
    chunks = [images[:2], images[2:3], images[3:]]
    write_split_chunks(tmp_path, "train", images.shape, chunks, _captions(5))
    np.testing.assert_array_equal(load_split(tmp_path, "train").images, images)


def test_write_split_chunks_rejects_a_short_stream(tmp_path: Path) -> None:
    images = _features(5)
    with pytest.raises(ValueError, match="4 images, expected 5"):
        write_split_chunks(tmp_path, "train", images.shape, [images[:4]], _captions(5))
    assert not (tmp_path / "train_ims.npy").exists()


def test_write_split_rejects_bad_caption_counts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="7 captions for 2 images"):
        write_split(tmp_path, "train", _features(2), _captions(7))


def test_write_split_rejects_multiline_captions(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="caption 1"):
        write_split(tmp_path, "train", _features(2), ["one", "two\nlines"])


def test_captions_tolerate_crlf_and_missing_final_newline(tmp_path: Path) -> None:
    np.save(tmp_path / "dev_ims.npy", _features(2))
    (tmp_path / "dev_caps.txt").write_bytes(b"a dog .\r\na cat")
    assert load_split(tmp_path, "dev").captions == ["a dog .", "a cat"]


# --- error paths: one UserError line naming the file and the field ---------------------------


def _write_raw(tmp_path: Path, images: np.ndarray, caps: str, split: str = "dev") -> None:
    np.save(tmp_path / f"{split}_ims.npy", images)
    (tmp_path / f"{split}_caps.txt").write_text(caps)


def _error(tmp_path: Path, split: str = "dev") -> str:
    with pytest.raises(UserError) as info:
        load_split(tmp_path, split)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_files_are_listed(tmp_path: Path) -> None:
    message = _error(tmp_path)
    assert str(tmp_path) in message
    assert "split 'dev'" in message
    assert "missing dev_ims.npy, dev_caps.txt" in message


def test_missing_captions_file(tmp_path: Path) -> None:
    np.save(tmp_path / "dev_ims.npy", _features(1))
    message = _error(tmp_path)
    assert "missing dev_caps.txt;" in message
    assert "expects dev_ims.npy and dev_caps.txt" in message


def test_features_not_3d(tmp_path: Path) -> None:
    _write_raw(tmp_path, np.zeros((2, 3), np.float32), "a\nb\n")
    assert _error(tmp_path) == (
        f"{tmp_path / 'dev_ims.npy'}: shape: got (2, 3), expected 3-D (images, regions, features)"
    )


def test_features_wrong_dtype(tmp_path: Path) -> None:
    _write_raw(tmp_path, np.zeros((2, 3, 4), np.float64), "a\nb\n")
    assert _error(tmp_path) == f"{tmp_path / 'dev_ims.npy'}: dtype: got float64, expected float32"


def test_features_not_npy(tmp_path: Path) -> None:
    (tmp_path / "dev_ims.npy").write_bytes(b"not numpy")
    (tmp_path / "dev_caps.txt").write_text("a\n")
    message = _error(tmp_path)
    assert message.startswith(f"{tmp_path / 'dev_ims.npy'}: format: not a readable .npy file")


def test_every_flipped_header_byte_is_one_line_naming_the_file(tmp_path: Path) -> None:
    """numpy parses the header as a Python literal, so one flipped byte raises ValueError,
    SyntaxError or tokenize.TokenError (the last two were tracebacks), or makes the header
    describe an array smaller than the file (silently read before)."""
    path = tmp_path / "ims.npy"
    np.save(path, _features(2))
    good = path.read_bytes()
    header = 10 + int.from_bytes(good[8:10], "little")  # magic, version, length, then the dict
    fields = set()
    for position in range(header):
        for bit in (0x01, 0x10, 0x40):
            flipped = bytearray(good)
            flipped[position] ^= bit
            path.write_bytes(bytes(flipped))
            try:
                images = load_files(path, None).images
            except UserError as exc:
                message = str(exc)
                assert message.startswith(f"{path}: ") and "\n" not in message, message
                fields.add(message.split(": ")[1])
            else:  # a flip that keeps the meaning, e.g. '<f4' -> '=f4' or in the padding
                np.testing.assert_array_equal(images, _features(2))
    assert fields == {"format", "size"}


def test_a_header_that_disagrees_with_the_file_size(tmp_path: Path) -> None:
    path = tmp_path / "ims.npy"
    np.save(path, _features(2))
    data = path.read_bytes()
    path.write_bytes(data.replace(b"(2, 4, 3)", b"(2, 4, 2)"))  # 32 bytes fewer than the file
    with pytest.raises(UserError) as info:
        load_files(path, None)
    assert str(info.value) == (
        f"{path}: size: has trailing bytes: {len(data)} bytes, its header's (2, 4, 2) float32 "
        f"array needs {len(data) - 32}"
    )
    path.write_bytes(data[:-1])
    with pytest.raises(UserError, match=r"ims\.npy: size: truncated: .*: re-run it$"):
        read_npy_header(path, ": re-run it")


def test_a_header_with_negative_sizes(tmp_path: Path) -> None:
    """(1, -1, -1) float32 needs 4 bytes, as many as the file holds: np.memmap's ValueError
    'negative dimensions are not allowed' was a traceback."""
    path = tmp_path / "ims.npy"
    np.save(path, _features(2))
    data = path.read_bytes().replace(b"(2, 4, 3)", b"(1,-1,-1)")
    path.write_bytes(data[: len(data) - 92])
    with pytest.raises(UserError) as info:
        load_files(path, None)
    assert str(info.value) == f"{path}: shape: got (1, -1, -1), expected sizes >= 0"
    with pytest.raises(UserError, match=r"ims\.npy: shape: got \(1, -1, -1\), .*: re-run it$"):
        open_npy(path, ": re-run it")


def test_open_npy_maps_the_array_read_only(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    expected = np.asfortranarray(_features(3))
    np.save(path, expected)
    header = read_npy_header(path)
    assert (header.shape, header.dtype, header.fortran_order) == ((3, 4, 3), np.float32, True)
    assert header.offset + expected.nbytes == path.stat().st_size
    mapped = open_npy(path)
    assert isinstance(mapped, np.memmap) and not mapped.flags.writeable
    np.testing.assert_array_equal(mapped, expected)
    np.save(path, np.array([None, 1], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match=r"x\.npy: dtype: holds Python objects, expected numbers"):
        open_npy(path)


def test_zero_images(tmp_path: Path) -> None:
    _write_raw(tmp_path, np.zeros((0, 36, 8), np.float32), "")
    assert _error(tmp_path) == (
        f"{tmp_path / 'dev_ims.npy'}: shape: holds zero images, expected at least one"
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_name_the_first_bad_image(
    tmp_path: Path, bad: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = _features(7)
    images[4, 1, 2] = bad
    images[6, 0, 0] = bad
    _write_raw(tmp_path, images, "".join(f"c{j}\n" for j in range(7)))
    # Two images a chunk, so the bad one is found in a later chunk, not the first.
    monkeypatch.setattr("scan_deploy.precomp._CHUNK_BYTES", 2 * images[0].nbytes)
    assert (
        _error(tmp_path) == f"{tmp_path / 'dev_ims.npy'}: features: image 4 has NaN or Inf values"
    )


def test_non_finite_check_of_any_features_names_the_field() -> None:
    images = _features(3)
    images[2, 3, 1] = np.inf
    with pytest.raises(UserError) as info:
        check_feature_values(images, None, "image features")
    assert str(info.value) == "image features: image 2 has NaN or Inf values"


def test_non_finite_check_can_be_skipped(tmp_path: Path) -> None:
    images = _features(1)
    images[0, 0, 0] = np.nan
    _write_raw(tmp_path, images, "c\n")
    assert load_split(tmp_path, "dev", check_finite=False).num_images == 1


def test_empty_caption_line(tmp_path: Path) -> None:
    _write_raw(tmp_path, _features(3), "a dog\n  \na cat\n")
    assert _error(tmp_path) == (
        f"{tmp_path / 'dev_caps.txt'}: line 2: empty caption, expected one caption a line"
    )


def test_caption_count_mismatch_states_both_counts(tmp_path: Path) -> None:
    _write_raw(tmp_path, _features(2), "".join(f"c{j}\n" for j in range(7)))
    assert _error(tmp_path) == (
        f"{tmp_path / 'dev_caps.txt'}: captions: got 7 captions for the 2 images of dev_ims.npy, "
        "expected 10 (5 per image) or 2 (1 per image)"
    )


def test_captions_drop_a_byte_order_mark(tmp_path: Path) -> None:
    np.save(tmp_path / "dev_ims.npy", _features(2))
    (tmp_path / "dev_caps.txt").write_text("\ufeffa dog\na cat\n", encoding="utf-8")
    assert load_split(tmp_path, "dev").captions == ["a dog", "a cat"]


def test_captions_not_utf8(tmp_path: Path) -> None:
    np.save(tmp_path / "dev_ims.npy", _features(1))
    (tmp_path / "dev_caps.txt").write_bytes(b"caf\xe9\n")
    assert _error(tmp_path).startswith(f"{tmp_path / 'dev_caps.txt'}: encoding: expected UTF-8")


# --- vocabulary lookup and the feature-dimension check ----------------------------------------


def test_find_vocab_returns_the_single_vocab(tmp_path: Path) -> None:
    (tmp_path / "coco_precomp_vocab.json").write_text("{}")
    assert find_vocab(tmp_path) == tmp_path / "coco_precomp_vocab.json"


def test_find_vocab_none(tmp_path: Path) -> None:
    with pytest.raises(UserError) as info:
        find_vocab(tmp_path)
    assert str(info.value) == (
        f"{tmp_path}: vocab: expected exactly one {{data_name}}_vocab.json, found none"
    )


def test_find_vocab_ambiguous(tmp_path: Path) -> None:
    (tmp_path / "a_vocab.json").write_text("{}")
    (tmp_path / "b_vocab.json").write_text("{}")
    with pytest.raises(UserError, match="found a_vocab.json, b_vocab.json"):
        find_vocab(tmp_path)


def test_find_vocab_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="data directory not found"):
        find_vocab(tmp_path / "nowhere")


def test_check_feature_dim(tmp_path: Path) -> None:
    write_split(tmp_path, "dev", _features(1, dim=3), ["c"])
    split = load_split(tmp_path, "dev")
    check_feature_dim(split, 3, "config.json")
    with pytest.raises(UserError) as info:
        check_feature_dim(split, 2048, "config.json")
    assert str(info.value) == (
        f"config.json: img_dim: the model expects 2048 features per region, "
        f"the data in {tmp_path / 'dev_ims.npy'} have 3"
    )


def test_check_feature_dim_without_a_path() -> None:
    split = PrecompSplit(np.zeros((1, 2, 5), np.float32), ["c"], 1)
    with pytest.raises(UserError, match="the data have 5"):
        check_feature_dim(split, 4, None)
