"""Load benchmark of `scan-deploy serve` (loopback only, bounded in time): N concurrent clients
send text queries for a fixed time; p50 / p99 latency, throughput, errors and the server's
resident memory over the run, with dynamic batching (the default) and without (--max-batch 1),
side by side in one run.

    python benchmarks/bench_serve.py runs/demo/gallery --clients 8 --seconds 20 [--ray-actors 2]

With --ray-actors, a third run serves the gallery sharded over that many Ray actors (the ray
extra; a local Ray instance), after checking its answers equal the one-process server's. With
--ray-serve N, another serves the same search on Ray Serve instead (`ray_serve_app.py`, N
replicas, each a whole retriever with --threads threads; needs `pip install 'ray[serve]'`);
its resident memory is not measured (replicas are Ray's processes).

Clients are threads of this process on the same 2-core machine as the server: the numbers are
what one machine serves itself, not a network service's.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' server launcher
from tests.serve.server_process import post_json, running_server  # noqa: E402


def resident_mib(pid: int | None) -> float:
    if pid is None:  # not measured: 0
        return 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load(url: str, queries: list[str], clients: int, seconds: float, k: int, pid: int) -> dict:
    latencies: list[float] = []
    errors: list[int] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    memory = [resident_mib(pid)]

    def client(offset: int) -> None:
        n = offset
        while time.monotonic() < deadline:
            start = time.perf_counter()
            status, _ = post_json(
                url + "/v1/search/text", {"queries": [queries[n % len(queries)]], "k": k}
            )
            took = time.perf_counter() - start
            with lock:
                (latencies if status == 200 else errors).append(took if status == 200 else status)
            n += clients

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        time.sleep(min(1.0, seconds / 10))
        memory.append(resident_mib(pid))
    for thread in threads:
        thread.join()
    ordered = sorted(latencies)
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "throughput_rps": len(latencies) / seconds,
        "p50_ms": 1e3 * statistics.median(ordered),
        "p99_ms": 1e3 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "rss_mib_first_last_max": None
        if pid is None
        else [round(memory[0]), round(memory[-1]), round(max(memory))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gallery", type=Path)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--queries", type=int, default=200, help="distinct texts, cycled")
    parser.add_argument("--ray-actors", type=int, default=0)
    parser.add_argument("--ray-serve", type=int, default=0, help="Ray Serve replicas")
    parser.add_argument("--threads", type=int, default=0, help="per Ray Serve replica")
    args = parser.parse_args()
    texts = json.loads((args.gallery / "images" / "texts.json").read_text())
    queries = texts[: args.queries]
    runs = [("batched", []), ("unbatched", ["--max-batch", 1])]
    if args.ray_actors:
        runs.append((f"ray {args.ray_actors} actors", ["--ray-actors", args.ray_actors]))
    report, answers = {}, {}
    check = {"queries": queries[:20], "k": args.k}
    for name, options in runs:
        with running_server(args.gallery, *options) as (url, process):
            answers[name] = post_json(url + "/v1/search/text", check)  # also the warm-up
            report[name] = load(url, queries, args.clients, args.seconds, args.k, process.pid)
        same = answers[name] == answers["batched"]
        print(name, json.dumps(report[name]), f"answers as batched: {same}", flush=True)
    if args.ray_serve:
        name = f"ray serve {args.ray_serve} replicas"
        report[name] = ray_serve_run(args, queries, check, answers)
    ratio = report["batched"]["throughput_rps"] / report["unbatched"]["throughput_rps"]
    print(f"throughput batched / unbatched: {ratio:.2f}×")
    for name in report:
        if name.startswith("ray"):
            ratio = report[name]["throughput_rps"] / report["batched"]["throughput_rps"]
            print(f"throughput {name} / batched: {ratio:.2f}×")


def ray_serve_run(args, queries: list[str], check: dict, answers: dict) -> dict:
    import ray
    import ray_serve_app
    from ray import serve

    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        url = ray_serve_app.start(args.gallery, args.ray_serve, args.threads, port)
        got = post_json(url + "/v1/search/text", check)  # also the warm-up
        report = load(url, queries, args.clients, args.seconds, args.k, None)
        same = _hits(got) == _hits(answers["batched"])
        name = f"ray serve {args.ray_serve} replicas"
        print(name, json.dumps(report), f"answers as batched: {same}", flush=True)
        return report
    finally:
        serve.shutdown()
        ray.shutdown()


def _hits(answer: tuple[int, dict]) -> list:
    return [[(h["id"], h["score"]) for h in r["hits"]] for r in answer[1]["results"]]


if __name__ == "__main__":
    main()
