"""Fusion passes: ``fold_bn``, ``merge_convs`` (summed convolutions of one input), ``fuse_act``,
``fuse_add_layer_norm`` (transformers, before the Triton lowering), and the CPU layout passes
``lower_convs`` and ``to_channels_last``."""
from fxopt.passes.fusion import (fold_bn, fuse_act, fuse_layer_norm,  # noqa: F401  (register
                                 layout, merge_convs)  # the passes)
