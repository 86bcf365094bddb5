"""An emulated TensorRT Python API (`import tensorrt`) for scan-deploy's test suite.

A TEST DOUBLE: never shipped (it lives under tests/), never a TensorRT result. It implements the
TensorRT 10.3 / 10.16 / 11.1 Python API that engines/tensorrt_api.py calls, as NVIDIA's sources
document it (each call cites its source; docs/tensorrt.md summarises the API), and refuses what
TensorRT refuses with the documented failure mode (None or False plus an E log, or the documented
exception).

Source codes used in the citations (git tags of github.com/NVIDIA/TensorRT unless noted):
C3/C16/C11 = python/src/infer/pyCore.cpp @v10.3.0/@v10.16/@v11.1; DOC = python/docstrings/infer/
pyCoreDoc.h; RT3 = include/NvInferRuntime.h@v10.3.0; NI3/NI11 = include/NvInfer.h @v10.3.0/@v11.1;
O3/O11 = python/src/parsers/pyOnnx.cpp; F = python/src/infer/pyFoundationalTypes.cpp; INIT =
python/packaging/bindings_wheel/tensorrt/__init__.py; S3/S11 = samples/python/common_runtime.py;
MI = onnx/onnx-tensorrt@10.1-GA ModelImporter.cpp. UNCONFIRMED: a behaviour those sources do not
settle. Engines
compute with ONNX Runtime on the ONNX graph they were built from; device memory and streams are
the `emulated_device` behind the emulated `cuda.bindings.runtime`.

Select the version with SCAN_DEPLOY_EMULATED_TENSORRT (10.3, 10.16, 11.1) and the device with
SCAN_DEPLOY_EMULATED_GPU ("NAME@MAJOR.MINOR") before the first import; tests use
tests/runtime/tensorrt_emulator.py. What the sources leave UNCONFIRMED, and calls they do not
document, raise `NotEmulated` instead of guessing.
"""

from ._builder import Builder, IBuilderConfig, IOptimizationProfile, ITimingCache
from ._enums import (
    BuilderFlag,
    DataType,
    DeviceType,
    ErrorCode,
    ExecutionContextAllocationStrategy,
    HardwareCompatibilityLevel,
    MemoryPoolType,
    NetworkDefinitionCreationFlag,
    TensorIOMode,
)
from ._errors import NotEmulated
from ._logging import ILogger, Logger
from ._network import INetworkDefinition, OnnxParser, ParserError
from ._runtime import ICudaEngine, IExecutionContext, Runtime
from ._types import Dims, IHostMemory, nptype, volume
from ._version import VERSION as __version__

EMULATED = True  # for test assertions only; the code under test never looks

# The DataType aliases — F@v11.1:179-205.
float32, float16, int8, int32, int64, uint8, bool = (  # noqa: A001
    DataType.FLOAT,
    DataType.HALF,
    DataType.INT8,
    DataType.INT32,
    DataType.INT64,
    DataType.UINT8,
    DataType.BOOL,
)
bfloat16, fp8, int4 = DataType.BF16, DataType.FP8, DataType.INT4

__all__ = [
    "Builder",
    "BuilderFlag",
    "DataType",
    "DeviceType",
    "Dims",
    "ErrorCode",
    "ExecutionContextAllocationStrategy",
    "HardwareCompatibilityLevel",
    "IBuilderConfig",
    "ICudaEngine",
    "IExecutionContext",
    "IHostMemory",
    "ILogger",
    "INetworkDefinition",
    "IOptimizationProfile",
    "ITimingCache",
    "Logger",
    "MemoryPoolType",
    "NetworkDefinitionCreationFlag",
    "NotEmulated",
    "OnnxParser",
    "ParserError",
    "Runtime",
    "TensorIOMode",
    "__version__",
    "nptype",
    "volume",
]
