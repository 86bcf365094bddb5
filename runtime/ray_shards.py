"""A gallery's shards spread over Ray actors (the `ray` extra): scale-out past one machine.

Each actor (`ShardActor`) opens the bundle, a backend and a contiguous range of the gallery's
shards from a path every node of the cluster can read (a shared file system, or a copy at the
same path), and ranks its items exactly; `ShardedRetriever` sends each query batch to every
actor and merges their top-k into the exact top-k (`search.TopK`, ties by lower index). Every
actor runs the same code on the same query batches as one process would, so the merged answer
equals the single-process `Retriever`'s, scores bit for bit (tests/runtime/test_ray_shards.py).

An actor that dies (its node lost, or killed) is restarted by Ray and the call retried once
(`max_restarts`, `max_task_retries`); past that the search is a one-line UserError naming the
actor's shards: never a partial answer.

With a shortlist (two-stage search) the queries are encoded and the first stage runs in this
process, on the whole gallery's first-stage index (`Retriever.candidates`); each actor re-ranks
exactly the candidates in its shards and the merged top-k equals the single-process one (the
same candidates, scored by the same scorer). The first-stage index is not split per actor: this
process must hold it (memory-mapped for the flat and SQ indexes).

Ray is the cluster: start or join one before (`ray.init(address=...)`, KubeRay on Kubernetes);
without one, `ShardedRetriever` starts a local Ray instance.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scan_deploy.runtime.generations import generation_folder
from scan_deploy.runtime.ray_cluster import check_gpus, first_line, gpus_for, require_ray
from scan_deploy.runtime.retriever import KINDS_BY_QUERY, Retriever, hits_of
from scan_deploy.runtime.search import Hit, Queries, TopK

from scan_deploy.errors import UserError, input_error


class ShardActor:
    """One actor's part: the shards first:stop of each gallery kind (runs in a Ray worker)."""

    def __init__(
        self,
        bundle: str,
        generation: str,
        parts: dict[str, tuple[int, int]],
        backend: str,
        precision: str,
        threads: int,
        checkpoint: str | None,
        scorer: str,
    ) -> None:
        """`generation`: the folder of the generation the driver opened (the same one after a
        writer makes another current, and after a restart)."""
        from scan_deploy.runtime.backends import open_backend  # in the actor's process
        from scan_deploy.runtime.generations import open_generation

        from scan_deploy.bundle import load_bundle

        loaded = load_bundle(bundle)
        galleries = open_generation(generation, verify=False)
        views = {kind: galleries[kind].restricted(*parts[kind]) for kind in parts}
        opened = open_backend(loaded, backend, precision, threads=threads, checkpoint=checkpoint)
        self.retriever = Retriever(loaded, views, opened, threads=threads, scorer=scorer)
        self.live = {kind: view.live_in_shards() for kind, view in views.items()}

    def rank(self, query: str, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, indices) of this actor's best min(k, its live items) for each query."""
        k = min(k, self.live[KINDS_BY_QUERY[query]])
        if k == 0:  # no live items here
            return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
        if query == "text":
            return self.retriever.rank_text(queries, k)
        return self.retriever.rank_image(queries, k)

    def rerank(
        self, kind: str, arrays: dict[str, np.ndarray], candidates: list[np.ndarray], k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of encoded queries' candidates in this actor's shards (padded with -inf
        and -1: `Retriever.rerank`)."""
        return self.retriever.rerank(Queries(arrays), kind, k, candidates)

    def close(self) -> None:
        self.retriever.close()


class ShardedRetriever:
    """`Retriever.search_text` / `search_image` over a gallery split across `actors` Ray actors.
    Exhaustive search fans the queries out; with a shortlist, `retriever` (this process's:
    default, one opened here with `backend`, `precision`, `threads` and `first_stage`) encodes
    the queries and runs the first stage on the whole gallery's index, and each actor re-ranks
    the candidates in its shards. Use as a context manager, or `close()`: the actors are
    killed (and the retriever opened here closed)."""

    def __init__(
        self,
        bundle: str | Path,
        gallery: str | Path,
        actors: int = 2,
        backend: str = "onnxruntime",
        precision: str = "fp32",
        threads: int = 0,
        max_restarts: int = 1,
        timeout: float = 600.0,
        retriever: Retriever | None = None,
        first_stage: str | None = None,
        checkpoint: str | None = None,
        scorer: str = "auto",
    ) -> None:
        ray = require_ray()
        if not isinstance(actors, int) or actors < 1:
            raise input_error(None, "actors", f"expected an integer ≥ 1, got {actors!r}")
        self.local = retriever or Retriever.open(
            bundle, gallery, backend, precision, threads=threads, first_stage=first_stage,
            checkpoint=checkpoint, scorer=scorer,
        )  # fmt: skip
        self._owned = retriever is None
        self.galleries = self.local.galleries
        if not ray.is_initialized():
            ray.init()
        self.timeout, self._ray = timeout, ray
        self.parts = split_shards(self.galleries, actors)
        gpus = gpus_for(self.local.backend)  # the backend this process runs
        check_gpus(ray, actors * gpus, f"{actors} Ray actors")
        remote = ray.remote(
            max_restarts=max_restarts, max_task_retries=max_restarts, num_gpus=gpus
        )(ShardActor)
        generation = str(generation_folder(self.galleries))
        where = None if checkpoint is None else str(checkpoint)
        self.actors = [
            remote.remote(
                str(bundle), generation, part, backend, precision, threads, where, str(scorer)
            )
            for part in self.parts
        ]

    def search_text(
        self, texts: Sequence[str], k: int = 10, shortlist: int | None = None
    ) -> list[list[Hit]]:
        return self._search("text", list(texts), k, shortlist)

    def search_image(
        self, features: np.ndarray, k: int = 10, shortlist: int | None = None
    ) -> list[list[Hit]]:
        return self._search("image", np.asarray(features, np.float32), k, shortlist)

    def _search(self, query: str, queries: Any, k: int, shortlist: int | None) -> list[list[Hit]]:
        gallery = self.local.gallery_for(query, k, shortlist)
        if len(queries) == 0:
            return []
        if shortlist is not None and shortlist < gallery.count:
            scores, indices = self._two_stage(query, queries, gallery, k, shortlist)
        else:
            calls = [actor.rank.remote(query, queries, k) for actor in self.actors]
            top = TopK(len(queries), k)
            for part, call in zip(self.parts, calls, strict=True):
                scores, indices = self._get(call, part)
                if scores.shape[1]:
                    top.update(scores, indices)
            scores, indices = top.result()
        return hits_of(scores, indices, gallery, self.galleries)

    def _two_stage(self, query: str, queries: Any, gallery, k: int, size: int):
        """Encode and shortlist here, a batch of the engine's size at a time; re-rank on the
        actors holding the candidates; merge."""
        kind, k = gallery.kind, min(k, gallery.live_count)
        sizes = self.local.sizes
        step = sizes.text_batch if query == "text" else sizes.image_batch
        scores = np.empty((len(queries), k), np.float32)
        indices = np.empty((len(queries), k), np.int64)
        for start in range(0, len(queries), step):
            chunk = queries[start : start + step]
            local = self.local
            encoded = local.encode_text(chunk) if query == "text" else local.encode_images(chunk)
            candidates = local.candidates(encoded, gallery, size)
            top, calls = TopK(len(chunk), k), []
            for actor, part in zip(self.actors, self.parts, strict=True):
                low, high = _item_range(gallery, part[kind])
                mine = [row[(row >= low) & (row < high)] for row in candidates]
                if any(len(row) for row in mine):
                    calls.append((part, actor.rerank.remote(kind, encoded.arrays, mine, k)))
            for part, call in calls:
                top.update(*self._get(call, part))
            scores[start : start + len(chunk)], indices[start : start + len(chunk)] = top.result()
        return scores, indices

    def _get(self, call, part: dict[str, tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        errors = self._ray.exceptions
        try:
            return self._ray.get(call, timeout=self.timeout)
        except (errors.RayActorError, errors.GetTimeoutError) as exc:
            shards = ", ".join(f"{kind} shards {a}..{b - 1}" for kind, (a, b) in part.items())
            raise UserError(f"the Ray actor of {shards} failed: {first_line(exc)}") from None
        except errors.RayTaskError as exc:  # a UserError in the actor: its own message
            cause = exc.as_instanceof_cause()
            raise UserError(str(cause).strip().splitlines()[-1]) from None

    def close(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors = []
        if self._owned:
            self.local.close()

    def __enter__(self) -> ShardedRetriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _item_range(gallery, shards: tuple[int, int]) -> tuple[int, int]:
    """The gallery indices [low, high) of the shards first:stop (empty when none)."""
    first, stop = shards
    if first >= stop:
        return 0, 0
    last = gallery.shards[stop - 1]
    return gallery.shards[first].offset, last.offset + last.count


def split_shards(galleries: dict[str, Any], actors: int) -> list[dict[str, tuple[int, int]]]:
    """Contiguous shard ranges per actor for each gallery kind, balanced by item count (an
    actor may get no shards of a kind with fewer shards than actors: an empty range)."""
    parts: list[dict[str, tuple[int, int]]] = [{} for _ in range(actors)]
    for kind, gallery in galleries.items():
        counts = np.array([shard.count for shard in gallery.shards])
        ends = np.cumsum(counts)
        cuts = (
            [0]
            + [
                int(np.searchsorted(ends, gallery.count * (a + 1) / actors, side="left")) + 1
                for a in range(actors - 1)
            ]
            + [len(counts)]
        )
        cuts = np.maximum.accumulate(np.minimum(cuts, len(counts))).tolist()
        for a in range(actors):
            parts[a][kind] = (cuts[a], cuts[a + 1])
    return parts
