"""Streaming top-k and the scorer's orientation for both query kinds."""

import numpy as np
from scan_deploy.runtime.search import Queries, TopK, scorer_feeds


def test_streamed_top_k_equals_a_full_sort():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((5, 230)).astype(np.float32)
    top = TopK(5, 7)
    for start in range(0, 230, 64):
        top.update(scores[:, start : start + 64], np.arange(start, min(start + 64, 230)))
    got_scores, got_indices = top.result()
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(got_indices, expected)
    np.testing.assert_array_equal(got_scores, np.take_along_axis(scores, expected, axis=1))


def test_top_k_keeps_fewer_when_fewer_seen_and_breaks_ties_by_index():
    top = TopK(1, 4)
    top.update(np.array([[1.0, 2.0, 1.0]], np.float32), np.array([9, 3, 5]))
    scores, indices = top.result()
    assert indices.tolist() == [[3, 5, 9]] and scores.tolist() == [[2.0, 1.0, 1.0]]


def test_scorer_feeds_put_images_on_the_image_side():
    text = Queries({"words": np.ones((2, 3, 4)), "lengths": np.array([3, 1]),
                    "caption_gram": np.ones((2, 3, 3)), "global": np.ones((2, 4))})  # fmt: skip
    images = {"regions": np.zeros((5, 6, 4)), "region_gram": np.zeros((5, 6, 6))}
    t2i = scorer_feeds(text, images, "t2i")
    assert t2i["regions"] is images["regions"] and t2i["words"] is text.arrays["words"]
    assert set(t2i) == {"regions", "words", "lengths", "region_gram"}
    i2t = scorer_feeds(text, images, "i2t")
    assert set(i2t) == {"regions", "words", "lengths", "caption_gram"}
    photo = Queries({**images, "global": np.ones((5, 4))})
    captions = {k: v for k, v in text.arrays.items() if k != "global"}
    assert scorer_feeds(photo, captions, "t2i")["regions"] is images["regions"]
