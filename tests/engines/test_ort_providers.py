"""ONNX Runtime's execution providers: a provider this onnxruntime lacks is one line naming the
package to install."""

import pytest
from scan_deploy.engines.ort_providers import check_provider

from scan_deploy.errors import UserError


def test_unavailable_provider_names_onnxruntime_gpu():
    with pytest.raises(UserError) as info:
        check_provider("cuda", ["CPUExecutionProvider"])
    text = str(info.value)
    assert text.startswith("provider cuda: onnxruntime") and "no CUDAExecutionProvider" in text
    assert text.endswith("pip install onnxruntime-gpu") and "\n" not in text
    with pytest.raises(
        UserError, match="no TensorrtExecutionProvider .*onnxruntime-gpu and TensorRT"
    ):
        check_provider("tensorrt", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert check_provider("cpu") == "CPUExecutionProvider"
