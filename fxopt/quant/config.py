"""``QuantConfig``: what ``optimize(..., quantize=...)`` quantizes, and how.

    >>> QuantConfig.coerce("int8")                      # the defaults
    >>> QuantConfig(activation_observer="percentile", keep_float=["fc", nn.Conv1d])
    >>> QuantConfig.coerce({"first_layer": "float"})

Activations: one grid per tensor from a named observer (``fxopt.observers.OBSERVERS``; default
``"mse"``, the clipping range with the least expected squared error, as torch.ao's x86 default
HistogramObserver aims for; on the digits ResNet 34.95 dB SQNR against 34.20 dB for
``"minmax"``). ``activation_symmetric``: ``False``, asymmetric uint8 (what PyTorch's x86 kernels
and ONNX Runtime take best); ``True``, symmetric int8 everywhere (runs on the reference path);
``"auto"``, zero point 0 on every grid, uint8 where the calibration data is non-negative and
int8 elsewhere (OpenVINO's scheme: its kernels take no zero-point compensation then);
``None`` (the default), ``"auto"`` for ``target="openvino"`` and ``False`` elsewhere. Weights: one
symmetric int8 grid per output channel (``weight_observer="per_channel_minmax"``, the only one).
``mode``: ``"static"`` (calibrated activation grids; needs ``calibration_data``) or
``"dynamic"`` (Linear layers only: int8 weights, activations quantized at run time from their
own range; no calibration data, for transformer blocks and the like).
``per_token`` (dynamic mode only, default ``False``): one run-time grid per token (per row of a
Linear layer's input) instead of one per tensor; more accurate where tokens differ in range
(torchvision vit_b_16 at 224: 29.9 dB per tensor, 31+ per token), no ONNX form; on a CPU
without VNNI or AMX its codes are multiplied in float32 (exact; ``torch._int_mm`` is 20x
slower there), slower than float (vit_b_16 304 against 253 ms on the AVX2 EPYC).
``reduce_range``: which grids drop a bit so that x86 int8 kernels without VNNI do not
saturate: ``True`` (or ``"activations"``: 7-bit uint8 activation grids, torch.ao's x86
default), ``"weights"`` (7-bit weight grids, ``[-63, 63]``), ``False`` (none: 8-bit
everywhere), or ``"auto"`` (the default): none where the int8 kernels sum in int32 (a CPU with
AVX-512 VNNI or AMX, any GPU), the weights' elsewhere (``fxopt.quant.isa`` says why);
resolved at calibration and recorded in the report (``stats["reduce_range"]``).
``bias_correction`` (default ``True``): after the weights are quantized, each conv/linear
bias absorbs the mean per-channel error the int8 weights cause on the calibration data (the
float layer's output less the layer's with int8 weights, on the same float input; NNCF's fast
bias correction): ``fxopt.quant.bias``.
``linear_residual_add`` (default ``"float"``): the residual add fused into a Linear layer (a
transformer block's ``x + proj(...)``, ``x + fc2(...)``) stays float, so the residual stream
is never quantized (``passes/quant/residual.py``: timm vit_tiny 8.4 -> 28 dB); ``"int8"``
quantizes it as a convolution's residual add is.
``smooth_quant`` (default ``0.5``; ``None`` turns it off): SmoothQuant's migration strength
``alpha``: a LayerNorm read only by quantized Linear layers hands its channel scales to their
weights before calibration (``fxopt.quant.smooth``), for trained transformers' outlier
channels.
``min_sqnr_db`` / ``max_float_layers``: sensitivity-guided fallback. Each layer's sensitivity is
the SQNR (dB, against float) of the model with only that layer quantized; the most sensitive
layers are kept in float, one at a time, until the whole model's SQNR reaches ``min_sqnr_db``
or ``max_float_layers`` are float. ``sensitivity_batches``: calibration batches used for that.
``min_sqnr_db="auto"`` (the default): an accuracy target of 30 dB on fresh data (aimed at
30.5 dB on the held-out batches: ``AUTO_MIN_SQNR_DB``; the CNNs the project measures are at
35-41 dB), with at most a quarter of the int8 layers' MACs kept float
(``AUTO_FLOAT_MAC_SHARE``). A model that meets it all int8 is left as it is (one simulated run
to know it; no sensitivities measured); below it, the layers whose noise costs the most per
MAC go to float first: the head and the patch embedding of a ViT, say (random-weight
torchvision vit_b_16 at 224 on an AVX2 CPU: 26.4 dB all int8), and a move that does not raise
the model's SQNR is undone (``fxopt.quant.select.fallback``). A number aims at that many dB
with no limit on the MACs (the most sensitive layers first); ``None``: no fallback.
Quantization-aware training (``prepare_qat``) takes ``"auto"`` as ``None``: training recovers
the accuracy.
``holdout_fraction`` (default 0.2): the share of the calibration batches (the last ones) held
out of calibration to measure the report's int8 figures on (SQNR, max abs error, top-1
agreement), when that is at least one batch (5 batches or more); with fewer, the example inputs
when they are not a calibration batch, else the calibration batches, and the report says so
(``fxopt.quant.accuracy``). ``0`` calibrates on every batch.
``warn_sqnr_db`` (default 20.0): a run whose measured SQNR falls under it (under
``min_sqnr_db`` when that is a number) warns with ``fxopt.Int8AccuracyWarning``, naming the layers
that hurt most and the fix (``min_sqnr_db=``); ``None`` never warns. 20 dB: the CNNs the project
measures reach 30-35 dB (ResNet-18/50, MobileNetV2, the digits ResNet; ``bench/results/``), and
at 20 dB the noise is 10% of the signal's rms, where top-1 classes start to flip.
``float_without_kernel``: on ``target="cpu"``, keep in float the layers PyTorch has no int8
kernel for (an epilogue activation other than relu / relu6 / hardtanh / clamp, a residual add
with an activation other than relu): run as int8 they would take the slow exact reference.
The report names them. ``False`` quantizes them anyway.
``cpu_engine``: which int8 kernel each layer runs on the CPU: ``"onednn"`` (oneDNN's
``qconv2d_pointwise`` / ``qlinear_pointwise``), ``"fbgemm"`` / ``"x86"`` (that quantized engine's
kernel where it has the layer's activation, else oneDNN's), ``"auto"`` (fbgemm for small
layers, oneDNN for the rest; see ``passes/lower/cpu.py``), or ``"fastest"``: the graph lowered
both with ``"auto"`` and with ``"x86"``, and the faster on the example inputs kept (the report
says which, with both times; which is faster depends on the model and the CPU, and two runs
may keep different ones, each checked; ``target="best"`` uses it where ``"auto"`` is set).
``keep_float``: module paths (``"layer1.0.conv1"``, a prefix covers its children) or module
types left in float. ``first_layer`` / ``last_layer``: ``"quantize"`` or ``"float"``
(the first / last quantizable layer in graph order).
"""
from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from fxopt.errors import InputError
from fxopt.infra.validate import choice_arg
from fxopt.quant.isa import REDUCE_RANGE_VALUES, resolve_reduce_range
from fxopt.quant.observers import OBSERVERS

__all__ = ["QuantConfig", "AUTO_MIN_SQNR_DB", "AUTO_FLOAT_MAC_SHARE"]

# min_sqnr_db="auto": the accuracy target, and the largest share of the int8 layers' MACs
# kept float to reach it (bench/results/transformer-int8-avx2-2026-12-07-auto-target.md and
# cpu-deploy-avx2-2026-12-07-auto-target.md). The target is 30 dB and half a dB for the spread
# between the few held-out batches the fallback judges on and fresh data (random-weight
# vit_b_16 at 224 aimed at 30: 29.97 dB on 3 held-out images, 30.37 on 8 others; swin_t
# 30.02 and 29.97). A quarter: deit_small needed 23% on the AVX2 EPYC.
AUTO_MIN_SQNR_DB = 30.5
AUTO_FLOAT_MAC_SHARE = 0.25

_LAYER_POLICIES = ("quantize", "float")
_MODES = ("static", "dynamic")
_ENGINES = ("auto", "x86", "fbgemm", "onednn", "fastest")
_WEIGHT_OBSERVERS = ("per_channel_minmax",)


@dataclass
class QuantConfig:
    activation_observer: str = "mse"
    weight_observer: str = "per_channel_minmax"
    activation_symmetric: bool | str | None = None  # None: by target (resolved)
    keep_float: list = field(default_factory=list)  # module paths (str) or nn.Module types
    first_layer: str = "quantize"
    last_layer: str = "quantize"
    observer_options: dict = field(default_factory=dict)  # keyword options for the observer
    min_batches: int = 1
    mode: str = "static"
    reduce_range: bool | str = "auto"
    bias_correction: bool = True
    linear_residual_add: str = "float"
    smooth_quant: float | None = 0.5
    min_sqnr_db: float | str | None = "auto"  # "auto": 30 dB within a quarter of the MACs
    max_float_layers: int | None = None
    sensitivity_batches: int = 2
    holdout_fraction: float = 0.2
    warn_sqnr_db: float | None = 20.0
    float_without_kernel: bool = True
    cpu_engine: str = "auto"
    per_token: bool = False  # dynamic mode: one run-time grid per token

    def __post_init__(self):
        if self.activation_observer not in OBSERVERS:
            raise InputError(f"unknown activation observer {self.activation_observer!r}",
                             hint=f"use one of: {', '.join(sorted(OBSERVERS))}")
        if self.weight_observer not in _WEIGHT_OBSERVERS:
            raise InputError(f"unknown weight observer {self.weight_observer!r}",
                             hint=f"use one of: {', '.join(_WEIGHT_OBSERVERS)}")
        for name in ("first_layer", "last_layer"):
            choice_arg(getattr(self, name), f"QuantConfig.{name}", _LAYER_POLICIES,
                       error=InputError)
        if isinstance(self.keep_float, (str, type)):
            self.keep_float = [self.keep_float]
        try:
            self.keep_float = list(self.keep_float)
        except TypeError:
            raise InputError(f"QuantConfig.keep_float must be a list, got "
                             f"{type(self.keep_float).__name__}",
                             hint="e.g. keep_float=['fc', nn.Conv1d]") from None
        for k in self.keep_float:
            if not isinstance(k, (str, type)):
                raise InputError(f"QuantConfig.keep_float holds module paths or types, not "
                                 f"{type(k).__name__}",
                                 hint="e.g. keep_float=['layer1.0.conv1', nn.Conv1d]")
        choice_arg(self.mode, "QuantConfig.mode", _MODES, error=InputError)
        sq = self.smooth_quant
        if sq is not None and (isinstance(sq, bool) or not isinstance(sq, (int, float))
                               or not 0 <= sq <= 1):
            raise InputError(f"QuantConfig.smooth_quant is SmoothQuant's alpha in [0, 1] or None, "
                             f"not {self.smooth_quant!r}", hint="e.g. smooth_quant=0.5")
        choice_arg(self.linear_residual_add, "QuantConfig.linear_residual_add",
                   ("float", "int8"), error=InputError)
        choice_arg(self.cpu_engine, "QuantConfig.cpu_engine", _ENGINES, error=InputError)
        if not any(self.reduce_range is v or isinstance(v, str) and self.reduce_range == v
                   for v in REDUCE_RANGE_VALUES):
            raise InputError(f"QuantConfig.reduce_range must be True, False, 'activations', "
                             f"'weights' or 'auto', got {self.reduce_range!r}",
                             hint="reduce_range='auto' picks 8-bit grids where the CPU has "
                                  "VNNI/AMX, 7-bit weight grids elsewhere")
        if self.activation_symmetric not in (None, True, False, "auto") or \
                isinstance(self.activation_symmetric, int) and \
                not isinstance(self.activation_symmetric, bool):
            raise InputError(f"QuantConfig.activation_symmetric must be True, False, 'auto' or "
                             f"None, got {self.activation_symmetric!r}",
                             hint="activation_symmetric='auto' gives zero point 0 everywhere "
                                  "(OpenVINO's scheme); None picks by target")
        for name in ("float_without_kernel", "bias_correction", "per_token"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"QuantConfig.{name} must be True or False, got "
                                 f"{getattr(self, name)!r}", hint=f"e.g. {name}=True")
        if self.per_token and self.mode != "dynamic":
            raise InputError("QuantConfig.per_token=True needs mode='dynamic' (a grid per token "
                             "is picked at run time; static grids are calibrated per tensor)",
                             hint="use QuantConfig(mode='dynamic', per_token=True), or leave "
                                  "per_token=False")
        if not isinstance(self.observer_options, dict):
            raise InputError(f"QuantConfig.observer_options must be a dict of keyword options, "
                             f"got {type(self.observer_options).__name__}",
                             hint="e.g. observer_options={'percentile': 99.99}")
        _check_observer_options(self.activation_observer, self.observer_options)
        if self.max_float_layers is not None:
            _count("max_float_layers", self.max_float_layers, 0, "or None for no limit")
        if self.min_sqnr_db is not None and self.min_sqnr_db != "auto" and (
                isinstance(self.min_sqnr_db, bool) or not isinstance(self.min_sqnr_db, (int, float))
                or not math.isfinite(self.min_sqnr_db)):
            raise InputError(f"QuantConfig.min_sqnr_db is a number of dB, 'auto' or None, not "
                             f"{self.min_sqnr_db!r}", hint="e.g. min_sqnr_db=30")
        if self.warn_sqnr_db is not None and (isinstance(self.warn_sqnr_db, bool) or
                                              not isinstance(self.warn_sqnr_db, (int, float))):
            raise InputError(f"QuantConfig.warn_sqnr_db is a number of dB or None, not "
                             f"{type(self.warn_sqnr_db).__name__}", hint="e.g. warn_sqnr_db=20")
        if isinstance(self.holdout_fraction, bool) or \
                not isinstance(self.holdout_fraction, (int, float)) or \
                not 0 <= self.holdout_fraction < 1:
            raise InputError(f"QuantConfig.holdout_fraction must be a number in [0, 1), got "
                             f"{self.holdout_fraction!r}", hint="e.g. holdout_fraction=0.2")
        _count("sensitivity_batches", self.sensitivity_batches, 1)
        _count("min_batches", self.min_batches, 1)

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
        hint = "use quantize='int8', 'int8_dynamic', a QuantConfig(...) or a dict of its fields"
        if isinstance(value, dict):
            known = {f.name for f in fields(cls)}
            unknown = set(value) - known
            if unknown:
                near = [difflib.get_close_matches(str(u), known, n=1) for u in sorted(unknown)]
                guess = f"did you mean {near[0][0]!r}? " if near[0] else ""
                raise InputError(f"unknown QuantConfig fields {sorted(unknown)}",
                                 hint=f"{guess}known: {', '.join(sorted(known))}")
            return cls(**value)
        raise InputError(f"quantize= takes 'int8', a QuantConfig or a dict, not "
                         f"{type(value).__name__} ({value!r})", hint=hint)

    def resolved(self, target: str = "cpu") -> QuantConfig:
        """This config with ``reduce_range="auto"`` decided for ``target`` on this machine
        (``fxopt.quant.isa.resolve_reduce_range``) and ``activation_symmetric=None`` for
        ``target`` (``"auto"`` on OpenVINO, else ``False``); values given are kept."""
        out = self
        if self.activation_symmetric is None:
            out = replace(out, activation_symmetric="auto" if target == "openvino" else False)
        if not isinstance(self.reduce_range, bool):
            out = replace(out, reduce_range=resolve_reduce_range(
                self.reduce_range, target=target, cpu_engine=self.cpu_engine))
        return out

    @property
    def fallback_target_db(self) -> float | None:
        """The SQNR (dB) the sensitivity fallback aims at: ``AUTO_MIN_SQNR_DB`` for
        ``min_sqnr_db="auto"``, the number given, or None (no target)."""
        return AUTO_MIN_SQNR_DB if self.min_sqnr_db == "auto" else self.min_sqnr_db

    @property
    def fallback_mac_share(self) -> float | None:
        """The largest share of the int8 layers' MACs the fallback may keep float:
        ``AUTO_FLOAT_MAC_SHARE`` under ``min_sqnr_db="auto"``, else None (no limit)."""
        return AUTO_FLOAT_MAC_SHARE if self.min_sqnr_db == "auto" else None

    @property
    def runs_fallback(self) -> bool:
        """Whether post-training quantization runs the sensitivity fallback."""
        return self.min_sqnr_db is not None or self.max_float_layers is not None

    @property
    def activations_7bit(self) -> bool:
        """Whether activation grids are 7-bit (``reduce_range`` resolved to True)."""
        return self.resolved().reduce_range is True

    @property
    def weights_7bit(self) -> bool:
        """Whether weight grids are 7-bit (``reduce_range`` resolved to ``"weights"``)."""
        return self.resolved().reduce_range == "weights"

    def keeps_float(self, path: str, module_type: type | None) -> bool:
        """Whether the layer at ``path`` (of ``module_type``) is to stay in float."""
        for k in self.keep_float:
            if isinstance(k, str):
                if path == k or (k and path.startswith(k + ".")):
                    return True
            elif module_type is not None and issubclass(module_type, k):
                return True
        return False




def _count(name: str, value: Any, low: int, more: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InputError(f"QuantConfig.{name} must be an integer >= {low}, got {value!r}",
                         hint=f"e.g. {name}={max(low, 2)} {more}".rstrip())


# Set by the calibration itself, never by the user (fxopt.quant.calibrate.activation_observer).
_SET_BY_CALIBRATION = ("self", "label", "dtype", "symmetric", "reduce_range")


def _check_observer_options(name: str, options: dict) -> None:
    """``observer_options`` must be keyword options the observer's constructor takes."""
    accepted: list[str] = []
    for klass in OBSERVERS[name].__mro__:  # a subclass passes **kw on to its base
        if "__init__" not in vars(klass) or klass is object:
            continue
        try:
            params = inspect.signature(vars(klass)["__init__"]).parameters
        except (TypeError, ValueError):
            return
        accepted += [p for p, v in params.items() if p not in _SET_BY_CALIBRATION
                     and v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)]
        if not any(v.kind is v.VAR_KEYWORD for v in params.values()):
            break
    else:
        return  # **kw all the way up: nothing to check against
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise InputError(f"QuantConfig.observer_options {unknown} are not options of the "
                         f"{name!r} observer",
                         hint=f"it takes: {', '.join(accepted)}" if accepted else
                         f"the {name!r} observer takes no options: drop observer_options")
