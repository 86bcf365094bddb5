"""The torch backend: the reference's runners equal the ONNX Runtime backend's (the export's
parity tolerances), on the CPU and, where there is one, on a CUDA device; the scorer takes the
Gram of its attention direction; checkpoints that are not the bundle's (config, vocabulary or
weights) are refused."""

import json
import logging

import numpy as np
import pytest
from scan_deploy.runtime.backends import open_backend

from scan_deploy.bundle import MANIFEST, load_bundle
from scan_deploy.choices import Graph
from scan_deploy.errors import UserError

from .conftest import copy_bundle, encoder_inputs, run_pipeline

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

EMBEDDING_ATOL = 1e-5
SIMILARITY_ATOL = 1e-4
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device visible to PyTorch"
))]  # fmt: skip


def assert_parity(actual, expected):
    for graph in Graph:
        tolerance = SIMILARITY_ATOL if graph == "scorer" else EMBEDDING_ATOL
        for got, want in zip(actual[graph], expected[graph], strict=True):
            assert got.dtype == np.float32 and got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=0, atol=tolerance)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["tiny", "tiny_i2t"])
def test_torch_runners_equal_the_onnxruntime_runners(which, device, request):
    tiny = request.getfixturevalue(which)
    reference = open_backend(tiny.bundle, "torch", checkpoint=tiny.checkpoint, device=device)
    assert reference.name == f"torch {device}"
    assert reference.precision == "fp32"
    onnx_runtime = open_backend(tiny.bundle, "onnxruntime", providers=["cpu"])
    inputs = encoder_inputs(tiny.bundle, batch=5, seed=11)
    expected = run_pipeline(onnx_runtime, *inputs)
    assert_parity(run_pipeline(reference, *inputs), expected)
    # The scorer alone, on identical inputs, within the similarity tolerance.
    image, text = expected["image_encoder"], expected["text_encoder"]
    feeds = {
        "regions": image[0],
        "region_gram": image[1],
        "words": text[0],
        "caption_gram": text[1],
        "lengths": inputs[2],
    }
    np.testing.assert_allclose(
        reference.runner("scorer").run(feeds)[0],
        onnx_runtime.runner("scorer").run(feeds)[0],
        rtol=0,
        atol=SIMILARITY_ATOL,
    )


def test_scorer_takes_the_gram_of_its_direction(tiny, tiny_i2t):
    assert [v["name"] for v in tiny.bundle.graph("scorer")["inputs"]][1] == "region_gram"
    assert "caption_gram" in [v["name"] for v in tiny_i2t.bundle.graph("scorer")["inputs"]]
    backend = open_backend(tiny_i2t.bundle, "torch", checkpoint=tiny_i2t.checkpoint, device="cpu")
    _, tokens, lengths = encoder_inputs(tiny_i2t.bundle, batch=3)
    regions = np.random.default_rng(0).random((2, 5, 8), dtype=np.float32)
    words, gram, _ = backend.runner("text_encoder").run({"tokens": tokens, "lengths": lengths})
    feeds = {"regions": regions, "words": words, "lengths": lengths, "caption_gram": gram}
    scorer = backend.runner("scorer")
    base = scorer.run(feeds)[0]
    assert base.shape == (2, 3)
    changed = scorer.run({**feeds, "caption_gram": gram * 4})[0]  # |c|² from the Gram given
    assert not np.allclose(base, changed)
    with pytest.raises(UserError, match=r"scorer: input 'caption_gram' is missing"):
        scorer.run({k: v for k, v in feeds.items() if k != "caption_gram"})


def test_mismatched_checkpoints_are_refused(tiny, tiny_i2t, tmp_path):
    from scan_deploy.checkpoint import save_checkpoint
    from scan_deploy.model import SCAN
    from scan_deploy.vocab import Vocabulary

    with pytest.raises(UserError) as info:  # another config
        open_backend(tiny.bundle, "torch", checkpoint=tiny_i2t.checkpoint, device="cpu")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{tiny_i2t.checkpoint}: not the checkpoint of {tiny.bundle.path}")
    assert (
        "bi_gru True (bundle: False)" in message and "cross_attn 'i2t' (bundle: 't2i')" in message
    )

    vocab = Vocabulary.build([" ".join(f"v{i}" for i in range(12))], threshold=1)  # same size
    assert len(vocab) == len(tiny.bundle.vocab)
    save_checkpoint(tmp_path / "other", SCAN(tiny.bundle.config), vocab)
    with pytest.raises(UserError, match=r"its vocabulary \(16 words, sha256 \w+…\) differs"):
        open_backend(tiny.bundle, "torch", checkpoint=tmp_path / "other", device="cpu")


def test_checkpoint_with_other_weights_is_refused(tiny, tmp_path):
    from scan_deploy.checkpoint import load_checkpoint, save_checkpoint
    from scan_deploy.model import SCAN
    from scan_deploy.weights import weights_digest

    torch.manual_seed(5)  # the bundle's config and vocabulary, other weights
    save_checkpoint(tmp_path / "other", SCAN(tiny.bundle.config).eval(), tiny.bundle.vocab)
    with pytest.raises(UserError) as info:
        open_backend(tiny.bundle, "torch", checkpoint=tmp_path / "other", device="cpu")
    theirs = weights_digest(load_checkpoint(tmp_path / "other").model.state_dict())
    recorded = tiny.bundle.manifest["weights"]["sha256"]
    assert theirs != recorded
    assert str(info.value) == (
        f"{tmp_path / 'other'}: not the checkpoint of {tiny.bundle.path / MANIFEST}: its weights "
        f"digest is {theirs[:12]}…, the bundle was exported from weights with digest "
        f"{recorded[:12]}…"
    )


def test_original_checkpoint_of_the_bundles_weights_is_accepted(tiny, tmp_path):
    """The digest is over the loaded weights: the `.pth.tar` they came from passes too."""
    from scan_deploy.checkpoint import load_checkpoint

    from ...scan_deploy.test_checkpoint import _original_file

    _original_file(tmp_path / "model_best.pth.tar", load_checkpoint(tiny.checkpoint).model)
    backend = open_backend(tiny.bundle, "torch", checkpoint=tmp_path / "model_best.pth.tar")
    features, _, _ = encoder_inputs(tiny.bundle, batch=2)
    reference = open_backend(tiny.bundle, "torch", checkpoint=tiny.checkpoint)
    np.testing.assert_array_equal(
        backend.runner("image_encoder").run({"features": features})[0],
        reference.runner("image_encoder").run({"features": features})[0],
    )


def test_bundle_without_weights_digest_opens_with_one_warning(tiny, tmp_path, caplog):
    path = copy_bundle(tiny.bundle, tmp_path / "old")
    manifest = json.loads((path / MANIFEST).read_text())
    manifest.pop("weights", None)  # as exported before the digest was recorded
    (path / MANIFEST).write_text(json.dumps(manifest))
    caplog.set_level(logging.WARNING, "scan_deploy")
    backend = open_backend(load_bundle(path), "torch", checkpoint=tiny.checkpoint, device="cpu")
    assert backend.runner("image_encoder") is not None
    assert [r.getMessage() for r in caplog.records] == [
        f"{path / MANIFEST}: records no weights digest (exported before bundles recorded one): "
        f"cannot check that {tiny.checkpoint} holds the bundle's weights (re-export the bundle "
        "to record it)"
    ]


def test_torch_backend_refusals(tiny, tmp_path):
    with pytest.raises(UserError, match="needs the checkpoint the bundle was exported from"):
        open_backend(tiny.bundle, "torch")
    with pytest.raises(UserError, match="the torch backend runs the fp32 reference, not fp16"):
        open_backend(tiny.bundle, "torch", "fp16", checkpoint=tiny.checkpoint)
    with pytest.raises(UserError, match="device: got 'gpu0'"):
        open_backend(tiny.bundle, "torch", checkpoint=tiny.checkpoint, device="gpu0")
    with pytest.raises(UserError, match="not found, expected a checkpoint folder"):
        open_backend(tiny.bundle, "torch", checkpoint=tmp_path / "nothing")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="this PyTorch sees no CUDA device"):
            open_backend(tiny.bundle, "torch", checkpoint=tiny.checkpoint, device="cuda")


def test_cuda_runs_keep_cudnn_rnns_in_ieee_fp32(tiny):
    """The setting is only switched (and restored): no CUDA is needed to check that."""
    backend = open_backend(tiny.bundle, "torch", checkpoint=tiny.checkpoint, device="cpu")
    rnn = getattr(torch.backends.cudnn, "rnn", None)
    if not hasattr(rnn, "fp32_precision"):
        pytest.skip("PyTorch < 2.9: the legacy cudnn.allow_tf32 flag is switched instead")
    before = rnn.fp32_precision
    with backend.fp32():
        assert rnn.fp32_precision == before  # CPU: untouched
    backend.device = torch.device("cuda")
    with backend.fp32():
        assert rnn.fp32_precision == "ieee"
    assert rnn.fp32_precision == before
