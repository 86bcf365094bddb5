"""Emulated cuda-python (`cuda.bindings.runtime` only): a test double, see `emulated_device`."""
