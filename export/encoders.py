"""The image and text encoders as ONNX graphs, emitted node by node from the model's weights.

No torch exporter is involved: the TorchScript exporter is deprecated and the dynamo exporter fails
on packed GRUs, so the GRU is written as an ONNX `GRU` node with `sequence_lens` (ONNX gate order
z, r, h; torch stores r, z, n) and `linear_before_reset=1` (torch applies the reset gate after the
hidden-state matmul). Every other op is plain MatMul / Gather / reductions, supported by ONNX
Runtime and TensorRT's ONNX parser.

Graph interfaces (dynamic axes named `batch`, `regions`, `words`):
- image_encoder: `features` (batch, regions, img_dim) float32 -> `regions` (batch, regions, D),
  `region_gram` (batch, regions, regions), `global` (batch, D).
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
from onnx import TensorProto, helper, numpy_helper

from scan_deploy.model import SCAN
from scan_deploy.scoring import EPS

DEFAULT_OPSET = 17


class GraphBuilder:
    """Accumulates nodes and constant initializers of one graph with unique names."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value, hint: str = "const") -> str:
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, outputs=1, **attrs):
        names = [self.name(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, **attrs))
        return names[0] if outputs == 1 else names

    def output_as(self, value: str, name: str) -> None:
        """Expose `value` as the graph output called `name`."""
        self.nodes.append(helper.make_node("Identity", [value], [name]))

    def reduce(self, op_type: str, x: str, axes: list[int], keepdims: int) -> str:
        """Reduce* with constant axes: an attribute before opset 18 (13 for ReduceSum), an input
        after."""
        axes_as_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if axes_as_input:
            return self.op(
                op_type, [x, self.const(np.array(axes, np.int64), "axes")], keepdims=keepdims
            )
        return self.op(op_type, [x], axes=axes, keepdims=keepdims)

    def l2norm(self, x: str) -> str:
        """x / (|x| + eps) over the last axis, as the reference `l2norm`."""
        norm = self.op("Sqrt", [self.reduce("ReduceSumSquare", x, [-1], 1)])
        return self.op("Div", [x, self.op("Add", [norm, self.const(np.float32(EPS), "eps")])])

    def gram(self, x: str) -> str:
        return self.op("MatMul", [x, self.op("Transpose", [x], perm=[0, 2, 1])], "gram")

    def model(self, inputs, outputs, graph_name: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.producer_name = "scan-deploy"
        return model


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().to(torch.float32).numpy()


def _value(name: str, elem_type: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def image_encoder_graph(model: SCAN, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Region features -> region embeddings, region Gram matrix and pooled global embedding."""
    config = model.config
    g = GraphBuilder(opset)
    weight = _array(model.img_enc.fc.weight).T.copy()  # weight-norm is folded into the constant
    features = g.op("MatMul", ["features", g.const(weight, "fc_weight")])
    regions = g.op("Add", [features, g.const(_array(model.img_enc.fc.bias), "fc_bias")])
    if not config.no_imgnorm:
        regions = g.l2norm(regions)
    g.output_as(regions, "regions")
    g.output_as(g.gram(regions), "region_gram")
    g.output_as(g.l2norm(g.reduce("ReduceMean", regions, [1], 0)), "global")
    d = config.embed_size
    return g.model(
        [_value("features", TensorProto.FLOAT, ["batch", "regions", config.img_dim])],
        [
            _value("regions", TensorProto.FLOAT, ["batch", "regions", d]),
            _value("region_gram", TensorProto.FLOAT, ["batch", "regions", "regions"]),
            _value("global", TensorProto.FLOAT, ["batch", d]),
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
    mask = _length_mask(g, "tokens", "lengths")  # (B, T, 1) float
    words = g.op("Mul", [words, mask])
    if not config.no_txtnorm:
        words = g.l2norm(words)
    g.output_as(words, "words")
    g.output_as(g.gram(words), "caption_gram")
    total = g.reduce("ReduceSum", words, [1], 0)
    count = g.op("Cast", ["lengths"], to=TensorProto.FLOAT)
    mean = g.op("Div", [total, g.op("Unsqueeze", [count, g.const(np.array([1], np.int64))])])
    g.output_as(g.l2norm(mean), "global")
    return g.model(
        [
            _value("tokens", TensorProto.INT64, ["batch", "words"]),
            _value("lengths", TensorProto.INT64, ["batch"]),
        ],
        [
            _value("words", TensorProto.FLOAT, ["batch", "words", hidden]),
            _value("caption_gram", TensorProto.FLOAT, ["batch", "words", "words"]),
            _value("global", TensorProto.FLOAT, ["batch", hidden]),
        ],
        "scan_text_encoder",
    )


def _length_mask(g: GraphBuilder, tokens: str, lengths: str) -> str:
    """(B, T, 1) float mask of the positions before each length."""
    shape = g.op("Shape", [tokens])
    steps = g.op("Gather", [shape, g.const(np.array(1, np.int64))], axis=0)
    positions = g.op(
        "Range", [g.const(np.array(0, np.int64)), steps, g.const(np.array(1, np.int64))]
    )
    valid = g.op(
        "Less",
        [
            g.op("Unsqueeze", [positions, g.const(np.array([0], np.int64))]),
            g.op("Unsqueeze", [lengths, g.const(np.array([1], np.int64))]),
        ],
    )
    as_float = g.op("Cast", [valid], to=TensorProto.FLOAT)
    return g.op("Unsqueeze", [as_float, g.const(np.array([2], np.int64))])
