import json
import math
import shutil

import numpy as np
import pytest
import torch

from scan_deploy.checkpoint import load_checkpoint
from scan_deploy.config import ModelConfig
from scan_deploy.errors import UserError
from scan_deploy.precomp import find_vocab, load_split, write_split
from scan_deploy.synth import write_synthetic
from scan_deploy.train import LAST, TRAIN_STATE, Trainer, TrainOptions, contrastive_loss
from scan_deploy.vocab import Vocabulary


def test_contrastive_loss_sum_and_hardest_negative():
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.3, 0.5, 0.6], [0.2, 0.1, 0.7]])
    # caption costs (rows): [0, 0.1, 0], [0, 0, 0.3], [0, 0, 0]; image costs (columns):
    # col0 [_, 0, 0], col1 [0.5, _, 0], col2 [0, 0.1, _]
    assert contrastive_loss(scores, 0.2, max_violation=False).item() == pytest.approx(1.0)
    assert contrastive_loss(scores, 0.2, max_violation=True).item() == pytest.approx(1.0)
    scores[0, 2] = 0.85  # a second violation in row 0: sum grows, hardest takes only the max
    assert contrastive_loss(scores, 0.2, False).item() == pytest.approx(1.0 + 0.15 + 0.35)
    assert contrastive_loss(scores, 0.2, True).item() == pytest.approx(0.15 + 0.3 + 0.5 + 0.35)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    write_synthetic(out, train=60, dev=20, test=20, img_dim=16, regions=6, seed=0)
    return out


def _trainer(data, run_dir, epochs, **options):
    vocab = Vocabulary.load(find_vocab(data))
    config = ModelConfig(
        vocab_size=len(vocab), img_dim=16, embed_size=8, word_dim=6, max_violation=True
    )
    defaults = dict(batch_size=32, lr=2e-3, lr_update=2, warmup_epochs=1, val_images=20)
    options = TrainOptions(epochs=epochs, **{**defaults, **options})
    return Trainer(
        run_dir, load_split(data, "train"), load_split(data, "dev"), vocab, config, options
    )


def test_training_writes_best_and_last_with_the_schedule(data, tmp_path):
    trainer = _trainer(data, tmp_path / "run", epochs=3)
    history = trainer.fit()
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert [h["hardest_negative"] for h in history] == [False, True, True]
    assert [h["lr"] for h in history] == pytest.approx([2e-3, 2e-3, 2e-4])
    best = load_checkpoint(tmp_path / "run" / "model_best")
    assert best.meta["best_rsum"] == max(h["rsum"] for h in history)
    assert (tmp_path / "run" / LAST / "optimizer.safetensors").is_file()


def test_resume_equals_an_uninterrupted_run(data, tmp_path):
    straight = _trainer(data, tmp_path / "a", epochs=3)
    straight.fit()
    first = _trainer(data, tmp_path / "b", epochs=2)
    first.fit()
    resumed = _trainer(data, tmp_path / "b", epochs=3)
    resumed.resume(tmp_path / "b" / LAST)
    assert resumed.start_epoch == 2
    resumed.fit()
    for name, tensor in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], tensor, atol=1e-6, rtol=0)
    assert [h["rsum"] for h in resumed.history] == pytest.approx(
        [h["rsum"] for h in straight.history], abs=1e-6
    )


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("lr", math.nan, "--lr: got nan, expected a finite number > 0"),
        ("lr", -1.0, "--lr: got -1.0, expected a finite number > 0"),
        ("lr", math.inf, "--lr: got inf, expected a finite number > 0"),
        ("grad_clip", math.nan, "--grad-clip: got nan, expected a finite number >= 0"),
        ("grad_clip", -1.0, "--grad-clip: got -1.0, expected a finite number >= 0"),
        ("val_images", 0, "--val-images: got 0, expected an integer >= 1"),
        ("batch_size", 1, "--batch-size: got 1, expected an integer >= 2"),
        ("epochs", 0, "--epochs: got 0, expected an integer >= 1"),
        ("lr_update", 0, "--lr-update: got 0, expected an integer >= 1"),
        ("warmup_epochs", -1, "--warmup-epochs: got -1, expected an integer >= 0"),
        ("seed", -1, "--seed: got -1, expected an integer >= 0"),
        ("epochs", 2.5, "--epochs: got 2.5, expected an integer >= 1"),
        ("device", "tpu", "--device: got 'tpu', expected cpu, cuda or cuda:N"),
        ("device", "cuda:x", "--device: got 'cuda:x', expected cpu, cuda or cuda:N"),
    ],
)
def test_options_are_validated_up_front(option, value, message):
    with pytest.raises(UserError) as info:
        TrainOptions(**{option: value})
    assert str(info.value).startswith(message)


def test_a_cuda_device_that_does_not_exist_is_one_line(data, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="^--device: cuda:0 requested but this torch has no CUDA"):
        _trainer(data, tmp_path / "run", epochs=1, device="cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="^--device: got cuda:1, but only 1 CUDA device"):
        _trainer(data, tmp_path / "run", epochs=1, device="cuda:1")


def test_a_non_finite_loss_stops_training_before_anything_is_saved(data, tmp_path):
    trainer = _trainer(data, tmp_path / "run", epochs=2)
    with torch.no_grad():
        trainer.model.img_enc.fc.bias[0] = math.nan  # as a diverged step leaves it
    with pytest.raises(UserError, match="^epoch 0, batch 1: the loss is nan, training stopped"):
        trainer.fit()
    assert not (tmp_path / "run").exists()


def test_all_zero_regions_are_padding_and_train(data, tmp_path):
    """A region whose features are all zero is zero after the fresh model's fc (its bias starts
    at 0), where the L2 normalisation (the original SCAN's `X / (sqrt(sum X^2) + eps)`) has a NaN
    gradient: the loss was NaN at batch 2. Such a row is padding now (adaptive features), kept
    out of the normalisation and the scores: training runs and its weights stay finite."""
    train = load_split(data, "train")
    images = np.array(train.images)
    images[:, 2:] = 0.0  # every image keeps 2 regions
    write_split(tmp_path / "zeros", "train", images, train.captions)
    dev = load_split(data, "dev")
    write_split(tmp_path / "zeros", "dev", np.array(dev.images), dev.captions)
    vocab = Vocabulary.load(find_vocab(data))
    config = ModelConfig(vocab_size=len(vocab), img_dim=16, embed_size=8, word_dim=6)
    trainer = Trainer(
        tmp_path / "run",
        load_split(tmp_path / "zeros", "train"),
        load_split(tmp_path / "zeros", "dev"),
        vocab,
        config,
        TrainOptions(epochs=1, batch_size=32, lr=2e-3, val_images=20),
    )
    trainer.fit()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert (tmp_path / "run" / "model_best").is_dir()


def test_the_weights_message_names_regions_mapped_to_zero(data, tmp_path):
    trainer = _trainer(data, tmp_path / "run", epochs=1, batch_size=300)  # one batch an epoch
    step = trainer.optimizer.step

    def diverging_step():
        step()
        with torch.no_grad():
            trainer.model.img_enc.fc.bias[0] = math.nan

    trainer.optimizer.step = diverging_step
    with pytest.raises(UserError, match="^epoch 0: weight img_enc.fc.bias is NaN .*maps to zero"):
        trainer.fit()


def test_non_finite_weights_after_the_last_step_are_never_saved(data, tmp_path):
    trainer = _trainer(data, tmp_path / "run", epochs=1, batch_size=300)  # one batch an epoch
    step = trainer.optimizer.step

    def diverging_step():
        step()
        with torch.no_grad():
            trainer.model.txt_enc.embed.weight[3, 0] = math.inf

    trainer.optimizer.step = diverging_step
    with pytest.raises(UserError, match="^epoch 0: weight txt_enc.embed.weight is NaN or infin"):
        trainer.fit()
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def one_epoch_run(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    _trainer(data, run, epochs=1).fit()
    return run


def _corrupt_state(text: str):
    return lambda path: path.write_text(text)


def _edit_state(**changes):
    def edit(path):
        state = json.loads(path.read_text())
        state.update(changes)
        path.write_text(json.dumps({k: v for k, v in state.items() if v is not ...}))

    return edit


@pytest.mark.parametrize(
    ("file", "change", "message"),
    [
        (TRAIN_STATE, _corrupt_state('{"epoch": 0, "best_r'), "train_state.json: invalid JSON"),
        (TRAIN_STATE, _corrupt_state("[]"), "train_state.json: expected a JSON object"),
        (TRAIN_STATE, _edit_state(format_version=7), "train_state.json: format_version: got 7"),
        (TRAIN_STATE, _edit_state(epoch=...), "train_state.json: epoch: missing"),
        (TRAIN_STATE, _edit_state(epoch="0"), "train_state.json: epoch: expected an integer"),
        (TRAIN_STATE, _edit_state(epoch=-2), "train_state.json: epoch: got -2, expected"),
        (TRAIN_STATE, _edit_state(best_rsum=math.nan), "train_state.json: best_rsum: got nan"),
        (TRAIN_STATE, _edit_state(history={}), "train_state.json: history: expected a list"),
        (
            TRAIN_STATE,
            _edit_state(param_groups=[]),
            ": optimizer.safetensors and train_state.json do",
        ),
        ("optimizer.safetensors", _corrupt_state("x"), "optimizer.safetensors: unreadable"),
    ],
)
def test_resume_from_a_corrupt_state_is_one_line(
    data, one_epoch_run, tmp_path, file, change, message
):
    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    change(run / LAST / file)
    trainer = _trainer(data, run, epochs=2)
    with pytest.raises(UserError) as info:
        trainer.resume(run / LAST)
    assert str(info.value).startswith(str(run / LAST)) and message in str(info.value)
    assert "\n" not in str(info.value)
