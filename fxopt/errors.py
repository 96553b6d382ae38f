"""One hierarchy of errors, rooted at :class:`FxoptError`.

Every message says what failed (the pass, the node, the user's module path) and how to fix it.
The fix is also kept apart in ``err.hint`` so the command line can print it on its own line::

    try:
        fxopt.optimize(model, x)
    except fxopt.PreconditionError as e:
        print(e.hint)          # "call model.eval() first"

The kernel launchers (``fxopt.triton_kernels``) depend on torch and triton only, so they raise
``TypeError`` / ``ValueError`` (with messages of the same kind), not these classes.
"""
from __future__ import annotations

__all__ = [
    "FxoptError",
    "CaptureError",
    "InputError",
    "FileFormatError",
    "ModelTypeError",
    "UnsupportedOpError",
    "PreconditionError",
    "PipelineError",
    "NotAvailableError",
    "PassError",
    "VerificationError",
    "NumericMismatchError",
    "Int8AccuracyWarning",
]


class FxoptError(Exception):
    """Base of every error fxopt raises on purpose. ``hint`` says how to fix it."""

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message}\n  fix: {hint}")


class CaptureError(FxoptError):
    """The model could not be turned into a torch.fx graph (data-dependent control flow, ...)."""


class InputError(FxoptError, ValueError):
    """Example inputs or calibration data missing, of the wrong type or of the wrong shape."""


class FileFormatError(InputError):
    """A module file that cannot be written or read: a missing, empty, truncated or malformed
    file, an old (pickle) or newer format, or anything the file format does not allow (a call
    outside its allowlist, a module whose state is not data)."""


class ModelTypeError(FxoptError, TypeError):
    """What was passed as the model is not an ``nn.Module``."""


class UnsupportedOpError(FxoptError):
    """The graph holds an op that a pass or an exporter cannot handle."""


class PreconditionError(FxoptError):
    """A pass's requirement does not hold (the model is in training mode, no calibration data)."""


class PipelineError(FxoptError, ValueError):
    """An unknown pass or pipeline name, a bad option, or a violated ordering constraint."""


class NotAvailableError(FxoptError, NotImplementedError):
    """A feature that is designed but not built yet (asked for explicitly, never a silent
    no-op)."""


class PassError(FxoptError):
    """A pass raised an unexpected exception. ``pass_name`` names it."""

    def __init__(self, message: str, *, pass_name: str, hint: str | None = None):
        self.pass_name = pass_name
        super().__init__(message, hint=hint)


class VerificationError(FxoptError):
    """The structural verifier found a broken graph after a pass (lint, metadata, attributes)."""

    def __init__(self, message: str, *, pass_name: str, problems: list[str],
                 hint: str | None = None):
        self.pass_name = pass_name
        self.problems = problems
        super().__init__(message, hint=hint)


class NumericMismatchError(FxoptError):
    """A pass changed the model's numbers beyond the tolerance for the output dtype.

    Carries ``pass_name``, ``passes_before``, ``max_abs``, ``rel_err``, ``tolerance``, and the
    first diverging node (``node``, with the user's module path in ``module_path``).
    """

    def __init__(self, message: str, *, pass_name: str, passes_before: list[str], max_abs: float,
                 rel_err: float, tolerance: float, node: str | None, module_path: str | None,
                 hint: str | None = None):
        self.pass_name = pass_name
        self.passes_before = passes_before
        self.max_abs = max_abs
        self.rel_err = rel_err
        self.tolerance = tolerance
        self.node = node
        self.module_path = module_path
        super().__init__(message, hint=hint)


class Int8AccuracyWarning(UserWarning):
    """An int8 model's SQNR against float fell under the floor (``QuantConfig.min_sqnr_db``, else
    ``QuantConfig.warn_sqnr_db``, 20 dB by default). Carries ``sqnr_db``, ``floor_db``,
    ``worst_layers`` (``(module path, SQNR dB with only that layer int8)``, worst first) and
    ``hint`` (the fix: ``QuantConfig(min_sqnr_db=...)`` keeps the worst layers in float)."""

    def __init__(self, message: str, *, sqnr_db: float, floor_db: float,
                 worst_layers: list, hint: str):
        self.message, self.hint = message, hint
        self.sqnr_db, self.floor_db, self.worst_layers = sqnr_db, floor_db, list(worst_layers)
        super().__init__(f"{message}\n  fix: {hint}")
