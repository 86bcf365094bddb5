import errno
import logging
import re
import stat
from pathlib import Path

import pytest

from scan_deploy import atomic
from scan_deploy.atomic import (
    Marker,
    atomic_dir,
    atomic_path,
    check_output_dir,
    sweep_stale,
    write_json,
)
from scan_deploy.errors import UserError


def test_atomic_path_renames_on_success_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "bundle"
    with atomic_dir(target) as tmp:
        write_json(tmp / "a.json", {"x": 1})
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "b.json").write_text("{}")
        raise RuntimeError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["a.json"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_replace_leaves_only_the_new_folder(tmp_path, monkeypatch, exchange):
    if not exchange:  # a file system that cannot swap names
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "bundle"
    with atomic_dir(target) as tmp:
        (tmp / "old").write_text("1")
    with atomic_dir(target) as tmp:
        (tmp / "new").write_text("2")
    assert _names(target) == ["new"]
    assert _names(tmp_path) == ["bundle"]


def test_sweep_restores_an_old_folder_left_aside_and_removes_dead_temps(tmp_path, caplog):
    # Left by killed runs: no lock file, or one nobody holds (pid 1: ids say nothing here).
    aside = tmp_path / ".gallery.1.abcd1234.old"
    aside.mkdir()
    (aside / "manifest.json").write_text("{}")
    (tmp_path / ".gallery.1.abcd1234.lock").write_text("")
    stale = tmp_path / ".gallery.1.efgh5678.tmp"
    stale.mkdir()
    (stale / "shard.npy").write_bytes(b"x" * 1000)
    (tmp_path / ".gallery.1.ijkl9012.json.tmp").write_text("{")
    (tmp_path / ".bundle.7.qrst7890.tmp").mkdir()  # another target's, in the same folder
    live = atomic._Lease(tmp_path / "gallery")  # a writer at work: its names are kept
    live.path(".tmp").mkdir()
    try:
        with caplog.at_level(logging.WARNING, logger="scan_deploy"):
            sweep_stale(tmp_path / "gallery")
        assert _names(tmp_path) == sorted(
            ["gallery", live.path(".tmp").name, live.path(".lock").name]
        )
    finally:
        live.release()
    assert _names(tmp_path / "gallery") == ["manifest.json"]
    assert "restored" in caplog.text and "removed temporary files" in caplog.text


def test_sweep_removes_an_old_folder_once_the_new_one_is_in(tmp_path):
    (tmp_path / "gallery").mkdir()
    (tmp_path / "gallery" / "new").write_text("2")
    (tmp_path / ".gallery.42.abcd1234.old").mkdir()
    sweep_stale(tmp_path / "gallery")
    assert _names(tmp_path) == ["gallery"]
    assert _names(tmp_path / "gallery") == ["new"]


def test_an_error_between_the_two_renames_puts_the_old_folder_back(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "bundle"
    with atomic_dir(target) as tmp:
        (tmp / "old").write_text("1")

    def interrupted(point, name):
        if point == "replace:aside":
            raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "_kill_point", interrupted)
    with pytest.raises(KeyboardInterrupt), atomic_dir(target) as tmp:
        (tmp / "new").write_text("2")
    assert _names(tmp_path) == ["bundle"]
    assert _names(target) == ["old"]


def test_errors_that_name_no_file_name_the_artifact(tmp_path):
    with pytest.raises(OSError) as raised, atomic_dir(tmp_path / "gallery"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert raised.value.filename == str(tmp_path / "gallery")
    assert _names(tmp_path) == []


BUNDLE = Marker("manifest.json", ("format_version", "graphs"), "bundle")


@pytest.mark.parametrize(
    ("make", "force", "message"),
    [
        (lambda t: None, True, "is the current folder"),
        (lambda t: (t / "x").write_text("1"), False, "not empty (pass --force"),
        (lambda t: (t / "x").write_text("1"), True, "not a bundle folder (no manifest.json of"),
        # Another program's manifest.json, or another kind of artifact: not a bundle.
        (lambda t: (t / "manifest.json").write_text("{}"), True, "not a bundle folder"),
        (
            lambda t: (t / "manifest.json").write_text('{"format_version": 1, "kind": "images"}'),
            True,
            "not a bundle folder",
        ),  # fmt: skip
        (lambda t: (t / "manifest.json").write_text("{"), True, "not a bundle folder"),
        (lambda t: t.rmdir() or t.write_text("1"), True, "exists and is not a folder"),
        (lambda t: t.rmdir() or t.symlink_to(t.parent / "real"), True, "is a symbolic link"),
    ],
)
def test_check_output_dir_refuses(tmp_path, monkeypatch, make, force, message):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "manifest.json").write_text('{"format_version": 1, "graphs": {}}')
    target = tmp_path / "out"
    target.mkdir()
    make(target)
    if message == "is the current folder":
        monkeypatch.chdir(target / "..")
        target = Path(".")
    with pytest.raises(UserError, match=re.escape(message)):
        check_output_dir(target, force, BUNDLE)
    assert (tmp_path / "real" / "manifest.json").is_file()


def test_check_output_dir_refuses_a_folder_holding_an_input(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(UserError, match="holds the input"):
        check_output_dir(tmp_path, True, BUNDLE, [tmp_path / "data" / "f.npy"])
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "manifest.json").write_text('{"format_version": 1, "graphs": {}}')
    check_output_dir(tmp_path / "bundle", True, BUNDLE, [tmp_path / "data"])
