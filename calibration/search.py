"""Which nodes must stay in higher precision: decided by measurement, not by a fixed list.

Start with every candidate unit in low precision. If the calibration sample's worst |ΔR@K|
exceeds the target (or an output is not finite), measure each unit's own harm on the sample (the
worst |ΔR@K|, then the similarity error, when it alone is in low precision), then move units back
to higher precision, the most harmful first, until the sample meets the target. A unit is an
operator type of one graph for FP16 (norms, softmax, reductions behave alike) and a single node
for INT8 (few MatMuls, each with its own activation range).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import onnx
from scan_deploy.calibration.fp16 import float_nodes
from scan_deploy.calibration.int8 import quantizable_nodes

Graphs = dict[str, onnx.ModelProto]


@dataclass(frozen=True)
class Unit:
    graph: str
    label: str  # operator type (FP16) or node name (INT8)
    nodes: tuple[str, ...]


@dataclass(frozen=True, order=True)
class Measurement:
    """A variant on the calibration sample, against the FP32 reference (inf when not finite)."""

    worst_delta_recall: float
    similarity_error: float


@dataclass
class Decision:
    kept: list[Unit]  # units left in higher precision, in the order they were moved back
    sensitivity: dict[Unit, Measurement] = field(default_factory=dict)  # with the unit alone low
    steps: list[dict] = field(default_factory=list)  # the sample after each move

    def kept_report(self) -> list[dict]:
        return [
            {
                "graph": u.graph,
                "op": u.label,
                "nodes": list(u.nodes),
                "alone": asdict(self.sensitivity[u]) if u in self.sensitivity else None,
            }
            for u in self.kept
        ]


# Operators that move or select values without arithmetic: keeping them in FP32 cannot win back
# precision, so they follow their inputs and are not searched.
DATA_MOVEMENT = frozenset(
    [
        "Cast",
        "Concat",
        "Identity",
        "Reshape",
        "Shape",
        "Slice",
        "Squeeze",
        "Transpose",
        "Unsqueeze",
        "Where",
    ]
)


def fp16_units(graphs: Graphs) -> list[Unit]:
    units = []
    for name, model in graphs.items():
        by_op: dict[str, list[str]] = {}
        for node in float_nodes(model):
            if node.op_type not in DATA_MOVEMENT:
                by_op.setdefault(node.op_type, []).append(node.name)
        units += [Unit(name, op, tuple(nodes)) for op, nodes in sorted(by_op.items())]
    return units


def int8_units(graphs: Graphs) -> list[Unit]:
    return [
        Unit(name, node.name, (node.name,))
        for name, model in graphs.items()
        for node in quantizable_nodes(model)
    ]


def choose_kept(
    units: list[Unit],
    build: Callable[[list[Unit]], Graphs],
    measure: Callable[[Graphs], Measurement],
    target: float,
) -> Decision:
    """`build(kept)` makes the graphs with the `kept` units in higher precision; `measure` runs
    them on the calibration sample."""
    decision = Decision(kept=[])
    current = measure(build([]))
    decision.steps.append({"kept": None, **asdict(current)})
    if current.worst_delta_recall <= target:
        return decision
    for unit in units:
        decision.sensitivity[unit] = measure(build([u for u in units if u != unit]))
    for unit in sorted(units, key=decision.sensitivity.__getitem__, reverse=True):
        decision.kept.append(unit)
        current = measure(build(decision.kept))
        decision.steps.append({"kept": f"{unit.graph}:{unit.label}", **asdict(current)})
        if current.worst_delta_recall <= target:
            break
    return decision
