import json

import pytest

from scan_deploy.config import ModelConfig
from scan_deploy.errors import UserError


def test_defaults_are_the_original_train_py():
    c = ModelConfig(vocab_size=10)
    assert (c.img_dim, c.embed_size, c.word_dim, c.num_layers) == (2048, 1024, 300, 1)
    assert (c.raw_feature_norm, c.agg_func, c.cross_attn) == ("clipped_l2norm", "LogSumExp", "t2i")
    assert (c.lambda_softmax, c.lambda_lse, c.margin, c.max_violation) == (9.0, 6.0, 0.2, False)


def test_roundtrip_through_json(tmp_path):
    c = ModelConfig(vocab_size=7, bi_gru=True, cross_attn="i2t", agg_func="Mean")
    (tmp_path / "config.json").write_text(json.dumps(c.to_dict()))
    assert ModelConfig.load(tmp_path / "config.json") == c


@pytest.mark.parametrize(
    "data,message",
    [
        ({"vocab_size": 3, "agg_func": "Median"}, "agg_func: got 'Median', expected one of"),
        ({"vocab_size": 3, "cross_attn": "both"}, "cross_attn: got 'both'"),
        ({"vocab_size": 0}, "vocab_size: got 0, expected a positive integer"),
        ({"vocab_size": 3, "bi_gru": "yes"}, "bi_gru: got 'yes', expected true or false"),
        ({"vocab_size": 3, "lambda_lse": -1}, "lambda_lse: got -1, expected a finite number > 0"),
        ({"vocab_size": 3, "margin": -0.1}, "margin: got -0.1, expected a finite number >= 0"),
        ({"vocab_size": 3, "format_version": 2}, "format_version: got 2, expected 1 to 1"),
        ({"vocab_size": 3, "format_version": "1"}, "format_version: got '1', expected 1 to 1"),
        ({"vocab_size": 3, "dropout": 0.1}, "dropout: unknown option"),
        ({"img_dim": 3}, "vocab_size: missing"),
    ],
)
def test_bad_values_name_file_and_field(tmp_path, data, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=f"config.json: {message}"):
        ModelConfig.load(path)


def test_unreadable_files(tmp_path):
    with pytest.raises(UserError, match="file not found, expected a model config JSON"):
        ModelConfig.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="bad.json: invalid JSON"):
        ModelConfig.load(tmp_path / "bad.json")


@pytest.mark.parametrize("field", ["lambda_softmax", "lambda_lse", "margin"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_are_refused(tmp_path, field, value):
    with pytest.raises(UserError, match=f"^{field}: got {value!r}, expected a finite number"):
        ModelConfig(vocab_size=3, **{field: value})
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"vocab_size": 3, field: value}))  # NaN, Infinity: Python's JSON
    with pytest.raises(UserError, match=f"config.json: {field}: got {value!r}"):
        ModelConfig.load(path)
