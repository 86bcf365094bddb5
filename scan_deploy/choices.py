"""The named choices scan-deploy takes, as string enums: graph precision, inference backend, ONNX
Runtime execution provider, graph, gallery storage dtype and shortlist engine.

A member is a `str` equal to its value (`Precision.FP16 == "fp16"`), and formats, hashes and
serializes to JSON as that value, so manifests, sidecars and file names hold plain strings. The
command line declares its options with these types: its parser refuses a bad value naming the flag
(exit 2). A library function takes a member or its value and converts it once, where it is called,
with `parse`: a bad value is a one-line UserError naming the parameter, `precision: got 'bf16',
expected one of fp32, fp16, int8`.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import TypeVar

from scan_deploy.errors import input_error

C = TypeVar("C", bound="Choice")


class Choice(str, Enum):
    """A str enum whose members print and format as their values."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(
        cls: type[C],
        value: object,
        field: str,
        path: str | Path | None = None,
        among: Iterable[C] | None = None,
    ) -> C:
        """The member `value` names (a member or its value), when it is one of `among` (default:
        every member); otherwise the one-line UserError `FILE: FIELD: got 'x', expected one of
        a, b, c`."""
        allowed = tuple(cls if among is None else among)
        member = cls._value2member_map_.get(value) if isinstance(value, str) else None
        if member not in allowed:
            shown = value.value if isinstance(value, Enum) else value
            raise input_error(path, field, f"got {shown!r}, expected one of {', '.join(allowed)}")
        return member


class Precision(Choice):
    """The precision of a bundle's graphs: the exported FP32 ones, or a variant `calibrate`
    writes."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class Backend(Choice):
    """What runs the graphs: ONNX Runtime, TensorRT engines, or the PyTorch reference."""

    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"
    TORCH = "torch"


class Provider(Choice):
    """An ONNX Runtime execution provider, by its short name."""

    CPU = "cpu"
    CUDA = "cuda"
    TENSORRT = "tensorrt"


class Graph(Choice):
    """The three graphs of a bundle, in the order they run."""

    IMAGE_ENCODER = "image_encoder"
    TEXT_ENCODER = "text_encoder"
    SCORER = "scorer"


class GalleryDtype(Choice):
    """How a gallery stores its region and word features."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class ShortlistEngine(Choice):
    """What ranks the pooled-embedding shortlist: FAISS when installed (auto), numpy or FAISS."""

    AUTO = "auto"
    NUMPY = "numpy"
    FAISS = "faiss"


class FirstStage(Choice):
    """What picks a two-stage search's candidates: the pooled embeddings (global) or late
    interaction over the region and word vectors (maxsim)."""

    GLOBAL = "global"
    MAXSIM = "maxsim"


class Scorer(Choice):
    """Which exact scorer reads the gallery: `float` (the bundle's scorer at the backend's
    precision, on rows dequantized to float32), `int8` (the integer-GEMM scorer on an int8
    gallery's stored codes, ONNX Runtime on the CPU) or `auto` (int8 where it can run)."""

    AUTO = "auto"
    FLOAT = "float"
    INT8 = "int8"
