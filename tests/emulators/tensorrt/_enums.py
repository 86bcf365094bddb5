"""The enums of the emulated TensorRT, with the members of the selected version (a member another
version lacks is an AttributeError, as in the real bindings). Sources (codes as in this
package's docstring):
C3/C16/C11 = python/src/infer/pyCore.cpp @v10.3.0 / @v10.16 / @v11.1, NI3/NI11 = include/NvInfer.h,
F = python/src/infer/pyFoundationalTypes.cpp. Integer values the spec does not give are placeholders
(scan-deploy only uses the names)."""

from __future__ import annotations

import enum

from ._version import MAJOR, at_least

# --- DataType: NvInferRuntimeBase.h@v10.3.0:137-176, F@v11.1:179-205 --------------------------
_DATA_TYPES = {
    "FLOAT": 0,
    "HALF": 1,
    "INT8": 2,
    "INT32": 3,
    "BOOL": 4,
    "UINT8": 5,
    "FP8": 6,
    "BF16": 7,
    "INT64": 8,
    "INT4": 9,
}
if at_least(10, 8):
    _DATA_TYPES["FP4"] = 10
if at_least(10, 12):
    _DATA_TYPES["E8M0"] = 11
_ITEMSIZE = {"INT4": 0.5, "FP4": 0.5, "FLOAT": 4, "HALF": 2, "INT8": 1, "INT32": 4, "BOOL": 1,
             "UINT8": 1, "FP8": 1, "BF16": 2, "INT64": 8, "E8M0": 1}  # fmt: skip


class _DataTypeBase(enum.IntEnum):
    @property
    def itemsize(self) -> float:
        """Bytes per element (INT4/FP4: 0.5) — INIT@v11.1:157-224."""
        return _ITEMSIZE[self.name]


DataType = _DataTypeBase("DataType", _DATA_TYPES)

# --- TensorIOMode: RT3:2664-2673 ---------------------------------------------------------------
TensorIOMode = enum.IntEnum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})

# --- NetworkDefinitionCreationFlag: C3:1500-1505, NI3:9609-9621, C16:1891-1900; C11:1771-1778,
# NI11:11462-11481 (11.x: EXPLICIT_BATCH removed, STRONGLY_TYPED=0 deprecated and ignored) ------
if MAJOR == 10:
    _NETWORK_FLAGS = {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}
    if at_least(10, 16):
        _NETWORK_FLAGS |= {"PREFER_JIT_PYTHON_PLUGINS": 2, "PREFER_AOT_PYTHON_PLUGINS": 3}
else:
    _NETWORK_FLAGS = {"STRONGLY_TYPED": 0, "PREFER_JIT_PYTHON_PLUGINS": 1,
                      "PREFER_AOT_PYTHON_PLUGINS": 2}  # fmt: skip
NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", _NETWORK_FLAGS)

# --- BuilderFlag: C3:1337-1368, NI3:8300-8430 (10.3); C16:1670-1707 (10.16); C11:1599-1623,
# NI11:9958-10098 (11.1: FP16, INT8, BF16, FP8, INT4, FP4, OBEY/PREFER_PRECISION_CONSTRAINTS,
# REJECT_EMPTY_ALGORITHMS and WEIGHTLESS are gone) -----------------------------------------------
_FLAGS_10 = (
    "FP16", "INT8", "DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "TF32",
    "SPARSE_WEIGHTS", "SAFETY_SCOPE", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS",
    "DIRECT_IO", "REJECT_EMPTY_ALGORITHMS", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME", "FP8",
    "ERROR_ON_TIMING_CACHE_MISS", "BF16", "DISABLE_COMPILATION_CACHE", "STRIP_PLAN",
    "REFIT_IDENTICAL", "WEIGHT_STREAMING", "INT4", "REFIT_INDIVIDUAL",
)  # fmt: skip
_FLAGS_10_16 = (
    "STRICT_NANS", "MONITOR_MEMORY", "FP4", "EDITABLE_TIMING_CACHE", "DISTRIBUTIVE_INDEPENDENCE",
)  # fmt: skip
_FLAGS_11 = (
    "DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "EDITABLE_TIMING_CACHE", "TF32",
    "SPARSE_WEIGHTS", "SAFETY_SCOPE", "DIRECT_IO", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME",
    "ERROR_ON_TIMING_CACHE_MISS", "DISABLE_COMPILATION_CACHE", "STRIP_PLAN", "REFIT_IDENTICAL",
    "WEIGHT_STREAMING", "REFIT_INDIVIDUAL", "STRICT_NANS", "MONITOR_MEMORY",
    "DISTRIBUTIVE_INDEPENDENCE",
)  # fmt: skip
if MAJOR == 10:
    _names = _FLAGS_10 + (_FLAGS_10_16 if at_least(10, 16) else ())
    _BUILDER_FLAGS = {name: value for value, name in enumerate(_names)}
    _BUILDER_FLAGS["WEIGHTLESS"] = _BUILDER_FLAGS["STRIP_PLAN"]  # an alias
else:  # VERSION_COMPATIBLE=12 and EXCLUDE_LEAN_RUNTIME=13 as in NI11; the rest placeholders
    _names = tuple(n for n in _FLAGS_11 if n not in ("VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME"))
    _values = [v for v in range(len(_FLAGS_11)) if v not in (12, 13)]
    _BUILDER_FLAGS = dict(zip(_names, _values, strict=False))
    _BUILDER_FLAGS |= {"VERSION_COMPATIBLE": 12, "EXCLUDE_LEAN_RUNTIME": 13}
BuilderFlag = enum.IntEnum("BuilderFlag", _BUILDER_FLAGS)
# Precision flags a strongly typed 10.x network refuses (github.com/NVIDIA/TensorRT/issues/4253).
PRECISION_FLAGS = ("FP16", "INT8", "BF16", "FP8", "INT4", "FP4")

# --- MemoryPoolType: C11:1625-1631 ---------------------------------------------------------------
MemoryPoolType = enum.IntEnum(
    "MemoryPoolType",
    {"WORKSPACE": 0, "DLA_MANAGED_SRAM": 1, "DLA_LOCAL_DRAM": 2, "DLA_GLOBAL_DRAM": 3,
     "TACTIC_DRAM": 4, "TACTIC_SHARED_MEMORY": 5},
)  # fmt: skip

# --- HardwareCompatibilityLevel: C3:1387-1390, C11:1641-1645 (SAME_COMPUTE_CAPABILITY since 10.9)
_LEVELS = {"NONE": 0, "AMPERE_PLUS": 1}
if at_least(10, 9):
    _LEVELS["SAME_COMPUTE_CAPABILITY"] = 2
HardwareCompatibilityLevel = enum.IntEnum("HardwareCompatibilityLevel", _LEVELS)

# --- DeviceType: C3:1440-1442, NI3:8964-8974 ---------------------------------------------------
DeviceType = enum.IntEnum("DeviceType", {"GPU": 0, "DLA": 1})

# --- ExecutionContextAllocationStrategy: create_execution_context(strategy=STATIC), C3:1165-1167
ExecutionContextAllocationStrategy = enum.IntEnum(
    "ExecutionContextAllocationStrategy", {"STATIC": 0, "ON_PROFILE_CHANGE": 1, "USER_MANAGED": 2}
)

# --- ErrorCode of the ONNX parser: O3:153-185, O11:128-169 (values: the spec's order) -----------
_ERROR_CODES = (
    "SUCCESS", "INTERNAL_ERROR", "MEM_ALLOC_FAILED", "MODEL_DESERIALIZE_FAILED", "INVALID_VALUE",
    "INVALID_GRAPH", "INVALID_NODE", "UNSUPPORTED_GRAPH", "UNSUPPORTED_NODE",
    "UNSUPPORTED_NODE_ATTR", "UNSUPPORTED_NODE_INPUT", "UNSUPPORTED_NODE_DATATYPE",
    "UNSUPPORTED_NODE_DYNAMIC", "UNSUPPORTED_NODE_SHAPE", "REFIT_FAILED",
)  # fmt: skip
ErrorCode = enum.IntEnum("ErrorCode", {name: value for value, name in enumerate(_ERROR_CODES)})
