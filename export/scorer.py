"""The cross-attention scorer as an ONNX graph: the exact Gram identity of `scan_deploy.scoring`.

Inputs are what the encoders produce (and a gallery stores): `regions` (images, regions, D),
`region_gram` (images, regions, regions) for t2i, `words` (captions, words, D), `lengths`
(captions,) int64, `caption_gram` (captions, words, words) for i2t. Output `similarity`
(images, captions). The variant (direction, raw_feature_norm, aggregation, λs) is baked in as
constants. Padded regions (all-zero rows of `regions`: images of fewer regions than the block's)
are masked out of every softmax and pooling, as `scan_deploy.scoring.region_mask`. Masked
positions use a large finite negative instead of -inf (exp of it is exactly 0), which every
backend handles.

Node for node this follows `score_t2i_block` / `score_i2t_block`; the graph scores all pairs of its
inputs at once, so callers bound memory by feeding blocks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto
from scan_deploy.export.graph_builder import DEFAULT_OPSET, GraphBuilder, value_info

from scan_deploy.config import ModelConfig
from scan_deploy.int8_rows import INT8_ZERO_POINT
from scan_deploy.scoring import EPS

MASKED = -1e30


def scorer_graph(
    config: ModelConfig, opset: int = DEFAULT_OPSET, attention: bool = False
) -> onnx.ModelProto:
    """The scorer; with `attention`, also its attention weights as a second output `attention`
    (images, regions, captions, words): t2i, each word's weights over the regions; i2t, each
    region's weights over the words (the explain graph, `scan-deploy explain`)."""
    g = GraphBuilder(opset)
    t2i = config.cross_attn == "t2i"
    valid = g.length_mask("words", "lengths")  # (M, T) bool
    words = g.op("Mul", ["words", g.op("Cast", [g.unsqueeze(valid, 2)], to=TensorProto.FLOAT)])
    logits = _logits(g, words, config.embed_size)  # (N, R, M, T)
    regions_valid, region_norms = _float_regions(g, t2i)
    if t2i:
        norms = lambda: g.reduce("ReduceL2", words, [2], 0)  # noqa: E731 (M, T)
        similarity, attn = _t2i(g, config, logits, valid, norms, regions_valid)
    else:
        norms = lambda: region_norms  # noqa: E731 (N, R, 1)
        similarity, attn = _i2t(g, config, logits, valid, norms, regions_valid)
        padding = g.op("Cast", [_regions4(g, regions_valid)], to=TensorProto.FLOAT)
        attn = g.op("Mul", [attn, padding]) if attention else attn  # padding attends to nothing
    g.output_as(similarity, "similarity")
    if attention:
        g.output_as(attn, "attention")
    d = config.embed_size
    image_side = [value_info("regions", TensorProto.FLOAT, ["images", "regions", d])]
    caption_side = [
        value_info("words", TensorProto.FLOAT, ["captions", "words", d]),
        value_info("lengths", TensorProto.INT64, ["captions"]),
    ]
    if t2i:
        image_side.append(
            value_info("region_gram", TensorProto.FLOAT, ["images", "regions", "regions"])
        )
    else:
        caption_side.append(
            value_info("caption_gram", TensorProto.FLOAT, ["captions", "words", "words"])
        )
    outputs = [value_info("similarity", TensorProto.FLOAT, ["images", "captions"])]
    if attention:
        dims = ["images", "regions", "captions", "words"]
        outputs.append(value_info("attention", TensorProto.FLOAT, dims))
    return g.model(image_side + caption_side, outputs, f"scan_scorer_{config.cross_attn}")


def int8_gallery_scorer_graph(
    config: ModelConfig, kind: str, opset: int = DEFAULT_OPSET
) -> onnx.ModelProto:
    """The scorer with an int8 gallery of `kind` (images or captions) on one side, fed the
    gallery's stored codes as they are: no dequantization pass over the gallery.

    The gallery side takes the stored arrays by their stored names (`runtime/gallery.py`):
    `regions` or `words` as uint8 codes (q + 128) with their per-row `*_scale`, and the side's
    Gram the same way; the query side takes float32, as `scorer_graph`. The logits are one
    `MatMulInteger` of the gallery's codes (uint8, zero point 128: the A operand, which ONNX
    Runtime's u8s8 kernels take natively, `scan_deploy.int8_rows`) by the query's embeddings
    quantized per row in the graph (symmetric int8, scale max|x| / 127), scaled back by both
    scales. Everything after the logits is `scorer_graph`'s, in float32; the gallery side's
    norms come from the diagonal of its Gram (the graph never turns its codes into floats).
    """
    g = GraphBuilder(opset)
    t2i = config.cross_attn == "t2i"
    valid = g.length_mask("words", "lengths")  # (M, T) bool
    if kind == "images":
        words = g.op("Mul", ["words", g.op("Cast", [g.unsqueeze(valid, 2)], to=TensorProto.FLOAT)])
        flat = _integer_logits(g, "regions", "regions_scale", words, config.embed_size)
        logits = g.op("Reshape", [flat, _pair_dims(g, "regions", "words")])
        gram = _dequantize(g, "region_gram")
        regions_valid = g.op("Greater", ["regions_scale", g.const(np.float32(0.0))])  # (N, R)
        if t2i:
            norms = lambda: g.reduce("ReduceL2", words, [2], 0)  # noqa: E731 (M, T)
            similarity, _ = _t2i(g, config, logits, valid, norms, regions_valid, gram)
        else:
            norms = lambda: g.unsqueeze(_diagonal_norms(g, gram), 2)  # noqa: E731 (N, R, 1)
            similarity, _ = _i2t(g, config, logits, valid, norms, regions_valid)
    else:
        flat = _integer_logits(g, "words", "words_scale", "regions", config.embed_size)
        by_image = g.op("Transpose", [flat], perm=[1, 0])  # (N·R, M·T)
        logits = g.op("Reshape", [by_image, _pair_dims(g, "regions", "words")])
        gram = _dequantize(g, "caption_gram")
        regions_valid, region_norms = _float_regions(g, t2i)
        if t2i:
            norms = lambda: _diagonal_norms(g, gram)  # noqa: E731 (M, T)
            similarity, _ = _t2i(g, config, logits, valid, norms, regions_valid)
        else:
            norms = lambda: region_norms  # noqa: E731 (N, R, 1)
            similarity, _ = _i2t(g, config, logits, valid, norms, regions_valid, gram)
    g.output_as(similarity, "similarity")
    output = value_info("similarity", TensorProto.FLOAT, ["images", "captions"])
    inputs = _int8_gallery_inputs(config, kind)
    return g.model(inputs, [output], f"scan_scorer_{config.cross_attn}_int8_{kind}")


def _int8_gallery_inputs(config: ModelConfig, kind: str) -> list[onnx.ValueInfoProto]:
    d, t2i = config.embed_size, config.cross_attn == "t2i"
    u8, f32 = TensorProto.UINT8, TensorProto.FLOAT
    if kind == "images":
        return [
            value_info("regions", u8, ["images", "regions", d]),
            value_info("regions_scale", f32, ["images", "regions"]),
            value_info("region_gram", u8, ["images", "regions", "regions"]),
            value_info("region_gram_scale", f32, ["images", "regions"]),
            value_info("words", f32, ["captions", "words", d]),
            value_info("lengths", TensorProto.INT64, ["captions"]),
            *([] if t2i else [value_info("caption_gram", f32, ["captions", "words", "words"])]),
        ]
    return [
        value_info("regions", f32, ["images", "regions", d]),
        *([value_info("region_gram", f32, ["images", "regions", "regions"])] if t2i else []),
        value_info("words", u8, ["captions", "words", d]),
        value_info("words_scale", f32, ["captions", "words"]),
        value_info("lengths", TensorProto.INT64, ["captions"]),
        value_info("caption_gram", u8, ["captions", "words", "words"]),
        value_info("caption_gram_scale", f32, ["captions", "words"]),
    ]


def _integer_logits(g: GraphBuilder, codes: str, scale: str, other: str, dim: int) -> str:
    """(X·P, Y·Q) float32: the uint8 `codes` (X, P, D) with their per-row `scale` (X, P) times
    the float32 `other` (Y, Q, D) quantized per row, in int32 by MatMulInteger."""
    rows = g.const(np.array([-1, dim], np.int64), "rows")
    amax = g.reduce("ReduceMax", g.op("Abs", [other]), [2], 1)  # (Y, Q, 1)
    other_scale = g.op("Div", [amax, g.const(np.float32(127), "int8_max")])
    divisor = g.op("Max", [other_scale, g.const(np.float32(np.finfo(np.float32).tiny), "tiny")])
    quantized = g.op("Cast", [g.op("Round", [g.op("Div", [other, divisor])])], to=TensorProto.INT8)
    operand = g.op("Transpose", [g.op("Reshape", [quantized, rows])], perm=[1, 0])  # (D, Y·Q)
    zero_point = g.const(np.uint8(INT8_ZERO_POINT), "zero_point")
    products = g.op("MatMulInteger", [g.op("Reshape", [codes, rows]), operand, zero_point])
    column = g.const(np.array([-1, 1], np.int64), "column")
    scaled = g.op(
        "Mul", [g.op("Cast", [products], to=TensorProto.FLOAT), g.op("Reshape", [scale, column])]
    )
    line = g.const(np.array([1, -1], np.int64), "line")
    return g.op("Mul", [scaled, g.op("Reshape", [other_scale, line])])


def _pair_dims(g: GraphBuilder, regions: str, words: str) -> str:
    """(N, R, M, T) from the leading dims of `regions` and `words`."""
    image_dims = g.slice(g.op("Shape", [regions]), 0, 2)
    caption_dims = g.slice(g.op("Shape", [words]), 0, 2)
    return g.op("Concat", [image_dims, caption_dims], axis=0)


def _dequantize(g: GraphBuilder, name: str) -> str:
    """float32 of a stored uint8 array (X, P, P) and its `{name}_scale` (X, P): (c − 128)·scale,
    the runtime's host dequantization (`runtime/graphs/dequantize_uint8.onnx`), in one
    DequantizeLinear over the rows (its per-row zero point has the scale's shape)."""
    scale = g.op("Reshape", [f"{name}_scale", g.const(np.array([-1], np.int64), "flat")])
    zero_point = g.op("Expand", [g.const(np.uint8(INT8_ZERO_POINT)), g.op("Shape", [scale])])
    rows = g.op("Reshape", [name, g.const(np.array([-1, 0], np.int64), "rows")])  # (X·P, P)
    flat = g.op("DequantizeLinear", [rows, scale, zero_point], axis=0)
    return g.op("Reshape", [flat, g.op("Shape", [name])])


def _float_regions(g: GraphBuilder, t2i: bool) -> tuple[str, str | None]:
    """(regions_valid (N, R) bool, the region norms (N, R, 1) for i2t, else None) of float
    `regions`: a region is padding where its norm is 0, read from what the scorer computes
    anyway — the region Gram's diagonal (t2i), the region norms (i2t) — not from another pass
    over the regions, which took a 256-image one-query t2i block from 4.5 to 7.4 ms."""
    zero = g.const(np.float32(0.0))
    if t2i:
        return g.op("Greater", [_diagonal_norms(g, "region_gram"), zero]), None
    norms = g.reduce("ReduceL2", "regions", [2], 0)  # (N, R)
    return g.op("Greater", [norms, zero]), g.unsqueeze(norms, 2)


def _diagonal_norms(g: GraphBuilder, gram: str) -> str:
    """(X, P): the square root of the Gram's diagonal, the norms of the vectors it is made of.
    The diagonal is gathered from the flattened Gram (positions 0, P + 1, 2(P + 1), ...): the
    product with an identity it replaced read the whole Gram twice."""
    size = g.op("Gather", [g.op("Shape", [gram]), g.const(np.array(2, np.int64))], axis=0)
    zero, one = g.const(np.array(0, np.int64)), g.const(np.array(1, np.int64))
    positions = g.op("Mul", [g.op("Range", [zero, size, one]), g.op("Add", [size, one])])
    flat = g.op("Reshape", [gram, g.const(np.array([0, -1], np.int64))])  # (X, P·P)
    diagonal = g.op("Gather", [flat, positions], axis=1)
    return g.op("Sqrt", [g.op("Max", [diagonal, g.const(np.float32(0.0))])])


def _logits(g: GraphBuilder, words: str, dim: int) -> str:
    """S[n, r, m, t] = v_{n,r} · w_{m,t} as one MatMul of the flattened regions and words."""
    rows = g.const(np.array([-1, dim], np.int64), "rows")
    flat_regions = g.op("Reshape", ["regions", rows])
    flat_words = g.op("Reshape", [words, rows])
    flat = g.op("MatMul", [flat_regions, g.op("Transpose", [flat_words], perm=[1, 0])])
    image_dims = g.slice(g.op("Shape", ["regions"]), 0, 2)
    caption_dims = g.slice(g.op("Shape", ["words"]), 0, 2)
    return g.op("Reshape", [flat, g.op("Concat", [image_dims, caption_dims], axis=0)])


def _attention_logits(g: GraphBuilder, config: ModelConfig, logits: str, axis: int, valid):
    """λ · raw_feature_norm(logits) along `axis` (as `scoring.attention_logits`)."""
    kind, scale = config.raw_feature_norm, np.float32(config.lambda_softmax)
    if kind == "softmax":
        if valid is not None:
            logits = g.op("Where", [valid, logits, g.const(np.float32(MASKED), "masked")])
        return g.op("Mul", [g.softmax(logits, axis, 4), g.const(scale, "lambda")])
    if kind.startswith("clipped"):
        logits = g.op("LeakyRelu", [logits], alpha=0.1)
    if kind.endswith("l2norm") or kind.endswith("l1norm"):
        reduce = "ReduceL2" if kind.endswith("l2norm") else "ReduceL1"
        norm = g.reduce(reduce, logits, [axis], 1)
        factor = g.op(
            "Div", [g.const(scale, "lambda"), g.op("Add", [norm, g.const(np.float32(EPS))])]
        )
        return g.op("Mul", [logits, factor])
    return g.op("Mul", [logits, g.const(scale, "lambda")])


def _cosine(g: GraphBuilder, numerator: str, norm_a: str, squared_norm_b: str) -> str:
    zero, eps = g.const(np.float32(0.0)), g.const(np.float32(EPS), "eps")
    norm_b = g.op("Sqrt", [g.op("Max", [squared_norm_b, zero])])
    return g.op("Div", [numerator, g.op("Max", [g.op("Mul", [norm_a, norm_b]), eps])])


def _aggregate(g: GraphBuilder, config: ModelConfig, values: str, axis: int, valid, count):
    """Pool over `axis`; `valid` masks padded words (t2i), `count` is their number."""
    kind = config.agg_func
    if kind in ("LogSumExp", "Max"):
        if kind == "LogSumExp":
            values = g.op("Mul", [values, g.const(np.float32(config.lambda_lse), "lambda_lse")])
        if valid is not None:
            values = g.op("Where", [valid, values, g.const(np.float32(MASKED), "masked")])
        if kind == "Max":
            return g.reduce("ReduceMax", values, [axis], 0)
        pooled = g.reduce("ReduceLogSumExp", values, [axis], 0)
        return g.op("Div", [pooled, g.const(np.float32(config.lambda_lse), "lambda_lse")])
    if valid is None and kind == "Mean":
        return g.reduce("ReduceMean", values, [axis], 0)
    if valid is not None:
        values = g.op("Where", [valid, values, g.const(np.float32(0.0))])
    total = g.reduce("ReduceSum", values, [axis], 0)
    if kind == "Sum":
        return total
    return g.op("Div", [total, count])


def _t2i(
    g: GraphBuilder,
    config: ModelConfig,
    logits: str,
    valid: str,
    word_norms: Callable[[], str],
    regions_valid: str,
    region_gram: str = "region_gram",
) -> tuple[str, str]:
    """(similarity, attention); `word_norms()` emits the (M, T) norms of the words where the
    graph needs them; `regions_valid` (N, R) bool marks the regions that are not padding."""
    valid4 = g.unsqueeze(g.unsqueeze(valid, 0), 0)  # (1, 1, M, T)
    scaled = _attention_logits(g, config, logits, 3, valid4)
    # Padding out of the softmax by adding MASKED: a broadcast Add costs a fifth of the Where
    # (0.13 vs 0.67 ms on a 256-image one-query block, ONNX Runtime CPU).
    padding = g.op("Cast", [g.op("Not", [regions_valid])], to=TensorProto.FLOAT)
    penalty = g.op("Mul", [padding, g.const(np.float32(MASKED), "masked")])  # (N, R)
    masked = g.op("Add", [scaled, g.unsqueeze(g.unsqueeze(penalty, 2), 3)])
    attn = g.softmax(masked, 1, 4)  # over the image's regions
    numerator = g.reduce("ReduceSum", g.op("Mul", [attn, logits]), [1], 0)  # (N, M, T)
    n_r_mt = g.op(
        "Concat", [g.slice(g.op("Shape", [attn]), 0, 2), g.const(np.array([-1], np.int64))], axis=0
    )
    gram_attn = g.op("MatMul", [region_gram, g.op("Reshape", [attn, n_r_mt])])
    gram_attn = g.op("Reshape", [gram_attn, g.op("Shape", [attn])])
    context_sq = g.reduce("ReduceSum", g.op("Mul", [attn, gram_attn]), [1], 0)
    relevance = _cosine(g, numerator, word_norms(), context_sq)  # (N, M, T)
    count = g.op("Cast", ["lengths"], to=TensorProto.FLOAT)  # broadcasts over (N, M)
    return _aggregate(g, config, relevance, 2, g.unsqueeze(valid, 0), count), attn


def _i2t(
    g: GraphBuilder,
    config: ModelConfig,
    logits: str,
    valid: str,
    region_norms: Callable[[], str],
    regions_valid: str,
    caption_gram: str = "caption_gram",
) -> tuple[str, str]:
    """(similarity, attention); `region_norms()` emits the (N, R, 1) norms of the regions where
    the graph needs them; `regions_valid` (N, R) bool marks the regions that are not padding."""
    valid4 = g.unsqueeze(g.unsqueeze(valid, 0), 0)  # (1, 1, M, T)
    scaled = _attention_logits(g, config, logits, 1, _regions4(g, regions_valid))
    masked = g.op("Where", [valid4, scaled, g.const(np.float32(MASKED), "masked")])
    attn = g.softmax(masked, 3, 4)  # over the caption's words
    numerator = g.reduce("ReduceSum", g.op("Mul", [attn, logits]), [3], 0)  # (N, R, M)
    shape = g.op("Shape", [attn])  # N, R, M, T
    by_caption = g.op("Transpose", [attn], perm=[2, 0, 1, 3])  # (M, N, R, T)
    m_nr_t = g.op(
        "Concat",
        [g.slice(shape, 2, 3), g.const(np.array([-1], np.int64)), g.slice(shape, 3, 4)],
        axis=0,
    )
    attn_gram = g.op("MatMul", [g.op("Reshape", [by_caption, m_nr_t]), caption_gram])
    m_n_r_t = g.op(
        "Concat", [g.slice(shape, 2, 3), g.slice(shape, 0, 2), g.slice(shape, 3, 4)], axis=0
    )
    attn_gram = g.op("Transpose", [g.op("Reshape", [attn_gram, m_n_r_t])], perm=[1, 2, 0, 3])
    context_sq = g.reduce("ReduceSum", g.op("Mul", [attn, attn_gram]), [3], 0)  # (N, R, M)
    relevance = _cosine(g, numerator, region_norms(), context_sq)  # (N, R, M)
    valid_regions = g.op("Cast", [regions_valid], to=TensorProto.FLOAT)
    count = g.reduce("ReduceSum", valid_regions, [1], 1)  # (N, 1): broadcasts over (N, M)
    pooled = _aggregate(g, config, relevance, 1, g.unsqueeze(regions_valid, 2), count)
    return pooled, attn


def _regions4(g: GraphBuilder, regions_valid: str) -> str:
    """(N, R) -> (N, R, 1, 1), to broadcast over (N, R, M, T)."""
    return g.unsqueeze(g.unsqueeze(regions_valid, 2), 3)
