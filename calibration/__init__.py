"""Reduced precision: calibration data readers, FP16 and INT8 graphs, accuracy gates."""
