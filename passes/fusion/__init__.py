"""Fusion passes: ``fold_bn``, ``fuse_act``, and the CPU layout passes ``lower_convs`` and
``to_channels_last``."""
from fxopt.passes.fusion import fold_bn, fuse_act, layout  # noqa: F401  (register the passes)
