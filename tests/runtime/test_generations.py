"""Galleries that change: `index --append` (a new generation equal to indexing everything at
once, first stages extended), `delete` (tombstones no search returns), readers on a snapshot,
and a writer killed (kill -9) at every step leaving the previous generation current and whole."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from scan_deploy.runtime.gallery import Checked
from scan_deploy.runtime.generations import CURRENT, current_generation, open_generation
from scan_deploy.runtime.retriever import Retriever, open_galleries

from scan_deploy.errors import UserError
from scan_deploy.precomp import load_split
from tests.cli_runner import run_cli

pytest.importorskip("faiss")
SPLIT_AT = 300


def _write_part(folder, name, features, captions, first_id):
    np.save(folder / f"{name}_ims.npy", features)
    ids = [f"i{first_id + n}" for n in range(len(features))]
    (folder / f"{name}_ids.txt").write_text("".join(i + "\n" for i in ids))
    (folder / f"{name}_caps.txt").write_text("".join(c + "\n" for c in captions))


@pytest.fixture(scope="module")
def parts(trained, tmp_path_factory):
    """(bundle, data folder): the test split whole (`all`), its first 300 images (`first`) and
    the last 100 (`rest`), ids i0..i399, 5 captions each."""
    data, _, bundle = trained
    root = tmp_path_factory.mktemp("generations")
    split = load_split(data, "test")
    features, captions = np.asarray(split.images), split.captions
    _write_part(root, "all", features, captions, 0)
    _write_part(root, "first", features[:SPLIT_AT], captions[: 5 * SPLIT_AT], 0)
    _write_part(root, "rest", features[SPLIT_AT:], captions[5 * SPLIT_AT :], SPLIT_AT)
    return bundle, root


def _index(bundle, root, name, out, *extra):
    stages = ("--first-stage", "maxsim", "--first-stage", "global")
    done = run_cli("index", bundle, "--features", root / f"{name}_ims.npy", "--captions",
                   root / f"{name}_caps.txt", "--out", out, "--dtype", "fp32", "--shard-size",
                   128, *(() if "--append" in extra else stages), *extra)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done


def _answers(gallery, texts, features, shortlist=None, first_stage=None):
    with Retriever.open(None, gallery, first_stage=first_stage) as retriever:
        by_text = retriever.search_text(texts, k=8, shortlist=shortlist)
        by_image = retriever.search_image(features, k=8, shortlist=shortlist)
    return [[(h.id, round(h.score, 5)) for h in hits] for hits in by_text + by_image]


@pytest.fixture(scope="module")
def grown(parts, tmp_path_factory):
    """The first 300 indexed, then the last 100 appended; and all 400 indexed at once."""
    bundle, root = parts
    out = tmp_path_factory.mktemp("grown")
    _index(bundle, root, "first", out / "grown")
    _index(bundle, root, "rest", out / "grown", "--append")
    _index(bundle, root, "all", out / "whole")
    return out / "grown", out / "whole"


def test_an_appended_gallery_answers_as_one_indexed_at_once(parts, grown):
    _, root = parts
    gallery, whole = grown
    assert current_generation(gallery)[0] == 1
    galleries = open_galleries(gallery)
    assert galleries["images"].count == 400 and galleries["captions"].count == 2000
    assert galleries["images"].ids[-1] == "i399"
    texts = (root / "all_caps.txt").read_text().splitlines()[::97]
    features = np.load(root / "all_ims.npy")[[3, 350]]
    assert _answers(gallery, texts, features) == _answers(whole, texts, features)
    for stage in ("maxsim", "global"):  # the first stages extended, not rebuilt: same shortlists
        options = {"shortlist": 40, "first_stage": stage}
        assert _answers(gallery, texts, features, **options) == _answers(
            whole, texts, features, **options
        )
        record = galleries["images"].first_stages[stage]
        assert record["vectors"] == (400 if stage == "global" else 400 * 8)


def test_a_later_generation_reads_only_its_new_files_again(grown, monkeypatch):
    """With one `Checked` record across generations (serve's), the files a later generation
    shares with an earlier one (hard links: the same inode) are not hashed again; its new
    files are, every one."""
    from pathlib import Path

    from scan_deploy.runtime import gallery as gallery_module

    root = grown[0]
    hashed = []
    original = gallery_module.sha256_file
    monkeypatch.setattr(
        gallery_module, "sha256_file", lambda file: hashed.append(Path(file)) or original(file)
    )
    checked = Checked()
    open_generation(root, checked)  # generation 0: every file read
    before = {path.stat().st_ino for path in hashed}
    assert len(hashed) == len(before) > 10
    hashed.clear()
    later = root / "generations" / "000001"
    open_generation(later, checked)
    stored = [p for p in later.rglob("*") if p.suffix in (".npy", ".faiss")]
    new = {p for p in stored if p.stat().st_ino not in before}
    assert set(hashed) == new and len(hashed) == len(new)
    assert len(stored) - len(new) == 3 * 3 + 12 * 4  # the shards of the first 300, linked
    hashed.clear()
    open_generation(later, checked)  # nothing new
    assert hashed == []


def test_prune_removes_the_generations_no_reader_holds(parts, grown, tmp_path):
    """Generations 0 and 1 behind the current 2: a reader opened on 1 keeps it (and answers
    from it) while 0 goes; once that reader closes, the next prune removes 1. The current
    generation answers as before, every file's sha256 checked."""
    bundle, root = parts
    gallery = tmp_path / "g"  # indexed here: a copy would not keep the hard links
    _index(bundle, root, "first", gallery)
    _index(bundle, root, "rest", gallery, "--append")
    texts = (root / "all_caps.txt").read_text().splitlines()[:20:4]
    features = np.load(root / "all_ims.npy")[[3, 250, 399]]
    unshared = sum(  # what only generation 0 holds: all but its shards (linked into 1)
        path.stat().st_size
        for kind in ("images", "captions")
        for path in (gallery / kind).rglob("*")
        if path.is_file() and path.suffix != ".npy"
    )
    reader = Retriever.open(None, gallery)  # generation 1, leased
    before = reader.search_text(texts, k=8)
    assert run_cli("delete", gallery, "i7").returncode == 0  # generation 2
    done = run_cli("prune", gallery, "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["removed"], summary["in_use"], summary["current"]) == ([0], [1], 2)
    assert summary["freed_bytes"] == unshared  # its shards live on in 1 and 2 (links)
    assert not (gallery / "images").exists() and (gallery / "generations" / "000001").is_dir()
    assert reader.search_text(texts, k=8) == before  # its files are still there
    reader.close()  # releases the lease
    again = run_cli("prune", gallery)
    assert again.returncode == 0, again.stderr
    assert "generation 2 current; removed 1 (" in again.stdout
    assert not (gallery / "generations" / "000001").exists()
    assert _intact(gallery) == 400
    expected = _answers(grown[0], texts, features)
    got = _answers(gallery, texts, features)
    assert [[hit for hit in row if hit[0] != "i7"][:7] for row in expected[:5]] == [
        [hit for hit in row if hit[0] != "i7"][:7] for row in got[:5]
    ]
    assert run_cli("prune", gallery).stdout.startswith(
        f"{gallery}: generation 2 current; removed none"
    )


def test_a_reader_that_fails_to_open_holds_no_lease(parts, tmp_path):
    import fcntl

    from tests.export.tiny_bundle import make_bundle

    bundle, root = parts
    gallery = tmp_path / "g"
    _index(bundle, root, "first", gallery)
    with pytest.raises(UserError, match="gallery built with another bundle"):
        Retriever.open(make_bundle(tmp_path / "other"), gallery)
    with open(gallery / ".readers" / "000000") as lease:  # nobody holds it
        fcntl.flock(lease, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with (
        Retriever.open(None, gallery),
        open(gallery / ".readers" / "000000") as lease,
        pytest.raises(BlockingIOError),  # an open retriever holds it
    ):
        fcntl.flock(lease, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_deleted_image_can_be_added_again(parts, tmp_path):
    """Delete i5 and i9 (with their captions), then append i5 again with other features (image
    7's) and captions: the gallery holds i5 twice, once deleted; searches find the new row,
    whose image query answers as image 7's; tombstones are positions (format 4)."""
    bundle, root = parts
    gallery = tmp_path / "g"
    _index(bundle, root, "first", gallery)
    assert run_cli("delete", gallery, "i5", "i9").returncode == 0
    features = np.load(root / "first_ims.npy")[[7]]
    captions = (root / "first_caps.txt").read_text().splitlines()[35:40]  # image 7's
    np.save(tmp_path / "again_ims.npy", features)
    (tmp_path / "again_ids.txt").write_text("i5\n")
    (tmp_path / "again_caps.txt").write_text("".join(c + "\n" for c in captions))
    done = run_cli("index", bundle, "--features", tmp_path / "again_ims.npy", "--captions",
                   tmp_path / "again_caps.txt", "--out", gallery, "--append")  # fmt: skip
    assert done.returncode == 0, done.stderr
    galleries = open_galleries(gallery)
    images = galleries["images"]
    assert images.ids.count("i5") == 2 and images.live_count == 300 - 1
    assert json.loads((images.path / "deleted.json").read_text()) == [5, 9]
    assert images.manifest["format_version"] == 4
    with Retriever.open(None, gallery) as retriever:  # the new i5 is image 7 again
        (found,) = retriever.search_text(captions[:1], k=299)  # every live image
        score = {h.id: h.score for h in found}
        assert "i9" not in score and score["i5"] == pytest.approx(score["i7"], abs=1e-5)
        assert next(h.index for h in found if h.id == "i5") == 300  # the new row
        (by_image,) = retriever.search_image(features, k=retriever.galleries["captions"].live_count)
        score = {h.id: h.score for h in by_image}
        assert [score[f"i5:{k}"] for k in range(5)] == pytest.approx(
            [score[f"i7:{k}"] for k in range(5)], abs=1e-5
        )
        assert not any(item.startswith("i9:") for item in score)
    again = run_cli("delete", gallery, "i5")  # deletes the live one
    assert again.returncode == 0, again.stderr
    assert json.loads((open_galleries(gallery)["images"].path / "deleted.json").read_text()) == [
        5,
        9,
        300,
    ]
    assert "already deleted" in run_cli("delete", gallery, "i5").stderr


def test_format_3_tombstones_by_id_are_read_and_older_formats_not_extended(parts, tmp_path):
    import hashlib

    bundle, root = parts
    gallery = tmp_path / "g"
    _index(bundle, root, "first", gallery)
    assert run_cli("delete", gallery, "i5", "i9").returncode == 0
    images = open_galleries(gallery)["images"]
    manifest = json.loads((images.path / "manifest.json").read_text())
    by_id = json.dumps(["i9", "i5"]).encode()  # as format 3 wrote them
    (images.path / "deleted.json").write_bytes(by_id)
    manifest["deleted"]["sha256"] = hashlib.sha256(by_id).hexdigest()
    (images.path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 3}))
    assert list(open_galleries(gallery)["images"].deleted) == [5, 9]
    (images.path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))
    refused = run_cli("delete", gallery, "i7")
    assert refused.returncode == 2 and refused.stderr.strip().endswith(
        "format_version: format 2, written by an older scan-deploy: re-run index"
    )


def test_deleted_items_are_never_returned(parts, grown, tmp_path):
    import shutil

    _, root = parts
    gallery = shutil.copytree(grown[0], tmp_path / "g", symlinks=True)
    done = run_cli("delete", gallery, "i3", "i350", "i10:2", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["deleted"] == {"images": 2, "captions": 11}
    for kind in ("images", "captions"):  # nothing added: the first-stage indexes are shared
        for name in ("global.faiss", "maxsim.faiss"):
            before = gallery / "generations" / "000001" / kind / name
            after = gallery / "generations" / "000002" / kind / name
            assert before.stat().st_ino == after.stat().st_ino
    texts = (root / "all_caps.txt").read_text().splitlines()[15:20]  # image i3's captions
    features = np.load(root / "all_ims.npy")[[10, 3]]
    gone = {"i3", "i350", "i10:2", *(f"i3:{k}" for k in range(5)), *(f"i350:{k}" for k in range(5))}
    with Retriever.open(None, grown[1]) as whole, Retriever.open(None, gallery) as retriever:
        for options in ({}, {"shortlist": 40}):
            got = retriever.search_text(texts, k=10, **options) + retriever.search_image(
                features, k=10, **options
            )
            expected = whole.search_text(texts, k=30) + whole.search_image(features, k=30)
            for hits, full in zip(got, expected, strict=True):
                assert not {h.id for h in hits} & gone
                if not options:  # exhaustive: the whole gallery's ranking without them
                    assert [h.id for h in hits] == [h.id for h in full if h.id not in gone][:10]
        assert retriever.galleries["images"].live_count == 398
        with pytest.raises(Exception, match=r"k: expected 1\.\.398"):
            retriever.search_text(texts, k=399)
    again = run_cli("delete", gallery, "i3")
    assert again.returncode == 2
    assert again.stderr.strip().endswith("delete: id 'i3': already deleted")
    unknown = run_cli("delete", gallery, "nope")
    assert unknown.returncode == 2 and "id 'nope': not in the gallery" in unknown.stderr
    assert current_generation(gallery)[0] == 2  # the refusals changed nothing


def test_compaction_drops_the_deleted_and_answers_the_same(parts, grown, tmp_path):
    import shutil

    _, root = parts
    gallery = shutil.copytree(grown[0], tmp_path / "g", symlinks=True)
    assert run_cli("delete", gallery, "i3", "i350", "i10:2").returncode == 0
    texts = (root / "all_caps.txt").read_text().splitlines()[::97]
    features = np.load(root / "all_ims.npy")[[10, 351]]
    with Retriever.open(None, gallery) as deleted:
        before = deleted.search_text(texts, k=8) + deleted.search_image(features, k=8)
    done = run_cli("compact", gallery, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["kept"] == {"images": 398, "captions": 1989}
    galleries = open_galleries(gallery, verify=True)
    assert galleries["images"].count == 398 and len(galleries["images"].deleted) == 0
    assert "i3" not in galleries["images"].ids
    assert galleries["images"].first_stages["maxsim"]["vectors"] == 398 * 8  # rebuilt
    with Retriever.open(None, gallery) as compacted:
        after = compacted.search_text(texts, k=8) + compacted.search_image(features, k=8)
        shortlisted = compacted.search_text(texts, k=8, shortlist=40)
    for old, new in zip(before, after, strict=True):  # the same items (positions renumbered)
        assert [h.id for h in new] == [h.id for h in old]
        np.testing.assert_allclose([h.score for h in new], [h.score for h in old], atol=1e-5)
    assert all(len(hits) == 8 for hits in shortlisted)
    again = run_cli("compact", gallery)
    assert again.returncode == 2 and "no deleted items: nothing to compact" in again.stderr


def test_a_reader_keeps_its_snapshot_while_a_writer_appends(parts, tmp_path):
    bundle, root = parts
    gallery = tmp_path / "g"
    _index(bundle, root, "first", gallery)
    text = (root / "all_caps.txt").read_text().splitlines()[0]
    with Retriever.open(None, gallery) as before:
        first = before.search_text([text], k=5)
        _index(bundle, root, "rest", gallery, "--append")
        assert before.galleries["images"].count == 300
        assert before.search_text([text], k=5) == first  # the old generation, still whole
    with Retriever.open(None, gallery) as after:
        assert after.galleries["images"].count == 400


def _append_process(bundle, root, gallery, kill_at=None):
    env = {**os.environ}
    if kill_at:
        env["SCAN_DEPLOY_KILL_AT"] = kill_at
    command = [sys.executable, "-m", "scan_deploy", "index", str(bundle), "--features",
               str(root / "rest_ims.npy"), "--captions", str(root / "rest_caps.txt"), "--out",
               str(gallery), "--append"]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _intact(gallery) -> int:
    """The current generation opens with every file's sha256 checked; its image count."""
    return open_galleries(gallery, verify=True)["images"].count


@pytest.mark.parametrize(
    "kill_at", ["replace:staged", "generation:written", "generation:switched", 0.5, 1.0, 2.0]
)
def test_a_writer_killed_anywhere_leaves_a_whole_generation(parts, tmp_path, kill_at):
    """Killed at a named step (SCAN_DEPLOY_KILL_AT) or after a delay (SIGKILL from here): the
    gallery opens whole, as before or as after; an append run again completes it."""
    bundle, root = parts
    gallery = tmp_path / "g"
    _index(bundle, root, "first", gallery)
    if isinstance(kill_at, str):
        process = _append_process(bundle, root, gallery, kill_at)
        process.wait(120)
    else:
        process = _append_process(bundle, root, gallery)
        time.sleep(kill_at)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    count = _intact(gallery)
    assert count in (300, 400)
    if count == 300:
        finished = _append_process(bundle, root, gallery)
        assert finished.wait(120) == 0, finished.stderr.read().decode()
    assert _intact(gallery) == 400
    leftovers = [p.name for p in (gallery / "generations").iterdir() if not p.name.isdigit()]
    assert leftovers == [] and (gallery / CURRENT).is_file()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("dim", "img_dim: the model expects 32 features per region"),
        ("regions", "shape: has 6 regions per image, the bundle takes 8"),
        ("duplicate", "ids: image 'i0' is already in the gallery (ids must stay unique)"),
        ("no-captions", "captions: has captions: append them too (--captions)"),
        ("bundle", "bundle.embed_size: gallery built with another bundle (embed_size 32"),
    ],
)
def test_bad_appends_are_one_line_and_change_nothing(parts, tmp_path, setup, message):
    bundle, root = parts
    gallery = tmp_path / "g"
    _index(bundle, root, "first", gallery)
    features = np.load(root / "rest_ims.npy")[:10]
    captions = (root / "rest_caps.txt").read_text().splitlines()[:50]
    first_id = 0 if setup == "duplicate" else 1000
    if setup == "dim":
        features = features[..., :20]
    if setup == "regions":
        features = features[:, :6]
    _write_part(tmp_path, "bad", np.ascontiguousarray(features), captions, first_id)
    extra = () if setup == "no-captions" else ("--captions", tmp_path / "bad_caps.txt")
    appended_with = bundle
    if setup == "bundle":
        from tests.export.tiny_bundle import make_bundle

        appended_with = make_bundle(tmp_path / "other")
    done = run_cli("index", appended_with, "--features",
                   tmp_path / "bad_ims.npy", *extra, "--out", gallery, "--append")  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert current_generation(gallery)[0] == 0 and _intact(gallery) == 300
