"""The ONNX Runtime backend: one `InferenceSession` per graph.

Execution providers, most preferred first: TensorRT, CUDA, then the CPU, among those this
onnxruntime has (`onnxruntime.get_available_providers()`), or among the `providers` asked for
(cpu, cuda, tensorrt). The CPU provider always ends the list: ONNX Runtime places on it the
nodes the others do not take. A provider asked for but missing is a logged warning, not an
error, and the backend's name says which provider leads (`onnxruntime (CPUExecutionProvider)`).

Each graph's session comes, when there is one, from an artifact `scan-deploy build-engine
--backend onnxruntime --provider P` wrote under `BUNDLE/engines/` for the graph, the precision
and the leading provider: `scan_deploy.engines.load.load_session` checks its sidecar (bundle
graph hash, vocabulary, onnxruntime version, device, file hash) and creates the session with the
settings recorded there (importing neither torch nor onnx). A stale artifact is skipped with a
warning, and the session is created from the bundle's graph instead.

Sessions led by the TensorRT provider get an engine cache and a timing cache under
`BUNDLE/engines/`, keyed like the sidecars (`scan_deploy.engines.ort_cache`).

A graph ONNX Runtime cannot load (garbage, a truncated file, an invalid graph), or one whose
inputs or outputs (names, dtypes, fixed dims) are not those its manifest entry records (another
graph put in its place), is a one-line UserError naming the file when its runner is opened.

`InferenceSession.run` is thread-safe, so one runner serves several threads.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scan_deploy.engines.load import find_engines, load_session
from scan_deploy.engines.ort_cache import (
    make_cache_folders,
    session_with_caches,
    tensorrt_cache_options,
    tensorrt_version,
)
from scan_deploy.engines.ort_providers import EXECUTION_PROVIDERS, import_onnxruntime
from scan_deploy.engines.sidecar import ENGINES_DIR
from scan_deploy.runtime.backends.base import LOG, RunnerCache, as_output, prepare_feeds

from scan_deploy.bundle import Bundle
from scan_deploy.choices import Backend, Graph, Precision, Provider
from scan_deploy.errors import UserError, input_error

# Most preferred first.
PROVIDER_ORDER = (Provider.TENSORRT, Provider.CUDA, Provider.CPU)


def choose_providers(
    requested: Sequence[Provider | str] | Provider | str | None, available: Sequence[str]
) -> list[Provider]:
    """The providers (most preferred first) a session is created with: those requested
    (default: all of `PROVIDER_ORDER`) that `available` has, then the CPU. A provider requested
    but unavailable is logged as a warning; an unknown name is a UserError."""
    if isinstance(requested, str):
        requested = [requested]
    wanted = list(
        dict.fromkeys(
            PROVIDER_ORDER
            if requested is None
            else (Provider.parse(name, "providers") for name in requested)
        )
    )
    chosen = [p for p in wanted if EXECUTION_PROVIDERS[p] in available]
    missing = [EXECUTION_PROVIDERS[p] for p in wanted if p not in chosen]
    if Provider.CPU not in chosen:
        chosen.append(Provider.CPU)
    if missing:
        LOG.log(
            logging.WARNING if requested is not None else logging.INFO,
            "onnxruntime has no %s (it has %s): using %s",
            ", ".join(missing),
            ", ".join(available),
            EXECUTION_PROVIDERS[chosen[0]],
        )
    return chosen


def tensorrt_provider_options(
    bundle: Bundle, graph: Graph, precision: Precision, device_tag: str, ort_version: str
) -> dict[str, Any]:
    """The TensorRT provider's options for a session on the bundle's `graph`: the caches
    (their folders created here; when that fails, a warning and no caches) and no FP16/INT8
    builder flags, so the precision is the graph's own (TensorRT >= 10 builds it strongly
    typed). No explicit profile: the provider takes its shapes from the inputs it sees and
    widens its cached profile when a new shape falls outside it (`build-engine --backend
    onnxruntime --provider tensorrt` records fixed profiles instead)."""
    entry = bundle.graph(graph, precision)
    caches = tensorrt_cache_options(
        bundle.path / ENGINES_DIR,
        graph,
        precision,
        entry["sha256"],
        device_tag,
        ort_version,
        tensorrt_version(),
    )
    options: dict[str, Any] = {"trt_fp16_enable": False, "trt_int8_enable": False}
    if make_cache_folders(caches):
        options.update(caches)
    return options


def gpu_tag() -> str:
    """`sm87` for the current CUDA device when cuda-python or pycuda can tell, else `gpu`
    (ONNX Runtime's own cache file names carry the compute capability either way)."""
    from scan_deploy.engines.cuda_device import current_device

    try:
        return current_device().sm
    except UserError:
        return "gpu"


def _load_errors(ort: Any) -> tuple[type[Exception], ...]:
    """What `InferenceSession` raises for a model file it cannot load."""
    state = ort.capi.onnxruntime_pybind11_state
    return (
        state.Fail,
        state.InvalidArgument,
        state.InvalidGraph,
        state.InvalidProtobuf,
        state.NoSuchFile,
        state.NotImplemented,
    )


def check_interface(graph: str, entry: dict[str, Any], session: Any, source: Path) -> None:
    """Refuse a session whose inputs or outputs (names, dtypes, fixed dims) are not the
    manifest's `entry`: the graph file was replaced by another graph."""
    for kind, actual in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        found = [_signature(v.name, _numpy_dtype(v.type), v.shape) for v in actual]
        expected = [_signature(v["name"], v["dtype"], v["shape"]) for v in entry[kind]]
        if found != expected:
            raise input_error(
                source,
                kind,
                f"the graph has {', '.join(found)}, the manifest's {graph} has "
                f"{', '.join(expected)}: re-export the bundle",
            )


def _signature(name: str, dtype: str, shape: Sequence[Any] | None) -> str:
    """`name dtype[dims]`, symbolic dims shown as `?` (their names are not compared)."""
    dims = ", ".join(str(d) if isinstance(d, int) else "?" for d in shape or ())
    return f"{name} {dtype}[{dims}]"


def _numpy_dtype(ort_type: str) -> str:
    """ONNX Runtime's `tensor(float)` as numpy's `float32` (the manifest's names)."""
    inner = ort_type.removeprefix("tensor(").removesuffix(")")
    return {"float": "float32", "double": "float64"}.get(inner, inner)


def integer_dot_products(cpuinfo: str | None = None) -> bool:
    """Whether the CPU has the integer dot products (x86 avx512_vnni / avx_vnni, Arm asimddp)
    that ONNX Runtime's u8s8 kernels accumulate in 32 bits: without them (AVX2's vpmaddubsw)
    pairs of products are added in saturating 16 bits, which the int8 scorer's full-range
    query codes can overflow (onnxruntime#12088). Read from /proc/cpuinfo; unknown: False."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & {"avx512_vnni", "avx_vnni", "asimddp"})


class OnnxRuntimeRunner:
    def __init__(
        self, graph: Graph | str, entry: dict[str, Any], session: Any, source: Path
    ) -> None:
        self.graph = graph
        self.inputs: list[dict[str, Any]] = entry["inputs"]
        self.outputs: list[dict[str, Any]] = entry["outputs"]
        self.session = session
        self.source = source  # the model file the session runs
        self._output_names = [value["name"] for value in self.outputs]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        arrays = prepare_feeds(self.graph, self.inputs, feeds)
        session = self.session
        if session is None:
            raise UserError(f"{self.graph}: the runner is closed")
        return [as_output(x) for x in session.run(self._output_names, arrays)]

    def close(self) -> None:
        self.session = None  # ONNX Runtime frees a session with its last reference


class OnnxRuntimeBackend(RunnerCache):
    def __init__(
        self,
        bundle: Bundle,
        precision: Precision = Precision.FP32,
        *,
        threads: int = 0,
        providers: Sequence[Provider | str] | Provider | str | None = None,
    ) -> None:
        super().__init__()
        self.ort = import_onnxruntime()
        self.bundle = bundle
        self.precision = precision
        self.threads = threads
        self.providers = choose_providers(providers, self.ort.get_available_providers())
        self.name = f"onnxruntime ({EXECUTION_PROVIDERS[self.providers[0]]})"
        self._int8_scorers: dict[str, OnnxRuntimeRunner] = {}

    def _open(self, graph: Graph) -> OnnxRuntimeRunner:
        entry = self.bundle.graph(graph, self.precision)
        session, source = self._artifact_session(graph)
        if session is None:
            source = self.bundle.path / entry["file"]
            options = self.ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            providers = [
                (EXECUTION_PROVIDERS[p], self._provider_options(p, graph)) for p in self.providers
            ]
            session = self._session(source, options, providers)
        check_interface(graph, entry, session, source)
        leading = EXECUTION_PROVIDERS[self.providers[0]]
        if session.get_providers()[:1] != [leading]:
            LOG.warning(
                "%s: onnxruntime could not use %s, it runs on %s",
                source,
                leading,
                ", ".join(session.get_providers()),
            )
        return OnnxRuntimeRunner(graph, entry, session, source)

    def int8_scorer(self, kind: str) -> OnnxRuntimeRunner:
        """The runner of the bundle's int8-gallery scorer for a gallery of `kind` (written by
        `calibrate --precision int8`), opened once. It runs on the CPU provider only: its
        integer GEMM is the CPU's u8s8 kernel; a UserError says why it cannot run here."""
        if self.providers[0] != Provider.CPU:
            leading = EXECUTION_PROVIDERS[self.providers[0]]
            raise UserError(f"scorer int8: runs on ONNX Runtime's CPU provider, not {leading}")
        if not integer_dot_products():
            raise UserError(
                "scorer int8: this CPU has no integer dot-product instructions (x86 VNNI, Arm "
                "dotprod), without which ONNX Runtime's u8s8 GEMM can saturate"
            )
        entry = self.bundle.int8_scorer(kind)
        if entry is None:
            raise UserError(
                f"scorer int8: {self.bundle.path} has no int8 scorer for {kind} galleries "
                f"(scan-deploy calibrate {self.bundle.path} --data DIR --precision int8)"
            )
        with self._lock:
            if self._closed:
                raise UserError(f"int8_scorer.{kind}: the backend is closed")
            if kind not in self._int8_scorers:
                source = self.bundle.path / entry["file"]
                options = self.ort.SessionOptions()
                options.intra_op_num_threads = self.threads
                session = self._session(source, options, [("CPUExecutionProvider", {})])
                label = f"int8_scorer.{kind}"
                check_interface(label, entry, session, source)
                self._int8_scorers[kind] = OnnxRuntimeRunner(label, entry, session, source)
            return self._int8_scorers[kind]

    def close(self) -> None:
        """The graphs' runners and the int8 scorers'."""
        super().close()
        with self._lock:
            scorers, self._int8_scorers = list(self._int8_scorers.values()), {}
        for runner in scorers:
            runner.close()

    def _session(self, source: Path, options: Any, providers: list) -> Any:
        """A session on a bundle graph; a file ONNX Runtime cannot load is a UserError."""
        try:
            return session_with_caches(self.ort, str(source), options, providers)
        except _load_errors(self.ort) as exc:
            reason = " ".join(str(exc).split())
            message = f"ONNX Runtime cannot load the graph ({reason}): re-export the bundle"
            raise input_error(source, None, message) from None

    def _provider_options(self, provider: Provider, graph: Graph) -> dict[str, Any]:
        if provider != Provider.TENSORRT:
            return {}
        return tensorrt_provider_options(
            self.bundle, graph, self.precision, gpu_tag(), self.ort.__version__
        )

    def _artifact_session(self, graph: Graph) -> tuple[Any, Path | None]:
        """A session on a build-engine artifact for this graph, precision and leading provider,
        or (None, None) when there is none that fits."""
        candidates = find_engines(
            self.bundle, Backend.ONNXRUNTIME, graph, self.precision, provider=self.providers[0]
        )
        if not candidates:
            return None, None
        for path, _ in candidates:
            try:
                session = load_session(path, self.bundle, self.precision, self.threads)
            except UserError as exc:
                LOG.warning("ignoring an onnxruntime artifact: %s", exc)
                continue
            LOG.info("%s: using the onnxruntime artifact %s", graph, path.name)
            return session, path
        return None, None
