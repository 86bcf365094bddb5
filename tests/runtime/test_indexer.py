"""`index_gallery`'s output checks: every input of the run, the torch backend's checkpoint
included, is protected from `--force`."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from scan_deploy.bundle import load_bundle
from scan_deploy.errors import UserError

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")


def test_force_never_deletes_the_torch_backends_checkpoint(tmp_path):
    """A checkpoint kept inside the gallery folder was deleted with the old gallery."""
    from scan_deploy.runtime.backends import open_backend
    from scan_deploy.runtime.indexer import index_gallery

    from scan_deploy.checkpoint import save_checkpoint
    from scan_deploy.model import SCAN
    from tests.export.tiny_bundle import make_bundle

    bundle = load_bundle(make_bundle(tmp_path / "bundle"))
    torch.manual_seed(0)  # make_bundle's recipe: the bundle's weights
    save_checkpoint(tmp_path / "ckpt", SCAN(bundle.config).eval(), bundle.vocab)
    np.save(tmp_path / "ims.npy", np.random.default_rng(0).random((3, 5, 10), dtype=np.float32))
    gallery = tmp_path / "gallery"
    index_gallery(bundle, open_backend(bundle), tmp_path / "ims.npy", None, gallery, dtype="fp32")
    shutil.copytree(tmp_path / "ckpt", gallery / "ckpt")
    backend = open_backend(bundle, "torch", checkpoint=gallery / "ckpt")
    assert backend.checkpoint == gallery / "ckpt"
    with pytest.raises(UserError, match=f"^{gallery}: holds the input {gallery / 'ckpt'}; "):
        index_gallery(bundle, backend, tmp_path / "ims.npy", None, gallery, force=True)
    assert (gallery / "ckpt" / "model.safetensors").is_file()


def test_a_bottom_up_tsv_becomes_a_gallery_whose_hits_carry_its_image_ids(trained, tmp_path):
    """The user's path: detector TSV → `data import-tsv` → `index` → `query`: hits are named by
    the TSV's image ids (captions by `image_id:k`)."""
    import base64
    import json

    from scan_deploy.precomp import load_split
    from tests.cli_runner import run_cli

    data, _, bundle = trained
    test = load_split(data, "test")
    count, per_image = 30, test.captions_per_image
    lines = []
    for i in range(count):
        features = np.asarray(test.images[i], np.float32)
        boxes = np.tile(np.array([[0, 0, 10, 10]], np.float32), (len(features), 1))
        fields = [f"COCO_val_{1000 + i}", "640", "480", str(len(features))]
        fields += [base64.b64encode(a.tobytes()).decode() for a in (boxes, features)]
        lines.append("\t".join(fields) + "\n")
    (tmp_path / "features.tsv").write_text("".join(lines))
    captions = tmp_path / "captions.txt"
    captions.write_text("".join(c + "\n" for c in test.captions[: count * per_image]))
    out = tmp_path / "data"
    done = run_cli("data", "import-tsv", tmp_path / "features.tsv", "--out", out, "--split",
                   "mine", "--captions", captions)  # fmt: skip
    assert done.returncode == 0, done.stderr
    gallery = tmp_path / "gallery"
    done = run_cli("index", bundle, "--features", out / "mine_ims.npy", "--captions",
                   out / "mine_caps.txt", "--out", gallery, "--dtype", "fp32")  # fmt: skip
    assert done.returncode == 0, done.stderr
    done = run_cli("query", gallery, test.captions[3 * per_image], "-k", 3, "--json")
    hits = json.loads(done.stdout)["hits"]
    assert [hit["id"] for hit in hits] == [f"COCO_val_{1000 + hit['index']}" for hit in hits]
    np.save(tmp_path / "q.npy", np.asarray(test.images[5:6], np.float32))
    done = run_cli("query", gallery, "--image-features", tmp_path / "q.npy", "-k", 5, "--json")
    hits = json.loads(done.stdout)["hits"]
    expected = [f"COCO_val_{1000 + h['index'] // per_image}:{h['index'] % per_image}" for h in hits]
    assert [hit["id"] for hit in hits] == expected
    done = run_cli("query", gallery, test.captions[0], "-k", 2, "--explain", "--json")
    hit = json.loads(done.stdout)["hits"][0]
    attention = hit["attention"]
    assert attention["similarity"] == pytest.approx(hit["score"], abs=1e-5)
    assert attention["boxes"] == [[0, 0, 10, 10]] * test.num_regions
    assert attention["image_size"] == [640, 480]
    weights = np.asarray(attention["weights"])
    assert weights.shape == (len(attention["tokens"]), test.num_regions)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-5)  # t2i: per word
    done = run_cli("query", gallery, "--image-features", tmp_path / "q.npy", "-k", 2, "--explain",
                   "--json")  # fmt: skip
    hit = json.loads(done.stdout)["hits"][0]
    assert "boxes" not in hit["attention"] and hit["attention"]["tokens"][0] == "<start>"
    table = run_cli("query", gallery, test.captions[0], "-k", 2, "--explain")
    assert "hit 1 (COCO_val_" in table.stdout and "[0 0 10 10]" in table.stdout
    manifest = json.loads((gallery / "images" / "manifest.json").read_text())
    manifest["boxes"]["shape"] = [count + 1, test.num_regions, 4]
    (gallery / "images" / "manifest.json").write_text(json.dumps(manifest))
    bad = run_cli("query", gallery, "a dog")
    assert bad.returncode == 2 and "boxes.shape: got [31," in bad.stderr
    (out / "mine_ids.txt").write_text("a\nb\na\n" + "".join(f"x{i}\n" for i in range(count - 3)))
    bad = run_cli("index", bundle, "--features", out / "mine_ims.npy", "--out", tmp_path / "g2")
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        f"error: {out / 'mine_ids.txt'}: line 3: 'a' again (first at line 1), expected unique ids"
    )


def test_hits_name_their_image_files(trained, tmp_path):
    """`{split}_images/` beside the features: `index` records it and hits (image hits, and the
    images of caption hits) carry their file, when it is there."""
    import json
    import shutil

    from tests.cli_runner import run_cli

    data, _, bundle = trained
    split = tmp_path / "data"
    split.mkdir()
    for name in ("test_ims.npy", "test_caps.txt"):
        shutil.copy(data / name, split / name)
    (split / "test_images").mkdir()
    drawn = {str(i) for i in range(0, 400, 2)}  # every other image has its file
    for image_id in drawn:
        (split / "test_images" / f"{image_id}.png").write_bytes(b"png")
    gallery = tmp_path / "gallery"
    done = run_cli("index", bundle, "--features", split / "test_ims.npy", "--captions",
                   split / "test_caps.txt", "--out", gallery)  # fmt: skip
    assert done.returncode == 0, done.stderr
    caption = (split / "test_caps.txt").read_text().splitlines()[0]
    hits = json.loads(run_cli("query", gallery, caption, "-k", 10, "--json").stdout)["hits"]
    folder = (split / "test_images").resolve()
    for hit in hits:
        expected = str(folder / f"{hit['id']}.png") if hit["id"] in drawn else None
        assert hit["image"] == expected
    np.save(tmp_path / "q.npy", np.load(data / "test_ims.npy")[:1])
    done = run_cli("query", gallery, "--image-features", tmp_path / "q.npy", "-k", 10, "--json")
    for hit in json.loads(done.stdout)["hits"]:
        image_id = hit["id"].split(":")[0]
        assert hit["image"] == (str(folder / f"{image_id}.png") if image_id in drawn else None)


def test_query_draws_the_attention_picture_of_its_top_hit(trained, tmp_path):
    """`query --explain-png`: the top hit's image file lit by the query's words (plots extra);
    a file that is not an image is one line naming it, nothing written."""
    import json
    import shutil

    from tests.cli_runner import run_cli

    image = pytest.importorskip("PIL.Image")
    data, _, bundle = trained
    split = tmp_path / "data"
    (split / "test_images").mkdir(parents=True)
    for name in ("test_ims.npy", "test_caps.txt"):
        shutil.copy(data / name, split / name)
    for i in range(400):
        image.new("RGB", (80, 60), (i % 256, 40, 90)).save(split / "test_images" / f"{i}.png")
    regions = np.load(data / "test_ims.npy", mmap_mode="r").shape[1]
    np.save(split / "test_boxes.npy", np.tile([0, 0, 40, 30], (400, regions, 1)).astype(np.float32))
    np.save(split / "test_image_sizes.npy", np.tile([80, 60], (400, 1)))
    gallery = tmp_path / "gallery"
    done = run_cli("index", bundle, "--features", split / "test_ims.npy", "--out", gallery)
    assert done.returncode == 0, done.stderr
    caption = (split / "test_caps.txt").read_text().splitlines()[0]
    done = run_cli("query", gallery, caption, "-k", 3, "--explain-png", tmp_path / "hit.png",
                   "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    top = json.loads(done.stdout)["hits"][0]
    assert "attention" in top and (tmp_path / "hit.png").stat().st_size > 10_000
    (split / "test_images" / f"{top['id']}.png").write_bytes(b"not a png")
    done = run_cli("query", gallery, caption, "--explain-png", tmp_path / "bad.png")
    assert done.returncode == 2 and not (tmp_path / "bad.png").exists()
    assert done.stderr.startswith(f"error: {split.resolve() / 'test_images' / top['id']}.png: not")
    np.save(tmp_path / "q.npy", np.load(data / "test_ims.npy")[:1])
    done = run_cli("query", gallery, "--image-features", tmp_path / "q.npy", "--explain-png",
                   tmp_path / "i.png")  # fmt: skip
    assert done.returncode == 2 and done.stderr.strip() == (
        "error: --explain-png: give a text query (the picture is of its top hit)"
    )
