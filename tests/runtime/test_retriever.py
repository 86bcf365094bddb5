"""The runtime end to end with the ONNX Runtime backend on a small trained model: index the
test split, query it, and get what the deployed pipeline ranks first; every error path."""

import json
import logging
import subprocess
import sys
import threading
from itertools import cycle, islice
from types import SimpleNamespace

import numpy as np
import pytest
from scan_deploy.export.compare import ort_similarities
from scan_deploy.export.verify import session
from scan_deploy.export.writer import ShapeRanges, export_bundle
from scan_deploy.runtime.backends import open_backend
from scan_deploy.runtime.first_stage import global_shortlist as shortlist
from scan_deploy.runtime.gallery import open_gallery
from scan_deploy.runtime.indexer import index_gallery
from scan_deploy.runtime.retriever import Retriever, open_galleries

from scan_deploy.bundle import load_bundle
from scan_deploy.checkpoint import load_checkpoint
from scan_deploy.choices import Graph
from scan_deploy.errors import UserError
from scan_deploy.precomp import load_split
from tests.cli_runner import run_cli
from tests.runtime.engines import SHORTLIST_ENGINES, needs_faiss


@pytest.fixture(scope="module")
def indexed(trained, tmp_path_factory):
    """(bundle, test split, fp32 gallery folder, the ORT pipeline's similarity matrix)."""
    data, _, bundle_path = trained
    bundle = load_bundle(bundle_path)
    out = tmp_path_factory.mktemp("gallery") / "g"
    split = load_split(data, "test")
    index_gallery(bundle, open_backend(bundle), data / "test_ims.npy", data / "test_caps.txt",
                  out, dtype="fp32", shard_size=150)  # fmt: skip
    sessions = {name: session(str(bundle.graph_path(name))) for name in Graph}
    return bundle, split, out, ort_similarities(bundle, sessions, split)


def test_text_search_returns_the_pipelines_ranking(indexed):
    bundle, split, gallery, sims = indexed
    retriever = Retriever.open(bundle, gallery)
    queries = list(range(0, split.num_captions, 37))
    hits = retriever.search_text([split.captions[j] for j in queries], k=5)
    for j, row in zip(queries, hits, strict=True):
        expected = np.argsort(-sims[:, j], kind="stable")[:5]
        assert [h.index for h in row] == expected.tolist()
        np.testing.assert_allclose([h.score for h in row], sims[expected, j], atol=1e-5)
        assert [h.id for h in row] == [str(i) for i in expected]
    found = [j // 5 in [h.index for h in row] for j, row in zip(queries, hits, strict=True)]
    assert np.mean(found) > 4 * 5 / 400  # the ground truth is in the top 5 far above chance


def test_image_search_returns_the_pipelines_ranking(indexed):
    bundle, split, gallery, sims = indexed
    retriever = Retriever(bundle, Retriever.open(bundle, gallery).galleries, open_backend(bundle))
    images = [0, 57, 399]
    hits = retriever.search_image(np.asarray(split.images[images]), k=8)
    for i, row in zip(images, hits, strict=True):
        expected = np.argsort(-sims[i], kind="stable")[:8]
        assert [h.index for h in row] == expected.tolist()
        assert all(h.id == f"{h.index // 5}:{h.index % 5}" for h in row)
        assert row[0].text == split.captions[row[0].index]


@pytest.mark.parametrize("engine", SHORTLIST_ENGINES)
def test_shortlist_of_the_whole_gallery_is_exhaustive_and_smaller_ones_rerank(indexed, engine):
    bundle, split, gallery, _ = indexed
    retriever = Retriever.open(bundle, gallery, shortlist_engine=engine)
    assert retriever.shortlist_engine == engine
    texts = split.captions[:40]
    exact = retriever.search_text(texts, k=5)
    assert retriever.search_text(texts, k=5, shortlist=400) == exact
    short = retriever.search_text(texts, k=5, shortlist=50)
    for a, b in zip(exact, short, strict=True):  # re-ranked with the exact scorer
        for hit in b:
            match = [h for h in a if h.index == hit.index]
            assert not match or abs(match[0].score - hit.score) < 1e-6


def test_rerank_of_a_gallery_larger_than_memory_prefetches_and_answers_the_same(
    indexed, monkeypatch
):
    bundle, split, gallery, _ = indexed
    retriever = Retriever.open(bundle, gallery)
    texts = split.captions[:10]
    in_memory = retriever.search_text(texts, k=5, shortlist=50)
    images = retriever.galleries["images"]
    prefetched = []
    monkeypatch.setattr(images, "larger_than_memory", lambda: True)
    monkeypatch.setattr(images, "prefetch", lambda indices: prefetched.append(indices.size))
    assert retriever.search_text(texts, k=5, shortlist=50) == in_memory
    assert prefetched == [10 * 50]  # one call for every candidate of the batch


@needs_faiss
def test_shortlist_engines_pick_the_same_candidates(indexed):
    """The shortlist streams over 3 shards (150, 150, 100 images): FAISS and numpy keep the same
    50 best pooled-embedding products of every query, ordered best first."""
    bundle, split, gallery, _ = indexed
    retriever = Retriever.open(bundle, gallery)
    queries = retriever.encode_text(split.captions[:30])
    images = retriever.galleries["images"]
    picked = {engine: shortlist(queries, images, 50, engine) for engine in ("numpy", "faiss")}
    np.testing.assert_array_equal(picked["numpy"], picked["faiss"])
    pooled = np.concatenate([emb for _, emb in images.global_embeddings()])
    products = queries.arrays["global"] @ pooled.T
    expected = np.argsort(-products, axis=1, kind="stable")[:, :50]
    np.testing.assert_array_equal(picked["numpy"], expected)


def test_concurrent_callers_get_the_same_answers(indexed):
    bundle, split, gallery, _ = indexed
    retriever = Retriever.open(bundle, gallery)
    texts = split.captions[:24]
    expected = retriever.search_text(texts, k=3)
    results, errors = {}, []

    def worker(n):
        try:
            results[n] = retriever.search_text(texts, k=3)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(r == expected for r in results.values())


def test_bad_queries_are_one_line_errors(indexed, caplog):
    bundle, split, gallery, _ = indexed
    retriever = Retriever.open(bundle, gallery)
    with pytest.raises(UserError, match="empty query"):
        retriever.search_text(["  "])
    with pytest.raises(UserError, match=r"^k: expected 1\.\.400"):
        retriever.search_text(["a dog"], k=0)
    with pytest.raises(UserError, match=r"^k: expected 1\.\.400"):
        retriever.search_text(["a dog"], k=401)
    with pytest.raises(UserError, match="^shortlist: expected at least k"):
        retriever.search_text(["a dog"], k=10, shortlist=5)
    with pytest.raises(UserError, match=r"expected \(images, regions, 32\), got \(1, 8, 31\)"):
        retriever.search_image(np.zeros((1, 8, 31), np.float32))
    features = np.ones((3, 8, 32), np.float32)
    features[1:, 2, 3] = np.nan
    with pytest.raises(UserError, match="^image features: image 1 has NaN or Inf values$"):
        retriever.search_image(features)
    assert len(retriever.search_text(["qwerty zxcvb"], k=2)[0]) == 2  # OOV only: answered
    assert "no word is in the vocabulary" in caplog.text


def test_image_queries_beyond_the_models_scale_are_refused(indexed):
    """×1e30 overflows the L2 norm of every region: hits scored against zeros, answered silently
    before. Image 35 is in the third batch of 16 (the bundle's): the error counts from the first."""
    bundle, split, gallery, _ = indexed
    retriever = Retriever.open(bundle, gallery)
    features = np.array(split.images[:40], np.float32)
    features[35] *= np.float32(1e30)
    with pytest.raises(UserError) as err:
        retriever.search_image(features, k=3)
    message = str(err.value)
    assert message.startswith(
        "image features: image 35: the image encoder's output is zero or NaN/Inf (features up to "
    )
    assert message.endswith("): expected features of the scale the model was trained on")
    assert "\n" not in message
    with pytest.raises(UserError, match=r"^q\.npy: image 35: the image encoder's output"):
        retriever.search_image(features, k=3, source="q.npy")
    with pytest.raises(UserError, match="^image features: image 35: the image encoder's output"):
        retriever.encode_images(features)


def test_a_query_the_text_encoder_zeroes_is_refused(indexed):
    bundle, split, gallery, _ = indexed
    backend = open_backend(bundle)

    def zero_first(outputs):
        words, caption_gram, pooled = outputs
        pooled[0] = 0
        return words, caption_gram, pooled

    text = backend.runner("text_encoder")
    broken = SimpleNamespace(
        runner=lambda graph: (
            SimpleNamespace(run=lambda feeds: zero_first(text.run(feeds)))
            if graph == "text_encoder"
            else backend.runner(graph)
        ),
        sizes=backend.sizes,
    )
    retriever = Retriever(bundle, Retriever.open(bundle, gallery).galleries, broken)
    message = "the text encoder's output is zero or NaN/Inf: the bundle is broken"
    with pytest.raises(UserError, match=f"^query 'a dog': {message}$"):
        retriever.search_text(["a dog"], k=3)
    with pytest.raises(UserError, match=f"^query 'a cat': {message}$"):
        retriever.encode_text(["a cat", "a dog"])


def _words(bundle, count: int) -> str:
    """`count` vocabulary words (each one token), cycling through the alphabetic ones."""
    return " ".join(islice(cycle(w for w in bundle.vocab.word2idx if w.isalpha()), count))


def test_long_queries_are_read_as_their_first_words(indexed, caplog):
    bundle, _, gallery, _ = indexed
    retriever = Retriever.open(bundle, gallery)
    assert retriever.sizes.max_tokens == 30  # the fixture's export --max-words (ONNX Runtime)
    caplog.set_level(logging.WARNING, "scan_deploy")
    long_hits = retriever.search_text([_words(bundle, 1000)], k=5)
    assert retriever.search_text([_words(bundle, 28)], k=5) == long_hits
    message = "1 of 1 queries longer than the engine's limit of 30 tokens: each read as its first"
    assert [r.getMessage() for r in caplog.records] == [message + " 28 words"]


def test_index_reads_long_captions_as_their_first_words(trained, tmp_path, caplog):
    """One 1000-word caption: its shard's words and Grams are padded to the word limit (30), not
    to 1002 tokens (arrays: 16,577,632 bytes before, 30,304 now), and it is stored as its first 28
    words would be; its text is kept whole."""
    data, _, bundle_path = trained
    bundle = load_bundle(bundle_path)
    np.save(tmp_path / "ims.npy", np.load(data / "test_ims.npy")[:4])
    captions = (data / "test_caps.txt").read_text().splitlines()[:20:5]  # one per image
    galleries = {}
    caplog.set_level(logging.WARNING, "scan_deploy")
    for name, third in (("long", _words(bundle, 1000)), ("cut", _words(bundle, 28))):
        (tmp_path / f"{name}.txt").write_text("\n".join([*captions[:2], third, captions[3]]))
        index_gallery(bundle, open_backend(bundle), tmp_path / "ims.npy",
                      tmp_path / f"{name}.txt", tmp_path / name, dtype="fp32")  # fmt: skip
        galleries[name] = open_gallery(tmp_path / name / "captions")
    long, cut = galleries["long"], galleries["cut"]
    assert long.shards[0].shape("caption_gram") == (4, 30, 30)
    # words, caption_gram, global (float32) and lengths (int64) of 4 captions of 30 tokens, D=32
    assert long.nbytes == cut.nbytes == 4 * (30 * 32 * 4 + 30 * 30 * 4 + 32 * 4 + 8) == 30304
    everything = np.arange(4)
    for name in ("words", "lengths", "caption_gram", "global"):
        np.testing.assert_array_equal(long.rows(name, everything), cut.rows(name, everything))
    assert long.texts[2] == _words(bundle, 1000)
    message = "1 of 4 captions longer than the engine's limit of 30 tokens: each read as its first"
    assert [r.getMessage() for r in caplog.records] == [message + " 28 words"]


def test_features_beyond_the_models_scale_are_refused(trained, tmp_path):
    """×1e30 overflows the L2 norm of every region: an all-zero gallery, written silently before."""
    data, _, bundle_path = trained
    bundle = load_bundle(bundle_path)
    features = np.load(data / "test_ims.npy")[:3]
    features[1] *= np.float32(1e30)
    np.save(tmp_path / "ims.npy", features)
    with pytest.raises(UserError) as err:
        index_gallery(bundle, open_backend(bundle), tmp_path / "ims.npy", None, tmp_path / "g")
    assert str(err.value).startswith(
        f"{tmp_path / 'ims.npy'}: image 1: the image encoder's output is zero or NaN/Inf "
        "(features up to "
    )
    assert not (tmp_path / "g").exists()


def test_a_caption_the_text_encoder_zeroes_is_refused(trained, tmp_path):
    data, _, bundle_path = trained
    bundle = load_bundle(bundle_path)
    backend = open_backend(bundle)

    def zero_third(outputs):
        words, caption_gram, pooled = outputs
        pooled[2] = 0
        return words, caption_gram, pooled

    text = backend.runner("text_encoder")
    broken = SimpleNamespace(
        runner=lambda graph: (
            SimpleNamespace(run=lambda feeds: zero_third(text.run(feeds)))
            if graph == "text_encoder"
            else backend.runner(graph)
        ),
        sizes=backend.sizes,
    )
    np.save(tmp_path / "ims.npy", np.load(data / "test_ims.npy")[:4])
    captions = tmp_path / "caps.txt"
    captions.write_text("\n".join((data / "test_caps.txt").read_text().splitlines()[:4]))
    with pytest.raises(UserError, match=r"caps\.txt: line 3: the text encoder's output is zero"):
        index_gallery(bundle, broken, tmp_path / "ims.npy", captions, tmp_path / "g")
    assert not (tmp_path / "g").exists()


def test_a_gallery_from_another_bundle_is_refused(trained, indexed, tmp_path):
    _, checkpoint, _ = trained
    _, _, gallery, _ = indexed
    ranges = ShapeRanges.create(16, 8, 30)
    export_bundle(load_checkpoint(checkpoint), tmp_path / "other", 18, ranges)  # other graphs
    with pytest.raises(UserError, match="gallery built with another bundle"):
        Retriever.open(tmp_path / "other", gallery)


def test_runtime_does_not_import_torch(indexed):
    bundle, split, gallery, _ = indexed
    code = (
        "import sys\n"
        "from scan_deploy.runtime.retriever import Retriever\n"
        f"r = Retriever.open({str(bundle.path)!r}, {str(gallery)!r})\n"
        f"assert r.search_text([{split.captions[0]!r}], k=1)[0][0].index == 0 or True\n"
        "assert 'torch' not in sys.modules and 'onnx' not in sys.modules, sorted(sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_index_query_bench_commands(trained, tmp_path):
    data, _, bundle = trained
    out = tmp_path / "g"
    files = ("--features", data / "test_ims.npy", "--captions", data / "test_caps.txt")
    done = run_cli("index", bundle, *files, "--out", out, "--dtype", "int8", "--shard-size", 100)
    assert done.returncode == 0, done.stderr
    assert "400 images, 2000 captions (int8" in done.stdout
    caption = (data / "test_caps.txt").read_text().splitlines()[10]
    done = run_cli("query", out, caption, "-k", 3, "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["query"] == caption and len(answer["hits"]) == 3
    np.save(tmp_path / "q.npy", np.load(data / "test_ims.npy")[:2])
    done = run_cli("query", out, "--image-features", tmp_path / "q.npy", "-k", 2, "--json")
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [len(line["hits"]) for line in lines] == [2, 2]
    done = run_cli("bench", out, "--batch", 1, "--batch", 4, "--iterations", 2, "--warmup", 0,
                "--shortlist", 50, "--shortlist-engine", "numpy", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["shortlist_engine"] == "numpy"
    assert [row["batch"] for row in report["batches"]] == [1, 4]
    assert 0.0 <= report["agreement"]["top_k_agreement"] <= 1.0
    table = run_cli("query", out, caption, "-k", 2)
    assert table.returncode == 0 and "rank" in table.stdout


@needs_faiss
def test_faiss_index_serves_the_shortlist_from_the_command_line(trained, tmp_path):
    data, _, bundle = trained
    out = tmp_path / "g"
    done = run_cli("index", bundle, "--features", data / "test_ims.npy", "--out", out,
                   "--first-stage", "global")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "graphs, global index SQfp16)" in done.stdout
    caption = (data / "test_caps.txt").read_text().splitlines()[10]
    hits = {}
    for engine in ("faiss", "numpy"):
        done = run_cli("query", out, caption, "-k", 3, "--shortlist", 100,
                       "--shortlist-engine", engine, "--json")  # fmt: skip
        assert done.returncode == 0, done.stderr
        hits[engine] = [hit["index"] for hit in json.loads(done.stdout)["hits"]]
    assert hits["faiss"] == hits["numpy"]
    done = run_cli("bench", out, "--batch", 1, "--iterations", 1, "--warmup", 0,
                   "--shortlist", 100)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "shortlist 100 (global on SQfp16)" in done.stdout


def test_runtime_commands_fail_in_one_line(trained, tmp_path):
    data, _, bundle = trained
    out = tmp_path / "g"
    assert (
        run_cli("index", bundle, "--features", data / "test_ims.npy", "--out", out).returncode == 0
    )
    cases = [
        ("query", tmp_path, "a dog"),  # not a gallery
        ("query", out),  # no query at all
        ("query", out, "--image-features", tmp_path / "q.npy"),  # image queries, no captions
        ("index", bundle, "--features", data / "test_caps.txt", "--out", tmp_path / "x"),
        ("index", bundle, "--features", data / "test_ims.npy", "--out", out),  # not empty
        ("bench", out, "--batch", 0),
        ("query", out, "a dog", "--shortlist", 20, "--shortlist-engine", "annoy"),
    ]
    np.save(tmp_path / "q.npy", np.load(data / "test_ims.npy")[:1])
    for args in cases:
        done = run_cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, (args, done.stderr)
    shard = next((out / "images").glob("shard-*/regions.npy"))
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    done = run_cli("query", out, "a dog")
    assert done.returncode == 2 and "regions.npy" in done.stderr


@needs_faiss
def test_maxsim_first_stage_end_to_end_against_pooled(trained, tmp_path):
    """On the small trained model (400 images of 8 regions, 2000 captions, D = 32): a shortlist
    of the whole gallery is exhaustive search for either stage; a 5% image→text shortlist by
    maxsim keeps far more of exhaustive SCAN's top 10 than one by the pooled embedding
    (measured 0.87 vs 0.70), and a 5% text→image one stays close (0.54 vs 0.60: on this tiny
    model exact hard-attention SCAN keeps 0.59; on the demo model it is 0.94 vs 0.40)."""
    data, _, bundle_path = trained
    bundle = load_bundle(bundle_path)
    out = tmp_path / "g"
    index_gallery(bundle, open_backend(bundle), data / "test_ims.npy", data / "test_caps.txt",
                  out, dtype="fp16", first_stages={"maxsim": None})  # fmt: skip
    split = load_split(data, "test")
    texts, images = split.captions[::10], np.asarray(split.images[::8])
    kept = {}
    for stage in ("maxsim", "global"):
        retriever = Retriever.open(bundle, out, first_stage=stage)
        exact = {"t2i": retriever.search_text(texts, 10), "i2t": retriever.search_image(images, 10)}
        assert retriever.search_text(texts[:5], 10, shortlist=400) == exact["t2i"][:5]
        assert retriever.search_image(images[:5], 10, shortlist=2000) == exact["i2t"][:5]
        short = {"t2i": retriever.search_text(texts, 10, 20),
                 "i2t": retriever.search_image(images, 10, 100)}  # fmt: skip
        for direction in exact:
            pairs = zip(exact[direction], short[direction], strict=True)
            overlap = [len({h.index for h in a} & {h.index for h in b}) / 10 for a, b in pairs]
            kept[stage, direction] = np.mean(overlap)
    assert kept["maxsim", "i2t"] >= kept["global", "i2t"] + 0.15, kept
    assert kept["maxsim", "t2i"] >= kept["global", "t2i"] - 0.1, kept


@needs_faiss
def test_first_stages_from_the_command_line(trained, tmp_path):
    """`index --first-stage` builds each stage's index from its factory string; `query` and
    `bench` pick the stage (maxsim by default when indexed); every bad first-stage input is
    one line and exit 2, and a refused index writes nothing."""
    data, _, bundle = trained
    out = tmp_path / "g"
    files = ("--features", data / "test_ims.npy", "--captions", data / "test_caps.txt")
    done = run_cli("index", bundle, *files, "--out", out, "--first-stage", "maxsim:IVF8,SQ8",
                   "--first-stage", "global", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    stages = json.loads(done.stdout)["first_stages"]
    assert stages["images"]["maxsim"]["factory"] == "IVF8,SQ8"
    assert stages["images"]["maxsim"]["vectors"] == 400 * 8
    assert stages["captions"]["global"]["factory"] == "SQfp16"
    caption = (data / "test_caps.txt").read_text().splitlines()[10]
    answers = {}
    for stage in ("maxsim", "global"):
        done = run_cli("query", out, caption, "-k", 3, "--shortlist", 400, "--first-stage", stage,
                       "--json")  # fmt: skip
        assert done.returncode == 0, done.stderr
        answers[stage] = json.loads(done.stdout)["hits"]
    assert answers["maxsim"] == answers["global"]  # the whole gallery: exhaustive either way
    done = run_cli("bench", out, "--batch", 1, "--iterations", 1, "--warmup", 0,
                   "--shortlist", 40, "--faiss-params", "nprobe=8")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "shortlist 40 (maxsim on IVF8,SQ8)" in done.stdout
    bad = [
        (("index", bundle, *files, "--out", tmp_path / "b", "--first-stage", "colbert"),
         "--first-stage: got 'colbert', expected one of global, maxsim"),
        (("index", bundle, *files, "--out", tmp_path / "b", "--first-stage", "maxsim:IVFx"),
         "factory: FAISS cannot make an index of 'IVFx'"),
        (("index", bundle, *files, "--out", tmp_path / "b", "--first-stage", "maxsim:IVF4096,SQ8"),
         "trains 4096 centroids on at least 159744 vectors"),
        (("query", out, caption, "--shortlist", 20, "--faiss-params", "efSearch=3"),
         "faiss_params: IndexIVFScalarQuantizer takes no search parameters 'efSearch=3'"),
        (("query", out, caption, "--shortlist", 20, "--first-stage", "tfidf"),
         "Invalid value for '--first-stage'"),
        (("query", out, caption, "--shortlist", 20, "--token-candidates", 0),
         "--token-candidates"),
    ]  # fmt: skip
    for args, message in bad:
        done = run_cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr
    assert not (tmp_path / "b").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["g"]
    plain = tmp_path / "plain"
    assert (
        run_cli("index", bundle, "--features", data / "test_ims.npy", "--out", plain).returncode
        == 0
    )
    done = run_cli("query", plain, caption, "--shortlist", 20, "--first-stage", "maxsim")
    assert done.returncode == 2
    assert "first_stages: the gallery has no maxsim first stage (indexed: none)" in done.stderr


@pytest.fixture(scope="module")
def int8_indexed(int8_scored, trained, tmp_path_factory):
    """(bundle with int8 scorers, test split, int8 gallery of it): shards of 150, so caption
    shards differ in padded length."""
    path, _ = int8_scored
    data = trained[0]
    bundle = load_bundle(path)
    out = tmp_path_factory.mktemp("int8") / "g"
    index_gallery(bundle, open_backend(bundle), data / "test_ims.npy", data / "test_caps.txt",
                  out, dtype="int8", shard_size=150)  # fmt: skip
    return bundle, load_split(data, "test"), out


def _by_id(hits) -> dict[str, float]:
    return {h.id: h.score for h in hits}


def test_an_int8_gallery_is_scored_by_the_int8_scorer_close_to_the_float_one(int8_indexed):
    bundle, split, gallery = int8_indexed
    fast = Retriever.open(bundle, gallery)  # auto: the int8 scorer where it can run
    slow = Retriever.open(bundle, gallery, scorer="float")
    assert [s.stored for s in fast.scorers.values()] == [True, True]
    assert [s.stored for s in slow.scorers.values()] == [False, False]
    texts = split.captions[::50]
    images = np.asarray(split.images[::20])
    for got, want in (
        (fast.search_text(texts, k=10), slow.search_text(texts, k=10)),
        (fast.search_image(images, k=10), slow.search_image(images, k=10)),
    ):
        same_first = [a[0].id == b[0].id for a, b in zip(got, want, strict=True)]
        assert np.mean(same_first) >= 0.9
        for a, b in zip(got, want, strict=True):
            common = _by_id(a).keys() & _by_id(b).keys()
            assert len(common) >= 7
            assert max(abs(_by_id(a)[i] - _by_id(b)[i]) for i in common) < 0.02


def test_the_int8_scorer_reranks_stored_rows_as_it_scores_stored_blocks(int8_indexed):
    """Re-ranked candidates (gathered across shards, captions padded to the longest shard) get
    the scores the exhaustive pass gives them (blocks read straight from the memory maps)."""
    bundle, split, gallery = int8_indexed
    retriever = Retriever.open(bundle, gallery, scorer="int8")
    texts = split.captions[:30]
    for exact, short in (
        (retriever.search_text(texts, k=5), retriever.search_text(texts, k=5, shortlist=350)),
        (
            retriever.search_image(np.asarray(split.images[:10]), k=5),
            retriever.search_image(np.asarray(split.images[:10]), k=5, shortlist=1900),
        ),
    ):
        for a, b in zip(exact, short, strict=True):
            for hit in b:
                if hit.id in _by_id(a):
                    assert abs(hit.score - _by_id(a)[hit.id]) < 1e-5


def test_the_int8_scorer_says_why_it_cannot_run(int8_indexed, indexed, trained):
    bundle, split, gallery = int8_indexed
    with pytest.raises(UserError, match=r"^scorer int8: .* stores fp32, not int8 \(scan-deploy"):
        Retriever.open(bundle, indexed[2], scorer="int8")
    plain = load_bundle(trained[2])  # never calibrated: no int8 scorers
    with pytest.raises(UserError, match=r"has no int8 scorer for images galleries \(scan-deploy"):
        Retriever.open(plain, gallery, scorer="int8")
    assert not Retriever.open(plain, gallery).scorers["images"].stored  # auto: the float one
    opened = Retriever.open(bundle, gallery, scorer="float")
    opened.galleries["images"].manifest["format_version"] = 2
    with pytest.raises(UserError, match="format 2, which stored int8 values as int8: re-run"):
        Retriever(bundle, opened.galleries, opened.backend, scorer="int8")
    with pytest.raises(UserError, match="^scorer: got 'int4', expected one of auto, float, int8$"):
        Retriever.open(bundle, gallery, scorer="int4")
    import scan_deploy.runtime.backends.onnxruntime_backend as ort_backend

    with pytest.MonkeyPatch.context() as patch:  # an AVX2-only CPU
        patch.setattr(ort_backend, "integer_dot_products", lambda: False)
        with pytest.raises(UserError, match="no integer dot-product instructions"):
            Retriever.open(bundle, gallery, scorer="int8")
        assert not Retriever.open(bundle, gallery).scorers["images"].stored


def test_the_scorer_option_of_query_and_bench(int8_indexed, indexed):
    bundle, split, gallery = int8_indexed
    caption = split.captions[3]
    done = run_cli("bench", gallery, "--bundle", bundle.path, "--batch", 1, "--iterations", 1,
                   "--warmup", 0, "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["scorer"] == "int8"
    done = run_cli("bench", gallery, "--bundle", bundle.path, "--batch", 1, "--iterations", 1,
                   "--warmup", 0, "--scorer", "float")  # fmt: skip
    assert done.returncode == 0 and "float scorer" in done.stdout
    fast = run_cli("query", gallery, caption, "--bundle", bundle.path, "--json")
    slow = run_cli("query", gallery, caption, "--bundle", bundle.path, "--scorer", "float",
                   "--json")  # fmt: skip
    first = [json.loads(out.stdout)["hits"][0]["id"] for out in (fast, slow)]
    assert first[0] == first[1]
    bad = run_cli("query", indexed[2], caption, "--scorer", "int8")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: scorer int8: {indexed[2] / 'images'} stores fp32, not int8 "
        "(scan-deploy index --dtype int8)"
    ]


def test_the_torch_backend_keeps_gallery_blocks_on_its_device(indexed, trained, monkeypatch):
    """Blocks the backend keeps (`resident_bytes`: on CUDA half the free memory; forced here on
    the CPU) are read and uploaded once and scored from the device copy afterwards, up to the
    budget; the hits are the same."""
    from scan_deploy.runtime.gallery import Shard

    bundle, split, gallery, _ = indexed
    checkpoint = trained[1]
    plain = Retriever.open(bundle, gallery, "torch", checkpoint=checkpoint)
    assert plain.backend.resident_bytes == 0  # the CPU: nothing kept
    texts = split.captions[:12]
    expected = plain.search_text(texts, k=5)
    reads = []
    original = Shard.block
    monkeypatch.setattr(Shard, "block", lambda self, *a: reads.append(a) or original(self, *a))
    block = 16 * 8 * (32 + 8) * 4  # 16 images: regions (8 × 32) and Gram (8 × 8), float32
    for budget, kept in ((10**9, 27), (block, 1)):  # shards of 150, 150, 100: 27 blocks of ≤ 16
        backend = open_backend(bundle, "torch", checkpoint=checkpoint, device="cpu")
        backend.resident_bytes = budget
        resident = Retriever(bundle, plain.galleries, backend)
        reads.clear()
        assert resident.search_text(texts, k=5) == expected
        first = len(reads)
        assert resident.search_text(texts, k=5) == expected
        assert len(resident.scorers["images"].device_blocks) == kept
        assert len(reads) - first == first - 2 * kept  # the kept blocks are not read again
    used = backend._resident_used
    later = resident.on_galleries(open_galleries(gallery))  # serve's next generation
    resident.close()  # its blocks' budget goes back: the next retriever keeps them again
    assert used == block and backend._resident_used == 0
    assert later.search_text(texts, k=5) == expected
    assert len(later.scorers["images"].device_blocks) == 1


def test_a_closed_retriever_refuses_to_search(indexed):
    """`with Retriever.open(...)` closes the backend it opened (its sessions and runners) on
    exit; a search afterwards is a one-line error, and closing twice is harmless."""
    bundle, split, gallery, _ = indexed
    with Retriever.open(bundle, gallery) as retriever:
        assert len(retriever.search_text([split.captions[0]], k=2)[0]) == 2
        retriever.explain_text(split.captions[0], retriever.search_text([split.captions[0]])[0][:1])
    with pytest.raises(UserError, match="^the retriever is closed$"):
        retriever.search_text([split.captions[0]], k=2)
    with pytest.raises(UserError, match="^the retriever is closed$"):
        retriever.explain_text(split.captions[0], [])
    with pytest.raises(UserError, match="^the retriever is closed$"):
        retriever.rank_image(np.asarray(split.images[:1]), k=2)
    retriever.close()
    backend = open_backend(bundle)
    with backend:
        runner = backend.runner(Graph.TEXT_ENCODER)
    with pytest.raises(UserError, match="^text_encoder: the backend is closed$"):
        backend.runner(Graph.TEXT_ENCODER)
    with pytest.raises(UserError, match="^text_encoder: the runner is closed$"):
        runner.run({"tokens": np.ones((1, 3), np.int64), "lengths": np.array([3])})
