"""``fxopt.export_onnx``: an optimized model as a standard ONNX file, checked in ONNX Runtime.

The fxopt ops have no ONNX translation of their own. The exporter works on a copy of the graph
in which every fused call is decomposed back into the standard ops it stands for (the op's own
reference math, without in-place updates)::

    conv2d_act(x, w, b, stride, padding, dilation, groups, residual, act="relu")
      ->  relu(F.conv2d(x, w, b, stride, padding, dilation, groups) + residual)

then hands that copy to ``torch.onnx.export`` (the TorchScript exporter, ``dynamo=False``: the
same result on torch 2.11 and 2.14). The file is written beside ``path`` and renamed into place
only after ``onnx.checker`` accepted it and, when onnxruntime is installed, an
``InferenceSession`` (CPUExecutionProvider) reproduced the fxopt module's outputs on
``example_inputs`` within the float tolerance table (``fxopt.ir.tolerances``).

    >>> opt = fxopt.optimize(model.eval(), x, prune=0.5)
    >>> result = fxopt.export_onnx(opt, x, "model.onnx")
    >>> result.translated, result.kept, result.check.rel_err
    ({'conv2d_act': 20, 'linear_act': 1}, [], 3.1e-07)

Int8 graphs (the fxopt int8 IR, or that IR lowered onto PyTorch's quantized CPU kernels) are
rewritten into QDQ first (``fxopt.export.qdq``, a table of one-op rewrites: QuantizeLinear /
DequantizeLinear around the float ops, int8 weights with per-channel scales) and checked within
one quantization step of the output (``OnnxExport.output_step``) instead of the float tolerance.

Where each op goes is read off two tables, never a list of names: an fxopt op whose schema has
a ``decompose`` is decomposed; one the QDQ table has a row for is left to it; any other op is
*kept*. ``kept`` lists the graph ops that stay as they were because no standard translation is
known (an fxopt op with neither, an op on int8 codes with no QDQ row); each is also named in a
warning, and the export then usually fails in ``torch.onnx.export`` with its own message.
"""
from __future__ import annotations

import copy
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from fxopt.errors import InputError, NumericMismatchError, UnsupportedOpError
from fxopt.export.qdq import (MIN_QDQ_OPSET, compare_within_step, drop_initializer_identities,
                              has_rule, is_int8_graph, qdq_rewrite, untranslated)
from fxopt.ir.capture import normalize_inputs
from fxopt.ir.check import clone_inputs
from fxopt.ir.tolerances import ErrorStats, compare_outputs
from fxopt.ops.schema import is_fxopt_op, schema_of

__all__ = ["export_onnx", "OnnxExport", "decompose_fused_ops", "DEFAULT_OPSET", "MIN_OPSET",
           "MAX_OPSET"]

DEFAULT_OPSET = 17
# The opsets the TorchScript exporter writes (torch.onnx's own bounds where it states them).
MIN_OPSET = 9
MAX_OPSET = getattr(getattr(torch.onnx, "_constants", None), "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET",
                    20)


@dataclass
class OnnxExport:
    """What ``export_onnx`` wrote and how it checked."""

    path: Path
    opset: int
    translated: dict[str, int] = field(default_factory=dict)  # fxopt op -> calls decomposed
    kept: list[str] = field(default_factory=list)  # graph ops kept as they were (no translation)
    check: ErrorStats | None = None  # ONNX Runtime vs the fxopt module; None: not run
    notes: list[str] = field(default_factory=list)
    output_step: float | None = None  # int8 (QDQ): the tolerance of the check, one output step


def decompose_fused_ops(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, int], list[str]]:
    """A copy of ``gm`` with the float fused ops decomposed (``gm`` is not touched).

    Returns (the copy, {op name: calls decomposed}, [ops kept as they were]): an fxopt op is
    decomposed when its schema has a ``decompose``, left for :func:`qdq_rewrite` when the QDQ
    table has a row for it, and kept otherwise.
    """
    gm = copy.deepcopy(gm)
    translated: Counter = Counter()
    kept: list[str] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        target = node.target
        schema = schema_of(target)
        if schema is not None and schema.decompose is not None:
            node.target = schema.decompose
            translated[schema.name] += 1
        elif is_fxopt_op(target) and not has_rule(target):
            # no standard form in the schema and no QDQ row: exported as it is
            kept.append(f"{node.name} ({node.target})")
    if translated:
        gm.graph.lint()
        gm.recompile()
    return gm, dict(translated), kept


# -- export -------------------------------------------------------------------------------------
def _graph_module_of(module: nn.Module) -> nn.Module:
    gm = getattr(module, "graph_module", None)
    return gm if isinstance(gm, nn.Module) else module


def _check_path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"path must be a str or a path, got {type(path).__name__}",
                         hint="e.g. export_onnx(opt, x, 'model.onnx')")
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a directory", hint="give a file name, e.g. DIR/model.onnx")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the folder {path.parent}: {e.strerror or e}",
                         hint="choose a writable location") from e
    return path


def _check_options(opset, check, input_names, output_names) -> None:
    if isinstance(opset, bool) or not isinstance(opset, int) or \
            not MIN_OPSET <= opset <= MAX_OPSET:
        raise InputError(f"opset must be an integer from {MIN_OPSET} to {MAX_OPSET} (what "
                         f"torch.onnx.export writes), got {opset!r}",
                         hint=f"leave it unset (opset={DEFAULT_OPSET})")
    if not isinstance(check, bool):
        raise InputError(f"check must be True or False, got {check!r}",
                         hint="check=True runs the file in ONNX Runtime; check=False does not")
    for what, names in (("input_names", input_names), ("output_names", output_names)):
        if names is not None and (not isinstance(names, (list, tuple))
                                  or not all(isinstance(n, str) for n in names)):
            raise InputError(f"{what} must be a list of strings, got {names!r}",
                             hint=f"e.g. {what}=['{what[:-6]}']")


def _reference(module: nn.Module, inputs: tuple) -> Any:
    """The module's outputs on ``inputs`` in eval mode, as it is exported: a module left in
    training mode is switched to eval for this one call (its BatchNorm statistics are not
    updated) and every training flag is put back after, on error too."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with torch.no_grad():
            return module(*inputs)
    except Exception as e:  # noqa: BLE001 - any failure here is about the inputs
        first = str(e).splitlines()[0] if str(e) else ""
        raise InputError(f"the module failed on the example inputs: {type(e).__name__}: {first}",
                         hint="pass inputs of the shape, dtype and device the module takes (the "
                              "ones it was optimized with)") from e
    finally:
        for m, training in flags:
            m.training = training


def _ort_outputs(model_path: Path, inputs: tuple) -> list:
    """The file run in ONNX Runtime on ``inputs``; a file ORT refuses (an InvalidArgument or
    Fail at session creation, an error while running) is an UnsupportedOpError."""
    import onnxruntime as ort

    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # its errors come back as the exception below
        session = ort.InferenceSession(str(model_path), options,
                                       providers=["CPUExecutionProvider"])
        tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
        feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), tensors)}
        return [torch.from_numpy(o) for o in session.run(None, feeds)]
    except Exception as e:  # noqa: BLE001 - ORT's errors are pybind classes of its own
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UnsupportedOpError(
            f"ONNX Runtime cannot run the exported file ({type(e).__name__}): {first}",
            hint="onnx.checker accepted the file but ONNX Runtime refuses it: change the "
                 "layer ORT names (e.g. a ConvTranspose2d whose output_padding is not below its "
                 "stride), or export with check=False to keep the file for another "
                 "runtime") from e


def export_onnx(module: nn.Module, example_inputs: Any, path: str | os.PathLike, *,
                opset: int = DEFAULT_OPSET, check: bool = True,
                input_names: list[str] | None = None,
                output_names: list[str] | None = None) -> OnnxExport:
    """Export ``module`` (an ``OptimizedModule``, a ``GraphModule`` or any module) to ``path``.

    ``check``: run the file in ONNX Runtime (when installed) and raise
    ``NumericMismatchError`` if it differs from ``module`` beyond the float tolerance; the file
    is then not written. ``onnx.checker`` always runs.
    """
    import onnx

    if not isinstance(module, nn.Module):
        raise InputError(f"module must be an nn.Module, got {type(module).__name__}",
                         hint="pass the OptimizedModule that fxopt.optimize returned")
    # Every run takes copies: a forward that writes into its input (x.mul_(gate)) must change
    # neither the caller's tensors nor the inputs of the next run (the trace, ONNX Runtime).
    inputs = clone_inputs(normalize_inputs(example_inputs))
    _check_options(opset, check, input_names, output_names)
    path = _check_path(path)
    reference = _reference(module, clone_inputs(inputs))
    gm = _graph_module_of(module)
    notes: list[str] = []
    step = None
    if isinstance(gm, fx.GraphModule):
        export_gm, translated, kept = decompose_fused_ops(gm)
        if is_int8_graph(export_gm):
            if opset < MIN_QDQ_OPSET:
                raise InputError(f"int8 (QDQ) export needs opset >= {MIN_QDQ_OPSET} "
                                 f"(per-channel DequantizeLinear), got {opset}",
                                 hint=f"export_onnx(..., opset={DEFAULT_OPSET})")
            rewrite = qdq_rewrite(export_gm)
            export_gm, step = rewrite.gm, rewrite.output_step
            translated.update(rewrite.translated)
            kept += rewrite.kept + untranslated(export_gm)
    else:
        export_gm, translated, kept = copy.deepcopy(gm), {}, []
    for what in kept:
        warnings.warn(f"fxopt.export_onnx: no ONNX translation for {what}; kept as is",
                      UserWarning, stacklevel=2)
    export_gm.eval()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
                torch.onnx.export(export_gm, clone_inputs(inputs), str(tmp), opset_version=opset,
                                  input_names=input_names, output_names=output_names,
                                  dynamo=False, do_constant_folding=True)
        except Exception as e:  # noqa: BLE001 - the exporter raises many kinds
            counts = Counter(k.split("(")[-1].rstrip(")") for k in kept)
            hint = ("no ONNX translation yet for " + ", ".join(
                f"{op} (x{n})" for op, n in counts.items()) + "; export the float model "
                "(the int8 ops above have no QDQ translation yet)") if kept else \
                "run with a plain float pipeline (pipeline=['cleanup']) to find the op"
            raise UnsupportedOpError(f"torch.onnx.export failed: {e}".splitlines()[0],
                                     hint=hint) from e
        if step is not None:
            drop_initializer_identities(tmp)
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as e:  # noqa: BLE001 - ValidationError, InferenceError, ...
            raise UnsupportedOpError(
                f"torch.onnx.export wrote a file that onnx.checker refuses: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                hint=f"try another opset (opset={DEFAULT_OPSET} is tested), or export the "
                     f"float model (pipeline=['cleanup']) to find the op") from e
        stats = None
        if check:
            try:
                import onnxruntime  # noqa: F401
            except ImportError:
                notes.append("onnxruntime is not installed: the file was not run")
            else:
                ort_out = _ort_outputs(tmp, inputs)
                ref_list = list(reference) if isinstance(reference, (tuple, list)) else [reference]
                ref_list = [r.detach().cpu().contiguous() for r in ref_list]
                stats = compare_outputs(ort_out, ref_list) if not step else \
                    compare_within_step(ort_out, ref_list, step)
                if not stats.ok:
                    bound = f"rel err {stats.rel_err:.2e} > {stats.tolerance:.0e}" if not step \
                        else f"max abs err {stats.max_abs:.3g} > {stats.tolerance:.3g}"
                    raise NumericMismatchError(
                        f"ONNX Runtime's outputs differ from the fxopt module's: {bound} "
                        f"{stats.reason}".strip(),
                        pass_name="export_onnx", passes_before=[], max_abs=stats.max_abs,
                        rel_err=stats.rel_err, tolerance=stats.tolerance, node=None,
                        module_path=None, hint="export with check=False to inspect the file")
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return OnnxExport(path=path, opset=opset, translated=translated, kept=kept, check=stats,
                      notes=notes, output_step=step)
