"""One small interface for every inference backend, as Polygraphy's runners have.

A `Backend` opens the bundle's graphs (or the engines built from them) for one precision; its
`runner(graph)` runs one of the three graphs (`image_encoder`, `text_encoder`, `scorer`):
`run(feeds)` takes numpy arrays by input name and returns the graph's outputs in the manifest's
order, as float32 / int64 numpy arrays. The same feeds give the same outputs on every backend,
up to the precision's error.

    backend = open_backend(load_bundle("bundle"), "onnxruntime", "fp32")
    regions, region_gram, pooled = backend.runner("image_encoder").run({"features": features})

Backends live one per module, each importing its library lazily (`onnxruntime`, `tensorrt` with
cuda-python or pycuda, `torch`), so `import scan_deploy.runtime.backends` needs numpy only and
the runtime never imports torch or onnx unless the torch backend is asked for.

The shape contract: `backend.sizes(graph)` is what each symbolic dim of a graph's inputs may take
on that backend (the TensorRT engine's optimization profile; the manifest's shape ranges for
ONNX Runtime and torch, which run any shape but were exported for those), and `CallSizes.of`
turns it into the batch, gallery block and word limit the runtime uses: no constant of its own.

Feeds are checked against the manifest before any backend sees them (`prepare_feeds`): every
input present, of the graph's rank, fixed dims as exported and symbolic dims (`batch`,
`words`, ...) of one size across the inputs sharing them; arrays are cast to the input's dtype.
Names the graph does not take are ignored, so one dict of arrays can feed the scorer of either
attention direction (it takes `region_gram` for t2i, `caption_gram` for i2t).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from scan_deploy import choices
from scan_deploy.bundle import Bundle, DimSizes
from scan_deploy.choices import Graph, Precision
from scan_deploy.errors import UserError

LOG = logging.getLogger("scan_deploy.runtime")


class Runner(Protocol):
    """Runs one graph. `inputs`/`outputs` are the manifest's entries (name, dtype, shape)."""

    graph: Graph
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The graph's outputs in the manifest's order (float32 / int64 numpy arrays)."""
        ...

    def close(self) -> None:
        """Release what the runner holds (a session, an execution context, device buffers);
        `run` then raises a UserError. Closing twice is harmless."""
        ...


class Backend(Protocol):
    name: str  # "onnxruntime (CUDAExecutionProvider)", "tensorrt 10.3.0", "torch cuda"
    precision: Precision

    def runner(self, graph: Graph | str) -> Runner:
        """The runner of `graph`, created on first use and then reused."""
        ...

    def sizes(self, graph: Graph | str) -> dict[str, DimSizes]:
        """The sizes each symbolic dim of `graph`'s inputs may take on this backend."""
        ...

    def close(self) -> None:
        """Close every runner it opened; `runner` then raises a UserError."""
        ...


@dataclass(frozen=True)
class CallSizes:
    """How many items the runtime puts in one call, from the engine it runs (`Backend.sizes`):
    encoder batches and query batches at the optimal batch, gallery blocks at the largest the
    scorer takes, captions cut to the tokens both the text encoder and the scorer take."""

    image_batch: int  # images per image-encoder call (index, image queries)
    text_batch: int  # captions per text-encoder call (index, text queries)
    image_block: int  # gallery images per scorer call
    caption_block: int  # gallery captions per scorer call
    max_tokens: int  # tokens per caption, <start> and <end> included (`Bundle.encode_captions`)

    @classmethod
    def of(cls, backend: Backend) -> CallSizes:
        image, text, scorer = (backend.sizes(graph) for graph in Graph)
        return cls(
            image_batch=min(image["batch"].opt, scorer["images"].max),
            text_batch=min(text["batch"].opt, scorer["captions"].max),
            image_block=scorer["images"].max,
            caption_block=scorer["captions"].max,
            max_tokens=min(text["words"].max, scorer["words"].max),
        )

    def block(self, kind: str) -> int:
        """Gallery items per scorer call for a gallery of `kind` (images or captions)."""
        return self.image_block if kind == "images" else self.caption_block


class RunnerCache:
    """The `runner(graph)` of every backend: each graph's runner is opened once, on first use,
    under a lock, since several threads may ask for it at once. Backends implement `_open`,
    and set `bundle` and `precision`. `close()` (or leaving a `with` block) closes the runners;
    nothing is released in `__del__`."""

    bundle: Bundle
    precision: Precision

    def __init__(self) -> None:
        self._runners: dict[Graph, Runner] = {}
        self._lock = threading.Lock()
        self._closed = False

    def runner(self, graph: Graph | str) -> Runner:
        graph = Graph.parse(graph, "graph")
        with self._lock:
            if self._closed:
                raise UserError(f"{graph}: the backend is closed")
            if graph not in self._runners:
                self._runners[graph] = self._open(graph)
            return self._runners[graph]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            runners, self._runners = list(self._runners.values()), {}
        for runner in runners:
            runner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self, graph: Graph) -> Runner:
        raise NotImplementedError

    def sizes(self, graph: Graph | str) -> dict[str, DimSizes]:
        """The manifest's shape ranges (`Bundle.dim_sizes`): backends that run any shape."""
        return self.bundle.dim_sizes(Graph.parse(graph, "graph"), self.precision)


def open_backend(
    bundle: Bundle,
    backend: choices.Backend | str = choices.Backend.ONNXRUNTIME,
    precision: Precision | str = Precision.FP32,
    *,
    threads: int = 0,
    providers: Sequence[choices.Provider | str] | choices.Provider | str | None = None,
    checkpoint: str | Path | None = None,
    device: str | None = None,
) -> Backend:
    """Open `bundle` on `backend` at `precision`.

    - onnxruntime: `providers` (cpu, cuda, tensorrt; most preferred first, default: every one
      this onnxruntime has, TensorRT before CUDA before CPU) and `threads`
      (intra_op_num_threads, 0 = onnxruntime's default; the other backends ignore it);
    - tensorrt: the engines `scan-deploy build-engine --backend tensorrt` wrote under
      `BUNDLE/engines/`, checked against their sidecars;
    - torch: the PyTorch reference from `checkpoint` (the one the bundle was exported from) on
      `device` (default cuda when available, else cpu).
    `providers`, `checkpoint` and `device` given to a backend they do not apply to are refused
    (one-line UserError).
    """
    backend = choices.Backend.parse(backend, "backend")
    precision = Precision.parse(precision, "precision")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise UserError(f"threads: expected an integer >= 0, got {threads!r}")
    if threads and backend != choices.Backend.ONNXRUNTIME:
        LOG.info("threads: applies to the onnxruntime backend, ignored by %s", backend)
    for option, given, applies_to in (
        ("providers", providers is not None, choices.Backend.ONNXRUNTIME),
        ("checkpoint", checkpoint is not None, choices.Backend.TORCH),
        ("device", device is not None, choices.Backend.TORCH),
    ):
        if given and backend != applies_to:
            raise UserError(f"{option}: applies to the {applies_to} backend, not {backend}")
    if backend == choices.Backend.TORCH:
        from scan_deploy.runtime.backends.torch_backend import TorchBackend

        return TorchBackend(bundle, precision, checkpoint, device)
    bundle.graph(Graph.IMAGE_ENCODER, precision)  # a missing variant: UserError naming `calibrate`
    if backend == choices.Backend.ONNXRUNTIME:
        from scan_deploy.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(bundle, precision, threads=threads, providers=providers)
    from scan_deploy.runtime.backends.tensorrt_backend import TensorRTBackend

    return TensorRTBackend(bundle, precision)


def prepare_feeds(
    graph: str,
    inputs: list[dict[str, Any]],
    feeds: Mapping[str, Any],
    dtypes: Mapping[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """The graph's inputs, in the manifest's order, as C-contiguous arrays of the input's dtype
    (`dtypes` overrides the manifest's, e.g. with an engine's own I/O types); a one-line
    UserError names the first input that is missing or of the wrong shape."""
    result: dict[str, np.ndarray] = {}
    sizes: dict[str, tuple[str, int]] = {}  # symbolic dim -> (first input with it, size)
    for value in inputs:
        name = value["name"]
        if name not in feeds:
            expected = ", ".join(v["name"] for v in inputs)
            raise UserError(f"{graph}: input {name!r} is missing (the graph takes {expected})")
        dtype = np.dtype((dtypes or {}).get(name, value["dtype"]))
        array = np.ascontiguousarray(feeds[name], dtype=dtype)
        dims = value["shape"]
        if array.ndim != len(dims):
            raise UserError(
                f"{graph}: input {name!r} has shape {array.shape}, expected "
                f"{len(dims)} dims ({', '.join(str(d) for d in dims)})"
            )
        for axis, (dim, size) in enumerate(zip(dims, array.shape, strict=True)):
            if isinstance(dim, int):
                if size != dim:
                    raise UserError(
                        f"{graph}: input {name!r} has shape {array.shape}, dim {axis} must be {dim}"
                    )
            elif dim in sizes and sizes[dim][1] != size:
                first, expected_size = sizes[dim]
                raise UserError(
                    f"{graph}: input {name!r} has {dim}={size} (dim {axis}), "
                    f"input {first!r} has {dim}={expected_size}"
                )
            else:
                sizes.setdefault(dim, (name, size))
        result[name] = array
    return result


def as_output(array: Any) -> np.ndarray:
    """Outputs leave every runner as float32 (float16 engines included) or int64."""
    array = np.asarray(array)
    if array.dtype.kind == "f" and array.dtype != np.float32:
        return array.astype(np.float32)
    if array.dtype.kind in "iu" and array.dtype != np.int64:
        return array.astype(np.int64)
    return array
