"""A gallery's shards over Ray actors (a local Ray instance the tests start and stop): the
merged exact top-k equals the single-process retriever's, scores bit for bit; a killed actor is
restarted and the query retried, or, without restarts, one clear error, never a partial answer."""

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="ray (the ray extra) missing")
pytest.importorskip("faiss")  # the galleries' first-stage indexes
from scan_deploy.runtime.backends import open_backend  # noqa: E402
from scan_deploy.runtime.indexer import index_gallery  # noqa: E402
from scan_deploy.runtime.ray_shards import ShardedRetriever, split_shards  # noqa: E402
from scan_deploy.runtime.retriever import Retriever, open_galleries  # noqa: E402

from scan_deploy.bundle import load_bundle  # noqa: E402
from scan_deploy.errors import UserError  # noqa: E402
from scan_deploy.precomp import load_split  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def sharded(trained, tmp_path_factory):
    """(bundle, gallery of the test split in 5 shards of images and 14 of captions, split)."""
    data, _, bundle = trained
    gallery = tmp_path_factory.mktemp("ray") / "gallery"
    loaded = load_bundle(bundle)
    index_gallery(loaded, open_backend(loaded), data / "test_ims.npy", data / "test_caps.txt",
                  gallery, dtype="fp16", shard_size=150,
                  first_stages={"global": None, "maxsim": None})  # fmt: skip
    return bundle, gallery, load_split(data, "test")


def test_shards_split_contiguously_by_items(sharded):
    _, gallery, _ = sharded
    galleries = open_galleries(gallery)
    parts = split_shards(galleries, 2)
    assert parts == [
        {"images": (0, 2), "captions": (0, 7)},
        {"images": (2, 3), "captions": (7, 14)},
    ]
    assert split_shards(galleries, 4)[3]["images"][0] <= 3


def test_fan_out_equals_one_process(cluster, sharded):
    bundle, gallery, split = sharded
    texts = split.captions[::97]
    features = np.asarray(split.images[[0, 57, 399]])
    with Retriever.open(bundle, gallery) as single:
        expected = single.search_text(texts, k=7), single.search_image(features, k=7)
    with ShardedRetriever(bundle, gallery, actors=2) as retriever:
        got = retriever.search_text(texts, k=7), retriever.search_image(features, k=7)
        with pytest.raises(UserError, match=r"^k: expected 1\.\.400"):
            retriever.search_text(texts, k=401)
    assert got == expected  # ids, scores (bit for bit), texts


@pytest.mark.parametrize("stage", ["global", "maxsim"])
def test_two_stage_over_actors_equals_one_process(cluster, sharded, stage):
    """The first stage here (the whole gallery's index), the re-rank on the actors holding the
    candidates: the same hits as one process, scores to float rounding."""
    bundle, gallery, split = sharded
    texts = split.captions[::97]
    features = np.asarray(split.images[[0, 57, 399]])
    options = {"first_stage": stage}
    with Retriever.open(bundle, gallery, **options) as single:
        expected = single.search_text(texts, k=7, shortlist=30)
        expected += single.search_image(features, k=7, shortlist=60)
    with ShardedRetriever(bundle, gallery, actors=2, **options) as retriever:
        got = retriever.search_text(texts, k=7, shortlist=30)
        got += retriever.search_image(features, k=7, shortlist=60)
        with pytest.raises(UserError, match=r"^shortlist: expected at least k = 7, got 5$"):
            retriever.search_text(texts, k=7, shortlist=5)
    for hits, wanted in zip(got, expected, strict=True):
        assert [h.id for h in hits] == [h.id for h in wanted]
        np.testing.assert_allclose([h.score for h in hits], [h.score for h in wanted], atol=1e-5)


def test_a_killed_actor_is_restarted_and_the_query_retried(cluster, sharded):
    bundle, gallery, split = sharded
    texts = split.captions[:3]
    with ShardedRetriever(bundle, gallery, actors=2, max_restarts=1) as retriever:
        before = retriever.search_text(texts, k=5)
        ray.kill(retriever.actors[1], no_restart=False)
        assert retriever.search_text(texts, k=5) == before


def test_an_actor_that_stays_dead_is_one_clear_error(cluster, sharded):
    bundle, gallery, split = sharded
    with ShardedRetriever(bundle, gallery, actors=2, max_restarts=0) as retriever:
        ray.kill(retriever.actors[0])
        with pytest.raises(UserError) as raised:
            retriever.search_text(split.captions[:2], k=5)
    message = str(raised.value)
    assert message.startswith("the Ray actor of images shards 0..1, captions shards 0..6 failed")
    assert "\n" not in message
