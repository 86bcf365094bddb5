"""Device identification: the CUDA query's error handling and the CPU model name.

The real cuda-python query needs a GPU; here the documented `(err, value)` contract of
`cuda.bindings.runtime` is stood in for by a small object, and the missing-binding path by
blocking the imports."""

import sys
from enum import IntEnum
from types import SimpleNamespace

import pytest
from scan_deploy.engines import cuda_device
from scan_deploy.engines.cuda_device import DeviceInfo, cpu_model_name, decode_name, sm_tag

from scan_deploy.errors import UserError


class CudaError(IntEnum):
    cudaSuccess = 0
    cudaErrorNoDevice = 100


def _runtime(count=(CudaError.cudaSuccess, 1)):
    prop = SimpleNamespace(name=b"NVIDIA H200\x00\x00", major=9, minor=0, totalGlobalMem=150 << 30)
    return SimpleNamespace(
        cudaError_t=CudaError,
        cudaGetDeviceCount=lambda: count,
        cudaGetDevice=lambda: (CudaError.cudaSuccess, 0),
        cudaGetDeviceProperties=lambda index: (CudaError.cudaSuccess, prop),
    )


def test_tags_and_names():
    assert sm_tag("9.0") == "sm90" and sm_tag("8.7") == "sm87" and sm_tag(None) == "cpu"
    assert DeviceInfo("Orin", "8.7").sm == "sm87"
    assert decode_name(b"Orin\x00\x00garbage") == "Orin"
    assert decode_name("NVIDIA H200") == "NVIDIA H200"


def test_cuda_runtime_results_are_unpacked_and_checked():
    info = cuda_device._cudart_device(_runtime(), None)
    assert info == DeviceInfo("NVIDIA H200", "9.0", 150 << 30)
    assert info.sm == "sm90"
    with pytest.raises(UserError, match=r"cudaGetDeviceCount failed \(cudaErrorNoDevice\)"):
        cuda_device._cudart_device(_runtime((CudaError.cudaErrorNoDevice, 0)), None)
    with pytest.raises(UserError, match="CUDA device 3 does not exist"):
        cuda_device._cudart_device(_runtime(), 3)


def test_missing_bindings_give_an_install_hint(monkeypatch):
    for name in ("cuda", "cuda.bindings", "pycuda", "pycuda.driver"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(UserError, match="no CUDA Python binding found: pip install cuda-python"):
        cuda_device.current_device()


def test_cpu_model_name(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9654 96-Core Processor\n")
    assert cpu_model_name(cpuinfo) == "AMD EPYC 9654 96-Core Processor"
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 62.50\n")  # aarch64 has no model name
    assert cpu_model_name(cpuinfo) == cpu_model_name(tmp_path / "missing") != ""


class PycudaError(Exception):
    """Stands in for `pycuda.driver.Error`."""


def _pycuda(count=1, init_error=None):
    def init():
        if init_error:
            raise PycudaError(init_error)

    class Device:
        def __init__(self, index):
            if not 0 <= index < count:
                raise PycudaError("cuDeviceGet failed: invalid device ordinal")

        @staticmethod
        def count():
            return count

        def name(self):
            return "Orin"

        def compute_capability(self):
            return 8, 7

        def total_memory(self):
            return 1 << 34

    return SimpleNamespace(Error=PycudaError, init=init, Device=Device)


def test_pycuda_failures_are_one_line_user_errors():
    assert cuda_device._pycuda_device(_pycuda(), None) == DeviceInfo("Orin", "8.7", 1 << 34)
    with pytest.raises(UserError, match=r"^CUDA device 3 does not exist \(1 visible\)$"):
        cuda_device._pycuda_device(_pycuda(), 3)
    with pytest.raises(UserError, match="no CUDA device is visible"):
        cuda_device._pycuda_device(_pycuda(count=0), None)
    failing = _pycuda(init_error="cuInit failed:\nno CUDA-capable device is detected")
    with pytest.raises(UserError) as info:
        cuda_device._pycuda_device(failing, None)
    assert str(info.value) == (
        "CUDA driver (pycuda): cuInit failed: no CUDA-capable device is detected"
    )
