"""Cleanup passes: dce, cse, constant_fold, remove_noops, and the ``cleanup`` fixpoint group."""
from fxopt.passes.cleanup import cleanup, noops  # noqa: F401  (register the passes)
