"""Indexing in one process vs on Ray Data workers (`index --ray-workers`), side by side in one
run: wall time of the whole command (Ray's start included), images and captions per second, the
ratio, and that both galleries hold the same ids and shards.

    python benchmarks/bench_ray_index.py runs/demo/bundle --features runs/demo/data/train_ims.npy \\
        --captions runs/demo/data/train_caps.txt --workers 2 --threads 1

The one-process run uses every core (ONNX Runtime's default threads); each worker uses
--threads threads. On one machine the workers compete for the same cores: the gain needs more
cores than one process can use, or more nodes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def index(bundle: str, args: argparse.Namespace, out: Path, *extra: str) -> float:
    command = [sys.executable, "-m", "scan_deploy", "index", bundle, "--features", args.features,
               "--captions", args.captions, "--out", str(out), "--shard-size",
               str(args.shard_size), "--json", *extra]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed: {done.stderr.strip().splitlines()[-1]}")
    return seconds


def shards(gallery: Path) -> list:
    found = []
    for kind in ("images", "captions"):
        manifest = json.loads((gallery / kind / "manifest.json").read_text())
        ids = json.loads((gallery / kind / "ids.json").read_text())
        found.append((kind, ids, [(s["count"], s["offset"]) for s in manifest["shards"]]))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--features", required=True)
    parser.add_argument("--captions", required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shard-size", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        local = index(args.bundle, args, Path(folder) / "local")
        ray_args = ("--ray-workers", str(args.workers), "--threads", str(args.threads))
        on_ray = index(args.bundle, args, Path(folder) / "ray", *ray_args)
        same = shards(Path(folder) / "local") == shards(Path(folder) / "ray")
        counts = {kind: len(ids) for kind, ids, _ in shards(Path(folder) / "local")}
    print(f"{counts['images']} images, {counts['captions']} captions, shards of {args.shard_size}")
    print(f"{'run':<34} {'seconds':>8} {'images/s':>9} {'captions/s':>11}")
    for name, seconds in (("one process", local), (f"{args.workers} Ray Data workers × "
                          f"{args.threads} threads", on_ray)):  # fmt: skip
        rates = counts["images"] / seconds, counts["captions"] / seconds
        print(f"{name:<34} {seconds:>8.1f} {rates[0]:>9.0f} {rates[1]:>11.0f}")
    print(f"Ray / one process (time): {on_ray / local:.2f}; same ids and shards: {same}")


if __name__ == "__main__":
    main()
