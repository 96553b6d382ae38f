"""Structured channel pruning, the actions: the ``prune_channels`` pass (the plan) and
``rewrite`` (the physical removal, the shape check, the masked reference).

The analysis and the importance criteria are library code in ``fxopt.prune``.
"""
from fxopt.passes.prune import prune_channels  # noqa: F401  (registers the pass)
