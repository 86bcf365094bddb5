import pytest
import torch

from scan_deploy.checkpoint import load_checkpoint
from scan_deploy.config import ModelConfig
from scan_deploy.precomp import find_vocab, load_split
from scan_deploy.synth import write_synthetic
from scan_deploy.train import LAST, Trainer, TrainOptions, contrastive_loss
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


def _trainer(data, run_dir, epochs):
    vocab = Vocabulary.load(find_vocab(data))
    config = ModelConfig(
        vocab_size=len(vocab), img_dim=16, embed_size=8, word_dim=6, max_violation=True
    )
    options = TrainOptions(
        epochs=epochs, batch_size=32, lr=2e-3, lr_update=2, warmup_epochs=1, val_images=20
    )
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
