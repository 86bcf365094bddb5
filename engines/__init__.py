"""Engines: what `scan-deploy build-engine` builds from a bundle's graphs and what the runtime
loads, for TensorRT and ONNX Runtime.

- build side: `build` (options, TensorRT build plans, ONNX Runtime offline optimization, staging
  and publishing with sidecars) and `profiles` (optimization profiles);
- load side: `load` (finding an engine by its sidecar, checking the sidecar, loading);
- shared by both: `sidecar` (file names, sidecar format and checks), `tensorrt_api` (the only
  module that imports `tensorrt`), `ort_providers` (ONNX Runtime's execution providers),
  `ort_cache` (the TensorRT provider's caches), `cuda_device` and `cuda_buffers`.

Importing any of them needs neither torch nor onnx: loading runs on a device with numpy and
TensorRT or ONNX Runtime only. TensorRT, ONNX Runtime and the CUDA bindings are imported when
first used.
"""
