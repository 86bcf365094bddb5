"""The ONNX encoder graphs in ONNX Runtime against the PyTorch reference."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from scan_deploy.export.encoders import image_encoder_graph, text_encoder_graph

from scan_deploy.config import ModelConfig
from scan_deploy.model import SCAN
from scan_deploy.scoring import caption_gram, pooled_embedding, region_gram

V, F, D, E, R = 23, 12, 8, 6, 5


def _session(model_proto: onnx.ModelProto) -> ort.InferenceSession:
    onnx.checker.check_model(model_proto, full_check=True)
    return ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _model(**overrides) -> SCAN:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=V, img_dim=F, embed_size=D, word_dim=E, **overrides)
    return SCAN(config).eval()


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize(
    "overrides", [{}, {"precomp_enc_type": "weight_norm"}, {"no_imgnorm": True}]
)
def test_image_encoder_matches_pytorch(batch, overrides):
    model = _model(**overrides)
    features = torch.rand(batch, R, F)
    regions, gram, pooled = _session(image_encoder_graph(model)).run(
        None, {"features": features.numpy()}
    )
    with torch.no_grad():
        expected = model.img_enc(features)
    np.testing.assert_allclose(regions, expected.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(gram, region_gram(expected).numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(pooled, pooled_embedding(expected).numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides", [{}, {"no_imgnorm": True}])
def test_image_encoder_zeroes_padded_regions_at_10_36_and_100(overrides):
    """Adaptive features (10, 36 and 100 regions, zero-padded to 100): the graph's regions,
    Gram and pooled embedding are the reference's, the padding's embeddings zero."""
    model = _model(**overrides)
    counts = [10, 36, 100]
    features = torch.rand(3, 100, F, generator=torch.Generator().manual_seed(5))
    for i, count in enumerate(counts):
        features[i, count:] = 0
    regions, gram, pooled = _session(image_encoder_graph(model)).run(
        None, {"features": features.numpy()}
    )
    with torch.no_grad():
        expected = model.img_enc(features)
        alone = [
            pooled_embedding(model.img_enc(features[i : i + 1, :c])) for i, c in enumerate(counts)
        ]
    np.testing.assert_allclose(regions, expected.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(gram, region_gram(expected).numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(pooled, torch.cat(alone).numpy(), atol=1e-5, rtol=0)
    for i, count in enumerate(counts):
        assert not regions[i, count:].any()


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"bi_gru": True},
        {"num_layers": 2},
        {"bi_gru": True, "num_layers": 2},
        {"no_txtnorm": True},
    ],
)
def test_text_encoder_matches_pytorch_for_every_length(batch, overrides):
    model = _model(**overrides)
    gen = torch.Generator().manual_seed(batch)
    max_len = 9
    lengths = torch.randint(1, max_len + 1, (batch,), generator=gen)
    lengths[0] = max_len
    if batch > 1:
        lengths[1] = 1
    tokens = torch.randint(1, V, (batch, max_len), generator=gen)
    tokens[torch.arange(max_len)[None] >= lengths[:, None]] = 0
    words, gram, pooled = _session(text_encoder_graph(model)).run(
        None, {"tokens": tokens.numpy(), "lengths": lengths.numpy()}
    )
    with torch.no_grad():
        expected = model.txt_enc(tokens, lengths)
    np.testing.assert_allclose(words, expected.numpy(), atol=1e-5, rtol=0)
    padded = np.arange(max_len)[None] >= lengths.numpy()[:, None]
    assert np.all(words[padded] == 0)
    np.testing.assert_allclose(gram, caption_gram(expected).numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(
        pooled, pooled_embedding(expected, lengths).numpy(), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("opset", [13, 17, 18, 20])
def test_graphs_are_valid_at_supported_opsets(opset):
    model = _model(bi_gru=True)
    for graph in (image_encoder_graph(model, opset), text_encoder_graph(model, opset)):
        assert graph.opset_import[0].version == opset
        _session(graph)
