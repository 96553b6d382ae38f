"""Built-in passes. Importing this package registers them (``fxopt.infra.registry``).

One folder per pass family: ``cleanup`` (dce, cse, constant_fold, remove_noops and the
``cleanup`` group), ``fusion`` (fold_bn, fuse_act), ``prune`` (prune_channels), ``quant``
(quantize_int8) and ``lower`` (lower_int8_cpu, lower_to_triton). The pipelines that order them
are in ``fxopt.pipelines``.
"""
from fxopt.passes import cleanup, fusion, lower, prune, quant  # noqa: F401  (register the passes)

__all__: list[str] = []
