"""``python -m fxopt ...``: the same command line as the ``fxopt`` script (see ``fxopt.cli``)."""
import sys

from fxopt.tools.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
