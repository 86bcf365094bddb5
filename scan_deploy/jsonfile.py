"""Reading the project's JSON files (configs, vocabularies, manifests) with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scan_deploy.errors import input_error


def read_json_object(path: str | Path, what: str) -> dict[str, Any]:
    """The JSON object in `path`; `what` names the expected file in the error messages."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise input_error(path, None, f"file not found, expected {what}") from None
    except OSError as exc:
        raise input_error(path, None, f"cannot read the file ({exc.strerror})") from None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise input_error(path, None, f"invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise input_error(path, None, f"expected a JSON object ({what})")
    return data
