"""scan-deploy: the SCAN image-text matching model, from PyTorch training to embedded inference.

Importing this package loads neither torch nor onnx, so the runtime works on a device that has only
numpy and an inference backend.
"""

__version__ = "0.1.0"
