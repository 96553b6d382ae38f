"""Exports of optimized models: ONNX (float, and int8 as QDQ), checked in ONNX Runtime.

The package sits below ``fxopt.api`` (nothing in it imports the api). Modules, each depending
only on the ones listed after it:

- ``engines``: ``optimize(target="openvino"/"onnxruntime"/"best")``: the checked graph exported
  by ``onnx``, loaded by OpenVINO or ONNX Runtime, checked against the graph, and called like
  the module (``Engine``); the timing of ``"best"``.
- ``onnx``: ``export_onnx`` (decompose the fused float ops through the op schema, rewrite int8
  graphs into QDQ, export, check in ONNX Runtime) and ``decompose_fused_ops``.
- ``qdq``: the QDQ rewrite: ``RULES`` (both tables) run on the rewrite engine, what is kept,
  the output step, the ONNX Runtime check within one step.
- ``qdq_ir`` / ``qdq_cpu``: the rows, for the fxopt int8 IR and for the graph lowered onto
  PyTorch's quantized CPU kernels.
- ``qdq_state``: the state the rows share (grids of codes, constants) and the QDQ pieces.
- ``onnx_ops``: the standard ONNX quantization operators as traceable torch functions.
- ``fileformat``: the ``.fxopt`` file (``OptimizedModule.save`` / ``fxopt.load``): the graph and
  modules as JSON, the tensors as safetensors, no pickle; it sits below ``fxopt.api`` (it
  imports ``fxopt.ir``, ``fxopt.ops`` and ``fxopt.errors`` only).
- ``allowlist``: what a ``.fxopt`` file may call: call targets named and resolved by
  qualified name, built from the running torch (below ``fileformat``).
"""
__all__: list[str] = []
