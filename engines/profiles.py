"""Optimization profiles for engine builds: from the manifest's shape ranges, or trtexec-style
shapes `min_shapes`, `opt_shapes`, `max_shapes` (`name:1x36x256,name2:4x7`; build-engine's
`--min-shapes/--opt-shapes/--max-shapes`). Inputs that share
a symbolic dim (`tokens` and `lengths` share `batch`) keep it consistent: the size an option
gives it applies to all of them, and two options giving it different sizes are refused.

Pure Python (no TensorRT): the TensorRT builder (`engines.tensorrt_api`) and ONNX Runtime's
TensorRT execution provider (`trt_profile_*_shapes`, the same syntax) both take these profiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scan_deploy.bundle import DIM_RANGES
from scan_deploy.errors import UserError

Shape = tuple[int, ...]


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
    manifest's profile when none is given. An input given only in `opt_shapes` gets
    min = max = opt (trtexec's rule). The size an option gives a symbolic dim (`batch`) applies
    to every input sharing that dim, as min, opt and max separately; inputs an option leaves out
    otherwise keep the manifest's shapes. `only_known` skips names this graph lacks (options
    shared by several graphs)."""
    counts = {len(x) for x in (min_shapes, opt_shapes, max_shapes) if x}
    if len(counts) > 1:
        raise UserError(
            "min_shapes/opt_shapes/max_shapes: give each once per profile "
            f"(got {len(min_shapes)}, {len(opt_shapes)} and {len(max_shapes)})"
        )
    base = manifest_profile(inputs, shape_ranges)
    dims = {v["name"]: list(v["shape"]) for v in inputs}
    profiles = [base]
    if counts:
        n = counts.pop()
        given = [
            [_parsed(options, k, option) for k in range(n)]
            for option, options in (
                ("min_shapes", min_shapes),
                ("opt_shapes", opt_shapes),
                ("max_shapes", max_shapes),
            )
        ]
        if only_known:
            given = [[_known(d, base) for d in per_profile] for per_profile in given]
        profiles = [_override(base, dims, *(g[k] for g in given)) for k in range(n)]
    return [p.static() for p in profiles] if static else profiles


def _parsed(options: list[str], k: int, option: str) -> dict[str, Shape]:
    return parse_shapes(options[k], option) if options else {}


def _known(shapes: dict[str, Shape], base: Profile) -> dict[str, Shape]:
    return {name: shape for name, shape in shapes.items() if name in base.inputs}


BOUNDS = ("opt", "min", "max")  # the order errors are reported in


def _override(
    base: Profile,
    dims: dict[str, list[int | str]],
    mins: dict[str, Shape],
    opts: dict[str, Shape],
    maxs: dict[str, Shape],
) -> Profile:
    for option, given in (("min_shapes", mins), ("opt_shapes", opts), ("max_shapes", maxs)):
        unknown = sorted(set(given) - set(base.inputs))
        if unknown:
            raise UserError(
                f"{option}: unknown input {unknown[0]!r} (inputs: {', '.join(base.inputs)})"
            )
    # The shapes the options set, per bound: an input given only in opt_shapes sets all three.
    explicit: dict[str, dict[str, Shape]] = {which: {} for which in BOUNDS}
    for name in base.inputs:
        if name in opts and name not in mins and name not in maxs:
            for which in BOUNDS:
                explicit[which][name] = opts[name]
        else:
            for which, shapes in (("opt", opts), ("min", mins), ("max", maxs)):
                if name in shapes:
                    explicit[which][name] = shapes[name]
    sizes = {which: _symbolic_sizes(which, dims, explicit[which]) for which in BOUNDS}
    result = {}
    for name, default in base.inputs.items():
        bounds = {
            which: explicit[which][name]
            if name in explicit[which]
            else _with_sizes(getattr(default, which), dims[name], sizes[which])
            for which in BOUNDS
        }
        shapes = InputRange(bounds["min"], bounds["opt"], bounds["max"])
        _check_range(name, [isinstance(d, int) for d in dims[name]], default.opt, shapes)
        result[name] = shapes
    return Profile(result)


def _symbolic_sizes(
    which: str, dims: dict[str, list[int | str]], shapes: dict[str, Shape]
) -> dict[str, tuple[int, str]]:
    """Symbolic dim -> (size, the input that set it), from the shapes given for one bound;
    refuses two inputs giving one dim different sizes."""
    sizes: dict[str, tuple[int, str]] = {}
    for name, shape in shapes.items():
        if len(shape) != len(dims[name]):
            raise UserError(
                f"{which}_shapes: {name}: expected {len(dims[name])} dims, "
                f"got {format_shape(shape)}"
            )
        for dim, size in zip(dims[name], shape, strict=True):
            if isinstance(dim, int):
                continue
            first = sizes.setdefault(dim, (size, name))
            if first[0] != size:
                raise UserError(
                    f"{which}_shapes: symbolic dim {dim!r} is {first[0]} for {first[1]} "
                    f"but {size} for {name} (inputs sharing a dim take the same size)"
                )
    return sizes


def _with_sizes(shape: Shape, dims: list[int | str], sizes: dict[str, tuple[int, str]]) -> Shape:
    """`shape` with each symbolic dim an option sized replaced by that size."""
    return tuple(
        sizes[dim][0] if isinstance(dim, str) and dim in sizes else size
        for dim, size in zip(dims, shape, strict=True)
    )


def _check_range(name: str, fixed: list[bool], graph: Shape, shapes: InputRange) -> None:
    rank = len(graph)
    for which in ("opt", "min", "max"):
        shape = getattr(shapes, which)
        if len(shape) != rank:
            raise UserError(
                f"{which}_shapes: {name}: expected {rank} dims, got {format_shape(shape)}"
            )
    for axis, (lo, opt, hi) in enumerate(zip(shapes.min, shapes.opt, shapes.max, strict=True)):
        if fixed[axis] and not lo == opt == hi == graph[axis]:
            raise UserError(
                f"{name}: dim {axis} is fixed at {graph[axis]} in the graph, "
                f"got min/opt/max {lo}/{opt}/{hi}"
            )
        if not lo <= opt <= hi:
            raise UserError(f"{name}: dim {axis}: expected min <= opt <= max, got {lo}/{opt}/{hi}")
