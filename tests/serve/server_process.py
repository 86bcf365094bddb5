"""`scan-deploy serve` as a real process on a free loopback port, for tests that go through a
socket: started, waited for (bounded), and stopped with Ctrl-C (SIGINT) as a person would."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

START_SECONDS = 60


@contextmanager
def running_server(gallery: Path, *options: object):
    """Yields (base URL, the process); the process must still run when the block ends."""
    command = [sys.executable, "-m", "scan_deploy", "serve", str(gallery), "--port", "0"]
    command += [str(option) for option in options]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = _announced_url(process)
        _wait_ready(url)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def _announced_url(process: subprocess.Popen) -> str:
    """The address from serve's first lines of stderr, read by a thread so that a server that
    never prints cannot hang the test past START_SECONDS."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in process.stderr], daemon=True).start()
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            if process.poll() is not None:
                raise AssertionError(f"serve exited with {process.returncode}") from None
            continue
        found = re.search(r"on (http://127\.0\.0\.1:\d+)/", line)
        if found:
            return found.group(1)
    raise AssertionError("serve did not announce its address in time")


def _wait_ready(url: str) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    raise AssertionError(f"{url} was not ready in {START_SECONDS} s")


def post_json(url: str, body: dict, timeout: float = 30) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
