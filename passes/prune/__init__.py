"""Structured channel pruning: the ``prune_channels`` pass, its importance criteria and rewrite."""
from fxopt.passes.prune import prune_channels  # noqa: F401  (registers the pass)
