"""The SCAN model configuration: every option of the original, validated, read and written as JSON.

This module imports neither torch nor onnx: the runtime reads the same config from a bundle.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from scan_deploy.errors import UserError, input_error, one_of
from scan_deploy.jsonfile import read_json_object

FORMAT_VERSION = 1

PRECOMP_ENC_TYPES = ("basic", "weight_norm")
RAW_FEATURE_NORMS = (
    "softmax",
    "l2norm",
    "clipped_l2norm",
    "l1norm",
    "clipped_l1norm",
    "clipped",
    "no_norm",
)
AGG_FUNCS = ("LogSumExp", "Mean", "Max", "Sum")
CROSS_ATTNS = ("t2i", "i2t")


@dataclass(frozen=True)
class ModelConfig:
    """Model options with the defaults of the original SCAN `train.py`."""

    vocab_size: int
    img_dim: int = 2048
    embed_size: int = 1024
    word_dim: int = 300
    num_layers: int = 1
    bi_gru: bool = False
    precomp_enc_type: str = "basic"
    no_imgnorm: bool = False
    no_txtnorm: bool = False
    raw_feature_norm: str = "clipped_l2norm"
    agg_func: str = "LogSumExp"
    cross_attn: str = "t2i"
    lambda_softmax: float = 9.0
    lambda_lse: float = 6.0
    margin: float = 0.2
    max_violation: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, source: str | Path | None = None) -> None:
        """Raise a UserError naming the first field whose value is not allowed."""
        choices = {
            "precomp_enc_type": PRECOMP_ENC_TYPES,
            "raw_feature_norm": RAW_FEATURE_NORMS,
            "agg_func": AGG_FUNCS,
            "cross_attn": CROSS_ATTNS,
        }
        for name, allowed in choices.items():
            one_of(getattr(self, name), allowed, name, source)
        for name in ("vocab_size", "img_dim", "embed_size", "word_dim", "num_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise input_error(source, name, f"got {value!r}, expected a positive integer")
        for name in ("bi_gru", "no_imgnorm", "no_txtnorm", "max_violation"):
            if not isinstance(getattr(self, name), bool):
                raise input_error(
                    source, name, f"got {getattr(self, name)!r}, expected true or false"
                )
        if not is_finite_number(self.margin) or self.margin < 0:
            raise input_error(
                source, "margin", f"got {self.margin!r}, expected a finite number >= 0"
            )
        for name in ("lambda_softmax", "lambda_lse"):
            value = getattr(self, name)
            if not is_finite_number(value) or value <= 0:
                raise input_error(source, name, f"got {value!r}, expected a finite number > 0")

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | Path | None = None) -> ModelConfig:
        """Build a config from a dict, refusing unknown or missing fields with a one-line error."""
        if not isinstance(data, dict):
            raise input_error(source, None, "expected a JSON object with the model options")
        version = data.get("format_version", FORMAT_VERSION)
        if isinstance(version, bool) or version not in range(1, FORMAT_VERSION + 1):
            raise input_error(
                source,
                "format_version",
                f"got {version!r}, expected 1 to {FORMAT_VERSION} "
                "(a higher version means a newer scan-deploy wrote the file)",
            )
        data = {k: v for k, v in data.items() if k != "format_version"}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise input_error(
                source, unknown[0], f"unknown option (known: {', '.join(sorted(known))})"
            )
        if "vocab_size" not in data:
            raise input_error(source, "vocab_size", "missing, expected a positive integer")
        try:
            return cls(**data)
        except UserError as exc:
            raise input_error(source, None, str(exc)) from None

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(read_json_object(path, "a model config JSON"), source=Path(path))


def is_finite_number(value: Any) -> bool:
    """A finite int or float (not a bool, NaN or infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
