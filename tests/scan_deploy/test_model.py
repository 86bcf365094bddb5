import pytest
import torch

from scan_deploy.config import ModelConfig
from scan_deploy.errors import UserError
from scan_deploy.model import SCAN, weight_shapes
from scan_deploy.scoring import l2norm, pooled_embedding


def _config(**overrides) -> ModelConfig:
    base = dict(vocab_size=11, img_dim=6, embed_size=4, word_dim=3)
    return ModelConfig(**{**base, **overrides})


@pytest.mark.parametrize("bi_gru", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_text_encoder_matches_each_caption_encoded_alone(bi_gru, num_layers):
    torch.manual_seed(0)
    model = SCAN(_config(bi_gru=bi_gru, num_layers=num_layers)).eval()
    lengths = torch.tensor([3, 6, 1, 4])
    tokens = torch.randint(1, 11, (4, 6))
    words = model.txt_enc(tokens, lengths)
    assert words.shape == (4, 6, 4)
    for row, length in enumerate(lengths.tolist()):
        alone = model.txt_enc(tokens[row : row + 1, :length], lengths[row : row + 1])
        torch.testing.assert_close(words[row, :length], alone[0], atol=1e-6, rtol=0)
        assert torch.all(words[row, length:] == 0)
    norms = words.norm(dim=-1)[torch.arange(6)[None] < lengths[:, None]]
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-6, rtol=0)


def test_bi_gru_averages_the_two_directions():
    torch.manual_seed(1)
    model = SCAN(_config(bi_gru=True, no_txtnorm=True)).eval()
    tokens = torch.tensor([[1, 2, 3]])
    output, _ = model.txt_enc.rnn(model.txt_enc.embed(tokens))
    expected = (output[..., :4] + output[..., 4:]) / 2
    torch.testing.assert_close(model.txt_enc(tokens, torch.tensor([3])), expected)


def padded_features(counts: list[int], regions: int, img_dim: int, seed: int) -> torch.Tensor:
    """Random non-negative features (as bottom-up features are), image i's rows past counts[i]
    zero: adaptive features in the precomp layout."""
    features = torch.rand(
        len(counts), regions, img_dim, generator=torch.Generator().manual_seed(seed)
    )
    for i, count in enumerate(counts):
        features[i, count:] = 0.0
    return features


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_padded_images_score_as_each_image_alone_at_10_36_and_100_regions(direction):
    """Adaptive features: images of 10, 36 and 100 regions padded to 100 get the scores (and
    pooled embeddings) each gets alone, unpadded; the padding's embeddings are zero."""
    torch.manual_seed(2)
    model = SCAN(_config(cross_attn=direction)).eval()
    counts = [10, 36, 100]
    features = padded_features(counts, 100, 6, seed=3)
    tokens, lengths = torch.randint(1, 11, (4, 6)), torch.tensor([3, 6, 1, 4])
    with torch.no_grad():
        regions = model.img_enc(features)
        words = model.txt_enc(tokens, lengths)
        scores = model.similarity(regions, words, lengths)
        for i, count in enumerate(counts):
            assert not regions[i, count:].any()
            alone = model.img_enc(features[i : i + 1, :count])
            expected = model.similarity(alone, words, lengths)
            torch.testing.assert_close(scores[i : i + 1], expected, atol=1e-6, rtol=0)
            torch.testing.assert_close(
                pooled_embedding(regions[i : i + 1]), pooled_embedding(alone), atol=1e-6, rtol=0
            )


@pytest.mark.parametrize("no_imgnorm", [False, True])
def test_training_on_padded_images_has_finite_gradients(no_imgnorm):
    """A fresh model's fc maps an all-zero row to zero (bias 0), where the L2 norm's gradient is
    NaN: padding must stay out of it."""
    torch.manual_seed(2)
    model = SCAN(_config(no_imgnorm=no_imgnorm))
    torch.nn.init.zeros_(model.img_enc.fc.bias)
    features = padded_features([3, 8], 8, 6, seed=5)
    tokens, lengths = torch.randint(1, 11, (2, 6)), torch.tensor([6, 2])
    model(features, tokens, lengths).sum().backward()
    for name, parameter in model.named_parameters():
        assert torch.isfinite(parameter.grad).all(), name


def test_full_region_counts_take_the_unmasked_path_bit_for_bit():
    """Fixed 36 regions: the masking changes nothing, to the bit."""
    torch.manual_seed(2)
    model = SCAN(_config()).eval()
    features = padded_features([36, 36], 36, 6, seed=4)
    with torch.no_grad():
        regions = model.img_enc(features)
        unmasked = l2norm(model.img_enc.fc(features), -1)
    assert torch.equal(regions, unmasked)


@pytest.mark.parametrize("enc_type", ["basic", "weight_norm"])
def test_image_encoder_normalises_unless_disabled(enc_type):
    torch.manual_seed(2)
    images = torch.randn(2, 5, 6)
    normed = SCAN(_config(precomp_enc_type=enc_type)).img_enc(images)
    torch.testing.assert_close(normed.norm(dim=-1), torch.ones(2, 5), atol=1e-6, rtol=0)
    raw = SCAN(_config(precomp_enc_type=enc_type, no_imgnorm=True)).img_enc(images)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(2, 5))


def test_weight_norm_keeps_original_parameter_names_and_value():
    model = SCAN(_config(precomp_enc_type="weight_norm"))
    keys = set(model.state_dict())
    assert {"img_enc.fc.weight_g", "img_enc.fc.weight_v", "img_enc.fc.bias"} <= keys
    fc = model.img_enc.fc
    assert fc.weight_g.shape == ()
    torch.testing.assert_close(fc.weight.norm(), fc.weight_g.detach())


def test_load_weights_names_the_mismatch():
    model = SCAN(_config())
    state = SCAN(_config(vocab_size=12)).state_dict()
    with pytest.raises(
        UserError, match=r"ckpt: txt_enc.embed.weight: shape \(12, 3\).*vocab_size=11"
    ):
        model.load_weights(state, "ckpt")
    state = dict(model.state_dict())
    del state["img_enc.fc.bias"]
    with pytest.raises(UserError, match="img_enc.fc.bias: missing"):
        model.load_weights(state, "ckpt")


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"precomp_enc_type": "weight_norm"},
        {"bi_gru": True},
        {"num_layers": 3},
        {"num_layers": 2, "bi_gru": True, "precomp_enc_type": "weight_norm"},
    ],
)
def test_weight_shapes_are_the_models(overrides):
    """What the checkpoint loader checks weights against before building a model: the names,
    order and shapes of `SCAN(config).state_dict()`, each size naming its config field."""
    config = _config(embed_size=5, **overrides)
    expected = [(k, tuple(v.shape)) for k, v in SCAN(config).state_dict().items()]
    shapes = list(weight_shapes(config))
    assert [(name, tuple(size for size, _ in dims)) for name, dims in shapes] == expected
    for _, dims in shapes:
        for size, field in dims:
            assert size in {k * getattr(config, field) for k in (1, 2, 3)}  # GRU: 3 gates


def test_weight_shapes_allocate_nothing_and_are_lazy():
    """A corrupt config's sizes: SCAN(config) hung (num_layers) or ran out of memory."""
    config = _config(embed_size=10**12, num_layers=10**12)
    shapes = weight_shapes(config)
    name, dims = next(shapes)
    assert (name, dims) == ("img_enc.fc.weight", ((10**12, "embed_size"), (6, "img_dim")))
