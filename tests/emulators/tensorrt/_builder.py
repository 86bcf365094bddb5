"""`trt.Builder`, `IBuilderConfig`, `IOptimizationProfile`, `ITimingCache`: a build checks what
TensorRT checks (below, with sources) and serializes the plan: the network's I/O, its profiles,
the flags, the TensorRT version and device, and the ONNX graph.

Log texts quoted with a source below are TensorRT's (observed, version-dependent); the others are
the emulator's own wording in TensorRT's style: scan-deploy only passes them on."""

from __future__ import annotations

import hashlib
from typing import Any

import emulated_device

from . import _logging, _plan
from ._enums import (
    PRECISION_FLAGS,
    BuilderFlag,
    DeviceType,
    HardwareCompatibilityLevel,
    MemoryPoolType,
    NetworkDefinitionCreationFlag,
)
from ._errors import NotEmulated
from ._network import INetworkDefinition
from ._types import Dims, IHostMemory, to_dims
from ._version import MAJOR, VERSION

BUILD_ERROR = "IBuilder::buildSerializedNetwork: Error Code"


class IOptimizationProfile:
    """`builder.create_optimization_profile()` — C3:1518-1523."""

    def __init__(self) -> None:
        self._shapes: dict[str, tuple[Dims, Dims, Dims]] = {}

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002
        """None. Each bound `setDimensions` refuses (another rank than the bounds before it, a
        negative dim) raises RuntimeError "Shape provided for min|opt|max is inconsistent with
        other shapes." — C3:35-43, C11:36-44, RT3:2164-2190. Bounds out of order
        (not min <= opt <= max): UNCONFIRMED on 10.x/11.x, not emulated."""
        bounds = [to_dims(b) for b in (min, opt, max)]
        for which, dims in zip(("min", "opt", "max"), bounds, strict=True):
            if dims.nbDims != bounds[0].nbDims or any(d < 0 for d in dims.as_tuple()):
                raise RuntimeError(f"Shape provided for {which} is inconsistent with other shapes.")
        low, middle, high = (b.as_tuple() for b in bounds)
        if not all(a <= b <= c for a, b, c in zip(low, middle, high, strict=True)):
            raise NotEmulated(f"set_shape({input!r}) with bounds out of order: UNCONFIRMED")
        self._shapes[input] = (bounds[0], bounds[1], bounds[2])

    def get_shape(self, input: str) -> list[Dims]:  # noqa: A002
        """[min, opt, max], or [] when unset — C3:45-56."""
        return list(self._shapes.get(input, ()))

    def __bool__(self) -> bool:
        """`isValid()` — C3:810-811, RT3:2311-2322 (out-of-order bounds never get this far)."""
        return True


class ITimingCache:
    """`config.create_timing_cache(b"")` — DOC@v10.3.0:1479-1488. Records the device it was made
    on and the graphs built with it."""

    def __init__(self, compute_capability: str, entries: list[str]) -> None:
        self.compute_capability = compute_capability
        self.entries = entries

    def serialize(self) -> IHostMemory:
        header = {"compute_capability": self.compute_capability, "entries": self.entries}
        return IHostMemory(_plan.write(_plan.CACHE_MAGIC, header))


class IBuilderConfig:
    """`builder.create_builder_config()` — C3:1518-1523."""

    def __init__(self) -> None:
        self._flags: set[str] = set()
        self._pools: dict[str, int] = {}
        self.hardware_compatibility_level = HardwareCompatibilityLevel.NONE
        self.default_device_type = DeviceType.GPU
        self._dla_core = -1
        self.profiles: list[IOptimizationProfile] = []
        self.timing_cache: ITimingCache | None = None

    def set_memory_pool_limit(self, pool: Any, pool_size: int) -> None:
        """None. An invalid size or one above the device's memory is a no-op (reported to the
        error recorder, not emulated) — DOC@v10.3.0:1312-1326, C3:1435."""
        pool = MemoryPoolType(pool)
        if 0 <= pool_size <= emulated_device.properties().total_memory:
            self._pools[pool.name] = int(pool_size)

    def set_flag(self, flag: Any) -> None:
        """C3:1443-1445 (a flag another version lacks fails earlier, at `BuilderFlag.X`)."""
        self._flags.add(_flag(flag).name)

    def clear_flag(self, flag: Any) -> None:
        self._flags.discard(_flag(flag).name)

    def get_flag(self, flag: Any) -> bool:
        return _flag(flag).name in self._flags

    @property
    def flags(self) -> int:
        return sum(1 << int(BuilderFlag[name]) for name in self._flags)

    @property
    def DLA_core(self) -> int:  # noqa: N802
        """Default -1; the setter is a no-op on a device without DLA (the emulated one) —
        C3:1440-1442, NI3:8964-8974."""
        return self._dla_core

    @DLA_core.setter
    def DLA_core(self, value: int) -> None:  # noqa: N802
        pass

    def create_timing_cache(self, serialized_timing_cache: Any) -> ITimingCache:
        """b"" starts a new cache — DOC@v10.3.0:1479-1488; other bytes: this emulator's own
        serialized caches. Corrupt bytes: UNCONFIRMED, not emulated."""
        data = bytes(memoryview(serialized_timing_cache))
        if not data:
            return ITimingCache(emulated_device.properties().compute_capability, [])
        parsed = _plan.read(_plan.CACHE_MAGIC, data)
        if parsed is None:
            raise NotEmulated("create_timing_cache with bytes that are no timing cache")
        header, _ = parsed
        return ITimingCache(header["compute_capability"], list(header["entries"]))

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        """True; False when the cache was made on another device and not `ignore_mismatch` —
        DOC:1490-1502, NI3:9268-9286."""
        current = emulated_device.properties().compute_capability
        if cache.compute_capability != current and not ignore_mismatch:
            return False
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        """DOC:1504-1508"""
        return self.timing_cache

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        """Its index from 0; -1 for an invalid profile (no exception) — DOC:1388-1397,
        NI3:9046-9057."""
        if not profile:
            return -1
        self.profiles.append(profile)
        return len(self.profiles) - 1


def _flag(flag: Any) -> Any:
    if not isinstance(flag, BuilderFlag):
        raise TypeError(f"incompatible function arguments: expected tensorrt.BuilderFlag: {flag!r}")
    return flag


class Builder:
    """`trt.Builder(logger)` — C11:1785 (a machine without GPU: TypeError "factory function
    returned nullptr", never the case with the emulated device)."""

    def __init__(self, logger: Any) -> None:
        self.logger = _logging.check_logger(logger, "Builder")

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        """flags = OR of `1 << int(NetworkDefinitionCreationFlag.X)` — C3:1510, C11:1787. 10.x:
        strongly typed only with STRONGLY_TYPED (EXPLICIT_BATCH is ignored); 11.x: always
        (STRONGLY_TYPED=0 is ignored) — NI3:9609-9621, NI11:11462-11481. Unknown bits:
        UNCONFIRMED, not emulated."""
        known = sum(1 << int(f) for f in NetworkDefinitionCreationFlag)
        if flags & ~known:
            raise NotEmulated(f"create_network({flags:#x}): unknown flag bits")
        if MAJOR == 10:
            strongly_typed = bool(flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)))
        else:
            strongly_typed = True
        return INetworkDefinition(strongly_typed)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(
        self, network: INetworkDefinition, config: IBuilderConfig
    ) -> IHostMemory | None:
        """IHostMemory, or **None** with an E log: a precision flag on a strongly typed 10.x
        network (`Error Code 3: API Usage Error (Parameter check failed, condition:
        !config.getFlag(BuilderFlag::kFP16). )`, github.com/NVIDIA/TensorRT/issues/4253); dynamic
        inputs without a profile (`Error Code 4: ... (Network has dynamic or shape inputs, but no
        optimization profile has been defined.)`, github.com/daniel89710/trt-depth-anything/
        issues/1); a profile missing a dynamic input or contradicting a static dim — C11:1798-1817;
        samples/python/detectron2/build_engine.py@v10.3.0:235-238."""
        message = self._refusal(network, config)
        if message is not None:
            _logging.error(self.logger, f"{BUILD_ERROR} {message}")
            return None
        props = emulated_device.properties()
        digest = hashlib.sha256(network.model).hexdigest()
        if config.timing_cache is not None and digest not in config.timing_cache.entries:
            config.timing_cache.entries.append(digest)
        header = {
            "tensorrt": VERSION,
            "device": props.name,
            "compute_capability": props.compute_capability,
            "flags": sorted(config._flags),
            "memory_pools": config._pools,
            "hardware_compatibility_level": config.hardware_compatibility_level.name,
            "inputs": [t.to_json() for t in network.io_inputs],
            "outputs": [t.to_json() for t in network.io_outputs],
            "profiles": [
                {name: [list(d.as_tuple()) for d in p.get_shape(name)] for name in p._shapes}
                for p in config.profiles
            ],
        }
        return IHostMemory(_plan.write(_plan.PLAN_MAGIC, header, network.model))

    def _refusal(self, network: INetworkDefinition, config: IBuilderConfig) -> str | None:
        if network.model is None:
            raise NotEmulated("building a network the ONNX parser did not fill")
        if not network.strongly_typed:
            raise NotEmulated("a weakly typed network: TensorRT would choose layer precisions")
        if MAJOR == 10:
            for name in PRECISION_FLAGS:
                if name in config._flags:
                    return (
                        "3: API Usage Error (Parameter check failed, condition: "
                        f"!config.getFlag(BuilderFlag::k{name}). )"
                    )
        if config.default_device_type != DeviceType.GPU:
            raise NotEmulated("DLA builds (the emulated device has no DLA)")
        ampere_plus = config.hardware_compatibility_level == HardwareCompatibilityLevel.AMPERE_PLUS
        if ampere_plus and emulated_device.properties().major < 8:
            raise NotEmulated("AMPERE_PLUS on a pre-Ampere device")
        dynamic = [t for t in network.io_inputs if -1 in t.trt_dims]
        if dynamic and not config.profiles:
            return (
                "4: Internal Error (Network has dynamic or shape inputs, but no optimization "
                "profile has been defined.)"
            )
        inputs = {t.name: t for t in network.io_inputs}
        for k, profile in enumerate(config.profiles):
            unknown = sorted(set(profile._shapes) - set(inputs))
            if unknown:
                raise NotEmulated(f"a profile naming {unknown[0]!r}, not a network input")
            for tensor in dynamic:
                if tensor.name not in profile._shapes:
                    return (
                        f"4: Internal Error ({tensor.name}: dynamic input is missing dimensions "
                        f"in profile {k}.)"
                    )
            for name, bounds in profile._shapes.items():
                message = _profile_mismatch(inputs[name].trt_dims, name, k, bounds)
                if message is not None:
                    return message
        return None


def _profile_mismatch(
    network_dims: tuple[int, ...], name: str, k: int, bounds: tuple[Dims, Dims, Dims]
) -> str | None:
    low, opt, high = (b.as_tuple() for b in bounds)
    if len(low) != len(network_dims):
        return (
            f"4: Internal Error ({name}: profile {k} has {len(low)} dimensions, the network "
            f"input has {len(network_dims)}.)"
        )
    for axis, (size, a, b, c) in enumerate(zip(network_dims, low, opt, high, strict=True)):
        if size != -1 and not a == b == c == size:
            return (
                f"4: Internal Error ({name}: for dimension number {axis} in profile {k} does not "
                f"match network definition (got min={a}, opt={b}, max={c}), expected "
                f"min=opt=max={size}).)"
            )
    return None
