"""`scan-deploy serve` over a real loopback socket: it answers as the retriever does, under
concurrent clients, and stops cleanly on Ctrl-C; a port in use is one line, exit 2."""

import signal
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
from scan_deploy.runtime.retriever import Retriever  # noqa: E402

from tests.cli_runner import run_cli  # noqa: E402
from tests.serve.server_process import post_json, running_server  # noqa: E402


@pytest.fixture(scope="module")
def gallery(trained, tmp_path_factory):
    data, _, bundle = trained
    out = tmp_path_factory.mktemp("socket") / "gallery"
    done = run_cli("index", bundle, "--features", data / "test_ims.npy", "--captions",
                   data / "test_caps.txt", "--out", out)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out, (data / "test_caps.txt").read_text().splitlines()


def test_serve_answers_over_a_socket_and_stops_on_ctrl_c(gallery):
    path, captions = gallery
    queries = captions[:24:3]
    with Retriever.open(None, path) as retriever:
        expected = [[h.id for h in hits] for hits in retriever.search_text(queries, k=3)]
    with running_server(path, "--max-wait-ms", 20) as (url, process):
        with ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(
                    lambda q: post_json(url + "/v1/search/text", {"queries": [q], "k": 3}), queries
                )
            )
        status, error = post_json(url + "/v1/search/text", {"queries": ["a"], "k": 0})
        process.send_signal(signal.SIGINT)
        assert process.wait(20) == 0
    assert [s for s, _ in answers] == [200] * len(queries)
    assert [[h["id"] for h in body["results"][0]["hits"]] for _, body in answers] == expected
    assert status == 422 and error["error"]["message"].startswith("body.k: Input should be")


def test_a_port_in_use_is_one_line(gallery):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli("serve", gallery[0], "--port", port)
    assert done.returncode == 2
    assert done.stderr.strip().startswith(f"error: --host 127.0.0.1 --port {port}: cannot listen")
