"""The gallery `serve` answers from, switched to each new generation a writer makes current
(`index --append`, `delete`, `compact`: `runtime.generations`) without a restart.

A watcher reads the gallery's CURRENT pointer every `interval` seconds; when it names a newer
generation, that generation is opened (its files checked as at start) beside the one serving,
on the same backend (`Retriever.on_galleries`), and made current at once. Each request and each
batch uses one snapshot from start to end (`using`): a search never mixes generations. A
replaced generation is closed when its last user is done; the one the server started on is its
opener's to close (`serve` closes it, and the backend, on exit).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from scan_deploy.runtime.generations import current_generation, open_current
from scan_deploy.runtime.retriever import Retriever

LOG = logging.getLogger(__name__)


@dataclass
class Snapshot:
    """One generation's retriever, with the image-id index the routes look ids up in."""

    generation: int
    retriever: Retriever
    image_index: dict[str, int] = field(init=False)
    users: int = 0
    retired: bool = False

    def __post_init__(self) -> None:
        images = self.retriever.galleries.get("images")
        self.image_index = {} if images is None else {i: n for n, i in enumerate(images.ids)}


class LiveGallery:
    """The current snapshot of the gallery folder `root`, first `retriever` (the caller's)."""

    def __init__(self, root: str | Path | None, retriever: Retriever, verify: bool = True):
        self.root, self.verify = None if root is None else Path(root), verify
        number = 0 if self.root is None else current_generation(self.root)[0]
        self._first = Snapshot(number, retriever)
        self._current = self._first
        self._lock = threading.Lock()

    @property
    def generation(self) -> int:
        return self._current.generation

    @contextmanager
    def using(self) -> Iterator[Snapshot]:
        """The current snapshot, kept open until the block ends."""
        with self._lock:
            snapshot = self._current
            snapshot.users += 1
        try:
            yield snapshot
        finally:
            with self._lock:
                snapshot.users -= 1
                done = snapshot.retired and snapshot.users == 0
            if done:
                self._close(snapshot)

    def refresh(self) -> bool:
        """Switch to the generation CURRENT names if it is newer; True when it switched. Runs
        in a thread: opening (and checking) a generation reads its files."""
        if current_generation(self.root)[0] <= self._current.generation:
            return False
        number, galleries = open_current(self.root, self.verify)
        snapshot = Snapshot(number, self._current.retriever.on_galleries(galleries))
        with self._lock:
            old, self._current = self._current, snapshot
            old.retired = True
            done = old.users == 0
        if done:
            self._close(old)
        LOG.info("%s: now serving generation %d", self.root, number)
        return True

    async def watch(self, interval: float) -> None:
        """`refresh` every `interval` seconds until cancelled; a generation that cannot be
        opened is logged and tried again at the next tick (the one serving stays)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.refresh)
            except Exception as exc:  # a user error or a half-removed folder: keep serving
                LOG.warning("%s: staying on generation %d (%s)", self.root, self.generation, exc)

    def close(self) -> None:
        """Close the snapshots opened here (not the first: its opener's)."""
        with self._lock:
            current, self._current = self._current, self._first
        if current is not self._first:
            self._close(current)

    def _close(self, snapshot: Snapshot) -> None:
        if snapshot is not self._first:
            snapshot.retriever.close()
