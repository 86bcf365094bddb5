"""Inference backends behind one small interface (Polygraphy's runners): `open_backend(bundle,
"onnxruntime" | "tensorrt" | "torch", precision)` -> a `Backend` whose `runner(graph)` runs one
graph on numpy arrays. Each backend's library is imported when it is opened."""

from scan_deploy.runtime.backends.base import Backend, Runner, open_backend

__all__ = ["Backend", "Runner", "open_backend"]
