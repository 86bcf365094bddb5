import numpy as np

from scan_deploy.metrics import (
    image_to_text_ranks,
    mean_metrics,
    recall_metrics,
    text_to_image_ranks,
)


def _loop_i2t(sims, per_image):
    ranks = []
    for i in range(sims.shape[0]):
        order = np.argsort(sims[i])[::-1]
        ranks.append(
            min(np.where(order == j)[0][0] for j in range(per_image * i, per_image * (i + 1)))
        )
    return np.array(ranks)


def _loop_t2i(sims, per_image):
    ranks = []
    for j in range(sims.shape[1]):
        order = np.argsort(sims[:, j])[::-1]
        ranks.append(np.where(order == j // per_image)[0][0])
    return np.array(ranks)


def test_ranks_equal_the_original_argsort_loops():
    sims = np.random.default_rng(0).normal(size=(7, 35))
    np.testing.assert_array_equal(image_to_text_ranks(sims, 5), _loop_i2t(sims, 5))
    np.testing.assert_array_equal(text_to_image_ranks(sims, 5), _loop_t2i(sims, 5))


def test_perfect_and_known_metrics():
    sims = np.eye(4).repeat(5, axis=1)  # every caption scores only its own image
    m = recall_metrics(sims, 5)
    assert m["i2t"] == {"r1": 100.0, "r5": 100.0, "r10": 100.0, "medr": 1.0, "meanr": 1.0}
    assert m["rsum"] == 600.0
    reverse = -np.eye(3)  # one caption per image, each ranked last
    m = recall_metrics(reverse, 1)
    assert m["t2i"]["r1"] == 0.0 and m["t2i"]["medr"] == 3.0 and m["t2i"]["meanr"] == 3.0


def test_mean_metrics_averages_folds():
    a = recall_metrics(np.eye(2), 1)
    b = recall_metrics(-np.eye(2), 1)
    mean = mean_metrics([a, b])
    assert mean["i2t"]["r1"] == 50.0 and mean["rsum"] == (a["rsum"] + b["rsum"]) / 2
