"""ONNX Runtime against PyTorch, graph by graph, on generated or real inputs.

Used by `export` (which refuses to write a bundle that does not match) and by `compare`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch

from scan_deploy.model import SCAN
from scan_deploy.scoring import (
    attention_weights,
    caption_gram,
    pooled_embedding,
    region_gram,
    score_block,
)

# Tolerances of the parity targets (float32, ONNX Runtime CPU).
EMBEDDING_ATOL = 1e-5
SIMILARITY_ATOL = 1e-4


@dataclass(frozen=True)
class OutputError:
    graph: str
    output: str
    batch: int
    regions: str  # the images' region counts: "36", or "1-36" for zero-padded images
    max_abs: float
    max_rel: float
    cosine: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.tolerance


def session(model: onnx.ModelProto | str, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def error_stats(
    graph: str,
    output: str,
    inputs: tuple[int, str],
    got: np.ndarray,
    expected: np.ndarray,
    tol: float,
) -> OutputError:
    """The errors of one output; `inputs` is the batch and region counts it was run at."""
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    scale = np.abs(expected.astype(np.float64))
    a, b = got.ravel().astype(np.float64), expected.ravel().astype(np.float64)
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    cosine = float(a @ b / denom) if denom > 0 else 1.0
    max_rel = float((diff / np.maximum(scale, 1e-6)).max()) if diff.size else 0.0
    max_abs = float(diff.max(initial=0.0))
    return OutputError(graph, output, *inputs, max_abs, max_rel, cosine, tol)


@torch.no_grad()
def reference_outputs(
    model: SCAN, features: np.ndarray, tokens: np.ndarray, lengths: np.ndarray
) -> dict[str, dict[str, np.ndarray]]:
    """What each graph must produce for these inputs, by the PyTorch reference."""
    regions = model.img_enc(torch.tensor(features))
    length_t = torch.from_numpy(lengths)
    words = model.txt_enc(torch.from_numpy(tokens), length_t)
    similarity = score_block(regions, words, length_t, model.config)
    attention = attention_weights(regions, words, length_t, model.config)
    return {
        "image_encoder": {
            "regions": regions.numpy(),
            "region_gram": region_gram(regions).numpy(),
            "global": pooled_embedding(regions).numpy(),
        },
        "text_encoder": {
            "words": words.numpy(),
            "caption_gram": caption_gram(words).numpy(),
            "global": pooled_embedding(words, length_t).numpy(),
        },
        "scorer": {"similarity": similarity.numpy()},
        "explain": {"similarity": similarity.numpy(), "attention": attention.numpy()},
    }


def compare_graphs(
    sessions: dict[str, ort.InferenceSession],
    model: SCAN,
    features: np.ndarray,
    tokens: np.ndarray,
    lengths: np.ndarray,
) -> list[OutputError]:
    """Run the graphs in ONNX Runtime (the scorer, and the explain graph when `sessions` has
    it, on the ONNX encoders' outputs, as the deployed pipeline does) and compare every output
    with the reference."""
    expected = reference_outputs(model, features, tokens, lengths)
    image = dict(
        zip(
            ["regions", "region_gram", "global"],
            sessions["image_encoder"].run(None, {"features": features}),
            strict=True,
        )
    )
    text = dict(
        zip(
            ["words", "caption_gram", "global"],
            sessions["text_encoder"].run(None, {"tokens": tokens, "lengths": lengths}),
            strict=True,
        )
    )
    scorer_inputs = {"regions": image["regions"], "words": text["words"], "lengths": lengths}
    if model.config.cross_attn == "t2i":
        scorer_inputs["region_gram"] = image["region_gram"]
    else:
        scorer_inputs["caption_gram"] = text["caption_gram"]
    actual = {
        "image_encoder": image,
        "text_encoder": text,
        "scorer": {"similarity": sessions["scorer"].run(None, scorer_inputs)[0]},
    }
    if "explain" in sessions:
        similarity, attention = sessions["explain"].run(None, scorer_inputs)
        actual["explain"] = {"similarity": similarity, "attention": attention}
    counts = np.asarray(features).any(axis=2).sum(axis=1)
    low, high = int(counts.min()), int(counts.max())
    inputs = (features.shape[0], str(high) if low == high else f"{low}-{high}")
    return [
        error_stats(
            graph,
            name,
            inputs,
            actual[graph][name],
            value,
            SIMILARITY_ATOL if graph in ("scorer", "explain") else EMBEDDING_ATOL,
        )
        for graph, outputs in expected.items()
        if graph in actual
        for name, value in outputs.items()
    ]


def generated_inputs(
    vocab_size: int,
    img_dim: int,
    batch: int,
    regions: int,
    max_words: int,
    seed: int = 0,
    min_regions: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded features, and token ids whose lengths cover 1 and max_words. With `min_regions`,
    the images' region counts spread from `regions` down to it, each zero-padded to `regions`
    (adaptive features)."""
    rng = np.random.default_rng(seed)
    features = rng.random((batch, regions, img_dim), dtype=np.float32)
    if min_regions is not None:
        counts = np.linspace(regions, min_regions, batch).round().astype(int)
        features[np.arange(regions)[None] >= counts[:, None]] = 0
    lengths = rng.integers(1, max_words + 1, size=batch).astype(np.int64)
    lengths[0] = max_words
    if batch > 1:
        lengths[-1] = 1
    tokens = rng.integers(1, vocab_size, size=(batch, max_words)).astype(np.int64)
    tokens[np.arange(max_words)[None] >= lengths[:, None]] = 0
    return features, tokens, lengths
