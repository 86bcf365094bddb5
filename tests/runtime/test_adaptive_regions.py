"""Adaptive region features end to end: images of 2 to 8 regions, zero-padded to 8, exported,
indexed and searched with the ONNX Runtime backend, against the PyTorch reference on the same
padded features (which scores each image as its own regions alone, tests/scan_deploy)."""

import numpy as np
import pytest
import torch
from scan_deploy.export.writer import ShapeRanges, export_bundle
from scan_deploy.runtime.backends import open_backend
from scan_deploy.runtime.indexer import index_gallery
from scan_deploy.runtime.retriever import Retriever

from scan_deploy.bundle import load_bundle
from scan_deploy.checkpoint import load_checkpoint
from scan_deploy.evaluate import encode_captions, encode_images
from scan_deploy.precomp import load_split

IMAGES, FEWEST = 60, 2


@pytest.fixture(scope="module")
def adaptive(trained, tmp_path_factory):
    """(checkpoint, bundle exported for 2..8 regions, padded features, their captions, galleries
    by dtype)."""
    data, checkpoint_path, _ = trained
    root = tmp_path_factory.mktemp("adaptive")
    split = load_split(data, "test")
    features = np.array(split.images[:IMAGES], np.float32)
    counts = np.random.default_rng(3).integers(FEWEST, split.num_regions + 1, IMAGES)
    counts[0] = FEWEST
    for i, count in enumerate(counts):
        features[i, count:] = 0
    np.save(root / "ims.npy", features)
    captions = split.captions[: 5 * IMAGES]
    (root / "caps.txt").write_text("".join(c + "\n" for c in captions))
    checkpoint = load_checkpoint(checkpoint_path)
    ranges = ShapeRanges.create(16, split.num_regions, 30, FEWEST, split.num_regions)
    manifest = export_bundle(checkpoint, root / "bundle", 17, ranges)
    assert any(row["regions"] == f"{FEWEST}-8" for row in manifest["export_parity"])
    bundle = load_bundle(root / "bundle")
    galleries = {}
    for dtype in ("fp32", "int8"):
        galleries[dtype] = root / dtype
        index_gallery(bundle, open_backend(bundle), root / "ims.npy", root / "caps.txt",
                      galleries[dtype], dtype=dtype, shard_size=25)  # fmt: skip
    return checkpoint, bundle, features, captions, galleries


def _reference(checkpoint, features, captions) -> np.ndarray:
    """The PyTorch reference's similarities (images, captions) of the padded features."""
    model = checkpoint.model.eval()
    tokens = [checkpoint.vocab.encode(c) for c in captions]
    words, lengths = encode_captions(model, tokens)
    with torch.no_grad():
        return model.similarity(encode_images(model, features), words, lengths).numpy()


def test_text_search_over_padded_images_is_the_references(adaptive):
    checkpoint, bundle, features, captions, galleries = adaptive
    queries = captions[::23]
    expected = _reference(checkpoint, features, queries)
    found = Retriever.open(bundle, galleries["fp32"]).search_text(queries, k=5)
    for j, hits in enumerate(found):
        order = np.argsort(-expected[:, j], kind="stable")[:5]
        assert [h.index for h in hits] == order.tolist()
        np.testing.assert_allclose([h.score for h in hits], expected[order, j], atol=1e-4)
    int8 = Retriever.open(bundle, galleries["int8"]).search_text(queries, k=5)
    for j, hits in enumerate(int8):  # quantized: each hit's score close to the reference's
        scores = expected[[h.index for h in hits], j]
        np.testing.assert_allclose([h.score for h in hits], scores, atol=2e-2)
    top1 = np.mean([a[0].index == b[0].index for a, b in zip(found, int8, strict=True)])
    assert top1 >= 0.9


def test_image_queries_of_fewer_regions_are_the_references(adaptive):
    """Queries of 2 regions (the bundle's fewest) and padded ones rank the captions as the
    reference does; an image of 2 regions queried unpadded or padded to 8 gets the same hits."""
    checkpoint, bundle, features, captions, galleries = adaptive
    retriever = Retriever.open(bundle, galleries["fp32"])
    queries = features[:6]
    expected = _reference(checkpoint, queries, captions)
    for i, hits in enumerate(retriever.search_image(queries, k=5)):
        order = np.argsort(-expected[i], kind="stable")[:5]
        assert [h.index for h in hits] == order.tolist()
        np.testing.assert_allclose([h.score for h in hits], expected[i, order], atol=1e-4)
    alone = retriever.search_image(features[:1, :FEWEST], k=5)[0]
    padded = retriever.search_image(features[:1], k=5)[0]
    assert [h.index for h in alone] == [h.index for h in padded]
    np.testing.assert_allclose([h.score for h in alone], [h.score for h in padded], atol=1e-5)
