"""One-line user errors: `FILE: FIELD: message`, parts left out when unknown."""

import pytest

from scan_deploy.errors import UserError, input_error, one_of


def test_input_error_joins_the_known_parts():
    assert str(input_error("a.json", "dtype", "bad")) == "a.json: dtype: bad"
    assert str(input_error(None, "--k", "bad")) == "--k: bad"
    assert str(input_error("a.json", None, "bad")) == "a.json: bad"
    assert input_error(None, None, "x").exit_code == 2


def test_one_of_returns_an_allowed_value_and_names_the_choices():
    assert one_of("fp16", ("fp32", "fp16"), "dtype") == "fp16"
    assert one_of("cpu", {"cpu": 1, "cuda": 2}, "provider") == "cpu"  # keys of a mapping
    with pytest.raises(UserError, match=r"^m.json: dtype: got 'bf16', expected one of fp32, fp16$"):
        one_of("bf16", ("fp32", "fp16"), "dtype", "m.json")
    with pytest.raises(UserError, match=r"^kind: got None, expected one of images$"):
        one_of(None, ["images"], "kind")
