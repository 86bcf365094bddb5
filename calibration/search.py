"""Which nodes must stay in higher precision: decided by measurement, not by a fixed list.

Start with every candidate unit in low precision. If the calibration sample's worst |ΔR@K|
exceeds the target (or an output is not finite), measure each unit's own harm (the similarity
error when it alone is in low precision, on a small probe set), then move units back to higher
precision, the most harmful first, until the sample meets the target. A unit is an operator type
of one graph for FP16 (norms, softmax, reductions behave alike) and a single node for INT8 (few
MatMuls, each with its own activation range).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import onnx
from scan_deploy.calibration.fp16 import float_nodes
from scan_deploy.calibration.int8 import quantizable_nodes

Graphs = dict[str, onnx.ModelProto]


@dataclass(frozen=True)
class Unit:
    graph: str
    label: str  # operator type (FP16) or node name (INT8)
    nodes: tuple[str, ...]


@dataclass
class Decision:
    kept: list[Unit]  # units left in higher precision, in the order they were moved back
    sensitivity: dict[Unit, float] = field(default_factory=dict)  # probe error, unit alone low
    steps: list[dict] = field(default_factory=list)  # worst |ΔR@K| after each move

    def kept_report(self) -> list[dict]:
        return [
            {
                "graph": u.graph,
                "op": u.label,
                "nodes": list(u.nodes),
                "probe_similarity_error": self.sensitivity.get(u),
            }
            for u in self.kept
        ]


def fp16_units(graphs: Graphs) -> list[Unit]:
    units = []
    for name, model in graphs.items():
        by_op: dict[str, list[str]] = {}
        for node in float_nodes(model):
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
    worst_delta: Callable[[Graphs], float],
    probe_error: Callable[[Graphs], float],
    target: float,
) -> Decision:
    """`build(kept)` makes the graphs with `kept` units in higher precision; `worst_delta` gives
    the sample's worst |ΔR@K| (inf when not finite); `probe_error` the probe similarity error."""
    decision = Decision(kept=[])
    worst = worst_delta(build([]))
    decision.steps.append({"kept": [], "worst_delta_recall": worst})
    if worst <= target:
        return decision
    for unit in units:
        decision.sensitivity[unit] = probe_error(build([u for u in units if u != unit]))
    ranked = sorted(units, key=lambda u: decision.sensitivity[u], reverse=True)
    for unit in ranked:
        decision.kept.append(unit)
        worst = worst_delta(build(decision.kept))
        decision.steps.append({"kept": f"{unit.graph}:{unit.label}", "worst_delta_recall": worst})
        if worst <= target:
            break
    return decision
