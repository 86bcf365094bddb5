"""Training of the SCAN reference: Adam, step lr decay, gradient clipping, hinge loss with hardest
negatives, validation by rsum every epoch, best-checkpoint selection and `--resume`.

A run folder holds `model_best/` (the checkpoint with the best dev rsum) and `last/` (the latest
epoch, with optimizer and training state, which `--resume` continues from).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from scan_deploy.batching import pad_tokens
from scan_deploy.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from scan_deploy.config import ModelConfig, is_finite_number
from scan_deploy.errors import UserError, input_error
from scan_deploy.evaluate import split_similarities
from scan_deploy.jsonfile import read_json_object, typed
from scan_deploy.metrics import recall_metrics
from scan_deploy.model import SCAN
from scan_deploy.precomp import PrecompSplit
from scan_deploy.vocab import Vocabulary

BEST = "model_best"
LAST = "last"
OPTIMIZER = "optimizer.safetensors"
TRAIN_STATE = "train_state.json"
# Why a loss or weight becomes NaN/inf. The L2 normalisation is the original SCAN's
# `X / (sqrt(sum X^2) + eps)`, whose gradient at X = 0 is NaN: a region the image encoder's fc maps
# to zero has one (all-zero feature rows are padding, kept out of it by the encoder).
NON_FINITE_HINT = (
    "try a lower --lr; check the model options and the features: a region the image encoder "
    "maps to zero makes the L2 normalisation's gradient NaN"
)


@dataclass(frozen=True)
class TrainOptions:
    """Training options with the original SCAN defaults (warm-up 0 keeps the original recipe)."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-4
    lr_update: int = 15
    grad_clip: float = 2.0
    warmup_epochs: int = 0
    val_images: int = 1000
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name, minimum in _MINIMUMS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise _option_error(name, value, f"an integer >= {minimum}")
        if not is_finite_number(self.lr) or self.lr <= 0:
            raise _option_error("lr", self.lr, "a finite number > 0")
        if not is_finite_number(self.grad_clip) or self.grad_clip < 0:
            raise _option_error(
                "grad_clip", self.grad_clip, "a finite number >= 0 (0: no clipping)"
            )
        if not isinstance(self.device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise _option_error("device", self.device, "cpu, cuda or cuda:N")


_MINIMUMS = {
    "epochs": 1,
    "batch_size": 2,
    "lr_update": 1,
    "warmup_epochs": 0,
    "val_images": 1,
    "seed": 0,
}


def _option_error(name: str, value: object, expected: str) -> UserError:
    """`--lr: got nan, expected a finite number > 0`: options are named as the CLI spells them."""
    return UserError(f"--{name.replace('_', '-')}: got {value!r}, expected {expected}")


@dataclass
class EpochReport:
    epoch: int
    loss: float
    lr: float
    hardest_negative: bool
    rsum: float
    metrics: dict
    seconds: float
    best: bool


def contrastive_loss(scores: torch.Tensor, margin: float, max_violation: bool) -> torch.Tensor:
    """VSE++ hinge loss on a (B, B) score matrix whose diagonal holds the positive pairs.

    With `max_violation` only the hardest negative of each row and column counts; otherwise all
    violations are summed.
    """
    diagonal = scores.diag().view(-1, 1)
    cost_caption = (margin + scores - diagonal).clamp(min=0)
    cost_image = (margin + scores - diagonal.t()).clamp(min=0)
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    cost_caption = cost_caption.masked_fill(eye, 0)
    cost_image = cost_image.masked_fill(eye, 0)
    if max_violation:
        return cost_caption.max(dim=1)[0].sum() + cost_image.max(dim=0)[0].sum()
    return cost_caption.sum() + cost_image.sum()


class BatchStream:
    """Seeded (image features, caption tokens) batches of one epoch of a precomp split."""

    def __init__(self, split: PrecompSplit, vocab: Vocabulary, batch_size: int, seed: int) -> None:
        self.split = split
        self.batch_size = batch_size
        self.seed = seed
        self.tokens = [vocab.encode(c) for c in split.captions]

    def __len__(self) -> int:
        return -(-self.split.num_captions // self.batch_size)

    def epoch(self, epoch: int):
        order = np.random.default_rng([self.seed, epoch]).permutation(self.split.num_captions)
        for start in range(0, len(order), self.batch_size):
            captions = order[start : start + self.batch_size]
            if len(captions) < 2:
                continue
            images = captions // self.split.captions_per_image
            features = torch.from_numpy(np.ascontiguousarray(self.split.images[images]))
            tokens, lengths = pad_tokens([self.tokens[j] for j in captions])
            yield features, torch.from_numpy(tokens), torch.from_numpy(lengths)


def _check_device(device: str) -> None:
    """Refuse a CUDA device this torch cannot use, before any work is done."""
    if device == "cpu":
        return
    if not torch.cuda.is_available():
        raise UserError(
            f"--device: {device} requested but this torch has no CUDA device "
            f"(torch {torch.__version__}); install a CUDA build or use --device cpu"
        )
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise UserError(
            f"--device: got {device}, but only {torch.cuda.device_count()} CUDA device(s) exist"
        )


def validate(checkpoint: Checkpoint, dev: PrecompSplit, val_images: int) -> dict:
    sims = split_similarities(checkpoint, dev, num_images=val_images)
    return recall_metrics(sims, dev.captions_per_image)


class Trainer:
    """One training run. `on_batch(loss, pairs)` and `on_epoch(report)` report progress."""

    def __init__(
        self,
        run_dir: Path,
        train_split: PrecompSplit,
        dev_split: PrecompSplit,
        vocab: Vocabulary,
        config: ModelConfig,
        options: TrainOptions,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.train_split, self.dev_split = train_split, dev_split
        self.vocab, self.options = vocab, options
        _check_device(options.device)
        torch.manual_seed(options.seed)
        self.model = SCAN(config).to(options.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=options.lr)
        self.stream = BatchStream(train_split, vocab, options.batch_size, options.seed)
        self.start_epoch = 0
        self.best_rsum = float("-inf")
        self.history: list[dict] = []

    def resume(self, last_dir: Path) -> None:
        """Continue from a `last/` folder written by an earlier run."""
        state_path = last_dir / TRAIN_STATE
        if not state_path.is_file() or not (last_dir / OPTIMIZER).is_file():
            raise input_error(
                last_dir, None, "not a resumable run folder (expected a `last/` folder)"
            )
        checkpoint = load_checkpoint(last_dir)
        if checkpoint.config != self.model.config:
            raise input_error(
                last_dir / "config.json", None, "model options differ from this run's options"
            )
        state = _read_train_state(state_path)
        self.model.load_state_dict(checkpoint.model.state_dict())
        self._load_optimizer(last_dir, state)
        self.start_epoch = state["epoch"] + 1
        self.best_rsum = state["best_rsum"]
        self.history = state["history"]

    def fit(
        self,
        on_batch: Callable[[float, int], None] | None = None,
        on_epoch: Callable[[EpochReport], None] | None = None,
    ) -> list[dict]:
        for epoch in range(self.start_epoch, self.options.epochs):
            started = time.perf_counter()
            loss, lr, hardest = self._train_epoch(epoch, on_batch)
            self._check_finite_weights(epoch)
            checkpoint = Checkpoint(self.model.eval(), self.vocab, self.run_dir / BEST)
            metrics = validate(checkpoint, self.dev_split, self.options.val_images)
            best = metrics["rsum"] > self.best_rsum
            report = EpochReport(
                epoch,
                loss,
                lr,
                hardest,
                metrics["rsum"],
                metrics,
                time.perf_counter() - started,
                best,
            )
            self.history.append(asdict(report))
            self._save(epoch, best)
            if on_epoch is not None:
                on_epoch(report)
        return self.history

    def _train_epoch(self, epoch: int, on_batch) -> tuple[float, float, bool]:
        options = self.options
        lr = options.lr * (0.1 ** (epoch // options.lr_update))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        hardest = self.model.config.max_violation and epoch >= options.warmup_epochs
        self.model.train()
        total, batches = 0.0, 0
        for features, tokens, lengths in self.stream.epoch(epoch):
            scores = self.model(features.to(options.device), tokens.to(options.device), lengths)
            loss = contrastive_loss(scores, self.model.config.margin, hardest)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if options.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), options.grad_clip)
            self.optimizer.step()
            value = loss.item()
            if not math.isfinite(value):
                raise UserError(
                    f"epoch {epoch}, batch {batches + 1}: the loss is {value}, training stopped "
                    f"({NON_FINITE_HINT})"
                )
            total, batches = total + value, batches + 1
            if on_batch is not None:
                on_batch(total / batches, features.shape[0])
        return total / max(batches, 1), lr, hardest

    def _check_finite_weights(self, epoch: int) -> None:
        """Stop before validating or saving a model whose last step left NaN or inf weights."""
        for name, tensor in self.model.state_dict().items():
            if not torch.isfinite(tensor).all():
                raise UserError(
                    f"epoch {epoch}: weight {name} is NaN or infinite, training stopped "
                    f"({NON_FINITE_HINT})"
                )

    def _load_optimizer(self, last_dir: Path, state: dict) -> None:
        try:
            tensors = load_file(str(last_dir / OPTIMIZER))
        except (SafetensorError, OSError) as exc:
            raise input_error(
                last_dir / OPTIMIZER, None, f"unreadable safetensors file ({exc})"
            ) from None
        try:
            self.optimizer.load_state_dict(_unflatten_optimizer(tensors, state))
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            detail = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise input_error(
                last_dir, None, f"{OPTIMIZER} and {TRAIN_STATE} do not fit this model ({detail})"
            ) from None

    def _save(self, epoch: int, best: bool) -> None:
        if best:
            self.best_rsum = self.history[-1]["rsum"]
        meta = {"epoch": epoch, "rsum": self.history[-1]["rsum"], "best_rsum": self.best_rsum}
        if best:
            save_checkpoint(self.run_dir / BEST, self.model, self.vocab, meta)
        tensors, groups = _flatten_optimizer(self.optimizer.state_dict())
        state = {
            "format_version": 1,
            "epoch": epoch,
            "best_rsum": self.best_rsum,
            "options": asdict(self.options),
            "param_groups": groups,
            "history": self.history,
        }
        save_checkpoint(
            self.run_dir / LAST,
            self.model,
            self.vocab,
            meta,
            extra_files={OPTIMIZER: tensors, TRAIN_STATE: state},
        )


def _read_train_state(path: Path) -> dict:
    """The JSON `train_state.json` of a `last/` folder, its fields checked with one-line errors."""
    state = read_json_object(path, "the training state of a run", format_version=1)
    fields = {"epoch": int, "best_rsum": (int, float), "param_groups": list, "history": list}
    for key, kinds in fields.items():
        if key not in state:
            raise input_error(path, key, "missing from the training state")
        typed(state[key], kinds, key, path)
    if state["epoch"] < 0:
        raise input_error(path, "epoch", f"got {state['epoch']}, expected an integer >= 0")
    if not is_finite_number(state["best_rsum"]):
        raise input_error(path, "best_rsum", f"got {state['best_rsum']}, expected a finite number")
    return state


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Adam state as flat tensors `{param}.{name}` for safetensors, param groups as JSON."""
    tensors = {
        f"{param}.{name}": torch.as_tensor(value).detach().cpu().contiguous()
        for param, slots in state_dict["state"].items()
        for name, value in slots.items()
    }
    return tensors, state_dict["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], state: dict) -> dict:
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        param, name = key.split(".", 1)
        slots.setdefault(int(param), {})[name] = value
    return {"state": slots, "param_groups": state["param_groups"]}
