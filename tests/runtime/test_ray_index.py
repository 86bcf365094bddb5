"""`index --ray-workers`: the shards encoded on Ray Data workers (a local Ray instance the tests
start and stop) make the gallery one process writes: the same shards, ids, texts and first
stages, values to float rounding, the same answers; a bad shard is one line and writes nothing."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="ray (the ray extra) missing")
pytest.importorskip("ray.data", reason="Ray Data (pandas, pyarrow: the ray extra) missing")
pytest.importorskip("faiss")
from scan_deploy.runtime.backends import open_backend  # noqa: E402
from scan_deploy.runtime.gallery import open_gallery  # noqa: E402
from scan_deploy.runtime.indexer import index_gallery  # noqa: E402
from scan_deploy.runtime.ray_cluster import require_ray  # noqa: E402
from scan_deploy.runtime.ray_index import RayIndexing, shard_jobs  # noqa: E402
from scan_deploy.runtime.retriever import Retriever  # noqa: E402

from scan_deploy.atomic import KILL_AT, KILL_ONCE  # noqa: E402
from scan_deploy.bundle import load_bundle  # noqa: E402
from scan_deploy.errors import UserError  # noqa: E402
from scan_deploy.precomp import load_split  # noqa: E402
from tests.cli_runner import run_cli  # noqa: E402

STAGES = {"global": None, "maxsim": None}


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _index(trained, out, dtype, ray_settings=None, features=None):
    data, _, bundle = trained
    loaded = load_bundle(bundle)
    with open_backend(loaded) as backend:
        return index_gallery(loaded, backend, features or data / "test_ims.npy",
                             data / "test_caps.txt", out, dtype=dtype, shard_size=150,
                             first_stages=STAGES, ray=ray_settings)  # fmt: skip


@pytest.fixture(scope="module", params=["fp16", "int8"])
def both(request, cluster, trained, tmp_path_factory):
    """The test split (400 images, 2000 captions) indexed in one process and on 2 workers."""
    root = tmp_path_factory.mktemp(f"ray-index-{request.param}")
    _index(trained, root / "local", request.param)
    _index(trained, root / "ray", request.param, RayIndexing(workers=2))
    return root / "local", root / "ray"


def test_shard_jobs_follow_the_shards(trained):
    from scan_deploy.runtime.indexer import IndexInputs

    data, _, _ = trained
    split = IndexInputs.read(data / "test_ims.npy", data / "test_caps.txt")
    jobs = shard_jobs(split, {"images": 150, "captions": 150})
    images = [(j["start"], j["stop"]) for j in jobs if j["kind"] == "images"]
    assert images == [(0, 150), (150, 300), (300, 400)]
    captions = [j for j in jobs if j["kind"] == "captions"]
    assert len(captions) == 14 and captions[-1]["stop"] == 2000
    assert [j["shard"] for j in captions] == list(range(14))


@pytest.mark.parametrize("kind", ["images", "captions"])
def test_the_workers_write_the_gallery_one_process_writes(both, kind):
    local, remote = (open_gallery(path / kind) for path in both)  # sha256 of every file checked
    assert remote.ids == local.ids and remote.texts == local.texts
    assert remote.manifest["bundle"] == local.manifest["bundle"]
    assert len(remote.shards) == len(local.shards) == (3 if kind == "images" else 14)
    for mine, theirs in zip(remote.manifest["shards"], local.manifest["shards"], strict=True):
        assert mine["count"] == theirs["count"] and mine["offset"] == theirs["offset"]
        assert {n: r["shape"] for n, r in mine["files"].items()} == {
            n: r["shape"] for n, r in theirs["files"].items()
        }
    tolerance = 0.02 if remote.dtype == "int8" else 1e-6  # an int8 step; a float32 ulp or two
    for name in remote.manifest["shards"][0]["files"]:
        if name == "lengths" or name.endswith("_scale"):
            continue
        got = remote.rows(name, np.arange(remote.count))
        expected = local.rows(name, np.arange(local.count))
        np.testing.assert_allclose(got, expected, atol=tolerance, err_msg=name)
    assert set(remote.first_stages) == {"global", "maxsim"}


def test_the_workers_gallery_answers_as_one_process(both, trained):
    data, _, _ = trained
    split = load_split(data, "test")
    texts, features = split.captions[::97], np.asarray(split.images[[0, 57, 399]])
    answers = []
    for gallery in both:
        with Retriever.open(None, gallery) as retriever:
            hits = retriever.search_text(texts, k=8) + retriever.search_image(features, k=8)
            hits += retriever.search_text(texts, k=8, shortlist=40)
        answers.append(hits)
    for local, remote in zip(*answers, strict=True):
        assert [h.id for h in remote] == [h.id for h in local]
        np.testing.assert_allclose([h.score for h in remote], [h.score for h in local], atol=1e-4)


def test_a_bad_shard_is_one_line_and_writes_nothing(cluster, trained, tmp_path):
    data, _, _ = trained
    features = np.asarray(load_split(data, "test").images).copy()
    features[233, 2, 5] = np.nan  # in the second shard
    np.save(tmp_path / "bad_ims.npy", features)
    (tmp_path / "bad_caps.txt").write_text((data / "test_caps.txt").read_text())
    with pytest.raises(UserError) as raised:
        _index(trained, tmp_path / "out", "fp16", RayIndexing(2), tmp_path / "bad_ims.npy")
    expected = f"{tmp_path / 'bad_ims.npy'}: features: image 233 has NaN or Inf values"
    assert str(raised.value) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad_caps.txt", "bad_ims.npy"]


def test_workers_on_a_gpu_backend_need_the_cluster_s_gpus(cluster, trained, tmp_path):
    with pytest.raises(UserError) as raised:
        _index(trained, tmp_path / "out", "fp16", RayIndexing(2, gpus=1.0))
    expected = "2 Ray Data workers need 2 GPUs (the backend runs on a GPU: one each); "
    assert str(raised.value) == expected + "the Ray cluster has 0"
    assert not (tmp_path / "out").exists()


def test_settings_are_checked(monkeypatch):
    with pytest.raises(UserError, match=r"^ray_workers: expected an integer ≥ 1, got 0$"):
        RayIndexing(0)
    monkeypatch.setitem(sys.modules, "ray.data", None)  # Ray without Ray Data's pandas, pyarrow
    with pytest.raises(UserError, match=r"^scale-out needs Ray Data \(ray.data is missing\): "):
        require_ray(data=True)


def test_a_ray_address_needs_workers(trained, tmp_path):
    data, _, bundle = trained
    done = run_cli("index", bundle, "--features", data / "test_ims.npy", "--out", tmp_path / "g",
                   "--ray-address", "auto")  # fmt: skip
    assert (
        done.returncode == 2
        and done.stderr == "error: --ray-address: applies with --ray-workers N\n"
    )


def test_the_command_line_indexes_and_appends_on_workers(trained, tmp_path):
    """`index --ray-workers 2` in a process of its own (a local Ray instance), then `--append`
    on workers: the gallery answers as one indexed at once in one process."""
    data, _, bundle = trained
    split = load_split(data, "test")
    features, captions = np.asarray(split.images), split.captions
    for name, rows in (("first", slice(0, 300)), ("rest", slice(300, 400))):
        np.save(tmp_path / f"{name}_ims.npy", features[rows])
        ids = [f"i{n}" for n in range(400)][rows]
        (tmp_path / f"{name}_ids.txt").write_text("".join(i + "\n" for i in ids))
        lines = captions[rows.start * 5 : rows.stop * 5]
        (tmp_path / f"{name}_caps.txt").write_text("".join(c + "\n" for c in lines))
    gallery = tmp_path / "gallery"
    for name, extra in (("first", ()), ("rest", ("--append",))):
        done = run_cli("index", bundle, "--features", tmp_path / f"{name}_ims.npy", "--captions",
                       tmp_path / f"{name}_caps.txt", "--out", gallery, "--shard-size", 128,
                       "--ray-workers", 2, "--json", *extra)  # fmt: skip
        assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["images"] == 400
    _index(trained, tmp_path / "whole", "fp16")
    texts = captions[::97]
    with Retriever.open(None, gallery) as grown, Retriever.open(None, tmp_path / "whole") as whole:
        got, expected = grown.search_text(texts, k=8), whole.search_text(texts, k=8)
    assert [[h.id for h in row] for row in got] == [[f"i{h.id}" for h in row] for row in expected]


def _index_killing(trained, out, env):
    data, _, bundle = trained
    command = [sys.executable, "-m", "scan_deploy", "index", str(bundle), "--features",
               str(data / "test_ims.npy"), "--captions", str(data / "test_caps.txt"), "--out",
               str(out), "--shard-size", "150", "--ray-workers", "2"]  # fmt: skip
    env = {**os.environ, KILL_AT: "ray_index:shard-written@images-000001", **env}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_a_worker_killed_mid_run_is_restarted_and_its_shard_encoded_again(trained, tmp_path):
    """kill -9 of the worker that has just written image shard 1 (once): Ray Data restarts it
    and runs the shard again; the gallery is whole and the one one process writes."""
    once = tmp_path / "killed-once"
    done = _index_killing(trained, tmp_path / "ray", {KILL_ONCE: str(once)})
    assert done.returncode == 0, done.stderr
    assert once.exists()  # the worker was killed
    _index(trained, tmp_path / "local", "fp16")
    for kind in ("images", "captions"):
        remote = open_gallery(tmp_path / "ray" / kind)  # every file's sha256 checked
        local = open_gallery(tmp_path / "local" / kind)
        assert remote.ids == local.ids and len(remote.shards) == len(local.shards)


def test_a_shard_that_always_kills_its_worker_stops_the_run(trained, tmp_path):
    done = _index_killing(trained, tmp_path / "ray", {})
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: images 150..299: the Ray worker encoding them died 4 times")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "ray").exists() and not list(tmp_path.iterdir())
