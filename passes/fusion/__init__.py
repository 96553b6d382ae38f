"""Fusion passes: ``fold_bn`` (BatchNorm into the layer before it) and ``fuse_act``."""
from fxopt.passes.fusion import fold_bn, fuse_act  # noqa: F401  (register the passes)
