"""Exports of optimized models: ONNX (float, and int8 as QDQ), checked in ONNX Runtime."""
