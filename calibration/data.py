"""Calibration data: a seeded sample of a precomp split, and the inputs each graph sees in use.

The image encoder reads region features, the text encoder tokenized captions (batched by length,
as the pipeline batches them), and the scorer what the FP32 encoders produce from the same sample
(blocks of images × captions), so every graph is calibrated on its real input distribution.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from scan_deploy.batching import pad_tokens
from scan_deploy.errors import input_error
from scan_deploy.precomp import PrecompSplit
from scan_deploy.vocab import Vocabulary

Feed = dict[str, np.ndarray]
ENCODER_BATCH = 32
SCORER_IMAGES = 16  # a scorer calibration block: this many images × CAPTION_BATCH captions
CAPTION_BATCH = 64


def sample_split(split: PrecompSplit, samples: int, seed: int) -> PrecompSplit:
    """`samples` images drawn without replacement (seeded), with all their captions, in memory."""
    if samples < 1:
        raise input_error(None, "samples", f"expected at least 1, got {samples}")
    count = min(samples, split.num_images)
    chosen = np.sort(np.random.default_rng(seed).choice(split.num_images, count, replace=False))
    per_image = split.captions_per_image
    captions = [split.captions[i * per_image + j] for i in chosen for j in range(per_image)]
    features = np.stack([np.asarray(split.images[i], np.float32) for i in chosen])
    return PrecompSplit(features, captions, per_image, split.features_path)


def image_feeds(split: PrecompSplit) -> list[Feed]:
    """Batches of ENCODER_BATCH images (the last one wraps around: equal shapes)."""
    batches = -(-split.num_images // ENCODER_BATCH)
    return [
        {"features": np.asarray(split.images[rows % split.num_images], np.float32)}
        for rows in (np.arange(i * ENCODER_BATCH, (i + 1) * ENCODER_BATCH) for i in range(batches))
    ]


def text_feeds(split: PrecompSplit, vocab: Vocabulary) -> list[Feed]:
    """Captions in length-sorted batches of CAPTION_BATCH (the last one wraps around), all padded
    to the sample's longest caption: ONNX Runtime's histogram calibrators need equal shapes."""
    token_lists = sorted((vocab.encode(c) for c in split.captions), key=len, reverse=True)
    tokens, lengths = pad_tokens(token_lists)
    batches = -(-len(token_lists) // CAPTION_BATCH)
    feeds = []
    for index in range(batches):
        rows = np.arange(index * CAPTION_BATCH, (index + 1) * CAPTION_BATCH) % len(token_lists)
        feeds.append({"tokens": tokens[rows], "lengths": lengths[rows]})
    return feeds


def scorer_feeds(sessions: dict, split: PrecompSplit, vocab: Vocabulary, t2i: bool) -> list[Feed]:
    """Scorer inputs made by the FP32 encoder sessions: blocks of SCORER_IMAGES images (cycling
    through the sample) × one caption batch each."""
    image_out = [sessions["image_encoder"].run(None, feed) for feed in image_feeds(split)]
    regions = np.concatenate([out[0] for out in image_out])
    region_grams = np.concatenate([out[1] for out in image_out])
    feeds = []
    for index, feed in enumerate(text_feeds(split, vocab)):
        words, caption_gram, _ = sessions["text_encoder"].run(None, feed)
        block = np.arange(index * SCORER_IMAGES, (index + 1) * SCORER_IMAGES) % split.num_images
        scorer_feed = {"regions": regions[block], "words": words, "lengths": feed["lengths"]}
        if t2i:
            scorer_feed["region_gram"] = region_grams[block]
        else:
            scorer_feed["caption_gram"] = caption_gram
        feeds.append(scorer_feed)
    return feeds


class FeedReader(CalibrationDataReader):
    """ONNX Runtime's calibration interface over a list of feeds."""

    def __init__(self, feeds: list[Feed]) -> None:
        self.feeds = feeds
        self._iter: Iterator[Feed] = iter(feeds)

    def get_next(self) -> Feed | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)
