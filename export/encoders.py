"""The image and text encoders as ONNX graphs, emitted node by node from the model's weights.

No torch exporter is involved: the TorchScript exporter is deprecated and the dynamo exporter fails
on packed GRUs, so the GRU is written as an ONNX `GRU` node with `sequence_lens` (ONNX gate order
z, r, h; torch stores r, z, n) and `linear_before_reset=1` (torch applies the reset gate after the
hidden-state matmul). Every other op is plain MatMul / Gather / reductions, supported by ONNX
Runtime and TensorRT's ONNX parser.

Graph interfaces (dynamic axes named `batch`, `regions`, `words`):
- image_encoder: `features` (batch, regions, img_dim) float32 -> `regions` (batch, regions, D),
  `region_gram` (batch, regions, regions), `global` (batch, D). A padded region (an all-zero
  feature row: adaptive features) gets an all-zero embedding and stays out of `global`.
- text_encoder: `tokens` (batch, words) int64, `lengths` (batch,) int64 -> `words`
  (batch, words, D) zero beyond each length, `caption_gram` (batch, words, words),
  `global` (batch, D).
`global` is the L2-normalised mean of the valid region / word embeddings (the shortlist embedding,
`scan_deploy.scoring.pooled_embedding`).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto
from scan_deploy.export.graph_builder import DEFAULT_OPSET, GraphBuilder, value_info

from scan_deploy.model import SCAN


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().to(torch.float32).numpy()


def image_encoder_graph(model: SCAN, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Region features -> region embeddings, region Gram matrix and pooled global embedding."""
    config = model.config
    g = GraphBuilder(opset)
    weight = _array(model.img_enc.fc.weight).T.copy()  # weight-norm is folded into the constant
    features = g.op("MatMul", ["features", g.const(weight, "fc_weight")])
    regions = g.op("Add", [features, g.const(_array(model.img_enc.fc.bias), "fc_bias")])
    if not config.no_imgnorm:
        regions = g.l2norm(regions)
    valid = g.op("Cast", [g.nonzero_rows("features", keepdims=1)], to=TensorProto.FLOAT)
    regions = g.op("Mul", [regions, valid])  # padded regions (all-zero features) stay zero
    g.output_as(regions, "regions")
    g.output_as(g.gram(regions), "region_gram")
    count = g.op("Max", [g.reduce("ReduceSum", valid, [1], 0), g.const(np.float32(1.0))])
    total = g.reduce("ReduceSum", regions, [1], 0)
    g.output_as(g.l2norm(g.op("Div", [total, count])), "global")
    d = config.embed_size
    return g.model(
        [value_info("features", TensorProto.FLOAT, ["batch", "regions", config.img_dim])],
        [
            value_info("regions", TensorProto.FLOAT, ["batch", "regions", d]),
            value_info("region_gram", TensorProto.FLOAT, ["batch", "regions", "regions"]),
            value_info("global", TensorProto.FLOAT, ["batch", d]),
        ],
        "scan_image_encoder",
    )


def _gru_gates_zrh(weight: np.ndarray, hidden: int) -> np.ndarray:
    """torch packs GRU gates (r, z, n) along axis 0; ONNX wants (z, r, h)."""
    r, z, n = (weight[i * hidden : (i + 1) * hidden] for i in range(3))
    return np.concatenate([z, r, n], axis=0)


def _gru_weights(rnn: torch.nn.GRU, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W (dirs, 3H, in), R (dirs, 3H, H), B (dirs, 6H) of one layer in ONNX layout."""
    hidden = rnn.hidden_size
    suffixes = [f"l{layer}"] + ([f"l{layer}_reverse"] if rnn.bidirectional else [])
    ws, rs, bs = [], [], []
    for suffix in suffixes:
        ws.append(_gru_gates_zrh(_array(getattr(rnn, f"weight_ih_{suffix}")), hidden))
        rs.append(_gru_gates_zrh(_array(getattr(rnn, f"weight_hh_{suffix}")), hidden))
        bias_ih = _gru_gates_zrh(_array(getattr(rnn, f"bias_ih_{suffix}")), hidden)
        bias_hh = _gru_gates_zrh(_array(getattr(rnn, f"bias_hh_{suffix}")), hidden)
        bs.append(np.concatenate([bias_ih, bias_hh]))
    return np.stack(ws), np.stack(rs), np.stack(bs)


def text_encoder_graph(model: SCAN, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Token ids + lengths -> word embeddings (zero beyond each length), caption Gram, global."""
    config = model.config
    rnn = model.txt_enc.rnn
    g = GraphBuilder(opset)
    hidden, dirs = config.embed_size, 2 if config.bi_gru else 1
    embedded = g.op("Gather", [g.const(_array(model.txt_enc.embed.weight), "embed"), "tokens"])
    sequence = g.op("Transpose", [embedded], perm=[1, 0, 2])  # (T, B, E): GRU layout 0
    lengths32 = g.op("Cast", ["lengths"], to=TensorProto.INT32)
    for layer in range(config.num_layers):
        w, r, b = _gru_weights(rnn, layer)
        y, _ = g.op(
            "GRU",
            [sequence, g.const(w, "W"), g.const(r, "R"), g.const(b, "B"), lengths32],
            "gru",
            outputs=2,
            hidden_size=hidden,
            direction="bidirectional" if config.bi_gru else "forward",
            linear_before_reset=1,
        )  # y: (T, dirs, B, H)
        if layer + 1 < config.num_layers:  # next layer reads both directions concatenated
            stacked = g.op("Transpose", [y], perm=[0, 2, 1, 3])
            sequence = g.op("Reshape", [stacked, g.const(np.array([0, 0, dirs * hidden]))])
    per_word = g.reduce("ReduceMean", y, [1], 0)  # average of the two directions (or squeeze)
    words = g.op("Transpose", [per_word], perm=[1, 0, 2])  # (B, T, H)
    mask = g.op("Cast", [g.unsqueeze(g.length_mask("tokens", "lengths"), 2)], to=TensorProto.FLOAT)
    words = g.op("Mul", [words, mask])
    if not config.no_txtnorm:
        words = g.l2norm(words)
    g.output_as(words, "words")
    g.output_as(g.gram(words), "caption_gram")
    total = g.reduce("ReduceSum", words, [1], 0)
    count = g.op("Cast", ["lengths"], to=TensorProto.FLOAT)
    mean = g.op("Div", [total, g.unsqueeze(count, 1)])
    g.output_as(g.l2norm(mean), "global")
    return g.model(
        [
            value_info("tokens", TensorProto.INT64, ["batch", "words"]),
            value_info("lengths", TensorProto.INT64, ["batch"]),
        ],
        [
            value_info("words", TensorProto.FLOAT, ["batch", "words", hidden]),
            value_info("caption_gram", TensorProto.FLOAT, ["batch", "words", "words"]),
            value_info("global", TensorProto.FLOAT, ["batch", hidden]),
        ],
        "scan_text_encoder",
    )
