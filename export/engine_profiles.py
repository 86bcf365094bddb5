"""Optimization profiles for engine builds: from the manifest's shape ranges, or trtexec-style
`--min-shapes/--opt-shapes/--max-shapes` options (`name:1x36x256,name2:4x7`).

Pure Python (no TensorRT): the TensorRT builder (`scan_deploy.tensorrt_api`) and ONNX Runtime's
TensorRT execution provider (`trt_profile_*_shapes`, the same syntax) both take these profiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scan_deploy.errors import UserError

Shape = tuple[int, ...]

# The manifest's symbolic dims, by the shape range they take their sizes from.
DIM_RANGES = {
    "batch": "batch",
    "images": "batch",
    "captions": "batch",
    "regions": "regions",
    "words": "words",
}


@dataclass(frozen=True)
class InputRange:
    """The min/opt/max shapes of one input in one optimization profile."""

    min: Shape
    opt: Shape
    max: Shape

    def to_json(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclass(frozen=True)
class Profile:
    """One optimization profile: every graph input, in graph order."""

    inputs: dict[str, InputRange]

    def to_json(self) -> dict[str, dict[str, list[int]]]:
        return {name: shapes.to_json() for name, shapes in self.inputs.items()}

    def trtexec(self, which: str) -> str:
        """The `which` (min, opt or max) shapes in trtexec syntax: `name:1x5x8,name2:4`."""
        return ",".join(
            f"{name}:{format_shape(getattr(shapes, which))}" for name, shapes in self.inputs.items()
        )

    def static(self) -> Profile:
        """min = opt = max = opt, as DLA requires."""
        return Profile({n: InputRange(r.opt, r.opt, r.opt) for n, r in self.inputs.items()})


def format_shape(shape: Shape) -> str:
    return "x".join(str(d) for d in shape)


def manifest_profile(inputs: list[dict[str, Any]], shape_ranges: dict[str, Any]) -> Profile:
    """The profile the bundle was exported for: symbolic dims take their manifest range."""
    result = {}
    for value in inputs:
        bounds: list[list[int]] = [[], [], []]
        for dim in value["shape"]:
            if isinstance(dim, int):
                sizes = (dim, dim, dim)
            elif dim in DIM_RANGES:
                r = shape_ranges[DIM_RANGES[dim]]
                sizes = (r["min"], r["opt"], r["max"])
            else:
                raise UserError(
                    f"input {value['name']}: symbolic dim {dim!r} has no shape range "
                    f"(known: {', '.join(DIM_RANGES)})"
                )
            for bound, size in zip(bounds, sizes, strict=True):
                bound.append(int(size))
        result[value["name"]] = InputRange(*(tuple(b) for b in bounds))
    return Profile(result)


def parse_shapes(text: str, option: str) -> dict[str, Shape]:
    """Parse trtexec shape syntax `name:1x36x256,name2:4x7` (the name may contain colons)."""
    shapes: dict[str, Shape] = {}
    for item in text.split(","):
        name, sep, dims = item.strip().rpartition(":")
        if not sep or not name or not dims:
            raise UserError(f"{option}: expected NAME:DxDx... in {item.strip()!r}")
        try:
            shape = tuple(int(d) for d in dims.split("x"))
        except ValueError:
            raise UserError(
                f"{option}: {name}: dims must be integers joined by 'x', got {dims!r}"
            ) from None
        if any(d < 1 for d in shape):
            raise UserError(f"{option}: {name}: dims must be at least 1, got {dims!r}")
        if name in shapes:
            raise UserError(f"{option}: {name} is given twice")
        shapes[name] = shape
    return shapes


def build_profiles(
    inputs: list[dict[str, Any]],
    shape_ranges: dict[str, Any],
    min_shapes: list[str],
    opt_shapes: list[str],
    max_shapes: list[str],
    static: bool = False,
    only_known: bool = False,
) -> list[Profile]:
    """One profile per repetition of the shape options (as trtexec counts them), or the
    manifest's profile when none is given. Inputs an option leaves out keep the manifest's
    shapes; an input given only in `--opt-shapes` gets min = max = opt (trtexec's rule).
    `only_known` skips names this graph lacks (options shared by several graphs)."""
    counts = {len(x) for x in (min_shapes, opt_shapes, max_shapes) if x}
    if len(counts) > 1:
        raise UserError(
            "--min-shapes/--opt-shapes/--max-shapes: give each option once per profile "
            f"(got {len(min_shapes)}, {len(opt_shapes)} and {len(max_shapes)})"
        )
    base = manifest_profile(inputs, shape_ranges)
    fixed = {v["name"]: [isinstance(d, int) for d in v["shape"]] for v in inputs}
    profiles = [base]
    if counts:
        n = counts.pop()
        given = [
            [_parsed(options, k, option) for k in range(n)]
            for option, options in (
                ("--min-shapes", min_shapes),
                ("--opt-shapes", opt_shapes),
                ("--max-shapes", max_shapes),
            )
        ]
        if only_known:
            given = [[_known(d, base) for d in per_profile] for per_profile in given]
        profiles = [_override(base, fixed, *(g[k] for g in given)) for k in range(n)]
    return [p.static() for p in profiles] if static else profiles


def _parsed(options: list[str], k: int, option: str) -> dict[str, Shape]:
    return parse_shapes(options[k], option) if options else {}


def _known(shapes: dict[str, Shape], base: Profile) -> dict[str, Shape]:
    return {name: shape for name, shape in shapes.items() if name in base.inputs}


def _override(
    base: Profile,
    fixed: dict[str, list[bool]],
    mins: dict[str, Shape],
    opts: dict[str, Shape],
    maxs: dict[str, Shape],
) -> Profile:
    for option, given in (("--min-shapes", mins), ("--opt-shapes", opts), ("--max-shapes", maxs)):
        unknown = sorted(set(given) - set(base.inputs))
        if unknown:
            raise UserError(
                f"{option}: unknown input {unknown[0]!r} (inputs: {', '.join(base.inputs)})"
            )
    result = {}
    for name, default in base.inputs.items():
        if name in opts and name not in mins and name not in maxs:
            lo = hi = opts[name]
        else:
            lo, hi = mins.get(name, default.min), maxs.get(name, default.max)
        shapes = InputRange(lo, opts.get(name, default.opt), hi)
        _check_range(name, fixed[name], default.opt, shapes)
        result[name] = shapes
    return Profile(result)


def _check_range(name: str, fixed: list[bool], graph: Shape, shapes: InputRange) -> None:
    rank = len(graph)
    for which in ("opt", "min", "max"):
        shape = getattr(shapes, which)
        if len(shape) != rank:
            raise UserError(
                f"--{which}-shapes: {name}: expected {rank} dims, got {format_shape(shape)}"
            )
    for axis, (lo, opt, hi) in enumerate(zip(shapes.min, shapes.opt, shapes.max, strict=True)):
        if fixed[axis] and not lo == opt == hi == graph[axis]:
            raise UserError(
                f"{name}: dim {axis} is fixed at {graph[axis]} in the graph, "
                f"got min/opt/max {lo}/{opt}/{hi}"
            )
        if not lo <= opt <= hi:
            raise UserError(f"{name}: dim {axis}: expected min <= opt <= max, got {lo}/{opt}/{hi}")
