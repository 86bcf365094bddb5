"""The attention SCAN used to score one image–caption pair, from the bundle's explain graph
(`explain.onnx`: the scorer with its attention as a second output), on ONNX Runtime: torch-free.

t2i models attend from words to regions: each word has weights over the image's regions (they
sum to 1 per word), the picture of the paper ("attended image regions with respect to each
word"). i2t models attend from regions to words: each region has weights over the caption's
words (they sum to 1 per region). Either way the weights are kept as a (tokens, regions) matrix;
`direction` says which axis sums to 1. Tokens are the caption's as the model reads them,
`<start>` and `<end>` included. An image of fewer regions than its features' rows (adaptive
features, zero-padded) is shown without its trailing padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scan_deploy.engines.ort_providers import import_onnxruntime
from scan_deploy.runtime.backends.base import Backend, CallSizes
from scan_deploy.runtime.backends.onnxruntime_backend import check_interface

from scan_deploy.batching import pad_tokens
from scan_deploy.bundle import Bundle
from scan_deploy.choices import Graph
from scan_deploy.errors import UserError


@dataclass(frozen=True)
class Explanation:
    similarity: float
    direction: str  # t2i: each token's weights over the regions sum to 1; i2t: each region's
    tokens: list[str]
    weights: np.ndarray  # (tokens, regions) float32

    def top_regions(self, token: int, count: int) -> list[tuple[int, float]]:
        """The `count` regions with the most weight for a token, heaviest first."""
        row = self.weights[token]
        order = np.argsort(-row, kind="stable")[:count]
        return [(int(r), float(row[r])) for r in order]

    def boxes(self, boxed: tuple[np.ndarray, tuple[int, int]] | None):
        """An image's (boxes, size) as its gallery keeps them (`Gallery.boxes_of`) cut to the
        regions shown (trailing padding left out), or None."""
        if boxed is None:
            return None
        return boxed[0][: self.weights.shape[1]], (int(boxed[1][0]), int(boxed[1][1]))

    def to_dict(self) -> dict:
        return {
            "similarity": self.similarity,
            "direction": self.direction,
            "tokens": self.tokens,
            "weights": self.weights.round(6).tolist(),
        }


class Explainer:
    """Encodes a pair with the backend's encoders and runs the explain graph on ONNX Runtime's
    CPU provider (one pair at a time: it is for looking at, not for throughput)."""

    def __init__(self, bundle: Bundle, backend: Backend, threads: int = 0) -> None:
        entry = bundle.explain_graph()
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        source = bundle.path / entry["file"]
        self.session = ort.InferenceSession(
            str(source), options, providers=["CPUExecutionProvider"]
        )
        check_interface("explain", entry, self.session, source)
        self.bundle, self.backend = bundle, backend
        self.max_tokens = CallSizes.of(backend).max_tokens
        self._inputs = [value.name for value in self.session.get_inputs()]

    def close(self) -> None:
        self.session = None  # ONNX Runtime frees a session with its last reference

    def explain(self, features: np.ndarray, caption: str) -> Explanation:
        """The attention between one image's region features (regions, img_dim) and a caption."""
        batch = np.asarray(features, np.float32)[None]
        regions, region_gram, _ = self.backend.runner(Graph.IMAGE_ENCODER).run({"features": batch})
        image = {"regions": regions, "region_gram": region_gram}
        return self.explain_encoded(image, self.encode_caption(caption))

    def encode_caption(self, caption: str) -> dict[str, np.ndarray]:
        """The caption side of one caption (`words`, `lengths`, `caption_gram`, `tokens`)."""
        (tokens,), _ = self.bundle.encode_captions([caption], self.max_tokens)
        padded, lengths = pad_tokens([tokens])
        words, caption_gram, _ = self.backend.runner(Graph.TEXT_ENCODER).run(
            {"tokens": padded, "lengths": lengths}
        )
        return {"words": words, "lengths": lengths, "caption_gram": caption_gram, "tokens": padded}

    def explain_encoded(
        self, image: dict[str, np.ndarray], caption: dict[str, np.ndarray]
    ) -> Explanation:
        """The attention between one encoded image (`regions`, `region_gram`, each (1, ...)) and
        one encoded caption (`encode_caption`'s arrays, or a gallery's with its `tokens`)."""
        feeds = {**image, **caption}
        if self.session is None:
            raise UserError("explain: the explainer is closed")
        similarity, attention = self.session.run(
            ["similarity", "attention"], {name: feeds[name] for name in self._inputs}
        )
        count = int(caption["lengths"][0])
        regions = _regions_shown(image["regions"][0])
        weights = np.ascontiguousarray(attention[0, :regions, 0, :count].T, dtype=np.float32)
        vocab = self.bundle.vocab
        return Explanation(
            float(similarity[0, 0]),
            self.bundle.config.cross_attn,
            [vocab.idx2word.get(int(t), vocab.UNK) for t in caption["tokens"][0, :count]],
            weights,
        )


def _regions_shown(regions: np.ndarray) -> int:
    """The rows of one image's (R, D) region embeddings up to its last region: trailing
    all-zero rows are padding (`scan_deploy.scoring.region_mask`) and have no weights."""
    real = np.flatnonzero(regions.any(axis=1))
    return int(real[-1]) + 1 if real.size else len(regions)
