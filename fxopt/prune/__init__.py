"""The pruning library: the channel dependency analysis and ``PruneConfig``.

``fxopt.channel_groups`` reads the analysis; the ``prune_channels`` pass
(``fxopt.passes.prune``) acts on it.
"""
