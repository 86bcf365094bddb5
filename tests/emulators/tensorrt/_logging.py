"""`trt.ILogger` and `trt.Logger`, and how the emulator reports to them.

- `trt.Logger(min_severity=trt.Logger.WARNING)` prints to stdout `[MM/DD/YYYY-HH:MM:SS] [TRT] [E]
  msg` and drops messages less severe than `min_severity` (read/write); it never fails —
  C3:698-759, C11:937-999.
- `trt.ILogger.Severity`: INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4, also reachable as
  `trt.ILogger.ERROR` / `trt.Logger.WARNING` — C11:925-933, INIT@v11.1:150-153.
- A custom logger subclasses `trt.ILogger`, calls `trt.ILogger.__init__(self)` and implements
  `log(severity, msg)`; it gets every message and filters itself — docs.nvidia.com/deeplearning/
  tensorrt/latest/_static/python-api/infer/Core/Logger.html.
"""

from __future__ import annotations

import enum
import sys
import time
from typing import Any


class _Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


_LETTERS = {0: "F", 1: "E", 2: "W", 3: "I", 4: "V"}


class ILogger:
    Severity = _Severity
    INTERNAL_ERROR = _Severity.INTERNAL_ERROR
    ERROR = _Severity.ERROR
    WARNING = _Severity.WARNING
    INFO = _Severity.INFO
    VERBOSE = _Severity.VERBOSE

    def __init__(self) -> None:
        self._trt_base_initialized = True

    def log(self, severity: _Severity, msg: str) -> None:
        raise NotImplementedError("ILogger.log is pure virtual: implement it in the subclass")


class Logger(ILogger):
    def __init__(self, min_severity: _Severity = _Severity.WARNING) -> None:
        super().__init__()
        self.min_severity = _Severity(min_severity)

    def log(self, severity: _Severity, msg: str) -> None:
        if severity <= self.min_severity:
            stamp = time.strftime("%m/%d/%Y-%H:%M:%S")
            print(f"[{stamp}] [TRT] [{_LETTERS[int(severity)]}] {msg}", file=sys.stdout)


def check_logger(logger: Any, where: str) -> ILogger:
    """What pybind11 does with the logger argument of Builder/Runtime/OnnxParser."""
    if not isinstance(logger, ILogger):
        raise TypeError(f"{where}(): incompatible constructor arguments (logger: {logger!r})")
    if not getattr(logger, "_trt_base_initialized", False):
        raise TypeError("tensorrt.ILogger.__init__() must be called when overriding __init__")
    return logger


def error(logger: ILogger, message: str) -> None:
    logger.log(_Severity.ERROR, message)


def warning(logger: ILogger, message: str) -> None:
    logger.log(_Severity.WARNING, message)
