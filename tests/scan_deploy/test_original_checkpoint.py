import argparse
import codecs
import copyreg
import io
import os
import pickle
import pickletools
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from scan_deploy.config import ModelConfig
from scan_deploy.errors import UserError
from scan_deploy.original_checkpoint import (
    OriginalCheckpoint,
    config_from_options,
    load_original_checkpoint,
)
from tests.scan_deploy.legacy_pickle import (
    MAGIC_NUMBER,
    PROTOCOL_VERSION,
    SYS_INFO,
    LegacyStyle,
    Malicious,
    create_marker,
    legacy_checkpoint_bytes,
    pickled_parts,
    write_legacy_checkpoint,
)

IMG_DIM, EMBED, WORD_DIM, VOCAB = 6, 4, 3, 7


def image_state(weight_norm: bool, seed: int = 0) -> OrderedDict:
    gen = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    if weight_norm:  # weight_norm(fc, dim=None): a scalar gain
        state["fc.weight_g"] = torch.rand((), generator=gen) + 0.5
        state["fc.weight_v"] = torch.randn(EMBED, IMG_DIM, generator=gen)
    else:
        state["fc.weight"] = torch.randn(EMBED, IMG_DIM, generator=gen)
    state["fc.bias"] = torch.randn(EMBED, generator=gen)
    return state


def text_state(bi_gru: bool, num_layers: int, seed: int = 1) -> OrderedDict:
    gen = torch.Generator().manual_seed(seed)
    state = OrderedDict([("embed.weight", torch.randn(VOCAB, WORD_DIM, generator=gen))])
    directions = ["", "_reverse"] if bi_gru else [""]
    for layer in range(num_layers):
        in_dim = WORD_DIM if layer == 0 else EMBED * len(directions)
        for suffix in directions:
            rnn = f"rnn.{{}}_l{layer}{suffix}"
            state[rnn.format("weight_ih")] = torch.randn(3 * EMBED, in_dim, generator=gen)
            state[rnn.format("weight_hh")] = torch.randn(3 * EMBED, EMBED, generator=gen)
            state[rnn.format("bias_ih")] = torch.randn(3 * EMBED, generator=gen)
            state[rnn.format("bias_hh")] = torch.randn(3 * EMBED, generator=gen)
    return state


def scan_options(**overrides: Any) -> argparse.Namespace:
    """The Namespace of the original train.py (training options included), with tiny sizes."""
    options = dict(
        data_path="/data/scan/data",
        data_name="f30k_precomp",
        vocab_path="./vocab/",
        margin=0.2,
        num_epochs=30,
        batch_size=128,
        word_dim=WORD_DIM,
        embed_size=EMBED,
        grad_clip=2.0,
        num_layers=1,
        learning_rate=0.0002,
        lr_update=15,
        workers=10,
        log_step=10,
        val_step=500,
        logger_name="./runs/f30k_scan/log",
        model_name="./runs/f30k_scan/checkpoint",
        resume="",
        max_violation=True,
        img_dim=IMG_DIM,
        no_imgnorm=False,
        no_txtnorm=False,
        raw_feature_norm="clipped_l2norm",
        agg_func="LogSumExp",
        cross_attn="t2i",
        precomp_enc_type="basic",
        bi_gru=False,
        lambda_lse=6.0,
        lambda_softmax=9.0,
        vocab_size=VOCAB,
    )
    options.update(overrides)
    return argparse.Namespace(**options)


def scan_checkpoint(bi_gru: bool = False, weight_norm: bool = False, num_layers: int = 1) -> dict:
    """What the original train.py's `save_checkpoint` pickles."""
    opt = scan_options(
        bi_gru=bi_gru,
        num_layers=num_layers,
        precomp_enc_type="weight_norm" if weight_norm else "basic",
    )
    return {
        "model": [image_state(weight_norm), text_state(bi_gru, num_layers)],
        "opt": opt,
        "epoch": 17,
        "best_rsum": 412.75,
        "Eiters": 123456,
    }


def save_zip(path: Path, obj: Any) -> None:
    torch.save(obj, path)


def save_torch_legacy(path: Path, obj: Any) -> None:
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def legacy_writer(style: LegacyStyle) -> Callable[[Path, Any], None]:
    return lambda path, obj: write_legacy_checkpoint(path, obj, style)


PY2_03 = LegacyStyle(python2=True, rebuild="v1", cuda=True, storage="shared")
WRITERS = {
    "zip": save_zip,
    "torch-legacy": save_torch_legacy,
    "py3-torch0.4": legacy_writer(LegacyStyle()),
    "py3-torch0.3": legacy_writer(LegacyStyle(rebuild="v1", namespace="reconstructor")),
    "py2-torch0.3-cuda": legacy_writer(PY2_03),
    "py2-torch0.3-views": legacy_writer(
        LegacyStyle(python2=True, rebuild="v1", namespace="reconstructor", storage="views")
    ),
    "py2-torch0.4": legacy_writer(LegacyStyle(python2=True, storage="shared")),
}
VARIANTS = {
    "gru": dict(bi_gru=False, weight_norm=False, num_layers=1),
    "bigru-weightnorm": dict(bi_gru=True, weight_norm=True, num_layers=1),
    "bigru-2layers": dict(bi_gru=True, weight_norm=False, num_layers=2),
}


def assert_same_state(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(loaded) == list(expected)
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name], tensor), name


def assert_same_checkpoint(loaded: OriginalCheckpoint, expected: dict) -> None:
    assert_same_state(loaded.image_state, expected["model"][0])
    assert_same_state(loaded.text_state, expected["model"][1])
    options = vars(expected["opt"])
    assert loaded.options == options
    assert {k: type(v) for k, v in loaded.options.items()} == {
        k: type(v) for k, v in options.items()
    }
    assert (loaded.epoch, loaded.best_rsum, loaded.eiters) == (17, 412.75, 123456)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("era", WRITERS)
def test_loads_every_era_exactly(tmp_path: Path, era: str, variant: str) -> None:
    expected = scan_checkpoint(**VARIANTS[variant])
    path = tmp_path / "model_best.pth.tar"
    WRITERS[era](path, expected)
    assert_same_checkpoint(load_original_checkpoint(path), expected)


def python2_checkpoint() -> dict:
    checkpoint = scan_checkpoint(bi_gru=True)
    opt = checkpoint["opt"]
    opt.data_path = "/home/user/" + "deep/" * 60 + "data"  # over 255 bytes: BINSTRING
    opt.logger_name = "./runs/café"  # a latin1 byte string
    opt.seed = 2**40  # over 32 bits: a Python 2 INT text opcode
    del opt.precomp_enc_type  # the oldest SCAN versions had neither option
    del opt.bi_gru
    return checkpoint


@pytest.mark.parametrize("rebuild", ["v1", "v2"])
@pytest.mark.parametrize("namespace", ["newobj", "reconstructor"])
def test_python2_options_decode_to_python3_types(
    tmp_path: Path, rebuild: str, namespace: str
) -> None:
    expected = python2_checkpoint()
    style = LegacyStyle(python2=True, rebuild=rebuild, namespace=namespace, cuda=True)
    path = write_legacy_checkpoint(tmp_path / "model_best.pth.tar", expected, style)
    loaded = load_original_checkpoint(path)
    assert_same_checkpoint(loaded, expected)
    assert loaded.options["data_path"] == expected["opt"].data_path
    assert loaded.options["logger_name"] == "./runs/café"
    assert loaded.options["seed"] == 2**40
    assert type(loaded.options["max_violation"]) is bool
    assert type(loaded.options["margin"]) is float
    assert type(loaded.options["img_dim"]) is int
    assert config_from_options(loaded.options, path) == ModelConfig(
        vocab_size=VOCAB, img_dim=IMG_DIM, embed_size=EMBED, word_dim=WORD_DIM, max_violation=True
    )


def test_python2_fixture_is_written_the_python2_way(tmp_path: Path) -> None:
    """Guards the fixture itself: Python 2 opcodes only, and torch's own legacy loader agrees."""
    expected = python2_checkpoint()
    style = LegacyStyle(python2=True, rebuild="v1", namespace="reconstructor", cuda=True)
    data = legacy_checkpoint_bytes(expected, style)
    parts = pickled_parts(data)
    opcodes = [(op.name, arg) for part in parts for op, arg, _ in pickletools.genops(part)]
    names = {name for name, _ in opcodes}
    assert {"SHORT_BINSTRING", "BINSTRING", "INT"} <= names
    assert not names & {"BINUNICODE", "SHORT_BINUNICODE", "STACK_GLOBAL", "FRAME"}
    globals_ = {arg for name, arg in opcodes if name == "GLOBAL"}
    assert {"copy_reg _reconstructor", "__builtin__ object", "argparse Namespace"} <= globals_
    assert {"torch._utils _rebuild_tensor", "torch.cuda FloatStorage"} <= globals_
    assert ("SHORT_BINSTRING", "cuda:0") in opcodes

    path = tmp_path / "model_best.pth.tar"
    path.write_bytes(data)
    trusted = torch.load(path, weights_only=False, encoding="latin1", map_location="cpu")
    assert_same_state(trusted["model"][1], expected["model"][1])
    assert vars(trusted["opt"]) == vars(expected["opt"])


# --- hostile files ------------------------------------------------------------------------------

HOSTILE_WRITERS = {
    "zip": save_zip,
    "py3-legacy": save_torch_legacy,
    "py2-legacy": legacy_writer(PY2_03),
}


def payloads(marker: Path) -> dict[str, Malicious]:
    return {
        "os.system": Malicious(os.system, (f"touch {marker}",)),
        "function": Malicious(create_marker, (str(marker),)),
    }


@pytest.mark.parametrize("payload", ["os.system", "function"])
@pytest.mark.parametrize("era", HOSTILE_WRITERS)
def test_refuses_pickled_code_in_every_format(tmp_path: Path, era: str, payload: str) -> None:
    marker = tmp_path / "pwned"
    malicious = payloads(marker)[payload]
    checkpoint = scan_checkpoint()
    checkpoint["opt"].resume = malicious
    path = tmp_path / "model_best.pth.tar"
    HOSTILE_WRITERS[era](path, checkpoint)

    with pytest.raises(UserError) as info:
        load_original_checkpoint(path)

    target = f"{malicious.target.__module__}.{malicious.target.__name__}"
    assert str(info.value) == (
        f"{path}: pickle: refuses global '{target}' "
        "(only tensors, containers and argparse.Namespace are allowed)"
    )
    assert not marker.exists()


@pytest.mark.parametrize("era", HOSTILE_WRITERS)
def test_hostile_fixture_really_runs_code_when_unpickled_unsafely(tmp_path: Path, era: str) -> None:
    """The control for the test above: its payload is live."""
    marker = tmp_path / "pwned"
    checkpoint = scan_checkpoint()
    checkpoint["opt"].resume = payloads(marker)["function"]
    path = tmp_path / "model_best.pth.tar"
    HOSTILE_WRITERS[era](path, checkpoint)
    torch.load(path, weights_only=False, encoding="latin1", map_location="cpu")
    assert marker.exists()


def test_refuses_a_plain_hostile_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model_best.pth.tar"
    path.write_bytes(pickle.dumps(payloads(marker)["function"], protocol=2))
    with pytest.raises(UserError, match=r"refuses global '.*create_marker'"):
        load_original_checkpoint(path)
    assert not marker.exists()


class _PersistentPickler(pickle.Pickler):
    """Pickles `persistent` objects as the given persistent ids."""

    def __init__(self, file: io.BytesIO, persistent: dict[int, tuple]) -> None:
        super().__init__(file, protocol=2)
        self.persistent = persistent

    def persistent_id(self, obj: Any) -> tuple | None:
        return self.persistent.get(id(obj))


def handmade_legacy(content: Any, persistent: dict[int, tuple] | None = None) -> bytes:
    """A legacy file around `content`, its persistent ids chosen by the test."""
    out = io.BytesIO()
    for part in (MAGIC_NUMBER, PROTOCOL_VERSION, SYS_INFO):
        pickle.dump(part, out, protocol=2)
    _PersistentPickler(out, persistent or {}).dump(content)
    pickle.dump([], out, protocol=2)
    return out.getvalue()


SOURCE = object()
HOSTILE_CONTENT = {
    "reconstructor-of-another-class": (
        {"opt": Malicious(copyreg._reconstructor, (OrderedDict, object, None))},
        {},
        "pickle: refuses copyreg._reconstructor of 'OrderedDict'",
    ),
    "codec-other-than-latin1": (
        {"opt": Malicious(codecs.encode, ("payload", "rot13"))},
        {},
        "pickle: refuses _codecs.encode with encoding 'rot13'",
    ),
    "module-persistent-id": (
        {"model": SOURCE},
        {id(SOURCE): ("module", OrderedDict, "evil.py", "import os")},
        "pickle: refuses persistent object 'module'",
    ),
    "storage-larger-than-the-file": (
        {"model": SOURCE},
        {id(SOURCE): ("storage", torch.FloatStorage, "1", "cpu", 10**12, None)},
        "storage '1' of 1000000000000 elements does not fit in the file",
    ),
}


@pytest.mark.parametrize("case", HOSTILE_CONTENT)
def test_refuses_misuse_of_the_allowed_globals(tmp_path: Path, case: str) -> None:
    content, persistent, expected = HOSTILE_CONTENT[case]
    path = tmp_path / "model_best.pth.tar"
    path.write_bytes(handmade_legacy(content, persistent))
    assert expected in load_error(path)


# --- unusable files -----------------------------------------------------------------------------


def load_error(path: Path) -> str:
    with pytest.raises(UserError) as info:
        load_original_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    assert "file not found" in load_error(tmp_path / "model_best.pth.tar")


@pytest.mark.parametrize("content", [b"", b"hello, world\n", bytes(range(256)) * 4])
def test_not_a_checkpoint(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model_best.pth.tar"
    path.write_bytes(content)
    assert "not a PyTorch checkpoint" in load_error(path)


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75, 0.99])
@pytest.mark.parametrize("era", ["zip", "torch-legacy", "py2-torch0.3-cuda"])
def test_truncated(tmp_path: Path, era: str, fraction: float) -> None:
    path = tmp_path / "model_best.pth.tar"
    WRITERS[era](path, scan_checkpoint(bi_gru=True))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    assert "truncated or corrupted checkpoint" in load_error(path)


def test_storage_bytes_missing_at_the_very_end(tmp_path: Path) -> None:
    path = tmp_path / "model_best.pth.tar"
    data = legacy_checkpoint_bytes(scan_checkpoint(), PY2_03)
    path.write_bytes(data[:-1])
    assert "file ends 1 bytes early" in load_error(path)


def broken(change: Callable[[dict], Any]) -> Any:
    checkpoint = scan_checkpoint()
    return change(checkpoint) or checkpoint


STRUCTURE_ERRORS = {
    "list": (lambda c: [c], "expected a dict with 'model' and 'opt', got list"),
    "no-model": (lambda c: c.pop("model") and None, "model: missing"),
    "model-dict": (
        lambda c: c.update(model=dict(enumerate(c["model"]))),
        "model: expected [image state dict, text state dict], got dict",
    ),
    "model-3": (
        lambda c: c["model"].append({}),
        "model: expected [image state dict, text state dict], got a list of 3",
    ),
    "text-not-dict": (
        lambda c: c["model"].__setitem__(1, [1, 2]),
        "model[1]: expected a state dict, got a list of 2",
    ),
    "not-a-tensor": (
        lambda c: c["model"][0].__setitem__("fc.weight", 1.5),
        "model[0].fc.weight: expected a tensor, got float",
    ),
    "no-opt": (lambda c: c.pop("opt") and None, "opt: missing"),
    "opt-str": (lambda c: c.update(opt="--img_dim 6"), "opt: expected an argparse.Namespace"),
    "epoch-str": (lambda c: c.update(epoch="17"), "epoch: expected an integer, got str"),
}


@pytest.mark.parametrize("case", STRUCTURE_ERRORS)
@pytest.mark.parametrize("era", ["zip", "py2-torch0.4"])
def test_wrong_structure(tmp_path: Path, era: str, case: str) -> None:
    change, expected = STRUCTURE_ERRORS[case]
    path = tmp_path / "model_best.pth.tar"
    WRITERS[era](path, broken(change))
    assert expected in load_error(path)


def test_optional_metadata_may_be_absent_or_a_tensor(tmp_path: Path) -> None:
    checkpoint = scan_checkpoint()
    del checkpoint["epoch"], checkpoint["Eiters"]
    checkpoint["best_rsum"] = torch.tensor(412.75, dtype=torch.float64)
    path = tmp_path / "checkpoint_3.pth.tar"
    save_zip(path, checkpoint)
    loaded = load_original_checkpoint(path)
    assert (loaded.epoch, loaded.best_rsum, loaded.eiters) == (None, 412.75, None)


# --- options -> ModelConfig ---------------------------------------------------------------------


def test_config_takes_the_model_options_and_ignores_training_ones() -> None:
    options = vars(scan_options(bi_gru=True, agg_func="Mean", cross_attn="i2t", margin=0.1))
    assert config_from_options(options, "ckpt.pth.tar") == ModelConfig(
        vocab_size=VOCAB,
        img_dim=IMG_DIM,
        embed_size=EMBED,
        word_dim=WORD_DIM,
        num_layers=1,
        bi_gru=True,
        precomp_enc_type="basic",
        no_imgnorm=False,
        no_txtnorm=False,
        raw_feature_norm="clipped_l2norm",
        agg_func="Mean",
        cross_attn="i2t",
        lambda_softmax=9.0,
        lambda_lse=6.0,
        margin=0.1,
        max_violation=True,
    )


def test_config_defaults_for_options_old_versions_lack() -> None:
    options = vars(scan_options())
    del options["precomp_enc_type"], options["bi_gru"]
    config = config_from_options(options, "ckpt.pth.tar")
    assert (config.precomp_enc_type, config.bi_gru) == ("basic", False)


def test_config_converts_unambiguous_types() -> None:
    options = vars(scan_options())
    options.update(
        agg_func=b"Max",
        raw_feature_norm=b"softmax",
        embed_size=4.0,
        img_dim="6",
        bi_gru=1,
        no_imgnorm="False",
        max_violation=0,
        lambda_softmax=4,
        margin="0.05",
    )
    config = config_from_options(options, "ckpt.pth.tar")
    assert (config.agg_func, config.raw_feature_norm) == ("Max", "softmax")
    assert (config.embed_size, config.img_dim) == (4, 6)
    assert type(config.embed_size) is int
    assert (config.bi_gru, config.no_imgnorm, config.max_violation) == (True, False, False)
    assert config.lambda_softmax == 4.0 and type(config.lambda_softmax) is float
    assert config.margin == 0.05


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (dict(img_dim="big"), "ckpt.pth.tar: img_dim: got 'big', expected a positive integer"),
        (dict(embed_size=4.5), "ckpt.pth.tar: embed_size: got 4.5, expected a positive integer"),
        (dict(bi_gru=2), "ckpt.pth.tar: bi_gru: got 2, expected true or false"),
        (dict(agg_func="Median"), "ckpt.pth.tar: agg_func: got 'Median', expected one of"),
        (dict(vocab_size=None), "ckpt.pth.tar: vocab_size: got None"),
        (dict(lambda_softmax=float("nan")), "ckpt.pth.tar: lambda_softmax: got nan, expected a"),
        (dict(lambda_lse="inf"), "ckpt.pth.tar: lambda_lse: got inf, expected a finite number"),
        (dict(margin=b"nan"), "ckpt.pth.tar: margin: got nan, expected a finite number >= 0"),
    ],
)
def test_config_reports_bad_values(change: dict, expected: str) -> None:
    options = vars(scan_options(**change))
    with pytest.raises(UserError) as info:
        config_from_options(options, "ckpt.pth.tar")
    assert str(info.value).startswith(expected)


def test_config_needs_vocab_size() -> None:
    options = vars(scan_options())
    del options["vocab_size"]
    with pytest.raises(UserError, match="ckpt.pth.tar: vocab_size: missing"):
        config_from_options(options, "ckpt.pth.tar")
