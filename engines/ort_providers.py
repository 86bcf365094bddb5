"""ONNX Runtime's execution providers as engines use them: their names, whether the installed
onnxruntime has one, and the device an engine for one is built for and runs on.

onnxruntime is imported when first needed (`import_onnxruntime`), never by importing this module.
"""

from __future__ import annotations

from typing import Any

from scan_deploy.engines.cuda_device import DeviceInfo, cpu_device, current_device

from scan_deploy.choices import Provider
from scan_deploy.errors import UserError
from scan_deploy.extras import EXTRAS

INSTALL_HINT = (
    f"ONNX Runtime is not installed: {EXTRAS['onnxruntime'].install()} (on Jetson: NVIDIA's "
    "onnxruntime-gpu wheel)"
)
# ONNX Runtime's names of the execution providers.
EXECUTION_PROVIDERS = {
    Provider.CPU: "CPUExecutionProvider",
    Provider.CUDA: "CUDAExecutionProvider",
    Provider.TENSORRT: "TensorrtExecutionProvider",
}


def import_onnxruntime() -> Any:
    """The `onnxruntime` module, or a one-line UserError telling how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return onnxruntime


def check_provider(provider: Provider, available: list[str] | None = None) -> str:
    """The execution provider's name; a one-line UserError when this onnxruntime lacks it."""
    ort = import_onnxruntime()
    name = EXECUTION_PROVIDERS[provider]
    available = ort.get_available_providers() if available is None else available
    if name not in available:
        extra = " and TensorRT" if provider == Provider.TENSORRT else ""
        raise UserError(
            f"provider {provider}: onnxruntime {ort.__version__} has no {name} "
            f"(it has {', '.join(available)}): pip install onnxruntime-gpu{extra}"
        )
    return name


def provider_device(provider: Provider) -> DeviceInfo:
    """The device an engine for `provider` runs on: the host CPU, or the current CUDA GPU."""
    return cpu_device() if provider == Provider.CPU else current_device()
