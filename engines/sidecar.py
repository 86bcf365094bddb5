"""Engine sidecars: the JSON written beside every engine under `BUNDLE/engines/`, and the check
that refuses an engine built for another backend version, device, graph or precision.

As jetson-inference and clip_trt do, an engine's file name is keyed by graph, precision,
backend and its version, device (compute capability, or DLA core) and a short hash of the
source graph (`scorer.fp16.trt10.3.0.sm87.gpu.0123456789ab.engine`), and the sidecar records the
same facts in full. A stale engine is refused with the command that rebuilds it, never run,
and a malformed sidecar (a missing field, a wrong type, an unknown graph) with a one-line error.

Torch-free and onnx-free: the runtime uses this module on the device.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scan_deploy.engines.cuda_device import DeviceInfo

from scan_deploy.bundle import Bundle, sha256_file
from scan_deploy.choices import Backend, Graph, Precision
from scan_deploy.errors import input_error, one_of
from scan_deploy.jsonfile import read_json_object, typed

FORMAT_VERSION = 1
ENGINES_DIR = "engines"
BACKENDS = (Backend.TENSORRT, Backend.ONNXRUNTIME)  # those build-engine builds for
# The fields every check reads (besides format_version), parents first: (dotted name, allowed
# types, required).
FIELDS: tuple[tuple[str, tuple[type, ...], bool], ...] = (
    ("backend", (str,), True),
    ("backend_version", (str,), True),
    ("provider", (str, type(None)), False),
    ("device", (dict,), True),
    ("device.name", (str,), True),
    ("device.compute_capability", (str, type(None)), False),
    ("precision", (str,), True),
    ("graph", (str,), True),
    ("profiles", (list,), True),
    ("source", (dict,), True),
    ("source.sha256", (str,), True),
    ("engine", (dict,), True),
    ("engine.sha256", (str,), True),
    ("vocab", (dict,), True),
    ("vocab.words_sha256", (str,), True),
    ("build", (dict,), True),
    ("build.cli", (list,), False),
    ("build.dla_core", (int, type(None)), False),
    ("build.hardware_compatibility_level", (str, type(None)), False),
)
# Hardware-compatibility levels this project builds, and the oldest compute capability each runs on.
HARDWARE_COMPAT_MIN_CC = {"AMPERE_PLUS": (8, 0)}
# Version-compatible engines run on later TensorRT of the same major, and across majors only
# where NVIDIA's support matrix says so (built major, running major): 10 -> 11. (8.6 -> 10 is
# supported too, but build-engine needs TensorRT 10 or newer.)
CROSS_MAJOR = {(10, 11)}


def engine_stem(
    graph: str,
    precision: str,
    backend_tag: str,
    device_tag: str,
    target: str,
    source_sha256: str,
) -> str:
    """`scorer.fp16.trt10.3.0.sm87.gpu.0123456789ab`: every fact an engine depends on."""
    return ".".join([graph, precision, backend_tag, device_tag, target, source_sha256[:12]])


def sidecar_path(engine_path: str | Path) -> Path:
    """`X.engine` or `X.onnx` -> `X.json`."""
    return Path(engine_path).with_suffix(".json")


def read_sidecar(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    what = "an engine sidecar written by `scan-deploy build-engine`"
    sidecar = read_json_object(path, what, FORMAT_VERSION)
    check_fields(sidecar, path)
    return sidecar


def check_fields(sidecar: dict[str, Any], path: str | Path) -> None:
    """Every field the checks read is present and of the right type, and names a known backend,
    precision and graph (one-line UserErrors naming the sidecar and the field)."""
    for name, types, required in FIELDS:
        *parents, key = name.split(".")
        holder = sidecar
        for parent in parents:  # listed, and so checked to be objects, before their fields
            holder = holder[parent]
        if key not in holder:
            if required:
                raise input_error(path, name, "missing from the engine sidecar")
            continue
        typed(holder[key], types, name, path)
    Backend.parse(sidecar["backend"], "backend", path, among=BACKENDS)
    Precision.parse(sidecar["precision"], "precision", path)
    Graph.parse(sidecar["graph"], "graph", path)
    if not all(isinstance(arg, str) for arg in sidecar["build"].get("cli", [])):
        raise input_error(path, "build.cli", "expected a list of strings")
    level = sidecar["build"].get("hardware_compatibility_level")
    if level is not None:
        one_of(level, HARDWARE_COMPAT_MIN_CC, "build.hardware_compatibility_level", path)


def rebuild_command(bundle_path: str | Path, sidecar: dict[str, Any]) -> str:
    """The `scan-deploy build-engine` command that rebuilds this engine for the running setup."""
    return build_engine_command(
        bundle_path,
        sidecar["backend"],
        sidecar["precision"],
        sidecar["graph"],
        sidecar["build"].get("cli", []),
    )


def build_engine_command(
    bundle_path: str | Path,
    backend: str,
    precision: str,
    graph: str,
    options: Sequence[str] = (),
) -> str:
    """The shell command `scan-deploy build-engine` for one graph, with further `options`."""
    argv = ["scan-deploy", "build-engine", str(bundle_path), "--backend", backend]
    return shlex.join([*argv, "--precision", precision, "--graph", graph, *options])


def check_sidecar(
    sidecar: dict[str, Any],
    path: str | Path,
    bundle: Bundle,
    *,
    backend: Backend,
    backend_version: str,
    device: DeviceInfo,
    precision: Precision | None = None,
) -> None:
    """Refuse (UserError, one line) an engine whose sidecar does not match the bundle, the
    running backend and its version, the device, or the requested precision."""
    path = Path(path)
    check_fields(sidecar, sidecar_path(path))
    fix = f"rebuild it: {rebuild_command(bundle.path, sidecar)}"
    if sidecar["backend"] != backend:
        raise input_error(path, "backend", f"is a {sidecar['backend']} engine, not {backend}")
    if precision is not None and sidecar["precision"] != precision:
        raise input_error(
            path, "precision", f"is a {sidecar['precision']} engine, {precision} was requested"
        )
    try:
        expected = bundle.graph(sidecar["graph"], sidecar["precision"])
    except KeyError:
        raise input_error(
            sidecar_path(path),
            "graph",
            f"{sidecar['graph']!r} is not a {sidecar['precision']} graph of {bundle.path}",
        ) from None
    if sidecar["source"]["sha256"] != expected["sha256"]:
        raise input_error(
            path,
            "source.sha256",
            f"built from {sidecar['source']['sha256'][:12]}…, the bundle's "
            f"{expected['file']} is {expected['sha256'][:12]}… ({fix})",
        )
    words = bundle.manifest["vocab"]["words_sha256"]
    if sidecar["vocab"]["words_sha256"] != words:
        raise input_error(path, "vocab.words_sha256", f"built for another vocabulary ({fix})")
    _check_version(path, sidecar, backend_version, fix)
    _check_device(path, sidecar, device, fix)


def check_engine_file(path: str | Path, sidecar: dict[str, Any]) -> None:
    """The engine file is the one the sidecar describes (not replaced or truncated)."""
    path = Path(path)
    if not path.is_file():
        raise input_error(path, None, "missing (named by its sidecar)")
    actual = sha256_file(path)
    if actual != sidecar["engine"]["sha256"]:
        raise input_error(
            path,
            "sha256",
            f"is {actual[:12]}…, its sidecar expects {sidecar['engine']['sha256'][:12]}… "
            "(file changed or truncated: rebuild it)",
        )


def version_tuple(version: str) -> tuple[int, ...]:
    """`10.3.0.26` -> (10, 3, 0, 26); non-numeric parts (`1.32.0+cpu`) end it."""
    parts = []
    for part in version.split("."):
        match = re.match(r"\d+", part)
        if not match:
            break
        parts.append(int(match.group()))
        if match.group() != part:
            break
    return tuple(parts)


def _check_version(path: Path, sidecar: dict[str, Any], running: str, fix: str) -> None:
    built = sidecar["backend_version"]
    if built == running:
        return
    build = sidecar["build"]
    # A version-compatible TensorRT engine that embeds its lean runtime runs on a later TensorRT
    # of the same major (11.0 -> 11.x) or, across majors, only 10 -> 11 (TensorRT's support
    # matrix: "No other combination across major versions is supported").
    if build.get("version_compatible") and not build.get("exclude_lean_runtime"):
        old, new = version_tuple(built), version_tuple(running)
        if old and new and (new >= old if old[0] == new[0] else (old[0], new[0]) in CROSS_MAJOR):
            return
    raise input_error(
        path,
        "backend_version",
        f"built with {sidecar['backend']} {built}, running {running} ({fix})",
    )


def _check_device(path: Path, sidecar: dict[str, Any], device: DeviceInfo, fix: str) -> None:
    built = sidecar["device"]
    level = sidecar["build"].get("hardware_compatibility_level")
    if level is not None:
        oldest = HARDWARE_COMPAT_MIN_CC[level]
        if device.compute_capability is None or version_tuple(device.compute_capability) < oldest:
            raise input_error(
                path,
                "device",
                f"is a {level} engine, {device.name} has compute capability "
                f"{device.compute_capability} ({fix})",
            )
        return
    if built.get("compute_capability") != device.compute_capability:
        raise input_error(
            path,
            "device.compute_capability",
            f"built for {built.get('compute_capability')} ({built['name']}), running on "
            f"{device.compute_capability} ({device.name}) ({fix})",
        )
    if built["name"] != device.name:
        raise input_error(
            path, "device.name", f"built on {built['name']}, running on {device.name} ({fix})"
        )
