"""The TensorRT backend: the engines `scan-deploy build-engine --backend tensorrt` wrote under
`BUNDLE/engines/`, run with the TensorRT runtime and cuda-python (or pycuda) buffers.

Each graph's engine is found by its sidecar (graph, precision, backend tensorrt; newest first)
and loaded by `scan_deploy.engines.load.load_engine`, which refuses an engine built for another
TensorRT, GPU, graph or vocabulary with the command that rebuilds it. Every TensorRT call goes
through `scan_deploy.engines.tensorrt_api` (the only module importing `tensorrt`); the memory is
`scan_deploy.engines.cuda_buffers`.

A runner holds one execution context, one CUDA stream and, per I/O tensor, a pinned host buffer
and a device buffer that grow as larger shapes come. One run:
1. the feeds, checked against the manifest and cast to the engine's input types;
2. the optimization profile whose min..max covers every input shape (`select_profile`; the
   current one is kept when it does), switched with `set_optimization_profile_async`;
3. `set_input_shape` per input, output shapes from `get_tensor_shape`, buffers grown,
   `set_tensor_address` for every I/O tensor;
4. host -> device copies, `execute_async_v3`, device -> host copies, one stream synchronize.
An execution context is not re-entrant, so a runner serializes its runs with a lock.

The runtime sizes its calls to the engine (`sizes`, `base.CallSizes`): the symbolic dims of the
engine's largest optimization profile (by the volume of its max shapes), so that every call it
makes fits one profile.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
from scan_deploy.engines import tensorrt_api
from scan_deploy.engines.cuda_buffers import Stream, TensorBuffer
from scan_deploy.engines.load import engine_candidates, load_engine
from scan_deploy.runtime.backends.base import RunnerCache, as_output, prepare_feeds

from scan_deploy.bundle import Bundle, DimSizes
from scan_deploy.choices import Graph, Precision
from scan_deploy.errors import UserError

Shape = tuple[int, ...]
ProfileShapes = Mapping[str, tuple[Shape, Shape, Shape]]  # input -> (min, opt, max)


def io_order(
    graph: str, entry: Mapping[str, Any], tensors: Sequence[Any]
) -> tuple[list[Any], list[Any]]:
    """The engine's input and output tensors (anything with `name` and `is_input`), each in
    the manifest's order; a UserError when the engine's I/O differ from the graph's."""
    by_name = {t.name: t for t in tensors}
    result = []
    for kind, values, is_input in (
        ("inputs", entry["inputs"], True),
        ("outputs", entry["outputs"], False),
    ):
        expected = [v["name"] for v in values]
        actual = sorted(t.name for t in tensors if t.is_input == is_input)
        if sorted(expected) != actual:
            raise UserError(
                f"{graph}: the engine's {kind} are {', '.join(actual) or 'none'}, the bundle's "
                f"graph has {', '.join(expected)} (rebuild the engine from this bundle)"
            )
        result.append([by_name[name] for name in expected])
    return result[0], result[1]


def covers(profile: ProfileShapes, shapes: Mapping[str, Shape]) -> bool:
    """Every input shape lies within the profile's min..max, dim by dim."""
    for name, shape in shapes.items():
        low, _, high = profile[name]
        if len(shape) != len(low) or any(
            not lo <= d <= hi for d, lo, hi in zip(shape, low, high, strict=True)
        ):
            return False
    return True


def select_profile(
    profiles: Sequence[ProfileShapes],
    shapes: Mapping[str, Shape],
    current: int | None = None,
    source: str | Path = "engine",
) -> int:
    """The optimization profile to run `shapes` with: the current one when it covers them (no
    switch), else the first that does; a UserError naming the engine file `source` and listing
    the ranges when none does."""
    if current is not None and 0 <= current < len(profiles) and covers(profiles[current], shapes):
        return current
    for index, profile in enumerate(profiles):
        if covers(profile, shapes):
            return index
    given = ", ".join(f"{name}:{_dims(shape)}" for name, shape in shapes.items())
    ranges = "; ".join(
        ", ".join(f"{name}:{_dims(low)}..{_dims(high)}" for name, (low, _, high) in p.items())
        for p in profiles
    )
    raise UserError(
        f"{source}: input shapes {given} are outside every optimization profile of the engine "
        f"({ranges}); rebuild it with --min-shapes/--max-shapes that cover them"
    )


def profile_sizes(
    inputs: Sequence[Mapping[str, Any]], profiles: Sequence[ProfileShapes]
) -> dict[str, DimSizes]:
    """The sizes each symbolic dim of `inputs` (the manifest's entries) takes in the largest
    profile (by the volume of its max shapes; the first of equals): min, opt and max of the
    dim's axis, the tightest over the inputs sharing the dim."""
    largest = max(profiles, key=lambda p: math.prod(math.prod(high) for _, _, high in p.values()))
    bounds: dict[str, list[tuple[int, int, int]]] = {}
    for value in inputs:
        low, opt, high = largest[value["name"]]
        for axis, dim in enumerate(value["shape"]):
            if isinstance(dim, str):
                bounds.setdefault(dim, []).append((low[axis], opt[axis], high[axis]))
    return {
        dim: DimSizes(max(b[0] for b in found), min(b[1] for b in found), min(b[2] for b in found))
        for dim, found in bounds.items()
    }


def _dims(shape: Shape) -> str:
    return "x".join(str(d) for d in shape)


class TensorRTRunner:
    def __init__(self, graph: Graph, entry: Mapping[str, Any], engine: Any, path: Path) -> None:
        self.graph = graph
        self.inputs: list[dict[str, Any]] = entry["inputs"]
        self.outputs: list[dict[str, Any]] = entry["outputs"]
        self.source = path
        self._trt = tensorrt_api
        self._engine = engine  # the context needs its engine alive
        self._in, self._out = io_order(graph, entry, tensorrt_api.engine_tensors(engine, path))
        self._dtypes = {t.name: t.dtype for t in (*self._in, *self._out)}
        self.profiles = tensorrt_api.engine_profiles(engine, [t.name for t in self._in])
        self.sizes = profile_sizes(self.inputs, self.profiles)
        self._context = tensorrt_api.create_execution_context(engine, path)
        self._stream = Stream()
        self._buffers = {t.name: TensorBuffer() for t in (*self._in, *self._out)}
        self._profile: int | None = None
        self._lock = threading.Lock()

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        arrays = prepare_feeds(self.graph, self.inputs, feeds, self._dtypes)
        with self._lock:
            if self._context is None:
                raise UserError(f"{self.graph}: the runner is closed")
            return self._run(arrays)

    def close(self) -> None:
        """Free the device and pinned buffers and the stream; drop the context and engine."""
        with self._lock:
            for buffer in self._buffers.values():
                buffer.close()
            self._stream.close()
            self._context = self._engine = None

    def _run(self, arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
        trt, context, stream = self._trt, self._context, self._stream
        shapes = {name: array.shape for name, array in arrays.items()}
        profile = select_profile(self.profiles, shapes, self._profile, self.source)
        if profile != self._profile:
            trt.set_optimization_profile(context, profile, stream.handle)
            self._profile = profile
        for name, shape in shapes.items():
            trt.set_input_shape(context, name, shape)
        out_shapes = {t.name: trt.tensor_shape(context, t.name) for t in self._out}
        for name, array in arrays.items():
            self._buffers[name].ensure(array.nbytes)
        for t in self._out:
            self._buffers[t.name].ensure(_nbytes(out_shapes[t.name], t.dtype, t.name))
        for name, buffer in self._buffers.items():  # after growing: addresses may change
            trt.set_tensor_address(context, name, buffer.device.ptr)
        for name, array in arrays.items():
            self._buffers[name].upload(array, stream)
        trt.execute_async(context, stream.handle)
        views = [
            self._buffers[t.name].download(out_shapes[t.name], t.dtype, stream) for t in self._out
        ]
        stream.synchronize()
        return [as_output(np.array(view)) for view in views]  # copies: the buffers are reused


def _nbytes(shape: Shape, dtype: str, name: str) -> int:
    if any(d < 0 for d in shape):
        raise UserError(f"TensorRT left the shape of output {name!r} unknown: {shape}")
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


class TensorRTBackend(RunnerCache):
    def __init__(self, bundle: Bundle, precision: Precision = Precision.FP32) -> None:
        super().__init__()
        self.bundle = bundle
        self.precision = precision
        self.version = tensorrt_api.version()  # TensorRT missing: UserError with the install hint
        self.name = f"tensorrt {self.version}"

    def sizes(self, graph: Graph | str) -> dict[str, DimSizes]:
        """The engine's: its largest optimization profile (`profile_sizes`)."""
        return cast(TensorRTRunner, self.runner(graph)).sizes

    def _open(self, graph: Graph) -> TensorRTRunner:
        entry = self.bundle.graph(graph, self.precision)
        errors = []
        for path in engine_candidates(self.bundle, graph, self.precision):
            try:
                engine = load_engine(path, self.bundle, self.precision)
            except UserError as exc:  # stale: try an older one, else report the newest's error
                errors.append(exc)
                continue
            return TensorRTRunner(graph, entry, engine, path)
        raise errors[0]
