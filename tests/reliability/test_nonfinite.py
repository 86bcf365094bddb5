"""Non-finite values and out-of-range options through the command line: each is refused with one
line on stderr and exit code 2, before anything is written (today's code trained a NaN model to
rsum 600 and saved it, wrote NaN features, or showed a traceback)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scan_deploy.checkpoint import save_checkpoint
from scan_deploy.config import ModelConfig
from scan_deploy.model import SCAN
from scan_deploy.precomp import find_vocab
from scan_deploy.synth import write_synthetic
from scan_deploy.vocab import Vocabulary
from tests.cli_runner import run_cli

IMG_DIM = 8


def one_line_error(result, fragment: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nonfinite") / "data"
    write_synthetic(out, train=40, dev=4, test=4, img_dim=IMG_DIM, regions=6, seed=0)
    return out


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--lambda-softmax", "nan", "lambda_softmax: got nan, expected a finite number > 0"),
        ("--lr", "nan", "--lr: got nan, expected a finite number > 0"),
        ("--lr", "-1", "--lr: got -1.0, expected a finite number > 0"),
        ("--device", "tpu", "--device: got 'tpu', expected cpu, cuda or cuda:N"),
        ("--val-images", "0", "--val-images: got 0, expected an integer >= 1"),
    ],
)
def test_train_refuses_bad_numbers(data, tmp_path, option, value, message):
    run = tmp_path / "run"
    result = run_cli(
        "train",
        "--data",
        data,
        "--out",
        run,
        "--embed-size",
        16,
        "--word-dim",
        8,
        "--epochs",
        1,
        "--batch-size",
        50,
        option,
        value,
    )
    one_line_error(result, message)
    assert not run.exists()  # no model_best, no last


def test_evaluate_refuses_a_checkpoint_with_a_nan_bias(data, tmp_path):
    vocab = Vocabulary.load(find_vocab(data))
    config = ModelConfig(vocab_size=len(vocab), img_dim=IMG_DIM, embed_size=16, word_dim=8)
    torch.manual_seed(0)
    model = SCAN(config)
    with torch.no_grad():
        model.img_enc.fc.bias[3] = float("nan")
    save_checkpoint(tmp_path / "ckpt", model, vocab)
    result = run_cli("evaluate", tmp_path / "ckpt", "--data", data)
    one_line_error(result, "model.safetensors: img_enc.fc.bias: 1 of 16 values are NaN or infinite")
    assert result.stdout == ""  # no recall table


def test_data_synth_refuses_nan_noise(tmp_path):
    out = tmp_path / "data"
    result = run_cli(
        "data", "synth", "--out", out, "--train", 2, "--dev", 1, "--test", 1, "--noise", "nan"
    )
    one_line_error(result, "noise: got nan, expected a finite number >= 0")
    assert list(tmp_path.iterdir()) == []


def test_data_synth_refuses_a_noise_that_overflows(tmp_path):
    """1e300 is finite, but its float32 noise is not: NaN features were written."""
    out = tmp_path / "data"
    result = run_cli(
        "data", "synth", "--out", out, "--train", 2, "--dev", 1, "--test", 1, "--noise", "1e300"
    )
    one_line_error(result, "noise: got 1e+300, expected at most 100")
    assert list(tmp_path.iterdir()) == []
