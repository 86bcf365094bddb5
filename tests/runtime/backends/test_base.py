"""The shared part of the backends: option checks of open_backend, feed checks, engine discovery,
the sizes of the runtime's calls (the shape contract), and the import discipline (the runtime
loads neither torch nor onnx)."""

import subprocess
import sys
import textwrap
from dataclasses import asdict

import numpy as np
import pytest
from scan_deploy.runtime.backends import open_backend
from scan_deploy.runtime.backends.base import CallSizes, as_output, prepare_feeds

from scan_deploy.choices import Backend, Graph, Precision
from scan_deploy.errors import UserError

TEXT_INPUTS = [
    {"name": "tokens", "dtype": "int64", "shape": ["batch", "words"]},
    {"name": "lengths", "dtype": "int64", "shape": ["batch"]},
]
IMAGE_INPUTS = [{"name": "features", "dtype": "float32", "shape": ["batch", "regions", 10]}]


def test_prepare_feeds_orders_casts_and_ignores_other_names():
    feeds = {
        "lengths": [3, 1],
        "tokens": np.ones((2, 4), dtype=np.int32),
        "caption_gram": np.zeros(1),  # not an input of this graph: ignored
    }
    arrays = prepare_feeds("text_encoder", TEXT_INPUTS, feeds)
    assert list(arrays) == ["tokens", "lengths"]
    assert arrays["tokens"].dtype == np.int64 and arrays["lengths"].dtype == np.int64
    assert arrays["tokens"].flags.c_contiguous
    fortran = np.asfortranarray(np.ones((2, 5, 10), np.float64))
    (features,) = prepare_feeds("image_encoder", IMAGE_INPUTS, {"features": fortran}).values()
    assert features.dtype == np.float32 and features.flags.c_contiguous
    overridden = prepare_feeds("text_encoder", TEXT_INPUTS, feeds, {"tokens": "int32"})
    assert overridden["tokens"].dtype == np.int32  # an engine's own input type


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ({"tokens": np.ones((2, 4))}, r"text_encoder: input 'lengths' is missing \(the graph "),
        ({"tokens": np.ones(4), "lengths": [4]}, r"'tokens' has shape \(4,\), expected 2 dims"),
        (
            {"tokens": np.ones((2, 4)), "lengths": [4, 4, 4]},
            r"input 'lengths' has batch=3 \(dim 0\), input 'tokens' has batch=2",
        ),
    ],
)
def test_prepare_feeds_refusals(feeds, message):
    with pytest.raises(UserError, match=message):
        prepare_feeds("text_encoder", TEXT_INPUTS, feeds)


def test_prepare_feeds_checks_fixed_dims():
    with pytest.raises(UserError, match=r"has shape \(1, 5, 9\), dim 2 must be 10"):
        prepare_feeds("image_encoder", IMAGE_INPUTS, {"features": np.ones((1, 5, 9))})


def test_outputs_are_float32_or_int64():
    assert as_output(np.ones(2, np.float16)).dtype == np.float32
    assert as_output(np.ones(2, np.float64)).dtype == np.float32
    assert as_output(np.ones(2, np.int32)).dtype == np.int64
    same = np.ones(2, np.float32)
    assert as_output(same) is same


def test_open_backend_refusals(tiny):
    bundle = tiny.bundle
    with pytest.raises(UserError, match="backend: got 'openvino', expected one of onnxruntime"):
        open_backend(bundle, "openvino")
    with pytest.raises(UserError, match="precision: got 'bf16', expected one of fp32, fp16, int8"):
        open_backend(bundle, "onnxruntime", "bf16")
    with pytest.raises(UserError, match="providers: applies to the onnxruntime backend, not torch"):
        open_backend(bundle, "torch", providers=["cpu"], checkpoint=tiny.checkpoint)
    with pytest.raises(UserError, match="checkpoint: applies to the torch backend"):
        open_backend(bundle, checkpoint=tiny.checkpoint)
    with pytest.raises(UserError, match="device: applies to the torch backend, not tensorrt"):
        open_backend(bundle, "tensorrt", device="cuda")
    with pytest.raises(UserError, match=r"graph: got 'decoder', expected one of image_encoder"):
        open_backend(bundle).runner("decoder")
    opened = open_backend(bundle, Backend.ONNXRUNTIME, Precision.FP32)  # members or their values
    assert opened.precision is Precision.FP32 and opened.runner("scorer").graph is Graph.SCORER


@pytest.mark.parametrize("artifacts", [False, True], ids=["graphs", "build-engine-artifacts"])
def test_runtime_imports_neither_torch_nor_onnx(tiny, tmp_path, artifacts):
    """A fresh interpreter: importing the backends, opening the ONNX Runtime backend on the
    bundle (on its graphs, or on build-engine's ONNX Runtime artifacts, which
    `scan_deploy.engines.load.load_session` opens) and running its three runners loads no
    torch and no onnx."""
    pytest.importorskip("onnxruntime")
    path = tiny.bundle.path
    if artifacts:
        from scan_deploy.engines.build import BuildOptions, build_engines

        from scan_deploy.bundle import load_bundle

        from .conftest import copy_bundle

        path = copy_bundle(tiny.bundle, tmp_path / "bundle")
        build_engines(load_bundle(path), BuildOptions(backend="onnxruntime", provider="cpu"))
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import scan_deploy.runtime.backends
        assert not {{"torch", "onnx", "tensorrt"}} & set(sys.modules), "on import"
        from scan_deploy.bundle import load_bundle
        from scan_deploy.runtime.backends import open_backend
        backend = open_backend(load_bundle({str(path)!r}))
        image = backend.runner("image_encoder").run({{"features": np.ones((2, 5, 10))}})
        text = backend.runner("text_encoder").run(
            {{"tokens": np.ones((3, 4), np.int64), "lengths": np.array([4, 2, 1])}}
        )
        feeds = {{"regions": image[0], "region_gram": image[1], "words": text[0],
                  "lengths": np.array([4, 2, 1])}}
        assert backend.runner("scorer").run(feeds)[0].shape == (2, 3)
        sources = {{backend.runner(g).source.parent.name for g in ("image_encoder", "scorer")}}
        assert sources == {{{"engines" if artifacts else path.name!r}}}, sources
        print(sorted(m for m in ("torch", "onnx", "tensorrt") if m in sys.modules))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_call_sizes_come_from_the_manifest_on_onnx_runtime_and_torch(tiny):
    """The tiny bundle: batch 1..8 (opt 8), words 1..7. `export`'s defaults (max batch 256, opt
    32, 64 words) give gallery blocks of 256 and query batches of 32."""
    import inspect

    from scan_deploy.export.writer import ShapeRanges

    from scan_deploy import cli
    from scan_deploy.bundle import Bundle

    expected = CallSizes(image_batch=8, text_batch=8, image_block=8, caption_block=8, max_tokens=7)
    assert CallSizes.of(open_backend(tiny.bundle)) == expected
    assert CallSizes.of(open_backend(tiny.bundle, "torch", checkpoint=tiny.checkpoint)) == expected
    max_batch = inspect.signature(cli.export_command).parameters["max_batch"].default
    ranges = ShapeRanges.create(max_batch, 36, 64)
    manifest = {**tiny.bundle.manifest, "shape_ranges": asdict(ranges)}
    default = Bundle(tiny.bundle.path, manifest, tiny.bundle.config, tiny.bundle.vocab)
    assert CallSizes.of(open_backend(default)) == CallSizes(32, 32, 256, 256, 64)
