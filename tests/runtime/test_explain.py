"""`Explainer` (the explain graph on ONNX Runtime) against the PyTorch reference's attention on a
small trained model, and `scan-deploy explain` end to end: table, JSON with boxes, PNG, errors."""

import json

import numpy as np
import pytest
import torch
from scan_deploy.runtime.backends import open_backend
from scan_deploy.runtime.explain import Explainer

from scan_deploy.batching import pad_tokens
from scan_deploy.bundle import MANIFEST, load_bundle
from scan_deploy.checkpoint import load_checkpoint
from scan_deploy.errors import UserError
from scan_deploy.precomp import load_split
from scan_deploy.scoring import attention_weights, score_block
from tests.cli_runner import run_cli


def test_the_explain_graph_gives_the_references_attention(trained):
    data, checkpoint, bundle_path = trained
    bundle, test = load_bundle(bundle_path), load_split(data, "test")
    explainer = Explainer(bundle, open_backend(bundle))
    model = load_checkpoint(checkpoint).model.eval()
    for image, caption in ((0, 0), (7, 3), (7, 36)):
        got = explainer.explain(np.asarray(test.images[image]), test.captions[caption])
        tokens = bundle.vocab.encode(test.captions[caption])
        assert got.tokens == [bundle.vocab.idx2word[t] for t in tokens]
        with torch.no_grad():
            regions = model.img_enc(torch.from_numpy(np.array(test.images[image : image + 1])))
            padded, lengths = (torch.from_numpy(a) for a in pad_tokens([tokens]))
            words = model.txt_enc(padded, lengths)
            expected = attention_weights(regions, words, lengths, bundle.config)[0, :, 0].T
            score = score_block(regions, words, lengths, bundle.config)[0, 0]
        np.testing.assert_allclose(got.weights, expected.numpy(), atol=1e-5)
        np.testing.assert_allclose(got.weights.sum(axis=1), 1.0, atol=1e-5)  # t2i: per word
        assert got.similarity == pytest.approx(float(score), abs=1e-5)
        top = got.top_regions(2, 3)
        assert [r for r, _ in top] == np.argsort(-got.weights[2], kind="stable")[:3].tolist()


def test_a_bundle_without_the_explain_graph_says_re_export(trained, tmp_path):
    import shutil

    shutil.copytree(trained[2], tmp_path / "bundle")
    manifest = json.loads((tmp_path / "bundle" / MANIFEST).read_text())
    del manifest["explain"]
    (tmp_path / "bundle" / MANIFEST).write_text(json.dumps(manifest))
    bundle = load_bundle(tmp_path / "bundle")
    with pytest.raises(UserError, match="has no explain graph .* re-export it"):
        Explainer(bundle, open_backend(bundle))


def test_the_explain_command(trained, tmp_path):
    import shutil

    source, _, bundle = trained
    data = tmp_path / "data"
    data.mkdir()
    for name in ("test_ims.npy", "test_caps.txt"):
        shutil.copy(source / name, data / name)
    test = load_split(data, "test")
    regions = test.num_regions
    boxes = np.tile(np.arange(regions, dtype=np.float32)[:, None] * 10, (1, 4))
    boxes[:, 2:] += 8  # region k: the box (10k, 10k, 10k + 8, 10k + 8)
    np.save(data / "test_boxes.npy", np.broadcast_to(boxes, (test.num_images, regions, 4)))
    np.save(data / "test_image_sizes.npy", np.full((test.num_images, 2), 100, np.int64))
    done = run_cli("explain", bundle, "--data", data, "--image", 3, "--caption", 15, "--json",
                   "--png", tmp_path / "x.png")  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["image"] == "3" and report["caption"] == test.captions[15]
    assert report["direction"] == "t2i" and report["image_size"] == [100, 100]
    assert np.asarray(report["weights"]).shape == (len(report["tokens"]), regions)
    assert report["boxes"][2] == [20, 20, 28, 28]
    assert (tmp_path / "x.png").stat().st_size > 10_000
    table = run_cli("explain", bundle, "--data", data, "--image", 3, "--text", "a red dog")
    assert table.returncode == 0 and "similarity" in table.stdout and "[" in table.stdout
    image = pytest.importorskip("PIL.Image")
    (data / "test_images").mkdir()
    image.new("RGB", (100, 100), (200, 30, 30)).save(data / "test_images" / "3.png")
    done = run_cli("explain", bundle, "--data", data, "--image", 3, "--caption", 15, "--json",
                   "--png", tmp_path / "y.png")  # fmt: skip
    assert json.loads(done.stdout)["image_file"] == str(data / "test_images" / "3.png")
    (data / "test_images" / "4.png").write_bytes(b"not a png")
    done = run_cli("explain", bundle, "--data", data, "--image", 4, "--caption", 20,
                   "--png", tmp_path / "z.png")  # fmt: skip
    assert done.returncode == 2 and not (tmp_path / "z.png").exists()
    assert done.stderr.startswith(f"error: {data / 'test_images' / '4.png'}: not an image Pillow")
    done = run_cli("explain", bundle, "--data", data, "--image", 5, "--caption", 20,
                   "--images", data / "test_images")  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: {data / 'test_images'}: no 5.png, .jpg or .jpeg (the image's id is '5')"
    )
    for args, message in (
        (("--image", 0), "give one of --caption (a line of the split) or --text"),
        (
            ("--image", 0, "--caption", 1, "--text", "x"),
            "give one of --caption (a line of the split) or --text",
        ),
        (("--image", 400, "--caption", 1), "image: got 400, the test split has 400 images"),
        (("--image", 0, "--caption", 2000), "caption: got 2000, the test split has 2000"),
    ):
        done = run_cli("explain", bundle, "--data", data, *args)
        assert done.returncode == 2 and done.stderr.strip() == f"error: {message}", done.stderr
