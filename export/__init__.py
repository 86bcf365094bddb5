"""Trained model to deployable artifacts (ONNX graphs, bundle manifest, graph checks, engines)."""
