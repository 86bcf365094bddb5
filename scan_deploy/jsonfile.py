"""Reading the project's JSON files (configs, vocabularies, manifests) with one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from scan_deploy.errors import input_error


def read_json_object(
    path: str | Path, what: str, format_version: int | None = None
) -> dict[str, Any]:
    """The JSON object in `path`; `what` names the expected file in the error messages. With
    `format_version`, its `format_version` field must be that number."""
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
    if format_version is not None and data.get("format_version") != format_version:
        found = data.get("format_version")
        raise input_error(path, "format_version", f"got {found!r}, expected {format_version}")
    return data


def typed(value: Any, kinds: type | tuple[type, ...], field: str, path: str | Path) -> Any:
    """`value` when it is an instance of `kinds` (a bool is not an integer); otherwise the
    UserError `FILE: FIELD: expected an integer, got a string`."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(type_name(kind) for kind in kinds)
        raise input_error(path, field, f"expected {expected}, got {type_name(type(value))}")
    return value


def type_name(kind: type) -> str:
    """How a JSON value of Python type `kind` is named in error messages."""
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer"}
    names.update({bool: "a boolean", float: "a number", type(None): "null"})
    return names.get(kind, kind.__name__)


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float (inf, nan: "did not produce finite numbers") as None,
    so that it serializes as standard JSON rather than as `Infinity`/`NaN`."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
