import argparse
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from scan_deploy.checkpoint import load_checkpoint, save_checkpoint
from scan_deploy.config import ModelConfig
from scan_deploy.errors import UserError
from scan_deploy.model import SCAN
from scan_deploy.vocab import Vocabulary


def _vocab(size: int) -> Vocabulary:
    """A vocabulary of `size` entries: the 4 special tokens and words w0, w1, ..."""
    return Vocabulary.build([" ".join(f"w{i}" for i in range(size - 4))], threshold=1)


@pytest.fixture
def tiny():
    vocab = _vocab(9)
    config = ModelConfig(vocab_size=len(vocab), img_dim=6, embed_size=4, word_dim=3, bi_gru=True)
    torch.manual_seed(0)
    return SCAN(config), vocab


def test_roundtrip_keeps_weights_config_vocab_and_meta(tmp_path, tiny):
    model, vocab = tiny
    save_checkpoint(tmp_path / "ckpt", model, vocab, {"epoch": 3})
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == model.config
    assert loaded.vocab.word2idx == vocab.word2idx
    assert loaded.meta["epoch"] == 3
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor)
    assert not list(tmp_path.glob(".*tmp"))  # no temp leftovers


def test_vocab_size_mismatch_is_one_line_error(tmp_path, tiny):
    model, _ = tiny
    save_checkpoint(tmp_path / "ckpt", model, _vocab(8))
    with pytest.raises(UserError, match=r"config.json: vocab_size: is 9 but the vocabulary has 8"):
        load_checkpoint(tmp_path / "ckpt")


def test_corrupted_weights_and_missing_files(tmp_path, tiny):
    model, vocab = tiny
    save_checkpoint(tmp_path / "ckpt", model, vocab)
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="model.safetensors: unreadable safetensors"):
        load_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "vocab.json").unlink()
    with pytest.raises(UserError, match="vocab.json: missing"):
        load_checkpoint(tmp_path / "ckpt")
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "nothing")


def test_non_finite_weights_name_the_file_and_the_tensor(tmp_path, tiny):
    model, vocab = tiny
    with torch.no_grad():
        model.img_enc.fc.bias[1] = float("nan")
    save_checkpoint(tmp_path / "ckpt", model, vocab)
    with pytest.raises(UserError) as info:
        load_checkpoint(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    assert str(info.value) == f"{weights}: img_enc.fc.bias: 1 of 4 values are NaN or infinite"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"epoch": 3', "meta.json: invalid JSON"),
        ("[3]", "meta.json: expected a JSON object (checkpoint metadata)"),
    ],
)
def test_malformed_meta_is_one_line(tmp_path, tiny, content, message):
    model, vocab = tiny
    save_checkpoint(tmp_path / "ckpt", model, vocab)
    (tmp_path / "ckpt" / "meta.json").write_text(content)
    with pytest.raises(UserError, match=re.escape(message)) as info:
        load_checkpoint(tmp_path / "ckpt")
    assert "\n" not in str(info.value)


def _edit_config(path, **changes) -> None:
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"num_layers": 100000},  # SCAN(config) built 100000 GRU layers: a hang
            "num_layers: is 100000 but model.safetensors has no txt_enc.rnn.weight_ih_l1",
        ),
        (
            {"embed_size": 10**9},  # SCAN(config) ran out of memory (DefaultCPUAllocator)
            "embed_size: is 1000000000 but model.safetensors has "
            "img_enc.fc.weight of shape (4, 6), the config implies (1000000000, 6)",
        ),
        (
            {"word_dim": 5},
            "word_dim: is 5 but model.safetensors has "
            "txt_enc.embed.weight of shape (9, 3), the config implies (9, 5)",
        ),
        (
            {"bi_gru": False},
            "bi_gru: is false but model.safetensors also has txt_enc.rnn.bias_hh_l0_reverse",
        ),
        (
            {"precomp_enc_type": "weight_norm"},
            'precomp_enc_type: is "weight_norm" but model.safetensors has no img_enc.fc.weight_v',
        ),
    ],
)
def test_a_config_that_does_not_match_the_weights_is_refused_before_building(
    tmp_path, tiny, changes, message
):
    model, vocab = tiny
    save_checkpoint(tmp_path / "ckpt", model, vocab)
    _edit_config(tmp_path / "ckpt" / "config.json", **changes)
    with pytest.raises(UserError) as info:
        load_checkpoint(tmp_path / "ckpt")
    assert str(info.value) == f"{tmp_path / 'ckpt' / 'config.json'}: {message}"


def test_weights_that_match_no_config_field_name_the_weights_file(tmp_path, tiny):
    model, vocab = tiny
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    for name, tensor, message in [
        ("img_enc.fc.bias", None, "missing from the checkpoint weights"),
        ("extra", torch.zeros(2), "unexpected weight (does the config match the checkpoint?)"),
        ("img_enc.fc.bias", torch.zeros(4, 1), "shape (4, 1) does not match the config, "
         "expected (4,)"),
    ]:  # fmt: skip
        changed = {k: v for k, v in state.items() if k != name or tensor is not None}
        if tensor is not None:
            changed[name] = tensor
        save_checkpoint(tmp_path / "ckpt", model, vocab)
        save_file(changed, str(tmp_path / "ckpt" / "model.safetensors"))
        with pytest.raises(UserError) as info:
            load_checkpoint(tmp_path / "ckpt")
        assert str(info.value) == f"{tmp_path / 'ckpt' / 'model.safetensors'}: {name}: {message}"


def test_original_checkpoint_options_that_do_not_match_the_weights(tmp_path, tiny):
    model, vocab = tiny
    vocab.save(tmp_path / "vocab.json")
    path = tmp_path / "model_best.pth.tar"
    _original_file(path, model, embed_size=10**9, num_layers=100000)
    with pytest.raises(UserError) as info:
        load_checkpoint(path, tmp_path / "vocab.json")
    assert str(info.value) == (
        f"{path}: embed_size: is 1000000000 but the checkpoint has "
        "img_enc.fc.weight of shape (4, 6), the config implies (1000000000, 6)"
    )


def _original_file(path, model: SCAN, **opt_overrides):
    c = model.config
    options = dict(
        data_path="/data",
        vocab_size=c.vocab_size,
        img_dim=c.img_dim,
        embed_size=c.embed_size,
        word_dim=c.word_dim,
        num_layers=c.num_layers,
        bi_gru=c.bi_gru,
        precomp_enc_type=c.precomp_enc_type,
        no_imgnorm=c.no_imgnorm,
        no_txtnorm=c.no_txtnorm,
        raw_feature_norm=c.raw_feature_norm,
        agg_func=c.agg_func,
        cross_attn=c.cross_attn,
        lambda_softmax=c.lambda_softmax,
        lambda_lse=c.lambda_lse,
        margin=c.margin,
        max_violation=c.max_violation,
        learning_rate=2e-4,
    )
    opt = argparse.Namespace(**{**options, **opt_overrides})
    img = {
        k[len("img_enc.") :]: v for k, v in model.state_dict().items() if k.startswith("img_enc.")
    }
    txt = {
        k[len("txt_enc.") :]: v for k, v in model.state_dict().items() if k.startswith("txt_enc.")
    }
    torch.save({"model": [img, txt], "opt": opt, "epoch": 7, "best_rsum": 400.5, "Eiters": 9}, path)


def test_original_checkpoint_gives_the_same_scores(tmp_path, tiny):
    model, vocab = tiny
    _original_file(tmp_path / "model_best.pth.tar", model)
    vocab.save(tmp_path / "vocab.json")
    loaded = load_checkpoint(tmp_path / "model_best.pth.tar", tmp_path / "vocab.json")
    assert loaded.config == model.config and loaded.meta["epoch"] == 7
    images, tokens, lengths = (
        torch.randn(2, 5, 6),
        torch.tensor([[1, 5, 2], [1, 2, 0]]),
        torch.tensor([3, 2]),
    )
    torch.testing.assert_close(
        loaded.model(images, tokens, lengths), model.eval()(images, tokens, lengths)
    )


def test_original_checkpoint_needs_vocab_and_matching_config(tmp_path, tiny):
    model, vocab = tiny
    _original_file(tmp_path / "model_best.pth.tar", model)
    with pytest.raises(UserError, match="pass --vocab"):
        load_checkpoint(tmp_path / "model_best.pth.tar")
    _vocab(8).save(tmp_path / "small.json")
    with pytest.raises(
        UserError, match="model_best.pth.tar: vocab_size: is 9 but the vocabulary has 8"
    ):
        load_checkpoint(tmp_path / "model_best.pth.tar", tmp_path / "small.json")


def test_original_checkpoint_with_non_finite_weights_or_options_is_refused(tmp_path, tiny):
    model, vocab = tiny
    vocab.save(tmp_path / "vocab.json")
    path = tmp_path / "model_best.pth.tar"
    _original_file(path, model, lambda_softmax=float("nan"))
    with pytest.raises(UserError, match="model_best.pth.tar: lambda_softmax: got nan, expected"):
        load_checkpoint(path, tmp_path / "vocab.json")
    _original_file(path, model, margin=float("inf"))
    with pytest.raises(UserError, match="model_best.pth.tar: margin: got inf, expected"):
        load_checkpoint(path, tmp_path / "vocab.json")
    with torch.no_grad():
        model.txt_enc.embed.weight[2, 1] = float("nan")
    _original_file(path, model)
    with pytest.raises(UserError, match="model_best.pth.tar: txt_enc.embed.weight: 1 of 27 values"):
        load_checkpoint(path, tmp_path / "vocab.json")
    with torch.no_grad():  # finite in float64, infinite once cast to the model's float32
        model.txt_enc.embed.weight[2, 1] = 0.0
        model.img_enc.fc.weight[0, 0] = 0.0
    model.double()
    with torch.no_grad():
        model.img_enc.fc.weight[0, 0] = 1e300
    _original_file(path, model)
    with pytest.raises(UserError, match="model_best.pth.tar: img_enc.fc.weight: 1 of 24 values"):
        load_checkpoint(path, tmp_path / "vocab.json")


def test_original_checkpoint_vocab_is_found_in_the_data_folder(tmp_path, tiny):
    model, vocab = tiny
    path, data = tmp_path / "model_best.pth.tar", tmp_path / "data"
    data.mkdir()
    vocab.save(data / "f30k_precomp_vocab.json")
    _vocab(8).save(data / "coco_precomp_vocab.json")
    _original_file(path, model, data_name="f30k_precomp")  # the name picks one of two
    assert load_checkpoint(path, data_dir=data).vocab == vocab
    _vocab(8).save(tmp_path / "small.json")  # --vocab, when given, wins
    with pytest.raises(UserError, match="vocab_size: is 9 but the vocabulary has 8"):
        load_checkpoint(path, tmp_path / "small.json", data)
    _original_file(path, model)  # no data_name: the folder's only vocabulary
    with pytest.raises(UserError) as info:
        load_checkpoint(path, data_dir=data)
    assert str(info.value) == (
        f"{path}: an original SCAN checkpoint needs its vocabulary: pass --vocab FILE "
        f"({data}: vocab: expected exactly one {{data_name}}_vocab.json, "
        "found coco_precomp_vocab.json, f30k_precomp_vocab.json)"
    )
    (data / "coco_precomp_vocab.json").unlink()
    assert load_checkpoint(path, data_dir=data).vocab == vocab


def test_original_checkpoint_vocab_not_in_the_data_folder_is_one_line(tmp_path, tiny):
    model, vocab = tiny
    path, data = tmp_path / "model_best.pth.tar", tmp_path / "data"
    data.mkdir()
    vocab.save(data / "coco_precomp_vocab.json")
    _original_file(path, model, data_name="f30k_precomp")
    with pytest.raises(UserError) as info:
        load_checkpoint(path, data_dir=data)
    assert str(info.value) == (
        f"{path}: an original SCAN checkpoint needs its vocabulary: pass --vocab FILE "
        f"({data}: vocab: expected f30k_precomp_vocab.json, found coco_precomp_vocab.json)"
    )
    _original_file(path, model, data_name="../f30k_precomp")  # not a name: as if unknown
    assert load_checkpoint(path, data_dir=data).vocab == vocab
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'nowhere'}: data directory")):
        load_checkpoint(path, data_dir=tmp_path / "nowhere")
