"""``QuantConfig``: what ``optimize(..., quantize=...)`` quantizes, and how.

    >>> QuantConfig.coerce("int8")                      # the defaults
    >>> QuantConfig(activation_observer="percentile", keep_float=["fc", nn.Conv1d])
    >>> QuantConfig.coerce({"first_layer": "float"})

Activations: one grid per tensor from a named observer (``fxopt.observers.OBSERVERS``; default
``"mse"``, the clipping range with the least expected squared error, as torch.ao's x86 default
HistogramObserver aims for; on the digits ResNet 34.95 dB SQNR against 34.20 dB for
``"minmax"``): asymmetric uint8 with a 7-bit range by default (what the x86/fbgemm kernels need), or
``activation_symmetric=True`` for symmetric int8 (runs on the reference path). Weights: one
symmetric int8 grid per output channel (``weight_observer="per_channel_minmax"``, the only one).
``mode``: ``"static"`` (calibrated activation grids; needs ``calibration_data``) or
``"dynamic"`` (Linear layers only: int8 weights, activations quantized at run time from their
own range; no calibration data, for transformer blocks and the like).
``reduce_range``: 7-bit uint8 activation grids (default ``True``, what the x86/fbgemm kernels
need on CPUs without VNNI; torch.ao's x86 default does the same).
``min_sqnr_db`` / ``max_float_layers``: sensitivity-guided fallback. Each layer's sensitivity is
the SQNR (dB, against float) of the model with only that layer quantized; the most sensitive
layers are kept in float, one at a time, until the whole model's SQNR reaches ``min_sqnr_db``
or ``max_float_layers`` are float. ``sensitivity_batches``: calibration batches used for that.
``holdout_fraction`` (default 0.2): the share of the calibration batches (the last ones) held
out of calibration to measure the report's int8 figures on (SQNR, max abs error, top-1
agreement), when that is at least one batch (5 batches or more); with fewer, the example inputs
when they are not a calibration batch, else the calibration batches, and the report says so
(``fxopt.quant.accuracy``). ``0`` calibrates on every batch.
``warn_sqnr_db`` (default 20.0): a run whose measured SQNR falls under it (under
``min_sqnr_db`` when that is set) warns with ``fxopt.Int8AccuracyWarning``, naming the layers
that hurt most and the fix (``min_sqnr_db=``); ``None`` never warns. 20 dB: the CNNs the project
measures reach 30-35 dB (ResNet-18/50, MobileNetV2, the digits ResNet; ``bench/results/``), and
at 20 dB the noise is 10% of the signal's rms, where top-1 classes start to flip.
``float_without_kernel``: on ``target="cpu"``, keep in float the layers PyTorch has no int8
kernel for (an epilogue activation other than relu / relu6 / hardtanh / clamp, a residual add
with an activation other than relu): run as int8 they would take the slow exact reference.
The report names them. ``False`` quantizes them anyway.
``cpu_engine``: which PyTorch quantized engine packs each layer's weights on the CPU:
``"x86"``, ``"fbgemm"``, ``"onednn"``, or ``"auto"`` (per layer, by problem size; see
``passes/lower_cpu.py``).
``keep_float``: module paths (``"layer1.0.conv1"``, a prefix covers its children) or module
types left in float. ``first_layer`` / ``last_layer``: ``"quantize"`` or ``"float"``
(the first / last quantizable layer in graph order).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from fxopt.errors import InputError
from fxopt.quant.observers import OBSERVERS

__all__ = ["QuantConfig"]

_LAYER_POLICIES = ("quantize", "float")
_MODES = ("static", "dynamic")
_ENGINES = ("auto", "x86", "fbgemm", "onednn")
_WEIGHT_OBSERVERS = ("per_channel_minmax",)


@dataclass
class QuantConfig:
    activation_observer: str = "mse"
    weight_observer: str = "per_channel_minmax"
    activation_symmetric: bool = False
    keep_float: list = field(default_factory=list)  # module paths (str) or nn.Module types
    first_layer: str = "quantize"
    last_layer: str = "quantize"
    observer_options: dict = field(default_factory=dict)  # keyword options for the observer
    min_batches: int = 1
    mode: str = "static"
    reduce_range: bool = True
    min_sqnr_db: float | None = None
    max_float_layers: int | None = None
    sensitivity_batches: int = 2
    holdout_fraction: float = 0.2
    warn_sqnr_db: float | None = 20.0
    float_without_kernel: bool = True
    cpu_engine: str = "auto"

    def __post_init__(self):
        if self.activation_observer not in OBSERVERS:
            raise InputError(f"unknown activation observer {self.activation_observer!r}",
                             hint=f"use one of: {', '.join(sorted(OBSERVERS))}")
        if self.weight_observer not in _WEIGHT_OBSERVERS:
            raise InputError(f"unknown weight observer {self.weight_observer!r}",
                             hint=f"use one of: {', '.join(_WEIGHT_OBSERVERS)}")
        for name in ("first_layer", "last_layer"):
            if getattr(self, name) not in _LAYER_POLICIES:
                raise InputError(f"QuantConfig.{name} must be one of {_LAYER_POLICIES}, got "
                                 f"{getattr(self, name)!r}")
        if isinstance(self.keep_float, (str, type)):
            self.keep_float = [self.keep_float]
        self.keep_float = list(self.keep_float)
        for k in self.keep_float:
            if not isinstance(k, (str, type)):
                raise InputError(f"QuantConfig.keep_float holds module paths or types, not "
                                 f"{type(k).__name__}")
        if self.mode not in _MODES:
            raise InputError(f"QuantConfig.mode must be one of {_MODES}, got {self.mode!r}")
        if self.cpu_engine not in _ENGINES:
            raise InputError(f"QuantConfig.cpu_engine must be one of {_ENGINES}, got "
                             f"{self.cpu_engine!r}")
        if self.max_float_layers is not None and int(self.max_float_layers) < 0:
            raise InputError("QuantConfig.max_float_layers must be 0 or more")
        if self.min_sqnr_db is not None and not isinstance(self.min_sqnr_db, (int, float)):
            raise InputError(f"QuantConfig.min_sqnr_db is a number of dB, not "
                             f"{type(self.min_sqnr_db).__name__}", hint="e.g. min_sqnr_db=30")
        if self.warn_sqnr_db is not None and (isinstance(self.warn_sqnr_db, bool) or
                                              not isinstance(self.warn_sqnr_db, (int, float))):
            raise InputError(f"QuantConfig.warn_sqnr_db is a number of dB or None, not "
                             f"{type(self.warn_sqnr_db).__name__}", hint="e.g. warn_sqnr_db=20")
        if isinstance(self.holdout_fraction, bool) or \
                not isinstance(self.holdout_fraction, (int, float)) or \
                not 0 <= self.holdout_fraction < 1:
            raise InputError(f"QuantConfig.holdout_fraction must be a number in [0, 1), got "
                             f"{self.holdout_fraction!r}", hint="e.g. holdout_fraction=0.2")
        if int(self.sensitivity_batches) < 1:
            raise InputError("QuantConfig.sensitivity_batches must be at least 1")
        if int(self.min_batches) < 1:
            raise InputError("QuantConfig.min_batches must be at least 1")

    @classmethod
    def coerce(cls, value: Any) -> QuantConfig:
        """``"int8"`` or None (defaults), a ``QuantConfig``, or a dict of its fields."""
        if value is None:
            return cls()
        if isinstance(value, QuantConfig):
            return value
        if isinstance(value, str):
            if value.lower() == "int8":
                return cls()
            if value.lower() in ("int8_dynamic", "dynamic"):
                return cls(mode="dynamic")
            raise InputError(f"quantize={value!r} is not supported",
                             hint="use quantize='int8', 'int8_dynamic' or a QuantConfig")
        if isinstance(value, dict):
            known = {f.name for f in fields(cls)}
            unknown = set(value) - known
            if unknown:
                raise InputError(f"unknown QuantConfig fields {sorted(unknown)}",
                                 hint=f"known: {', '.join(sorted(known))}")
            return cls(**value)
        raise InputError(f"quantize= takes 'int8', a QuantConfig or a dict, not "
                         f"{type(value).__name__}")

    def keeps_float(self, path: str, module_type: type | None) -> bool:
        """Whether the layer at ``path`` (of ``module_type``) is to stay in float."""
        for k in self.keep_float:
            if isinstance(k, str):
                if path == k or (k and path.startswith(k + ".")):
                    return True
            elif module_type is not None and issubclass(module_type, k):
                return True
        return False
