"""`serve --ray-actors 2`: the same answers as serving in one process, over a real socket, with
the searches fanned out to Ray actors (a local Ray instance the server starts and stops),
exhaustive and two-stage."""

import pytest

pytest.importorskip("ray", reason="ray (the ray extra) missing")
pytest.importorskip("fastapi")
from tests.cli_runner import run_cli  # noqa: E402
from tests.serve.server_process import post_json, running_server  # noqa: E402


def test_serve_over_ray_actors_answers_as_one_process(trained, tmp_path):
    data, _, bundle = trained
    gallery = tmp_path / "gallery"
    done = run_cli("index", bundle, "--features", data / "test_ims.npy", "--captions",
                   data / "test_caps.txt", "--out", gallery, "--shard-size", 150)  # fmt: skip
    assert done.returncode == 0, done.stderr
    queries = (data / "test_caps.txt").read_text().splitlines()[:40:7]
    body = {"queries": queries, "k": 5}
    short = {**body, "shortlist": 50}
    with running_server(gallery) as (url, _):
        expected = post_json(url + "/v1/search/text", body)
        expected_short = post_json(url + "/v1/search/text", short)
    with running_server(gallery, "--ray-actors", 2) as (url, _):
        got = post_json(url + "/v1/search/text", body)
        got_short = post_json(url + "/v1/search/text", short)
    assert got == expected and got[0] == 200
    assert got_short[0] == 200 and _ids(got_short) == _ids(expected_short)


def _ids(answer):
    return [[hit["id"] for hit in result["hits"]] for result in answer[1]["results"]]
