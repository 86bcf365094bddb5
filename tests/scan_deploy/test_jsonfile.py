"""JSON helpers: one-line read errors, and standard JSON for non-finite measurements."""

import json
import math

import pytest

from scan_deploy.errors import UserError
from scan_deploy.jsonfile import json_safe, read_json_object, typed


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


@pytest.mark.parametrize(
    ("value", "kinds", "message"),
    [
        ("3", int, r"^m.json: count: expected an integer, got a string$"),
        (True, int, r"^m.json: count: expected an integer, got a boolean$"),
        (None, (str, type(None)), None),
        (2.5, (int, float), None),
        ([1], dict, r"^m.json: count: expected an object, got a list$"),
        (None, (dict, list), r"^m.json: count: expected an object or a list, got null$"),
    ],
)
def test_typed_names_the_file_the_field_and_both_types(value, kinds, message):
    if message is None:
        assert typed(value, kinds, "count", "m.json") is value
        return
    with pytest.raises(UserError, match=message):
        typed(value, kinds, "count", "m.json")


def test_read_json_object_checks_the_format_version(tmp_path):
    (tmp_path / "m.json").write_text('{"format_version": 2}')
    assert read_json_object(tmp_path / "m.json", "a manifest", 2) == {"format_version": 2}
    with pytest.raises(UserError, match=r"m.json: format_version: got 2, expected 1$"):
        read_json_object(tmp_path / "m.json", "a manifest", 1)
