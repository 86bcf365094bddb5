"""JSON helpers: one-line read errors, and standard JSON for non-finite measurements."""

import json
import math

import pytest

from scan_deploy.errors import UserError
from scan_deploy.jsonfile import json_safe, read_json_object


def test_non_finite_floats_become_null():
    value = {"a": math.inf, "b": [1.5, -math.inf, {"c": math.nan}], "d": (2, "x"), "e": None}
    safe = json_safe(value)
    assert safe == {"a": None, "b": [1.5, None, {"c": None}], "d": [2, "x"], "e": None}
    assert json.loads(json.dumps(safe, allow_nan=False)) == safe


def test_read_json_object_errors(tmp_path):
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(UserError, match="expected a JSON object"):
        read_json_object(tmp_path / "list.json", "a manifest")
    with pytest.raises(UserError, match="file not found"):
        read_json_object(tmp_path / "missing.json", "a manifest")
