"""The gallery `serve` answers from, switched to each new generation a writer makes current
(`index --append`, `delete`, `compact`: `runtime.generations`) without a restart.

A watcher reads the gallery's CURRENT pointer every `interval` seconds; when it names a newer
generation, that generation is opened (its files checked as at start) beside the one serving,
on the same backend (`Retriever.on_galleries`), and made current at once. Each batch and each
explain uses one snapshot from start to end (`using`): a search never mixes generations. A
replaced generation is released when its last user is done: closed, or for the one the server
started on, its galleries released (`Retriever.close_galleries`; its backend, which the later
ones share, stays its opener's to close).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from scan_deploy.runtime.gallery import Verify
from scan_deploy.runtime.generations import current_generation, generation_of, open_current
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
        self.image_index = (
            {}
            if images is None
            else {
                i: n
                for n, (i, gone) in enumerate(zip(images.ids, images.deleted_mask, strict=True))
                if not gone
            }
        )  # live items only: an id deleted and added again names its live row


class LiveGallery:
    """The current snapshot of the gallery folder `root` (None: a retriever's galleries given
    without their folder, never switched), first `retriever` (the caller's)."""

    def __init__(self, root: str | Path | None, retriever: Retriever, verify: Verify = True):
        """`verify`: how each later generation is checked (`serve` passes the `Checked` it
        opened the first with: the files generations share are read once)."""
        self.root, self.verify = None if root is None else Path(root), verify
        number = 0 if self.root is None else generation_of(self.root, retriever.galleries)
        self._first = Snapshot(number, retriever)
        self._current = self._first
        self._lock = threading.Lock()
        self._closed = False
        self._failed: int | None = None  # a generation that could not be opened
        self._releasing: list[threading.Thread] = []

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
                self._release(snapshot)

    def refresh(self) -> bool:
        """Switch to the generation CURRENT names if it is newer; True when it switched. Runs
        in a thread: opening (and checking) a generation reads its files."""
        if self.root is None or self._closed:
            return False
        newest = current_generation(self.root)[0]
        if newest <= self._current.generation or newest == self._failed:
            return False  # a generation that failed is not read again: the next one is
        galleries: dict = {}
        try:
            number, galleries = open_current(self.root, self.verify)
            snapshot = Snapshot(number, self._current.retriever.on_galleries(galleries))
        except Exception:
            self._failed = newest
            for gallery in galleries.values():  # its lease: prune may take it
                gallery.close()
            raise
        with self._lock:
            closed = self._closed
            if not closed:
                old, self._current = self._current, snapshot
                old.retired = True
                done = old.users == 0
        if closed:  # the server stopped meanwhile
            snapshot.retriever.close()
            return False
        self._failed = None
        if done:
            self._release(old)
        LOG.info("%s: now serving generation %d", self.root, number)
        return True

    async def watch(self, interval: float) -> None:
        """`refresh` every `interval` seconds until cancelled; a generation that cannot be
        opened is logged once and skipped (the one serving stays; a newer one is tried). Cancelled
        during a refresh, it waits for it (its thread uses the backend the caller closes)."""
        while True:
            await asyncio.sleep(interval)
            refreshing = asyncio.ensure_future(asyncio.to_thread(self._refresh_logged))
            try:
                await asyncio.shield(refreshing)
            except asyncio.CancelledError:
                await asyncio.wait([refreshing])
                raise

    def _refresh_logged(self) -> None:
        try:
            self.refresh()
        except Exception as exc:  # a user error or a half-removed folder: keep serving
            LOG.warning("%s: staying on generation %d (%s)", self.root, self.generation, exc)

    def close(self) -> None:
        """Stop switching; the current snapshot is released when its last user is done (a
        batch or an explain still running in its thread), the releases are waited for."""
        with self._lock:
            self._closed = True
            current = self._current
            current.retired = True
            done = current.users == 0
        if done and current is not self._first:  # the first is its opener's to close
            self._release(current)
        with self._lock:
            releasing = list(self._releasing)
        for thread in releasing:
            thread.join()

    def _release(self, snapshot: Snapshot) -> None:
        """Close a replaced snapshot (the first: release its galleries, keep the backend) in a
        thread of its own: freeing a large FAISS index or session must not hold the caller,
        which may be the event loop."""

        def release() -> None:
            snapshot.image_index = {}
            if snapshot is self._first:
                snapshot.retriever.close_galleries()
            else:
                snapshot.retriever.close()

        thread = threading.Thread(target=release, name="release-generation")
        with self._lock:
            self._releasing = [t for t in self._releasing if t.is_alive()] + [thread]
        thread.start()
