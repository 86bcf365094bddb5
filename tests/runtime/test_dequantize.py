"""Stored float16 / int8 to float32: bit-identical to numpy's arithmetic, through ONNX Runtime
(Cast, DequantizeLinear) when it is installed and through numpy without it, for every shape the
gallery stores."""

import importlib.util

import numpy as np
import pytest
from scan_deploy.runtime import dequantize
from scan_deploy.runtime.dequantize import to_float32


def float16_block(shape) -> np.ndarray:
    """Normal, subnormal, zero, signed zero, ±inf and the largest finite float16 values."""
    values = np.random.default_rng(0).standard_normal(shape).astype(np.float16)
    special = np.array([0.0, -0.0, 6e-8, -6e-8, 65504, -65504, np.inf, -np.inf], np.float16)
    flat = values.reshape(-1)
    flat[: special.size] = special[: flat.size]
    return values


@pytest.mark.parametrize("shape", [(3, 5, 8), (2, 4, 4), (1, 1, 1), (0, 5, 8), (7,)])
def test_float16_is_bit_identical_to_numpy(shape):
    raw = float16_block(shape)
    got = to_float32(raw)
    assert got.dtype == np.float32 and got.shape == raw.shape
    np.testing.assert_array_equal(got.view(np.uint32), raw.astype(np.float32).view(np.uint32))


@pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed"
)
def test_onnxruntime_graphs_are_used_when_installed():
    assert dequantize._session(dequantize.CAST_FLOAT16) is not None
    assert dequantize._session(dequantize.DEQUANTIZE_INT8) is not None
    assert dequantize._session(dequantize.DEQUANTIZE_UINT8) is not None


def without_onnxruntime(monkeypatch):
    monkeypatch.setattr(dequantize, "_session", lambda graph: None)


def test_float16_falls_back_to_numpy_without_onnxruntime(monkeypatch):
    without_onnxruntime(monkeypatch)
    raw = float16_block((3, 5, 8))
    np.testing.assert_array_equal(to_float32(raw), raw.astype(np.float32))


def test_float16_slices_of_a_memory_map_are_read(tmp_path):
    """Blocks come from memory maps (read-only, maybe not contiguous after a row selection)."""
    raw = float16_block((6, 5, 8))
    np.save(tmp_path / "a.npy", raw)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    np.testing.assert_array_equal(to_float32(mapped[1:4]), raw[1:4].astype(np.float32))
    np.testing.assert_array_equal(to_float32(mapped[:, ::2]), raw[:, ::2].astype(np.float32))


@pytest.mark.parametrize("codes", [False, True])
@pytest.mark.parametrize("onnxruntime", [True, False])
@pytest.mark.parametrize("shape", [(4, 5, 8), (3, 8), (0, 5, 8), (2, 1, 1)])
def test_int8_is_values_times_row_scale(monkeypatch, onnxruntime, shape, codes):
    """int8 values as int8 (gallery formats 1, 2) or as uint8 codes q + 128 (format 3)."""
    if not onnxruntime:
        without_onnxruntime(monkeypatch)
    rng = np.random.default_rng(1)
    q = rng.integers(-127, 128, shape).astype(np.int8)
    scale = (rng.random(shape[:-1]) * 0.01).astype(np.float32)
    if scale.size:
        scale.reshape(-1)[0] = 0  # an all-zero row
    stored = (q.astype(np.int16) + 128).astype(np.uint8) if codes else q
    got = to_float32(stored, scale)
    assert got.dtype == np.float32 and got.shape == q.shape
    expected = q.astype(np.float32) * scale[..., None]
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_int8_rows_of_a_memory_map_are_read(tmp_path):
    rng = np.random.default_rng(2)
    q = rng.integers(-127, 128, (6, 5, 8)).astype(np.int8)
    scale = rng.random((6, 5)).astype(np.float32)
    np.save(tmp_path / "q.npy", q)
    np.save(tmp_path / "s.npy", scale)
    mq, ms = (np.load(tmp_path / f, mmap_mode="r") for f in ("q.npy", "s.npy"))
    got = to_float32(mq[1:4], ms[1:4])
    np.testing.assert_array_equal(got, q[1:4].astype(np.float32) * scale[1:4, :, None])


def test_int8_without_scale_or_with_another_shape_is_refused():
    with pytest.raises(ValueError, match="per-row scale"):
        to_float32(np.zeros((2, 3), np.int8))
    with pytest.raises(ValueError, match=r"scale of shape \(2, 1\), expected \(2, 3\)"):
        to_float32(np.zeros((2, 3, 4), np.int8), np.ones((2, 1), np.float32))


def test_a_graph_onnxruntime_cannot_load_falls_back_to_numpy(tmp_path, caplog):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not onnx")
    assert dequantize._session.__wrapped__(broken) is None
    assert "onnxruntime cannot load it" in caplog.text


def test_float32_is_copied():
    raw = np.arange(6, dtype=np.float32).reshape(2, 3)
    got = to_float32(raw)
    np.testing.assert_array_equal(got, raw)
    assert not np.shares_memory(got, raw)
