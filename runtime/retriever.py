"""The retriever apps embed: a bundle, a gallery made by `scan-deploy index`, one backend.

    retriever = Retriever.open("bundle", "gallery", backend="onnxruntime", precision="fp16")
    hits = retriever.search_text(["a man riding a bike"], k=10)          # images for each text
    hits = retriever.search_image(region_features, k=10, shortlist=1000) # captions for each image

With `shortlist`, a first stage (`runtime.first_stage`: `maxsim` when the gallery was indexed
with it, else `global`) picks that many candidates and the exact scorer re-ranks them only.
The exact scorer of an int8 gallery is, where it can run, the bundle's int8 scorer on the
gallery's stored codes (`scorer`: ONNX Runtime on the CPU, a bundle calibrated with
`--precision int8`), else the bundle's scorer on rows dequantized to float32.

A gallery folder holds `images/` (searched by text) and, when `index` was given captions,
`captions/` (searched by image). Queries are batched, and every call sized by the engine the
backend runs (`backends.base.CallSizes`: its optimization profile, or the manifest's shape
ranges): captions sorted by length and encoded and scored `text_batch` at a time, images
`image_batch` at a time, against gallery blocks as large as the scorer takes. Concurrent callers
are safe: each graph's runner is used under its own lock (TensorRT execution contexts are not
re-entrant), so threads interleave at graph granularity. Text queries longer than the engine's
word limit are read as their first words, with one warning (the rule is `scan_deploy.bundle`'s).
A query the encoder turns into zeros or NaN/Inf (e.g. image features ×1e30) is refused as the
indexer refuses such a gallery item (`scan_deploy.runtime.encoded`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scan_deploy.runtime.backends import open_backend
from scan_deploy.runtime.backends.base import CallSizes
from scan_deploy.runtime.encoded import check_encoded_images, check_encoded_texts
from scan_deploy.runtime.explain import Explainer, Explanation
from scan_deploy.runtime.first_stage import Pooling, missing_stage, reads_index, shortlist
from scan_deploy.runtime.gallery import Gallery, Verify
from scan_deploy.runtime.generations import open_galleries
from scan_deploy.runtime.inner_product import (
    FAISS_HINT,
    check_engine,
)
from scan_deploy.runtime.search import (
    GalleryScorer,
    Hit,
    Queries,
    exhaustive,
    live_candidates,
    reranked,
    reranked_lists,
)

from scan_deploy.batching import pad_tokens
from scan_deploy.bundle import Bundle, load_bundle
from scan_deploy.choices import (
    Backend,
    FirstStage,
    GalleryDtype,
    Graph,
    Precision,
    Provider,
    Scorer,
    ShortlistEngine,
)
from scan_deploy.errors import UserError, input_error
from scan_deploy.precomp import check_feature_values

LOG = logging.getLogger("scan_deploy.runtime")
KINDS_BY_QUERY = {"text": "images", "image": "captions"}


class _Locked:
    """A runner used under a lock."""

    def __init__(self, runner) -> None:
        self.runner, self.lock = runner, threading.Lock()

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self.lock:
            return self.runner.run(feeds)

    def close(self) -> None:
        with self.lock:
            self.runner.close()


class Retriever:
    def __init__(
        self,
        bundle: Bundle,
        galleries: dict[str, Gallery],
        backend,
        shortlist_engine: ShortlistEngine | str = ShortlistEngine.AUTO,
        threads: int = 0,
        first_stage: FirstStage | str | None = None,
        token_candidates: int | None = None,
        scorer: Scorer | str = Scorer.AUTO,
        faiss_params: str | None = None,
        *,
        runners: dict[Graph, _Locked] | None = None,
    ) -> None:
        """`faiss_params`: those the galleries' first-stage indexes were opened with (`open`),
        kept for `on_galleries`; `runners`: the locked runners of a retriever on the same
        backend (`on_galleries`), shared so that the two never run one at once."""
        self.bundle, self.galleries, self.backend = bundle, galleries, backend
        self.faiss_params = faiss_params
        self.shortlist_engine = check_engine(shortlist_engine)
        self.threads = threads
        self.first_stage = (
            None if first_stage is None else FirstStage.parse(first_stage, "first_stage")
        )
        if token_candidates is not None and (
            isinstance(token_candidates, bool)
            or not isinstance(token_candidates, int)
            or token_candidates < 1
        ):
            message = f"expected an integer ≥ 1 or None, got {token_candidates!r}"
            raise input_error(None, "token_candidates", message)
        self.token_candidates = token_candidates
        self.pooling = Pooling.of(bundle.config)
        self._runners = runners or {name: _Locked(backend.runner(name)) for name in Graph}
        self.sizes = CallSizes.of(backend)
        self._explain: Explainer | None = None
        self._state = "open"  # released (close_galleries), closed (close)
        self._owned: list = []  # what close() closes
        self._explainer_lock = threading.Lock()
        self.scorer = Scorer.parse(scorer, "scorer")
        self.scorers = {
            kind: self._gallery_scorer(gallery, self.scorer) for kind, gallery in galleries.items()
        }

    def _gallery_scorer(self, gallery: Gallery, choice: Scorer) -> GalleryScorer:
        """The exact scorer of `gallery`: the int8 scorer when asked for (a UserError says why
        it cannot run) or, with auto, wherever it can; else the bundle's scorer."""
        cross_attn = self.bundle.config.cross_attn
        if choice != Scorer.FLOAT:
            try:
                runner = int8_scorer_runner(self.backend, gallery)
            except UserError as exc:
                if choice == Scorer.INT8:
                    raise
                LOG.info("%s: the float scorer (%s)", gallery.path, exc)
            else:
                return GalleryScorer(_Locked(runner), cross_attn, stored=True)
        resident = getattr(self.backend, "resident", None)  # device-resident blocks (torch)
        release = getattr(self.backend, "release", None)
        runner = self._runners[Graph.SCORER]
        return GalleryScorer(runner, cross_attn, resident=resident, release=release)

    @classmethod
    def open(
        cls,
        bundle: str | Path | Bundle | None,
        gallery: str | Path,
        backend: Backend | str = Backend.ONNXRUNTIME,
        precision: Precision | str = Precision.FP32,
        *,
        threads: int = 0,
        providers: Sequence[Provider | str] | None = None,
        checkpoint: str | Path | None = None,
        verify: Verify = True,
        shortlist_engine: ShortlistEngine | str = ShortlistEngine.AUTO,
        first_stage: FirstStage | str | None = None,
        faiss_params: str | None = None,
        token_candidates: int | None = None,
        scorer: Scorer | str = Scorer.AUTO,
    ) -> Retriever:
        """`bundle` None: the bundle the gallery was indexed with (its recorded path).
        `first_stage`: what picks a shortlist's candidates (None: `maxsim` for a gallery indexed
        with it, else `global`); `shortlist_engine` ranks the `global` stage (auto: the
        gallery's global FAISS index when faiss is installed, else numpy); `faiss_params`
        ("nprobe=64", "efSearch=256") replace the search parameters recorded with the indexes;
        `token_candidates`: gallery tokens each query token retrieves in the `maxsim` stage
        (default: max(shortlist, 64)); `scorer`: the exact scorer (`Scorer`: auto takes the
        int8 scorer for an int8 gallery where it can run). The FAISS indexes that will be used
        are opened and checked here. `threads` (0: the libraries' defaults) sizes ONNX
        Runtime's intra-op pool and FAISS's OpenMP threads."""
        engine = check_engine(shortlist_engine)
        stage = None if first_stage is None else FirstStage.parse(first_stage, "first_stage")
        galleries = open_galleries(gallery, verify)
        opened = None
        try:  # a failure closes what was opened: the generation's lease with its galleries
            if not isinstance(bundle, Bundle):
                if bundle is None:
                    bundle = next(iter(galleries.values())).manifest["bundle"]["path"]
                bundle = load_bundle(bundle)
            _check_galleries(galleries, bundle, stage, engine, faiss_params)
            opened = open_backend(
                bundle, backend, precision, threads=threads, providers=providers,
                checkpoint=checkpoint,
            )  # fmt: skip
            settings = (engine, threads, stage, token_candidates, scorer, faiss_params)
            retriever = cls(bundle, galleries, opened, *settings)
        except BaseException:
            if opened is not None:
                opened.close()
            for part in galleries.values():
                part.close()
            raise
        retriever._owned.append(opened)  # opened here: closed with the retriever
        return retriever

    def on_galleries(self, galleries: dict[str, Gallery]) -> Retriever:
        """This retriever's bundle, backend and settings over `galleries` (a later generation
        of its gallery: `serve` switches to it), their first-stage indexes opened as `open`
        does. The backend stays this retriever's: closing the new one closes its own scorers."""
        settings = (self.first_stage, self.shortlist_engine, self.faiss_params)
        _check_galleries(galleries, self.bundle, *settings)
        return Retriever(
            self.bundle,
            galleries,
            self.backend,
            self.shortlist_engine,
            self.threads,
            self.first_stage,
            self.token_candidates,
            self.scorer,
            self.faiss_params,
            runners=self._runners,  # the same locks: the two take turns on the runners
        )

    def close_galleries(self) -> None:
        """Release what this retriever holds for its galleries (device blocks, first-stage
        indexes, the explain session, the lease on their generation), keeping the backend:
        `serve` does so when it has switched to a later generation on the same backend.
        Searching or explaining afterwards is a UserError."""
        self._state = "closed" if self._state == "closed" else "released"
        for scorer in self.scorers.values():
            scorer.close()
        with self._explainer_lock:
            if self._explain is not None:
                self._explain.close()
                self._explain = None  # opened again if asked (a UserError once closed)
        for gallery in self.galleries.values():
            gallery.close()

    def close(self) -> None:
        """`close_galleries`, and close the backend `open` opened (one passed to the
        constructor stays its owner's); searching afterwards is a UserError."""
        self._state = "closed"
        self.close_galleries()
        for backend in self._owned:
            backend.close()
        self._owned.clear()

    def __enter__(self) -> Retriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def encode_text(self, texts: Sequence[str]) -> Queries:
        """Caption-side scorer inputs of `texts`, padded to their longest (in input order)."""
        return self._encode_tokens(self._token_lists(texts), texts)

    def _encode_tokens(self, token_lists: list[list[int]], texts: Sequence[str]) -> Queries:
        tokens, lengths = pad_tokens(token_lists)
        words, caption_gram, pooled = self._runners["text_encoder"].run(
            {"tokens": tokens, "lengths": lengths}
        )
        check_encoded_texts(words, pooled, lengths, None, [f"query {t!r}" for t in texts])
        return Queries(
            {"words": words, "lengths": lengths, "caption_gram": caption_gram, "global": pooled}
        )

    def encode_images(self, features: np.ndarray, *, source: str | Path | None = None) -> Queries:
        """Image-side scorer inputs of region features (images, regions, img_dim). `source`
        (the features' file, if any) names them in the error for an image the encoder turns
        into zeros or NaN/Inf (`runtime.encoded`)."""
        return self._encode_images(self.check_features(features), source)

    def _encode_images(self, features: np.ndarray, source, offset: int = 0) -> Queries:
        outputs, step = [], self.sizes.image_batch
        for start in range(0, len(features), step):
            batch = features[start : start + step]
            regions, region_gram, pooled = self._runners["image_encoder"].run({"features": batch})
            check_encoded_images(batch, regions, pooled, source, offset + start)
            outputs.append((regions, region_gram, pooled))
        regions, region_gram, pooled = (
            np.concatenate(parts) for parts in zip(*outputs, strict=True)
        )
        return Queries({"regions": regions, "region_gram": region_gram, "global": pooled})

    def search_text(
        self, texts: Sequence[str], k: int = 10, shortlist: int | None = None
    ) -> list[list[Hit]]:
        """The k best gallery images for each text, best first."""
        if not texts:
            return []
        gallery = self.gallery_for("text", k, shortlist)
        return hits_of(*self.rank_text(texts, k, shortlist), gallery, self.galleries)

    def rank_text(
        self, texts: Sequence[str], k: int, shortlist: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, gallery indices), each (texts, k') best first: `search_text` without the
        hits, k' = min(k, the live items). Captions are length-sorted and encoded
        `text_batch` at a time."""
        self._require_galleries()
        gallery = self.galleries["images"]
        k = min(k, gallery.live_count)
        token_lists = self._token_lists(texts)
        order = np.argsort([-len(t) for t in token_lists], kind="stable")
        scores = np.empty((len(texts), k), np.float32)
        indices = np.empty((len(texts), k), np.int64)
        step = self.sizes.text_batch
        for start in range(0, len(order), step):
            chunk = order[start : start + step]
            queries = self._encode_tokens(
                [token_lists[i] for i in chunk], [texts[i] for i in chunk]
            )
            scores[chunk], indices[chunk] = self._rank(queries, gallery, k, shortlist)
        return scores, indices

    def search_image(
        self,
        features: np.ndarray,
        k: int = 10,
        shortlist: int | None = None,
        *,
        source: str | Path | None = None,
    ) -> list[list[Hit]]:
        """The k best gallery captions for each image's region features, best first. An image
        the encoder turns into zeros or NaN/Inf (e.g. features ×1e30) is a UserError naming
        `source` (the features' file; `image features` when None) and the image."""
        gallery = self.gallery_for("image", k, shortlist)
        ranked = self.rank_image(features, k, shortlist, source=source)
        return hits_of(*ranked, gallery, self.galleries)

    def rank_image(
        self,
        features: np.ndarray,
        k: int,
        shortlist: int | None = None,
        *,
        source: str | Path | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, gallery indices), each (images, k'): `search_image` without the hits."""
        self._require_galleries()
        gallery = self.galleries["captions"]
        k = min(k, gallery.live_count)
        features = self.check_features(features)
        parts = []
        step = self.sizes.image_batch
        for start in range(0, len(features), step):
            queries = self._encode_images(features[start : start + step], source, start)
            parts.append(self._rank(queries, gallery, k, shortlist))
        if not parts:
            return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
        scores, indices = (np.concatenate(arrays) for arrays in zip(*parts, strict=True))
        return scores, indices

    def _rank(self, queries: Queries, gallery: Gallery, k: int, size: int | None):
        scorer, block = self.scorers[gallery.kind], self.sizes.block(gallery.kind)
        if size is None or size >= gallery.count:
            return exhaustive(scorer, queries, gallery, k, block)
        return reranked(scorer, queries, gallery, k, self.candidates(queries, gallery, size), block)

    def candidates(self, queries: Queries, gallery: Gallery, size: int) -> np.ndarray:
        """(queries, size) live items of `gallery` the first stage picks for each query."""
        stage, engine = stage_of(gallery, self.first_stage), self.shortlist_engine
        pooling, threads, per_token = self.pooling, self.threads, self.token_candidates
        extra = len(gallery.deleted)  # deleted items found are dropped: ask for as many more
        candidates = shortlist(
            queries, gallery, min(size + extra, gallery.count), stage, pooling, engine,
            threads, per_token,
        )  # fmt: skip
        if extra:
            candidates = live_candidates(candidates, gallery, size)
        return candidates

    def rerank(
        self, queries: Queries, kind: str, k: int, candidates: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of each query's own candidates in the `kind` gallery (any number, maybe
        none: a Ray shard actor gets the first stage's candidates in its shards): (queries, k)
        best first, padded with -inf scores and index -1 (`search.reranked_lists`)."""
        self._require_galleries()
        gallery, block = self.galleries[kind], self.sizes.block(kind)
        return reranked_lists(self.scorers[kind], queries, gallery, k, candidates, block)

    def explain_text(self, text: str, hits: Sequence[Hit]) -> list[Explanation]:
        """The attention between a text query and each of its image hits, from the gallery's
        stored regions (`runtime.explain`; the bundle's explain graph)."""
        explainer, gallery = self._explainer(), self.galleries["images"]
        caption = explainer.encode_caption(text)
        return [explainer.explain_encoded(_image_side(gallery, hit.index), caption) for hit in hits]

    def explain_image(self, features: np.ndarray, hits: Sequence[Hit]) -> list[Explanation]:
        """The attention between one image's region features (regions, img_dim) and each of
        its caption hits (their texts, encoded again)."""
        if any(hit.text is None for hit in hits):
            raise UserError("explain: the captions gallery keeps no texts to explain hits with")
        explainer = self._explainer()
        image = self._encode_images(self.check_features(features[None]), None)
        side = {name: image.arrays[name] for name in ("regions", "region_gram")}
        return [explainer.explain_encoded(side, explainer.encode_caption(hit.text)) for hit in hits]

    def _require_galleries(self) -> None:
        if self._state == "released":
            raise UserError("this retriever's galleries were released (a later one serves)")
        if self._state == "closed":
            raise UserError("the retriever is closed")

    def _explainer(self) -> Explainer:
        self._require_galleries()
        with self._explainer_lock:
            if self._explain is None:
                self._explain = Explainer(self.bundle, self.backend, self.threads)
            return self._explain

    def gallery_for(self, query: str, k: int, shortlist: int | None) -> Gallery:
        self._require_galleries()
        gallery = queried_gallery(self.galleries, query, k)
        if shortlist is not None and not k <= shortlist:
            raise input_error(None, "shortlist", f"expected at least k = {k}, got {shortlist}")
        stage = stage_of(gallery, self.first_stage)
        shortlisted = shortlist is not None and shortlist < gallery.count
        if shortlisted and stage == FirstStage.MAXSIM and stage not in gallery.first_stages:
            raise missing_stage(gallery, stage)
        return gallery

    def _token_lists(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of text queries, cut to the engine's word limit (`Bundle.encode_captions`)."""
        if any(not text.strip() for text in texts):
            raise input_error(None, "query", "empty query: expected some words")
        limit = self.sizes.max_tokens
        token_lists, cut = self.bundle.encode_captions(texts, limit)
        self.bundle.warn_cut(cut, len(texts), "queries", limit)
        unknown = self.bundle.vocab(self.bundle.vocab.UNK)
        for text, tokens in zip(texts, token_lists, strict=True):
            if all(t == unknown for t in tokens[1:-1]):
                LOG.warning("query %r: no word is in the vocabulary; answering anyway", text)
        return token_lists

    def check_features(self, features: np.ndarray) -> np.ndarray:
        """Image queries as float32 (images, regions, img_dim), checked: shape, values, the
        bundle's region range; a one-line UserError otherwise."""
        features = np.asarray(features, dtype=np.float32)
        dim = self.bundle.config.img_dim
        if features.ndim != 3 or features.shape[2] != dim:
            message = f"expected (images, regions, {dim}), got {features.shape}"
            raise input_error(None, "image features", message)
        padded = check_feature_values(features, None, "image features")
        self.bundle.check_regions(features.shape[1], padded, None, "image features")
        return features


def queried_gallery(galleries: dict[str, Gallery], query: str, k: int) -> Gallery:
    """The gallery a `query` ("text" or "image") searches, with k checked against its live
    items; one-line UserErrors otherwise."""
    kind = KINDS_BY_QUERY[query]
    if kind not in galleries:
        raise UserError(
            f"the gallery has no {kind}: {query} queries need `scan-deploy index` "
            + ("--captions" if kind == "captions" else "--features")
        )
    gallery = galleries[kind]
    if not 1 <= k <= gallery.live_count:
        message = f"expected 1..{gallery.live_count} (gallery size), got {k}"
        raise input_error(None, "k", message)
    return gallery


def hits_of(
    scores: np.ndarray, indices: np.ndarray, gallery: Gallery, galleries: dict[str, Gallery]
) -> list[list[Hit]]:
    """The hits of ranked gallery items: id, score, text and (from the images gallery) the
    image file."""
    texts, images = gallery.texts, galleries.get("images")
    return [
        [
            Hit(
                int(i),
                gallery.ids[i],
                float(s),
                texts[i] if texts is not None else None,
                images.image_file(_image_id(gallery, int(i))) if images else None,
            )
            for s, i in zip(row_scores, row_indices, strict=True)
        ]
        for row_scores, row_indices in zip(scores, indices, strict=True)
    ]


def _image_id(gallery: Gallery, index: int) -> str:
    """The image id of a gallery item: its own, or a caption's image (`image:k`)."""
    item = gallery.ids[index]
    return item if gallery.kind == "images" else item.rpartition(":")[0]


def _image_side(gallery: Gallery, index: int) -> dict[str, np.ndarray]:
    rows = np.array([index])
    return {name: gallery.rows(name, rows) for name in ("regions", "region_gram")}


def int8_scorer_runner(backend, gallery: Gallery):
    """The backend's int8 scorer for `gallery`, or a UserError saying why there is none."""
    if gallery.dtype != GalleryDtype.INT8:
        raise UserError(
            f"scorer int8: {gallery.path} stores {gallery.dtype}, not int8 "
            "(scan-deploy index --dtype int8)"
        )
    if gallery.manifest["format_version"] < 3:
        raise UserError(
            f"scorer int8: {gallery.path} is of format {gallery.manifest['format_version']}, "
            "which stored int8 values as int8: re-run scan-deploy index"
        )
    if not hasattr(backend, "int8_scorer"):
        raise UserError(f"scorer int8: runs on the onnxruntime backend, not {backend.name}")
    return backend.int8_scorer(gallery.kind)


def stage_of(gallery: Gallery, requested: FirstStage | None) -> FirstStage:
    """The first stage a shortlist on `gallery` runs: the one requested, else `maxsim` when the
    gallery was indexed for it, else `global`."""
    if requested is not None:
        return requested
    return FirstStage.MAXSIM if FirstStage.MAXSIM in gallery.first_stages else FirstStage.GLOBAL


def _check_galleries(
    galleries: dict[str, Gallery],
    bundle: Bundle,
    stage: FirstStage | None,
    engine: ShortlistEngine,
    params: str | None,
) -> None:
    """Galleries of `bundle`, their first-stage indexes that will be used opened (and checked)
    with `params`; one-line UserErrors otherwise."""
    for part in galleries.values():
        part.check_bundle(bundle)
    for part in galleries.values():
        _open_stage_index(part, stage_of(part, stage), engine, params)


def _open_stage_index(
    gallery: Gallery, stage: FirstStage, engine: ShortlistEngine, params: str | None
) -> None:
    """Open (and check) the FAISS index a shortlist on `gallery` will use, with `params`."""
    if reads_index(gallery, stage, engine):
        gallery.stage_index(stage, params)
    elif stage in gallery.first_stages and engine == ShortlistEngine.AUTO:
        LOG.warning("unused FAISS index in %s: %s", gallery.path, FAISS_HINT)
