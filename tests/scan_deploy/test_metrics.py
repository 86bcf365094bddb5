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


def _pessimistic_ranks(scores, is_gt):
    """Rank of the first ground truth when each row is sorted by score, NaN as -inf, and ties
    put the ground truths last: the documented rule, written as a sort."""
    keys = np.where(np.isnan(scores), -np.inf, scores)
    ranks = []
    for key, gt in zip(keys, is_gt, strict=True):
        order = np.lexsort((gt, -key))
        ranks.append(np.flatnonzero(gt[order])[0])
    return np.array(ranks)


def test_ranks_with_ties_and_nan_equal_the_pessimistic_sort():
    rng = np.random.default_rng(1)
    sims = rng.integers(0, 3, size=(6, 30)).astype(np.float32)  # many ties
    sims[rng.random(sims.shape) < 0.2] = np.nan
    sims[0, 0:5] = np.nan  # an image whose ground truths are all NaN
    sims[1, 5:10] = [np.nan, 1, np.nan, 2, 0]  # its best non-NaN ground truth is 2
    sims[:, 12] = np.nan  # a caption scored NaN by every image
    sims[3, 15:20] = -np.inf  # ground truths at -inf tie with their NaN rivals
    i2t_gt = np.arange(30)[None, :] // 5 == np.arange(6)[:, None]
    np.testing.assert_array_equal(image_to_text_ranks(sims, 5), _pessimistic_ranks(sims, i2t_gt))
    np.testing.assert_array_equal(
        text_to_image_ranks(sims, 5), _pessimistic_ranks(sims.T, i2t_gt.T)
    )
    assert image_to_text_ranks(sims, 5)[[0, 3]].tolist() == [25, 25]
    assert text_to_image_ranks(sims, 5)[[12, 15]].tolist() == [5, 5]


def test_constant_or_nan_similarities_score_zero_recall():
    for value in (0.5, np.nan):
        m = recall_metrics(np.full((12, 60), value), 5)
        assert m["i2t"] == {"r1": 0.0, "r5": 0.0, "r10": 0.0, "medr": 56.0, "meanr": 56.0}
        assert m["t2i"] == {"r1": 0.0, "r5": 0.0, "r10": 0.0, "medr": 12.0, "meanr": 12.0}
        assert m["rsum"] == 0.0


def test_a_nan_ground_truth_ranks_last_and_nan_others_rank_below():
    sims = np.eye(3)  # one caption per image, each ranked first
    sims[0, 0] = np.nan
    sims[2, 1] = np.nan  # a NaN rival of caption 1's ground truth (1.0) does not beat it
    np.testing.assert_array_equal(text_to_image_ranks(sims, 1), [2, 0, 0])
    np.testing.assert_array_equal(image_to_text_ranks(sims, 1), [2, 0, 0])


def test_zeroed_image_encoder_is_not_perfect_recall():
    """Every image scores a caption the same: all ties, so t2i recall is at its worst."""
    sims = np.tile(np.random.default_rng(2).normal(size=(1, 20)), (4, 1))
    assert recall_metrics(sims, 5)["t2i"]["r1"] == 0.0


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
