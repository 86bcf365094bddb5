"""Checkpoints: our safe format (a folder with safetensors weights + config + vocab) and conversion
of the original SCAN `model_best.pth.tar`.

Our format never unpickles anything: `model.safetensors`, `config.json`, `vocab.json` and an
optional `meta.json` (epoch, best rsum, ...). A training run's `last/` folder also holds
`optimizer.safetensors` + `train_state.json` for `--resume`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scan_deploy.atomic import Marker, atomic_dir, write_json
from scan_deploy.config import ModelConfig
from scan_deploy.errors import UserError, input_error
from scan_deploy.jsonfile import read_json_object
from scan_deploy.model import SCAN, weight_shapes
from scan_deploy.precomp import find_vocab
from scan_deploy.vocab import Vocabulary

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
MARKER = Marker(CONFIG, ("format_version", "vocab_size", "embed_size", "cross_attn"), "checkpoint")
VOCAB = "vocab.json"
META = "meta.json"
FORMAT_VERSION = 1
NEEDS_VOCAB = "an original SCAN checkpoint needs its vocabulary: pass --vocab FILE"


@dataclass
class Checkpoint:
    model: SCAN
    vocab: Vocabulary
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def save_checkpoint(
    path: str | Path,
    model: SCAN,
    vocab: Vocabulary,
    meta: dict[str, Any] | None = None,
    extra_files: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint folder atomically. `extra_files` maps file names to tensors dicts
    (written as safetensors) or JSON-able values."""
    with atomic_dir(path) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        write_json(tmp / CONFIG, model.config.to_dict())
        vocab.save(tmp / VOCAB)
        write_json(tmp / META, {"format_version": FORMAT_VERSION, **(meta or {})})
        for name, payload in (extra_files or {}).items():
            if name.endswith(".safetensors"):
                save_file(payload, str(tmp / name))
            else:
                write_json(tmp / name, payload)


def load_checkpoint(
    path: str | Path, vocab_path: str | Path | None = None, data_dir: str | Path | None = None
) -> Checkpoint:
    """Load our checkpoint folder, or an original SCAN `.pth.tar`, whose vocabulary is
    `vocab_path` or else the one in the precomp folder `data_dir` (see `load_original`)."""
    path = Path(path)
    if path.is_dir():
        return _load_folder(path)
    if path.is_file():
        return load_original(path, vocab_path, data_dir)
    raise input_error(path, None, "not found, expected a checkpoint folder or a .pth.tar file")


def _load_folder(path: Path) -> Checkpoint:
    for name in (WEIGHTS, CONFIG, VOCAB):
        if not (path / name).is_file():
            raise input_error(path / name, None, "missing, expected a scan-deploy checkpoint file")
    config = ModelConfig.load(path / CONFIG)
    vocab = Vocabulary.load(path / VOCAB)
    try:
        state = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise input_error(path / WEIGHTS, None, f"unreadable safetensors file ({exc})") from None
    meta = read_json_object(path / META, "checkpoint metadata") if (path / META).exists() else {}
    return Checkpoint(build_model(config, vocab, state, path / WEIGHTS), vocab, path, meta)


def build_model(
    config: ModelConfig, vocab: Vocabulary, state: dict[str, torch.Tensor], source: Path
) -> SCAN:
    """A SCAN model with `state` loaded, after checking config, vocab and weights agree and
    every weight is finite."""
    config_path = source.parent / CONFIG if source.suffix == ".safetensors" else source
    if len(vocab) != config.vocab_size:
        raise input_error(
            config_path,
            "vocab_size",
            f"is {config.vocab_size} but the vocabulary has {len(vocab)} words",
        )
    check_weight_shapes(config, state, source, config_path)
    model = SCAN(config)
    model.load_weights(state, str(source))
    for name, tensor in model.state_dict().items():  # after the float32 cast: overflow shows
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise input_error(source, name, f"{bad} of {tensor.numel()} values are NaN or infinite")
    return model.eval()


def check_weight_shapes(
    config: ModelConfig, state: dict[str, torch.Tensor], source: Path, config_path: Path
) -> None:
    """The weights `state` (read from `source`) are the ones `config` implies, names and shapes,
    checked before the model is built: building it from a corrupt config (num_layers 100000,
    embed_size 1000000000) would hang or run out of memory. The one-line error names the config
    field that disagrees, or else the weight."""
    weights = source.name if source != config_path else "the checkpoint"

    def mismatch(field: str | None, name: str, problem: str, otherwise: str) -> UserError:
        if field is None:
            return input_error(source, name, otherwise)
        value = json.dumps(getattr(config, field))
        return input_error(config_path, field, f"is {value} but {weights} {problem}")

    implied = set()
    for name, dims in weight_shapes(config):  # stops at the first weight the file lacks
        implied.add(name)
        if name not in state:
            raise mismatch(
                _field_of(name), name, f"has no {name}", "missing from the checkpoint weights"
            )
        shape, sizes = tuple(state[name].shape), tuple(size for size, _ in dims)
        if shape != sizes:
            field = None  # a tensor of another rank: no size to blame
            if len(shape) == len(sizes):
                field = next(f for (n, f), m in zip(dims, shape, strict=True) if n != m)
            raise mismatch(
                field,
                name,
                f"has {name} of shape {shape}, the config implies {sizes}",
                f"shape {shape} does not match the config, expected {sizes}",
            )
    unexpected = sorted(set(state) - implied)
    if unexpected:
        name = unexpected[0]
        otherwise = "unexpected weight (does the config match the checkpoint?)"
        raise mismatch(_field_of(name), name, f"also has {name}", otherwise)


def _field_of(name: str) -> str | None:
    """The config field that decides whether the weight `name` exists."""
    if name.endswith("_reverse"):
        return "bi_gru"
    if re.fullmatch(r"txt_enc\.rnn\.\w+_l[1-9][0-9]*", name):
        return "num_layers"
    if name in ("img_enc.fc.weight", "img_enc.fc.weight_v", "img_enc.fc.weight_g"):
        return "precomp_enc_type"
    return None


def load_original(
    path: Path, vocab_path: str | Path | None = None, data_dir: str | Path | None = None
) -> Checkpoint:
    """Read an original SCAN checkpoint through the restricted unpickler. Its vocabulary is
    `vocab_path`, or else `{data_name}_vocab.json` in `data_dir` (`data_name`: the checkpoint's
    training option; without it, the folder's only `*_vocab.json`)."""
    from scan_deploy.original_checkpoint import config_from_options, load_original_checkpoint

    if vocab_path is None and data_dir is None:
        raise input_error(path, None, NEEDS_VOCAB)
    original = load_original_checkpoint(path)
    options = dict(original.options)
    if vocab_path is None:
        vocab_path = _vocab_in(Path(data_dir), options.get("data_name"), path)
    vocab = Vocabulary.load(vocab_path)
    options.setdefault("vocab_size", len(vocab))
    config = config_from_options(options, path)
    state = {f"img_enc.{k}": v for k, v in original.image_state.items()}
    state.update({f"txt_enc.{k}": v for k, v in original.text_state.items()})
    meta = {
        "source": str(path),
        "epoch": original.epoch,
        "best_rsum": original.best_rsum,
        "eiters": original.eiters,
    }
    return Checkpoint(build_model(config, vocab, state, path), vocab, path, meta)


def _vocab_in(data_dir: Path, data_name: Any, checkpoint: Path) -> Path:
    """The vocabulary of the data set named `data_name` in `data_dir` (a file name; anything else
    counts as unknown), or a UserError saying what was looked for."""
    is_name = isinstance(data_name, str) and data_name and Path(data_name).name == data_name
    try:
        return find_vocab(data_dir, data_name if is_name else None)
    except UserError as exc:
        if not data_dir.is_dir():  # the folder itself is the mistake
            raise
        raise input_error(checkpoint, None, f"{NEEDS_VOCAB} ({exc})") from None
