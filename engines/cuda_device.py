"""The device an engine is built for and run on: a CUDA GPU (name, compute capability, memory)
or the host CPU (its model name).

The GPU is queried through cuda-python (`cuda.bindings.runtime`, whose functions return
`(cudaError_t, value...)` tuples) or, when only that is installed, pycuda (whose failures raise
`pycuda.driver.Error`); either way a failed query is a one-line UserError. Both are imported
lazily, so importing this module needs neither torch, onnx nor a GPU.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

from scan_deploy.errors import UserError

INSTALL_HINT = (
    "no CUDA Python binding found: pip install cuda-python (or pycuda); "
    "on Jetson use the cuda-python wheel that matches JetPack's CUDA"
)


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    compute_capability: str | None  # "9.0"; None for the CPU
    total_memory: int | None = None  # bytes

    @property
    def sm(self) -> str:
        """Short tag used in engine file names: `sm90`, or `cpu`."""
        return sm_tag(self.compute_capability)


def sm_tag(compute_capability: str | None) -> str:
    if compute_capability is None:
        return "cpu"
    major, _, minor = compute_capability.partition(".")
    return f"sm{major}{minor or 0}"


def current_device(index: int | None = None) -> DeviceInfo:
    """The current CUDA device (or device `index`), through cuda-python or pycuda."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        cudart = None
    if cudart is not None:
        return _cudart_device(cudart, index)
    try:
        import pycuda.driver as pycuda_driver
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return _pycuda_device(pycuda_driver, index)


def _cudart_device(cudart, index: int | None) -> DeviceInfo:
    count = _cuda_call(cudart, cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    if count < 1:
        raise UserError("no CUDA device is visible (check the driver and CUDA_VISIBLE_DEVICES)")
    if index is None:
        index = _cuda_call(cudart, cudart.cudaGetDevice(), "cudaGetDevice")
    if not 0 <= index < count:
        raise UserError(f"CUDA device {index} does not exist ({count} visible)")
    prop = _cuda_call(cudart, cudart.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    return DeviceInfo(
        decode_name(prop.name), f"{prop.major}.{prop.minor}", int(prop.totalGlobalMem)
    )


def _cuda_call(cudart, result: tuple, what: str):
    """The value of a cuda-python runtime call, which returns `(err, value)`."""
    err, value = result
    if err != cudart.cudaError_t.cudaSuccess:
        name = getattr(err, "name", str(err))
        raise UserError(f"CUDA runtime: {what} failed ({name})")
    return value


def _pycuda_device(driver, index: int | None) -> DeviceInfo:
    """Through pycuda's driver API, whose failures raise `pycuda.driver.Error`."""
    try:
        driver.init()
        count = driver.Device.count()
        if count < 1:
            raise UserError("no CUDA device is visible (check the driver and CUDA_VISIBLE_DEVICES)")
        index = 0 if index is None else index
        if not 0 <= index < count:
            raise UserError(f"CUDA device {index} does not exist ({count} visible)")
        device = driver.Device(index)
        major, minor = device.compute_capability()
        return DeviceInfo(device.name(), f"{major}.{minor}", int(device.total_memory()))
    except driver.Error as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise UserError(f"CUDA driver (pycuda): {message}") from None


def decode_name(raw: bytes | str) -> str:
    """`cudaDeviceProp.name` is a NUL-padded char[256] that cuda-python returns as bytes."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return text.split("\x00", 1)[0].strip()


def cpu_device() -> DeviceInfo:
    """The host CPU: the `model name` of /proc/cpuinfo where Linux gives one, else the
    processor or architecture name Python reports."""
    return DeviceInfo(cpu_model_name(), None, None)


def cpu_model_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
