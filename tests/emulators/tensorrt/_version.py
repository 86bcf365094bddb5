"""Which TensorRT the emulator is: SCAN_DEPLOY_EMULATED_TENSORRT = 10.3 (JetPack 6), 10.16 or 11.1,
read once at import (default 10.3)."""

from __future__ import annotations

import os

VERSION_ENV = "SCAN_DEPLOY_EMULATED_TENSORRT"
VERSIONS = {"10.3": "10.3.0", "10.16": "10.16.0", "11.1": "11.1.0"}

_key = os.environ.get(VERSION_ENV, "10.3")
if _key not in VERSIONS:
    raise ImportError(f"{VERSION_ENV}={_key!r}: expected one of {', '.join(VERSIONS)}")
VERSION = VERSIONS[_key]
MAJOR, MINOR = (int(part) for part in _key.split("."))


def at_least(major: int, minor: int) -> bool:
    return (major, minor) <= (MAJOR, MINOR)
