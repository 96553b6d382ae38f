"""The allowlist of call targets (``fxopt.export.allowlist``): what a ``.fxopt`` file may call,
resolved by qualified name; everything with effects beyond its result is refused."""
import torch
import torch.nn.functional as F

from fxopt.export import fileformat
from fxopt.export.allowlist import allowed_function


def test_the_allowlist():
    assert fileformat.allowed_function is allowed_function  # still importable from there
    allowed = allowed_function
    assert allowed("torch.ops.fxopt.conv2d_act.default") is torch.ops.fxopt.conv2d_act.default
    assert allowed("torch.ops.quantized.conv2d") is torch.ops.quantized.conv2d
    assert allowed("torch.flatten") is torch.flatten and allowed("operator.add") is not None
    assert allowed("torch.nn.functional.relu") is F.relu
    for name in ("os.system", "builtins.eval", "builtins.exec", "builtins.open", "torch.load",
                 "torch.save", "torch.from_file", "torch.hub.load", "operator.attrgetter",
                 "operator.call", "torch.ops.load_library", "torch.ops.aten.from_file",
                 "torch.ops.myns.op", "torch.fx.graph_module._exec_with_source",
                 "torch.Tensor.__reduce_ex__", "builtins.__import__", None, 3):
        assert allowed(name) is None, name
