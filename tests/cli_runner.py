"""Running `python -m scan_deploy` as a user would, for the command-line tests."""

import subprocess
import sys


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scan_deploy", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )
