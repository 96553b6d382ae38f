"""The command line and what it shows: pictures, the digits model, recipes, latency.

Nothing here is imported by the compiler itself; ``fxopt.draw`` is re-exported at the top::

    $ fxopt optimize --out build/            # fxopt.tools.cli
    >>> fxopt.draw(opt, "graph.png")         # fxopt.tools.draw
"""

__all__: list[str] = []
