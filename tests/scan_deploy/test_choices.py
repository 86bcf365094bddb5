"""The named choices: members are their values, and `parse` is the one check a library makes."""

import json

import pytest

from scan_deploy.choices import Backend, Graph, Precision, Provider
from scan_deploy.errors import UserError


def test_members_are_their_values():
    assert Precision.FP16 == "fp16" and f"{Graph.SCORER}" == str(Graph.SCORER) == "scorer"
    assert json.dumps({Graph.SCORER: [Precision.INT8]}) == '{"scorer": ["int8"]}'
    assert ", ".join(Provider) == "cpu, cuda, tensorrt"
    assert tuple(Backend) == ("onnxruntime", "tensorrt", "torch")


def test_parse_takes_a_member_or_its_value():
    assert Precision.parse("fp16", "precision") is Precision.FP16
    assert Precision.parse(Precision.INT8, "precision") is Precision.INT8


@pytest.mark.parametrize(
    ("value", "among", "message"),
    [
        ("bf16", None, "precision: got 'bf16', expected one of fp32, fp16, int8"),
        (
            Precision.FP32,
            (Precision.FP16, Precision.INT8),
            "precision: got 'fp32', expected one of",
        ),
        (["fp16"], None, "precision: got ['fp16'], expected one of fp32, fp16, int8"),
        ("FP16", None, "precision: got 'FP16'"),
    ],
)
def test_parse_names_the_parameter_in_one_line(value, among, message):
    with pytest.raises(UserError) as info:
        Precision.parse(value, "precision", among=among)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_parse_names_the_file_of_a_stored_value(tmp_path):
    with pytest.raises(UserError, match=f"^{tmp_path / 'x.json'}: graph: got 'decoder'"):
        Graph.parse("decoder", "graph", tmp_path / "x.json")
