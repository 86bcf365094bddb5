"""The weights digest bundles record (`weights.sha256`)."""

import hashlib

import numpy as np
import torch

from scan_deploy.weights import weights_digest


def test_weights_digest_is_the_documented_one():
    """Name order; per tensor `name`, `dtype`, `shape` lines, then its bytes: bundles record it,
    so the definition must not drift."""
    state = {"b": torch.tensor([1.5, -2.0]), "a": torch.arange(6).reshape(2, 3)}
    expected = hashlib.sha256(
        b"a\ntorch.int64\n(2, 3)\n"
        + np.arange(6, dtype="<i8").tobytes()
        + b"b\ntorch.float32\n(2,)\n"
        + np.array([1.5, -2.0], dtype="<f4").tobytes()
    ).hexdigest()
    assert weights_digest(state) == expected
    assert weights_digest({**state, "a": state["a"].reshape(3, 2)}) != expected
    assert weights_digest({**state, "b": state["b"].double()}) != expected
