"""Fusion passes: ``fuse_attention`` (hand-written attention into one SDPA call), ``fold_bn``,
``merge_convs`` (summed convolutions of one input), ``fuse_act``, ``fuse_add_layer_norm``
(transformers, before the Triton lowering), the CPU layout passes ``lower_convs`` and
``to_channels_last``, and OpenVINO's ``pointwise_convs`` (ConvNeXt's MLPs on NCHW)."""
from fxopt.passes.fusion import (fold_bn, fuse_act, fuse_attention,  # noqa: F401  (register
                                 fuse_layer_norm, layout, merge_convs,  # the passes)
                                 pointwise_convs)
