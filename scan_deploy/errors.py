"""User-facing errors: one line, naming the file, the field and what was expected."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any


class UserError(Exception):
    """A mistake in the user's input. The CLI prints it on one line and exits with code 2."""

    exit_code = 2


def input_error(path: str | Path | None, field: str | None, message: str) -> UserError:
    """Build the one-line message `FILE: FIELD: MESSAGE` (parts that are None are left out)."""
    parts = [str(p) for p in (path, field) if p is not None]
    return UserError(": ".join([*parts, message]))


def one_of(value: Any, allowed: Iterable[str], field: str, path: str | Path | None = None) -> Any:
    """`value` when it is one of `allowed`; otherwise the UserError `FILE: FIELD: got 'x',
    expected one of a, b, c`."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise input_error(path, field, f"got {value!r}, expected one of {', '.join(allowed)}")
    return value
