"""A script of ``bench/`` loaded as a module for its tests, once, under its own name."""
import importlib.util
import sys
from pathlib import Path

__all__ = ["load_bench_script"]

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_bench_script(stem: str):
    """``bench/<stem>.py`` as module ``<stem>_under_test`` (registered before it runs: its
    dataclasses look their module up). The scripts put ``bench/`` first on ``sys.path`` for their
    own imports; it is restored, so no bench script shadows a package a later test imports
    (``bench/kernels.py``, now ``gpu_kernels.py``, shadowed the ``kernels`` package transformers
    imports: the Hugging Face tests after them failed with an ImportError)."""
    name = f"{stem}_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{stem}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        path = list(sys.path)
        try:
            spec.loader.exec_module(sys.modules[name])
        finally:
            sys.path[:] = path
    return sys.modules[name]
