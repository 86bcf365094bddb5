"""The precision search, on stand-in measurements."""

import math

from scan_deploy.calibration.search import Measurement, Unit, choose_kept

UNITS = [Unit("scorer", op, (f"{op}_1",)) for op in ("MatMul", "Softmax", "ReduceLogSumExp")]
HARM = {"MatMul": 0.0, "Softmax": 0.5, "ReduceLogSumExp": math.inf}
ERROR = {"MatMul": 0.3, "Softmax": 0.1, "ReduceLogSumExp": 0.0}


def _search(target):
    built = []

    def build(kept):
        built.append([u.label for u in kept])
        return {"low": [u.label for u in UNITS if u not in kept]}

    def measure(graphs):
        low = graphs["low"]
        return Measurement(sum(HARM[x] for x in low), sum(ERROR[x] for x in low))

    return choose_kept(UNITS, build, measure, target), built


def test_nothing_kept_when_all_low_meets_the_target():
    decision, built = _search(target=math.inf)
    assert decision.kept == [] and built == [[]]
    assert decision.sensitivity == {}


def test_units_ranked_by_recall_harm_then_error_until_target_met():
    decision, _ = _search(target=0.2)
    assert [u.label for u in decision.kept] == ["ReduceLogSumExp", "Softmax"]
    assert decision.sensitivity[UNITS[2]] == Measurement(math.inf, 0.0)
    assert [s["worst_delta_recall"] for s in decision.steps] == [math.inf, 0.5, 0.0]
    assert decision.steps[-1]["kept"] == "scorer:Softmax"
    assert decision.kept_report()[1] == {
        "graph": "scorer",
        "op": "Softmax",
        "nodes": ["Softmax_1"],
        "alone": {"worst_delta_recall": 0.5, "similarity_error": 0.1},
    }


def test_error_breaks_ties_in_recall_harm():
    units = [Unit("scorer", op, (op,)) for op in ("Exp", "Div", "Mul")]
    harm = {"Exp": 1.0, "Div": 1.0, "Mul": 0.0}
    error = {"Exp": 0.1, "Div": 0.4, "Mul": 0.9}

    def build(kept):
        return {"low": [u.label for u in units if u not in kept]}

    def measure(graphs):
        low = graphs["low"]
        return Measurement(sum(harm[x] for x in low), sum(error[x] for x in low))

    decision = choose_kept(units, build, measure, target=0.5)
    assert [u.label for u in decision.kept] == ["Div", "Exp"]  # equal ΔR@K: larger error first
