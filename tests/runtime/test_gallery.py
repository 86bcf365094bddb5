"""The gallery: sharded, memory-mapped round trips per kind and dtype, and every refusal.

Measured worst round-trip errors on the seeded data below (unit-norm embeddings, Grams ≤ 1), the
same at R=36, D=1024: fp32 0 (exact); fp16 4.7e-4 relative (bound 2⁻¹¹ ≈ 4.9e-4), 2.4e-4
absolute; int8 0.499 of a quantization step = 3.93e-3 of the row's max |x| (bound 1/254 ≈ 3.94e-3).
`global` (always float32) and `lengths` (int64) are exact in every dtype.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scan_deploy.runtime.gallery import open_gallery
from scan_deploy.runtime.gallery_format import EMBEDDINGS, ITEM_AXES, KINDS
from scan_deploy.runtime.gallery_writer import GalleryWriter

from scan_deploy.bundle import Bundle, sha256_file
from scan_deploy.choices import GalleryDtype
from scan_deploy.config import ModelConfig
from scan_deploy.errors import UserError

D = 8
R = 5
COUNT = 11
SHARD = 4
BATCHES = (3, 5, 0, 3)  # 11 items: shards of 4, 4, 3; batches straddle shard boundaries


def fake_bundle(tmp_path: Path, scorer: str = "c", words: str = "d", embed_size: int = D) -> Bundle:
    manifest = {
        "graphs": {
            "image_encoder": {"file": "image_encoder.onnx", "sha256": "a" * 64},
            "text_encoder": {"file": "text_encoder.onnx", "sha256": "b" * 64},
            "scorer": {"file": "scorer.onnx", "sha256": scorer * 64},
        },
        "vocab": {"file": "vocab.json", "words_sha256": words * 64},
    }
    config = ModelConfig(vocab_size=12, embed_size=embed_size, cross_attn="t2i")
    return Bundle(tmp_path / "bundle", manifest, config, None)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_items(kind: str, seed: int = 0) -> dict[str, np.ndarray]:
    """COUNT items; captions get lengths 1..7 with garbage beyond each length."""
    rng = np.random.default_rng(seed)
    if kind == "images":
        regions = _unit(rng.standard_normal((COUNT, R, D)))
        gram = np.einsum("nrd,nsd->nrs", regions, regions)
        return {"regions": regions, "region_gram": gram, "global": _unit(regions.mean(1))}
    lengths = np.array([1, 3, 2, 7, 2, 2, 1, 2, 5, 6, 3], dtype=np.int64)
    words = _unit(rng.standard_normal((COUNT, 7, D)))
    valid = np.arange(7)[None, :] < lengths[:, None]
    clean = np.where(valid[:, :, None], words, 0).astype(np.float32)
    gram = np.einsum("ntd,nsd->nts", clean, clean)
    words[~valid] = 5.0  # what an encoder may emit beyond the length: must be zeroed
    return {
        "words": words,
        "clean_words": clean,
        "lengths": lengths,
        "caption_gram": gram,
        "global": _unit(rng.standard_normal((COUNT, D))),
    }


def batch_of(kind: str, items: dict, start: int, stop: int, drop_gram: bool = False) -> dict:
    batch = {k: v[start:stop] for k, v in items.items() if k != "clean_words"}
    if kind == "captions" and stop > start:
        t = int(batch["lengths"].max()) + 1  # each batch padded to its own length (+1 spare)
        batch["words"] = batch["words"][:, :t]
        batch["caption_gram"] = batch["caption_gram"][:, :t, :t]
    if drop_gram:
        batch.pop("region_gram" if kind == "images" else "caption_gram")
    return batch


def write(tmp_path, kind, dtype, items=None, drop_gram=False, name="gallery", texts=True, **writer):
    items = make_items(kind) if items is None else items
    path = tmp_path / name
    ids = [f"{kind}-{i}" for i in range(COUNT)]
    bundle = fake_bundle(tmp_path)
    with GalleryWriter(path, kind, bundle, dtype, SHARD, **writer) as w:
        start = 0
        for size in BATCHES:
            stop = start + size
            batch = batch_of(kind, items, start, stop, drop_gram)
            w.add(
                batch, ids[start:stop], [f"text {i}" for i in range(start, stop)] if texts else None
            )
            start = stop
        manifest = w.close()
    return path, items, manifest


def reference(kind: str, items: dict) -> dict[str, np.ndarray]:
    if kind == "images":
        return {k: items[k] for k in ("regions", "region_gram", "global")}
    return {
        "words": items["clean_words"],
        "lengths": items["lengths"],
        "caption_gram": items["caption_gram"],
        "global": items["global"],
    }


def assert_close(name: str, dtype: str, got: np.ndarray, want: np.ndarray) -> float:
    """Assert the dtype's error bound; return the error in the bound's unit."""
    assert got.shape == want.shape and got.dtype == want.dtype
    if name in ("global", "lengths") or dtype == "fp32":
        np.testing.assert_array_equal(got, want)
        return 0.0
    err = np.abs(got.astype(np.float64) - want)
    if dtype == "fp16":
        rel = err / np.maximum(np.abs(want), 2.0**-14)  # below 2⁻¹⁴ fp16 is subnormal
        assert rel.max() <= 2.0**-11
        return float(rel.max())
    step = np.abs(want).max(axis=-1, keepdims=True) / 127  # int8: one step per row
    in_steps = err / np.where(step > 0, step, 1)
    assert in_steps.max() <= 0.5 + 1e-4
    assert np.all(got[np.broadcast_to(step == 0, got.shape)] == 0)
    return float(in_steps.max())


@pytest.mark.parametrize("dtype", list(GalleryDtype))
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_every_kind_and_dtype(tmp_path, kind, dtype):
    path, items, manifest = write(tmp_path, kind, dtype)
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 3]
    assert [s["offset"] for s in manifest["shards"]] == [0, 4, 8]
    gallery = open_gallery(path)
    assert (gallery.kind, gallery.dtype, gallery.count) == (kind, dtype, COUNT)
    assert gallery.ids == [f"{kind}-{i}" for i in range(COUNT)]
    assert gallery.texts == [f"text {i}" for i in range(COUNT)]
    assert [(s.index, s.count, s.offset) for s in gallery.shards] == [
        (0, 4, 0),
        (1, 4, 4),
        (2, 3, 8),
    ]
    stored = {"fp32": np.float32, "fp16": np.float16, "int8": np.uint8}[dtype]
    main = "regions" if kind == "images" else "words"
    assert gallery.shards[0].load(main).dtype == stored
    assert isinstance(gallery.shards[0].load(main), np.memmap)
    assert gallery.shards[0].load("global").dtype == np.float32
    if dtype == "int8":
        assert gallery.shards[1].load(main + "_scale").shape == gallery.shards[1].shape(main)[:2]
    worst = {}
    for name, want in reference(kind, items).items():
        for shard in gallery.shards:
            got = shard.block(name, 0, shard.count)
            rows = want[shard.offset : shard.offset + shard.count]
            if kind == "captions" and got.ndim > 1 and name != "global":
                t = got.shape[1]  # the shard's own padded length
                rows = rows[:, :t, :t] if name == "caption_gram" else rows[:, :t]
            worst[name] = max(worst.get(name, 0.0), assert_close(name, dtype, got, rows))
            part = shard.block(name, 1, 3)
            np.testing.assert_array_equal(part, got[1:3])
    if dtype == "fp16":
        assert 0 < max(worst.values()) <= 2.0**-11
    if dtype == "int8":
        assert 0.3 < max(worst.values()) <= 0.5 + 1e-4


@pytest.mark.parametrize("dtype", list(GalleryDtype))
def test_caption_shards_are_padded_to_their_own_longest_caption(tmp_path, dtype):
    path, items, _ = write(tmp_path, "captions", dtype)
    gallery = open_gallery(path)
    lengths = items["lengths"]
    for shard in gallery.shards:
        longest = int(lengths[shard.offset : shard.offset + shard.count].max())
        assert shard.shape("words") == (shard.count, longest, D)
        assert shard.shape("caption_gram") == (shard.count, longest, longest)
        words = shard.block("words", 0, shard.count)
        mine = lengths[shard.offset : shard.offset + shard.count]
        beyond = np.arange(longest)[None, :] >= mine[:, None]
        assert np.all(words[beyond] == 0)  # the encoder's garbage (5.0) was zeroed
        gram = shard.block("caption_gram", 0, shard.count)
        assert np.all(gram[beyond] == 0) and np.all(gram.transpose(0, 2, 1)[beyond] == 0)
    assert [s.shape("words")[1] for s in gallery.shards] == [7, 2, 6]


@pytest.mark.parametrize("kind", KINDS)
def test_rows_across_shards_in_any_order(tmp_path, kind):
    path, items, _ = write(tmp_path, kind, "fp32")
    gallery = open_gallery(path)
    want = reference(kind, items)
    picks = np.array([9, 0, 5, 3, 10, 4, 9])  # every shard, unsorted, one repeat
    for name, full in want.items():
        got = gallery.rows(name, picks)
        np.testing.assert_array_equal(got, full[picks])
    empty = gallery.rows("global", np.array([], dtype=np.int64))
    assert empty.shape == (0, D) and empty.dtype == np.float32
    if kind == "captions":  # shards 1 (T=2) and 2 (T=6) touched: padded to 6, not to 7
        words = gallery.rows("words", np.array([7, 9]))
        assert words.shape == (2, 6, D)
        np.testing.assert_array_equal(words, items["clean_words"][[7, 9], :6])
        assert gallery.rows("caption_gram", np.array([5])).shape == (1, 2, 2)
    with pytest.raises(IndexError):
        gallery.rows("global", np.array([COUNT]))


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_rows_dequantize_like_blocks(tmp_path, dtype):
    path, _, _ = write(tmp_path, "images", dtype)
    gallery = open_gallery(path)
    got = gallery.rows("regions", np.array([6, 2]))
    np.testing.assert_array_equal(got[0], gallery.shards[1].block("regions", 2, 3)[0])
    np.testing.assert_array_equal(got[1], gallery.shards[0].block("regions", 2, 3)[0])


def test_prefetch_advises_exactly_the_rows_a_rerank_reads(tmp_path, monkeypatch):
    path, _, _ = write(tmp_path, "images", "int8")
    gallery = open_gallery(path)
    advised = []

    def fadvise(fd, offset, size, advice):
        file = Path(os.readlink(f"/proc/self/fd/{fd}"))
        advised.append((file.parent.name, file.stem, offset, size, advice))

    monkeypatch.setattr("os.posix_fadvise", fadvise)
    gallery.prefetch(np.array([9, 0, 1, 5, 9]))  # shard 0 rows 0-1 (one run), 1 row 1, 2 row 1
    expected = []
    for shard, first, rows in ((0, 0, 2), (1, 1, 1), (2, 1, 1)):
        for name in ("regions", "region_gram", "regions_scale", "region_gram_scale"):
            header, shape, dtype = gallery.shards[shard]._layout(name)
            row = int(np.prod(shape[1:])) * dtype.itemsize
            place = (f"shard-{shard:05d}", name, header + first * row, rows * row)
            expected.append((*place, os.POSIX_FADV_WILLNEED))
    assert sorted(advised) == sorted(expected)


def test_gallery_size_against_physical_memory(tmp_path, monkeypatch):
    path, _, _ = write(tmp_path, "images", "fp16")
    gallery = open_gallery(path)
    per_item = 2 * R * D + 2 * R * R + 4 * D  # fp16 regions and Gram, float32 global
    assert gallery.nbytes == COUNT * per_item
    assert not gallery.larger_than_memory()
    pages = {"SC_PAGE_SIZE": 1, "SC_PHYS_PAGES": COUNT * per_item - 1}
    monkeypatch.setattr("os.sysconf", lambda name: pages[name])
    assert gallery.larger_than_memory()


def test_global_embeddings_by_shard_with_offsets(tmp_path):
    path, items, _ = write(tmp_path, "images", "int8")
    blocks = list(open_gallery(path).global_embeddings())
    assert [offset for offset, _ in blocks] == [0, 4, 8]
    assert [b.shape for _, b in blocks] == [(4, D), (4, D), (3, D)]
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), items["global"])


@pytest.mark.parametrize("kind", KINDS)
def test_gram_is_computed_when_left_out(tmp_path, kind):
    path, items, manifest = write(tmp_path, kind, "fp32", drop_gram=True, texts=False)
    gallery = open_gallery(path)
    assert gallery.texts is None and manifest["texts"] is None
    gram = "region_gram" if kind == "images" else "caption_gram"
    np.testing.assert_allclose(
        gallery.rows(gram, np.arange(COUNT)), reference(kind, items)[gram], atol=1e-6
    )


def test_manifest_records_bundle_identity_and_files(tmp_path):
    path, _, manifest = write(tmp_path, "images", "int8")
    on_disk = json.loads((path / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["format_version"] == 4 and manifest["shard_size"] == SHARD
    assert manifest["bundle"]["graphs"]["scorer"] == "c" * 64
    assert manifest["bundle"]["vocab"]["words_sha256"] == "d" * 64
    assert (manifest["bundle"]["embed_size"], manifest["bundle"]["cross_attn"]) == (D, "t2i")
    files = manifest["shards"][2]["files"]
    assert sorted(files) == sorted(
        ["regions", "regions_scale", "region_gram", "region_gram_scale", "global"]
    )
    assert files["regions"] | {"sha256": None} == {
        "file": "shard-00002/regions.npy",
        "sha256": None,
        "shape": [3, R, D],
        "dtype": "uint8",  # codes q + 128
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gallery"]  # no temp folder left


def test_check_bundle_names_the_mismatch(tmp_path):
    path, _, _ = write(tmp_path, "captions", "fp16")
    gallery = open_gallery(path)
    gallery.check_bundle(fake_bundle(tmp_path))
    cases = [
        (fake_bundle(tmp_path, scorer="e"), "bundle.graphs.scorer"),
        (fake_bundle(tmp_path, words="f"), "bundle.vocab.words_sha256"),
        (fake_bundle(tmp_path, embed_size=16), "bundle.embed_size"),
    ]
    for bundle, field in cases:
        with pytest.raises(UserError, match="gallery built with another bundle") as err:
            gallery.check_bundle(bundle)
        message = str(err.value)
        assert field in message and "re-run scan-deploy index" in message and "\n" not in message


def _flip_last_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))


def test_corrupted_file_fails_its_sha256(tmp_path):
    path, _, _ = write(tmp_path, "images", "fp16")
    target = path / "shard-00001" / "region_gram.npy"
    _flip_last_byte(target)
    with pytest.raises(UserError, match=r"shard-00001/region_gram\.npy: sha256: is .*expects") as e:
        open_gallery(path)
    assert "\n" not in str(e.value)
    open_gallery(path, verify=False)  # the header and size still match: only hashing sees it


def test_truncated_file_fails_even_without_verify(tmp_path):
    path, _, _ = write(tmp_path, "captions", "int8")
    target = path / "shard-00002" / "words.npy"
    target.write_bytes(target.read_bytes()[:-5])
    with pytest.raises(UserError, match=r"words\.npy: size: truncated: \d+ bytes, .* needs \d+"):
        open_gallery(path, verify=False)
    target.write_bytes(target.read_bytes()[:20])  # not even a header
    with pytest.raises(UserError, match=r"words\.npy: format: not a readable \.npy file"):
        open_gallery(path, verify=False)


def _break_npy_header(file: Path) -> None:
    """One flipped bit in the .npy header ('descr': '<f2' -> ',f2'): numpy raises SyntaxError."""
    data = bytearray(file.read_bytes())
    data[data.index(b"'descr': '") + len(b"'descr': '")] = ord(",")
    file.write_bytes(bytes(data))


def test_a_corrupt_npy_header_is_one_line_naming_the_file(tmp_path):
    path, _, _ = write(tmp_path, "images", "int8")
    _break_npy_header(path / "shard-00001" / "regions_scale.npy")
    pattern = r"shard-00001/regions_scale\.npy: format: not a readable \.npy file \(.+\): re-run"
    with pytest.raises(UserError, match=pattern) as err:
        open_gallery(path)
    assert "\n" not in str(err.value)


def test_a_header_corrupted_after_opening_fails_the_read_in_one_line(tmp_path):
    path, _, _ = write(tmp_path, "images", "fp16")
    gallery = open_gallery(path)
    _break_npy_header(path / "shard-00000" / "regions.npy")
    pattern = r"shard-00000/regions\.npy: format: not a readable \.npy file"
    with pytest.raises(UserError, match=pattern):
        gallery.rows("regions", np.array([0, 5]))  # positioned reads: the header parsed once
    with pytest.raises(UserError, match=pattern):
        gallery.shards[0].block("regions", 0, 2)  # memory-mapped


def test_missing_or_swapped_files(tmp_path):
    path, _, _ = write(tmp_path, "images", "fp32")
    (path / "shard-00000" / "global.npy").unlink()
    with pytest.raises(UserError, match=r"global\.npy: missing \(named by manifest\.json"):
        open_gallery(path)
    path, _, _ = write(tmp_path, "images", "fp32", name="other")
    regions = path / "shard-00000" / "regions.npy"
    saved = regions.read_bytes()
    regions.write_bytes((path / "shard-00002" / "regions.npy").read_bytes())
    with pytest.raises(
        UserError, match=r"regions\.npy: shape: is \(3, 5, 8\) float32, .*\(4, 5, 8\)"
    ):
        open_gallery(path, verify=False)
    regions.write_bytes(saved)
    (path / "ids.json").write_text(json.dumps([f"x{i}" for i in range(COUNT)]))
    with pytest.raises(UserError, match=r"ids\.json: sha256"):
        open_gallery(path, verify=False)


def test_manifest_that_disagrees_with_itself(tmp_path):
    path, _, manifest = write(tmp_path, "images", "fp32")
    manifest["count"] = 12
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="shards: hold 11 items, the manifest count is 12"):
        open_gallery(path)
    manifest["count"] = 11
    manifest["shards"][1]["files"]["regions"]["shape"] = [4, 6, D]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"shards\[1\]\.files\.regions: records shape"):
        open_gallery(path)
    manifest["dtype"] = "bf16"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="dtype: got 'bf16', expected one of fp32, fp16, int8"):
        open_gallery(path)
    with pytest.raises(UserError, match="file not found"):
        open_gallery(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("path", "found"), [(..., "null"), (None, "null"), (5, "an integer"), ([], "a list")]
)
def test_a_recorded_bundle_path_of_the_wrong_type_is_one_line(tmp_path, path, found):
    """`query` without --bundle opens the recorded path: KeyError/TypeError tracebacks before."""
    gallery, _, manifest = write(tmp_path, "images", "fp32")
    if path is ...:
        del manifest["bundle"]["path"]
    else:
        manifest["bundle"]["path"] = path
    (gallery / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError) as info:
        open_gallery(gallery)
    expected = f"{gallery / 'manifest.json'}: bundle.path: expected a string, got {found}"
    assert str(info.value) == expected


def _good_images(n: int = 2) -> dict[str, np.ndarray]:
    return {k: v[:n] for k, v in make_items("images").items()}


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (
            {"regions": np.zeros((2, R, 16), np.float32)},
            r"arrays\.regions: got shape \(2, 5, 16\), expected \(n=2, R=5, D=8\)",
        ),
        (
            {"global": np.zeros((2, 16), np.float32)},
            r"arrays\.global: got shape \(2, 16\), expected \(n=2, D=8\)",
        ),
        ({"region_gram": np.zeros((2, R, 4), np.float32)}, r"arrays\.region_gram: got shape"),
        (
            {"regions": np.zeros((2, R, D), np.int32)},
            r"arrays\.regions: got dtype int32, expected float32",
        ),
        (
            {"global": np.full((2, D), np.nan, np.float32)},
            r"arrays\.global: item 0 \(id 'a'\) has NaN or Inf",
        ),
        (
            {"boxes": np.zeros((2, 4))},
            r"arrays\.boxes: unknown array, a gallery of images expects regions",
        ),
    ],
)
def test_bad_batch_is_refused_and_nothing_is_visible(tmp_path, change, pattern):
    target = tmp_path / "gallery"
    with (
        pytest.raises(UserError, match=pattern) as err,
        GalleryWriter(target, "images", fake_bundle(tmp_path), shard_size=1) as writer,
    ):
        writer.add(_good_images(), ["x", "y"])  # already a complete shard on disk (temp)
        writer.add(_good_images() | change, ["a", "b"])
    assert "\n" not in str(err.value)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # the temp folder is gone too


def test_bad_captions_and_ids(tmp_path):
    bundle = fake_bundle(tmp_path)
    items = make_items("captions")
    good = batch_of("captions", items, 0, 2)
    cases = [
        (
            good | {"lengths": np.array([1, 9])},
            ["a", "b"],
            r"arrays\.lengths: item 1 \(id 'b'\) has length 9, expected 1\.\.4",
        ),
        (
            good | {"lengths": np.array([1.0, 2.0])},
            ["a", "b"],
            r"arrays\.lengths: got dtype float64, expected integers",
        ),
        (
            {k: v for k, v in good.items() if k != "lengths"},
            ["a", "b"],
            r"arrays\.lengths: missing array",
        ),
        (good, ["a", "a"], r"ids: duplicate id 'a'"),
        (good, ["a"], r"arrays\.words: got shape \(2, 4, 8\), expected \(n=1, T=4, D=8\)"),
    ]
    for batch, ids, pattern in cases:
        writer = GalleryWriter(tmp_path / "g", "captions", bundle)
        with pytest.raises(UserError, match=pattern):
            writer.add(batch, ids)
        with pytest.raises(RuntimeError, match="aborted"):
            writer.add(good, ["c", "d"])
        assert list(tmp_path.iterdir()) == []
    with GalleryWriter(tmp_path / "g", "captions", bundle) as writer:
        writer.add(good, ["a", "b"], ["t0", "t1"])
        with pytest.raises(UserError, match="texts: earlier batches had texts"):
            writer.add(batch_of("captions", items, 2, 3), ["c"])
    assert list(tmp_path.iterdir()) == []


def test_writer_arguments_and_target(tmp_path):
    bundle = fake_bundle(tmp_path)
    with pytest.raises(UserError, match="kind: got 'videos', expected one of images, captions"):
        GalleryWriter(tmp_path / "g", "videos", bundle)
    with pytest.raises(UserError, match="dtype: got 'bf16', expected one of fp32, fp16, int8"):
        GalleryWriter(tmp_path / "g", "images", bundle, dtype="bf16")
    with pytest.raises(UserError, match="shard_size: got 0"):
        GalleryWriter(tmp_path / "g", "images", bundle, shard_size=0)
    with pytest.raises(UserError, match="count: no items were added"):
        GalleryWriter(tmp_path / "g", "images", bundle).close()
    assert list(tmp_path.iterdir()) == []
    path, _, _ = write(tmp_path, "images", "fp16")
    with pytest.raises(UserError, match=r"gallery: not empty \(pass --force to replace it\)"):
        GalleryWriter(path, "images", bundle)
    with GalleryWriter(path, "captions", bundle, dtype="fp32", force=True) as writer:
        writer.add(batch_of("captions", make_items("captions"), 0, 2), ["a", "b"])
    assert open_gallery(path).kind == "captions"  # replaced on the exit of the with-block
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a gallery folder"):
        GalleryWriter(tmp_path / "notes", "images", bundle, force=True)


def test_fp16_refuses_values_out_of_range(tmp_path):
    items = _good_images()
    items["regions"] = items["regions"] * 300  # Grams reach 9e4 > 65504
    with pytest.raises(UserError, match=r"arrays\.region_gram: has values up to .*float16 range"):
        GalleryWriter(tmp_path / "g", "images", fake_bundle(tmp_path), dtype="fp16").add(
            {k: v for k, v in items.items() if k != "region_gram"}, ["a", "b"]
        )
    assert list(tmp_path.iterdir()) == []


def test_import_needs_neither_torch_nor_onnx():
    code = (
        "import sys, scan_deploy.runtime.gallery; "
        "assert 'torch' not in sys.modules and 'onnx' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("kind", KINDS)
def test_a_format_2_int8_gallery_stored_as_int8_reads_the_same(tmp_path, kind):
    """Formats 1 and 2 stored int8 values as int8; format 3 stores the codes q + 128."""
    path, _, manifest = write(tmp_path, kind, "int8")
    now = open_gallery(path)
    expected = {name: now.rows(name, np.arange(COUNT)) for name in ITEM_AXES[kind]}
    for shard in manifest["shards"]:
        for record in shard["files"].values():
            if record["dtype"] == "uint8":
                file = path / record["file"]
                np.save(file, (np.load(file).astype(np.int16) - 128).astype(np.int8))
                record.update(dtype="int8", sha256=sha256_file(file))
    (path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))
    old = open_gallery(path)
    assert old.shards[0].load(EMBEDDINGS[kind]).dtype == np.int8
    for name, want in expected.items():
        np.testing.assert_array_equal(old.rows(name, np.arange(COUNT)), want)


@pytest.mark.parametrize("kind", ["images", "captions"])
@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_a_compacted_gallery_stores_the_live_rows_as_they_were(tmp_path, kind, dtype):
    """Compaction reads rows back as float32 and stores them again: fp16 values and int8 codes
    come back unchanged (scales to the last bit or so), the deleted rows are gone."""
    path, _, _ = write(tmp_path, kind, dtype)
    base = open_gallery(path)
    deleted = [base.ids[1], base.ids[7]]
    with_tombstones = tmp_path / "deleted"
    GalleryWriter(with_tombstones, kind, None, base=base, delete=deleted).close()
    marked = open_gallery(with_tombstones)
    GalleryWriter(tmp_path / "compact", kind, None, base=marked, compact=True).close()
    compacted = open_gallery(tmp_path / "compact")
    live = [i for i in range(COUNT) if base.ids[i] not in deleted]
    assert compacted.ids == [base.ids[i] for i in live] and compacted.texts[0] == base.texts[0]
    for name in compacted.shards[0].files:
        if name.endswith("_scale"):
            continue
        np.testing.assert_array_equal(
            compacted.stored_rows(name, np.arange(len(live))), base.stored_rows(name, live)
        )
