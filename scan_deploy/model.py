"""The PyTorch SCAN reference: image encoder, text encoder, and the model that scores pairs.

Parameter names follow the original code (`fc.weight`, `embed.weight`, `rnn.weight_ih_l0`, ...) so
original checkpoints load without renaming; our model nests them under `img_enc.` and `txt_enc.`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from scan_deploy.config import ModelConfig
from scan_deploy.errors import input_error
from scan_deploy.scoring import l2norm, nonzero_rows, score_block, similarity_matrix


class WeightNormLinear(nn.Module):
    """Linear layer with weight normalisation over the whole matrix (`weight_norm(..., dim=None)`).

    Written out rather than taken from torch.nn.utils so the parameters keep the original's names
    `weight_g` (a scalar), `weight_v` and `bias`.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        linear = nn.Linear(in_features, out_features)
        self.weight_v = nn.Parameter(linear.weight.detach().clone())
        self.weight_g = nn.Parameter(linear.weight.detach().norm())
        self.bias = nn.Parameter(linear.bias.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


class EncoderImage(nn.Module):
    """Region features (B, R, img_dim) -> region embeddings (B, R, D); a padded region (an
    all-zero feature row: adaptive features, fewer regions than R) stays an all-zero row
    (`scoring.region_mask`)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.no_imgnorm = config.no_imgnorm
        if config.precomp_enc_type == "weight_norm":
            self.fc = WeightNormLinear(config.img_dim, config.embed_size)
        else:
            self.fc = nn.Linear(config.img_dim, config.embed_size)
            bound = math.sqrt(6.0) / math.sqrt(config.img_dim + config.embed_size)
            nn.init.uniform_(self.fc.weight, -bound, bound)
            nn.init.zeros_(self.fc.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        valid = nonzero_rows(images)[..., None]
        features = self.fc(images)
        if not self.no_imgnorm:  # padding normalised as ones: the gradient of |0| is NaN
            features = l2norm(features.masked_fill(~valid, 1.0), dim=-1)
        return features * valid


class EncoderText(nn.Module):
    """Token ids (B, T) + lengths (B,) -> word embeddings (B, T, D), zero beyond each length."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.no_txtnorm = config.no_txtnorm
        self.bi_gru = config.bi_gru
        self.embed = nn.Embedding(config.vocab_size, config.word_dim)
        self.rnn = nn.GRU(
            config.word_dim,
            config.embed_size,
            config.num_layers,
            batch_first=True,
            bidirectional=config.bi_gru,
        )
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        embedded = self.embed(tokens)
        packed = pack_padded_sequence(
            embedded, lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        output, _ = self.rnn(packed)
        words, _ = pad_packed_sequence(output, batch_first=True, total_length=tokens.shape[1])
        if self.bi_gru:
            half = words.shape[2] // 2
            words = (words[:, :, :half] + words[:, :, half:]) / 2
        return words if self.no_txtnorm else l2norm(words, dim=-1)


class SCAN(nn.Module):
    """The two encoders and the cross-attention similarity of the configured variant."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.img_enc = EncoderImage(config)
        self.txt_enc = EncoderText(config)

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """Similarity (B_images, B_captions) of a training batch, differentiable."""
        return score_block(
            self.img_enc(images), self.txt_enc(tokens, lengths), lengths, self.config
        )

    @torch.no_grad()
    def similarity(
        self, regions: torch.Tensor, words: torch.Tensor, lengths: torch.Tensor, **kwargs
    ) -> torch.Tensor:
        """All-pairs similarities of encoded images and captions, in memory-bounded blocks."""
        return similarity_matrix(regions, words, lengths, self.config, **kwargs)

    def load_weights(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load a state dict, naming the first missing/unexpected/mis-shaped tensor on failure."""
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        if missing:
            raise input_error(source, missing[0], "missing from the checkpoint weights")
        unexpected = sorted(set(state) - set(expected))
        if unexpected:
            raise input_error(
                source, unexpected[0], "unexpected weight (does the config match the checkpoint?)"
            )
        for name, tensor in expected.items():
            if tuple(state[name].shape) != tuple(tensor.shape):
                raise input_error(
                    source,
                    name,
                    f"shape {tuple(state[name].shape)} does not match the config, "
                    f"expected {tuple(tensor.shape)}{_shape_hint(name, self.config)}",
                )
        self.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})


Size = tuple[int, str]  # a weight's size along one axis, with the config field it comes from


def weight_shapes(config: ModelConfig) -> Iterator[tuple[str, tuple[Size, ...]]]:
    """The name and shape of every weight of `SCAN(config)`, in its state dict's order, computed
    without allocating anything and one at a time: a checkpoint's weights are checked against a
    config before the model is built, which a corrupt config (num_layers 100000, embed_size 1e9)
    would make hang or run out of memory (`checkpoint.build_model`)."""
    embed, gates = (config.embed_size, "embed_size"), (3 * config.embed_size, "embed_size")
    image = (config.img_dim, "img_dim")
    if config.precomp_enc_type == "weight_norm":
        yield from [("img_enc.fc.weight_v", (embed, image)), ("img_enc.fc.weight_g", ())]
    else:
        yield "img_enc.fc.weight", (embed, image)
    yield "img_enc.fc.bias", (embed,)
    yield "txt_enc.embed.weight", ((config.vocab_size, "vocab_size"), (config.word_dim, "word_dim"))
    directions = ("", "_reverse") if config.bi_gru else ("",)
    inputs = (config.word_dim, "word_dim")
    for layer in range(config.num_layers):
        for suffix in directions:
            yield f"txt_enc.rnn.weight_ih_l{layer}{suffix}", (gates, inputs)
            yield f"txt_enc.rnn.weight_hh_l{layer}{suffix}", (gates, embed)
            yield f"txt_enc.rnn.bias_ih_l{layer}{suffix}", (gates,)
            yield f"txt_enc.rnn.bias_hh_l{layer}{suffix}", (gates,)
        inputs = (len(directions) * config.embed_size, "embed_size")


def _shape_hint(name: str, config: ModelConfig) -> str:
    if name == "txt_enc.embed.weight":
        return f" (vocab_size={config.vocab_size}, word_dim={config.word_dim})"
    if name.startswith("img_enc.fc."):
        return f" (img_dim={config.img_dim}, embed_size={config.embed_size})"
    return ""
