"""Atomic writes: every artifact goes to a temporary sibling path and is renamed into place.

A folder that already exists is replaced so that a kill at any instant leaves either the old or
the new artifact whole under its name:

- On Linux the finished temporary folder and the old artifact swap names in one
  `renameat2(RENAME_EXCHANGE)` call; the old one is then removed from the temporary name.
- Where the file system cannot swap (EINVAL/ENOSYS), the old artifact is renamed aside
  (`.NAME.PID.XXXX.old`), the new one renamed in, and the old one removed. A kill between the two
  renames leaves the old artifact whole under the aside name: the next write in the same folder
  renames it back first (`sweep_stale`).

A writer holds a lock (flock) on `.NAME.PID.XXXX.lock` while its `.tmp`/`.old` names exist, so
the next write in the same folder finds what killed runs left (names whose lock it can take) and
removes it, with one warning.

`SCAN_DEPLOY_KILL_AT=POINT[@NAME]` makes the process kill itself (SIGKILL) at a named point of a
replace (`replace:staged`, `replace:aside`, `replace:swapped`), for the crash tests.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import functools
import json
import logging
import os
import re
import shutil
import signal
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from scan_deploy.errors import input_error

# mkstemp/mkdtemp create private (0600/0700) paths; artifacts are meant to be shared and read.
FILE_MODE = 0o644
DIR_MODE = 0o755
KILL_AT = "SCAN_DEPLOY_KILL_AT"
KILL_ONCE = "SCAN_DEPLOY_KILL_ONCE"  # a file: kill at KILL_AT only while it does not exist
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Marker:
    """What marks a folder as an artifact of one kind: a JSON file every such artifact holds
    (`manifest.json`, `config.json`, ...) and keys its object always has."""

    file: str
    keys: tuple[str, ...]
    what: str  # "bundle", "gallery", ...

    def found_in(self, folder: Path) -> bool:
        try:
            data = json.loads((folder / self.file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and all(key in data for key in self.keys)


def check_output_dir(
    target: str | Path, force: bool, marker: Marker, inputs: Iterable[str | Path] = ()
) -> None:
    """Refuse an output folder that must not be replaced, before any work is done.

    Never the current folder or a folder above it, never a folder holding one of `inputs`, never
    a symbolic link; an existing non-empty folder only with `force`, and only when it holds the
    artifact's `marker`, so `--force` cannot delete a folder scan-deploy did not write.
    """
    target = Path(target)
    sweep_stale(target)  # an old artifact a killed run left aside counts as there
    if target.is_symlink():
        raise input_error(
            target, None, "is a symbolic link; give the folder it points to, or a new folder"
        )
    resolved = target.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise input_error(
            target, None, "is the current folder or holds it; give a new folder for the output"
        )
    for source in inputs:
        source_resolved = Path(source).resolve()
        if resolved == source_resolved or resolved in source_resolved.parents:
            raise input_error(
                target, None, f"holds the input {source}; give another folder for the output"
            )
    if target.exists() and not target.is_dir():
        raise input_error(
            target, None, f"exists and is not a folder, expected a {marker.what} folder"
        )
    if target.is_dir() and any(target.iterdir()):
        if not force:
            raise input_error(target, None, "not empty (pass --force to replace it)")
        if not marker.found_in(target):
            raise input_error(
                target,
                None,
                f"not a {marker.what} folder (no {marker.file} of one); refusing to replace a "
                "folder scan-deploy did not write",
            )


class _Lease:
    """A writer's claim on its temporary names `.NAME.PID.RAND.{tmp,old}`: the lock file
    `.NAME.PID.RAND.lock`, created and locked (flock) before any of them exists and removed
    after them. A sweeper treats names whose lock it can take as left by a killed run; process
    ids alone would not do (reused ids, containers whose every run is pid 1, shared volumes)."""

    def __init__(self, target: Path) -> None:
        fd, lock = tempfile.mkstemp(
            prefix=f".{target.name}.{os.getpid()}.", suffix=".lock", dir=target.parent
        )
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._fd = fd
        self.stem = lock.removesuffix(".lock")

    def path(self, suffix: str) -> Path:
        return Path(self.stem + suffix)

    def release(self) -> None:
        Path(self.stem + ".lock").unlink(missing_ok=True)
        os.close(self._fd)


@contextmanager
def atomic_path(target: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary file path beside `target`; rename it onto `target` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target)
    lease = _Lease(target)
    tmp_path = lease.path(suffix + ".tmp")
    try:
        tmp_path.touch(exist_ok=False)
        with _naming(target):
            yield tmp_path
            os.chmod(tmp_path, FILE_MODE)
            os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)
        lease.release()


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; it replaces `target` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target)
    lease = _Lease(target)
    tmp_path = lease.path(".tmp")
    try:
        tmp_path.mkdir()
        with _naming(target):
            yield tmp_path
            os.chmod(tmp_path, DIR_MODE)
            _kill_point("replace:staged", target)
            _replace_dir(tmp_path, target, lease.path(".old"))
    finally:
        _remove(tmp_path)
        lease.release()


@contextmanager
def _naming(target: Path) -> Iterator[None]:
    """OS errors that name no file (a full disk, a quota) name the artifact being written."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(target)) from exc
        raise


def _replace_dir(new: Path, target: Path, aside: Path) -> None:
    """Put the folder `new` under the name `target`; `target`, if any, is whole until then."""
    if not os.path.lexists(target):
        os.replace(new, target)
        return
    if _exchange(new, target):
        _kill_point("replace:swapped", target)
        _remove(new)  # now the old artifact
        return
    os.replace(target, aside)
    try:
        _kill_point("replace:aside", target)
        os.replace(new, target)
    except BaseException:  # Ctrl-C, a concurrent writer: the old artifact goes back
        os.replace(aside, target)
        raise
    _kill_point("replace:swapped", target)
    _remove(aside)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names of `a` and `b` in one step; False where the system cannot."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True) if name else None


# `.NAME.PID.RAND[.suffix].tmp`, `.NAME.PID.RAND.old`, `.NAME.PID.RAND.lock` (RAND: tempfile's 8).
_TEMP = re.compile(
    r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<rand>[a-z0-9_]{8})(?P<suffix>\..*)?\.(?P<kind>tmp|old|lock)$"
)


def sweep_stale(target: str | Path) -> None:
    """Clean up after killed writers in `target`'s folder: an old artifact left aside while its
    name is free is renamed back; temporary folders and files whose lease is free are removed."""
    folder = Path(target).parent
    if not folder.is_dir():
        return
    leases: dict[str, list[tuple[re.Match, Path]]] = {}
    for entry in folder.iterdir():
        match = _TEMP.match(entry.name)
        if match:
            stem = f".{match['name']}.{match['pid']}.{match['rand']}"
            leases.setdefault(stem, []).append((match, entry))
    removed = 0
    for stem, entries in sorted(leases.items()):
        lock = _take_stale_lease(folder / f"{stem}.lock")
        if lock is False:
            continue  # its writer is at work
        for match, entry in entries:
            artifact = folder / match["name"]
            if match["kind"] == "old" and not os.path.lexists(artifact):
                os.replace(entry, artifact)
                log.warning("%s: restored from %s, left by a killed run", artifact, entry.name)
            elif match["kind"] != "lock":
                removed += _size(entry)
                _remove(entry)
        if lock is not None:
            (folder / f"{stem}.lock").unlink(missing_ok=True)
            os.close(lock)
    if removed:
        log.warning(
            "%s: removed temporary files left by killed runs (%.2f MB)", folder, removed / 1e6
        )


def _take_stale_lease(lock: Path) -> int | None | Literal[False]:
    """The locked descriptor of a lease nobody holds, None when the lock file is gone (its
    writer finished or never locked), False when a live writer holds it."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    return fd


def _size(path: Path) -> int:
    """Bytes under `path` (not following links); what vanishes meanwhile counts as 0."""
    total = 0
    for item in [path, *(path.rglob("*") if path.is_dir() and not path.is_symlink() else ())]:
        with contextlib.suppress(FileNotFoundError):
            info = item.lstat()
            total += info.st_size if stat.S_ISREG(info.st_mode) else 0
    return total


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _kill_point(point: str, target: Path) -> None:
    """Die here (SIGKILL, as `kill -9` would) when the crash tests ask for this point; with
    KILL_ONCE (a file), only the first time (the file is created then): a process restarted
    and run again lives."""
    wanted = os.environ.get(KILL_AT)
    if wanted and wanted in (point, f"{point}@{target.name}"):
        once = os.environ.get(KILL_ONCE)
        if once:
            try:
                Path(once).touch(exist_ok=False)
            except FileExistsError:
                return
        os.kill(os.getpid(), signal.SIGKILL)


def write_json(target: str | Path, payload: Any) -> None:
    """Write `payload` as indented JSON to `target` atomically."""
    with atomic_path(target, suffix=".json") as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_text(target: str | Path, text: str) -> None:
    """Write `text` to `target` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
