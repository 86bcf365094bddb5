"""Atomic writes: every artifact goes to a temporary sibling path and is renamed into place.

A folder that already exists is replaced so that a kill at any instant leaves either the old or
the new artifact whole under its name:

- On Linux the finished temporary folder and the old artifact swap names in one
  `renameat2(RENAME_EXCHANGE)` call; the old one is then removed from the temporary name.
- Where the file system cannot swap (EINVAL/ENOSYS), the old artifact is renamed aside
  (`.NAME.PID.XXXX.old`), the new one renamed in, and the old one removed. A kill between the two
  renames leaves the old artifact whole under the aside name: the next write to the same target
  renames it back first (`sweep_stale`).

Temporary names carry the writer's process id, so the next run finds what killed runs left
(`.NAME.PID.XXXX.tmp` whose process is gone) and removes it, with one warning.

`SCAN_DEPLOY_KILL_AT=POINT[@NAME]` makes the process kill itself (SIGKILL) at a named point of a
replace (`replace:staged`, `replace:aside`, `replace:swapped`), for the crash tests.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import json
import logging
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from scan_deploy.errors import input_error

# mkstemp/mkdtemp create private (0600/0700) paths; artifacts are meant to be shared and read.
FILE_MODE = 0o644
DIR_MODE = 0o755
KILL_AT = "SCAN_DEPLOY_KILL_AT"
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100

log = logging.getLogger(__name__)


def check_output_dir(
    target: str | Path, force: bool, marker: str, what: str, inputs: Iterable[str | Path] = ()
) -> None:
    """Refuse an output folder that must not be replaced, before any work is done.

    Never the current folder or a folder above it, never a folder holding one of `inputs`; an
    existing non-empty folder only with `force`, and only when it holds `marker` (the file that
    every artifact of this kind has), so `--force` cannot delete a folder scan-deploy did not
    write.
    """
    target = Path(target)
    sweep_stale(target)  # an old artifact a killed run left aside counts as there
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
        raise input_error(target, None, f"exists and is not a folder, expected a {what} folder")
    if target.is_dir() and any(target.iterdir()):
        if not force:
            raise input_error(target, None, "not empty (pass --force to replace it)")
        if not (target / marker).exists():
            raise input_error(
                target,
                None,
                f"not a {what} folder (no {marker}); refusing to replace a folder "
                "scan-deploy did not write",
            )


@contextmanager
def atomic_path(target: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary file path beside `target`; rename it onto `target` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target)
    fd, tmp = tempfile.mkstemp(
        prefix=_temp_prefix(target), suffix=suffix + ".tmp", dir=target.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with _naming(target):
            yield tmp_path
            os.chmod(tmp_path, FILE_MODE)
            os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; it replaces `target` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target)
    tmp_path = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent))
    try:
        with _naming(target):
            yield tmp_path
            os.chmod(tmp_path, DIR_MODE)
            _kill_point("replace:staged", target)
            _replace_dir(tmp_path, target)
    finally:
        if tmp_path.exists():
            shutil.rmtree(tmp_path)


@contextmanager
def _naming(target: Path) -> Iterator[None]:
    """OS errors that name no file (a full disk, a quota) name the artifact being written."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(target)) from exc
        raise


def _replace_dir(new: Path, target: Path) -> None:
    """Put the folder `new` under the name `target`; `target`, if any, is whole until then."""
    if not target.exists():
        os.replace(new, target)
        return
    if _exchange(new, target):
        _kill_point("replace:swapped", target)
        shutil.rmtree(new)  # now the old artifact
        return
    aside = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".old", dir=target.parent))
    os.replace(target, aside)  # onto the empty folder mkdtemp made: a free, unique name
    _kill_point("replace:aside", target)
    os.replace(new, target)
    _kill_point("replace:swapped", target)
    shutil.rmtree(aside)


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


def sweep_stale(target: str | Path) -> None:
    """Clean up after killed writers of `target`: an old artifact left aside while `target` is
    missing is renamed back; temporary folders and files of dead processes are removed."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.[A-Za-z0-9_]{{8}}(\.[^/]*)?$")
    removed = 0
    for entry in sorted(target.parent.iterdir()):
        match = pattern.match(entry.name)
        if not match or _alive(int(match.group(1))):
            continue
        if entry.name.endswith(".old") and not target.exists():
            os.replace(entry, target)
            log.warning("%s: restored from %s, left by a killed run", target, entry.name)
        elif entry.name.endswith((".old", ".tmp")):
            removed += _size(entry)
            _remove(entry)
    if removed:
        log.warning(
            "%s: removed temporary files left by killed runs (%.2f MB)", target, removed / 1e6
        )


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}."


def _kill_point(point: str, target: Path) -> None:
    """Die here (SIGKILL, as `kill -9` would) when the crash tests ask for this point."""
    wanted = os.environ.get(KILL_AT)
    if wanted and wanted in (point, f"{point}@{target.name}"):
        os.kill(os.getpid(), signal.SIGKILL)


def write_json(target: str | Path, payload: Any) -> None:
    """Write `payload` as indented JSON to `target` atomically."""
    with atomic_path(target, suffix=".json") as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_text(target: str | Path, text: str) -> None:
    """Write `text` to `target` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
