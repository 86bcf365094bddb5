import stat

import pytest

from scan_deploy.atomic import atomic_dir, atomic_path, write_json


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
