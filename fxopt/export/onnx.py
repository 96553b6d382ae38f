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

The batch is dynamic by default (``dynamic_batch=True``): dim 0 of every tensor input, and of
every output that follows it, is the symbolic ``batch`` (``dynamic_axes``; inputs and outputs
are named ``input``/``output``, ``input_1``, ... unless ``input_names``/``output_names`` say
otherwise). A file that only looks dynamic (a Reshape holding the traced batch size) is caught
by running it a second time, at the example batch plus one (the first sample repeated), against
the module at that batch: a file that fails or differs there is an ``UnsupportedOpError`` whose
hint is ``dynamic_batch=False``, never a file written that only runs at one batch. A module that
itself only runs at the example batch gets the same error. ``dynamic_batch=False`` writes the
example shapes as they are.

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
from fxopt.export.onnx_ops import engine_friendly_symbolics, openvino_linear_weights
from fxopt.export.qdq import (MIN_QDQ_OPSET, compare_within_step, drop_initializer_identities,
                              has_rule, is_int8_graph, qdq_rewrite, untranslated)
from fxopt.ir.boundary import normalize_inputs
from fxopt.ir.check import batch_of, clone_inputs, grown_inputs, run_in_eval
from fxopt.ir.tolerances import ErrorStats, compare_outputs
from fxopt.ops.int8_dynamic import LinearInt8Dynamic
from fxopt.ops.isa import int8_pairs_saturate
from fxopt.ops.schema import is_fxopt_op, schema_of

__all__ = ["export_onnx", "OnnxExport", "decompose_fused_ops", "saturation_hint", "DEFAULT_OPSET",
           "MIN_OPSET", "MAX_OPSET"]

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
    dynamic_batch: bool = False  # dim 0 of the inputs (and the outputs that follow it): "batch"
    batches: tuple[int, ...] = ()  # the batch sizes the file was run at in ONNX Runtime


def _reduced_dtypes(gm: nn.Module) -> list[str]:
    """The reduced float dtypes (bfloat16, float16) among ``gm``'s weights and buffers."""
    found = {t.dtype for t in [*gm.parameters(), *gm.buffers()]}
    return sorted(str(d).replace("torch.", "") for d in found & {torch.bfloat16, torch.float16})


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


def _engine_of(module: nn.Module, engine: str | None) -> str | None:
    if engine is None:
        target = getattr(module, "target", None)
        return target if target in ("openvino", "onnxruntime") else None
    if engine not in ("openvino", "onnxruntime"):
        raise InputError(f"engine must be 'openvino', 'onnxruntime' or None, got {engine!r}",
                         hint="name the engine the file is for, or leave it out")
    return engine


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


def _check_options(opset, check, input_names, output_names, dynamic_batch) -> None:
    if isinstance(opset, bool) or not isinstance(opset, int) or \
            not MIN_OPSET <= opset <= MAX_OPSET:
        raise InputError(f"opset must be an integer from {MIN_OPSET} to {MAX_OPSET} (what "
                         f"torch.onnx.export writes), got {opset!r}",
                         hint=f"leave it unset (opset={DEFAULT_OPSET})")
    if not isinstance(check, bool):
        raise InputError(f"check must be True or False, got {check!r}",
                         hint="check=True runs the file in ONNX Runtime; check=False does not")
    if not isinstance(dynamic_batch, bool):
        raise InputError(f"dynamic_batch must be True or False, got {dynamic_batch!r}",
                         hint="dynamic_batch=True (the default) makes dim 0 a symbolic batch; "
                              "dynamic_batch=False keeps the example inputs' shapes")
    for what, names in (("input_names", input_names), ("output_names", output_names)):
        if names is not None and (not isinstance(names, (list, tuple))
                                  or not all(isinstance(n, str) for n in names)):
            raise InputError(f"{what} must be a list of strings, got {names!r}",
                             hint=f"e.g. {what}=['{what[:-6]}']")


def _reference(module: nn.Module, inputs: tuple) -> Any:
    """The module's outputs on ``inputs`` in eval mode, as it is exported: a module left in
    training mode is switched to eval for this one call (its BatchNorm statistics are not
    updated) and every training flag is put back after, on error too."""
    return run_in_eval(module, inputs, what="the module failed on the example inputs",
                       hint="pass inputs of the shape, dtype and device the module takes (the "
                            "ones it was optimized with)")


def saturation_hint(engine: str) -> str | None:
    """For an int8 file an engine computed differently from fxopt's graph: on a CPU whose int8
    kernels add product pairs in int16 (no VNNI or AMX, ``fxopt.ops.isa``), the grids that keep
    the engine's sums exact; None elsewhere."""
    if not int8_pairs_saturate():
        return None
    return (f"this CPU has no VNNI or AMX: {engine}'s int8 kernels saturate with 8-bit weights "
            f"times 8-bit activations; quantize with QuantConfig(reduce_range='auto') (7-bit "
            f"weight grids here)")


def _mismatch_hint(step) -> str:
    """The hint of an ONNX Runtime mismatch (an int8 file: ``saturation_hint`` first)."""
    first = saturation_hint("ONNX Runtime") if step is not None else None
    return f"{first}, or export with check=False to inspect the file" if first else \
        "export with check=False to inspect the file"


def _ort_outputs(model_path: Path, inputs: tuple, other: tuple | None = None) -> tuple:
    """The file run in ONNX Runtime on ``inputs`` and, when given, on ``other`` (the second
    batch): (outputs, outputs on ``other`` or None). A file ORT refuses (an InvalidArgument or
    Fail at session creation, an error while running) is an UnsupportedOpError; one that runs at
    the example batch only, an UnsupportedOpError that says ``dynamic_batch=False``."""
    import onnxruntime as ort

    def run(session, feed_inputs, quiet=False):
        tensors = [x for x in feed_inputs if isinstance(x, torch.Tensor)]
        feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), tensors)}
        run_options = ort.RunOptions()
        run_options.log_severity_level = 4 if quiet else 3  # a failure here is expected news
        return [torch.from_numpy(o) for o in session.run(None, feeds, run_options)]

    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # its errors come back as the exception below
        session = ort.InferenceSession(str(model_path), options,
                                       providers=["CPUExecutionProvider"])
        out = run(session, inputs)
    except Exception as e:  # noqa: BLE001 - ORT's errors are pybind classes of its own
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UnsupportedOpError(
            f"ONNX Runtime cannot run the exported file ({type(e).__name__}): {first}",
            hint="onnx.checker accepted the file but ONNX Runtime refuses it: change the "
                 "layer ORT names (e.g. a ConvTranspose2d whose output_padding is not below its "
                 "stride), or export with check=False to keep the file for another "
                 "runtime") from e
    if other is None:
        return out, None
    try:
        return out, run(session, other, quiet=True)
    except Exception as e:  # noqa: BLE001 - as above
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UnsupportedOpError(
            f"the exported file runs at the example batch {batch_of(inputs)} but ONNX Runtime "
            f"fails at batch {batch_of(other)} ({type(e).__name__}): {first}",
            hint=_FIXED_BATCH_HINT) from e


def _compare(out: list, ref: list, step: float | None) -> ErrorStats:
    ref = [r.detach().cpu().contiguous() for r in ref]
    return compare_outputs(out, ref) if not step else compare_within_step(out, ref, step)


def _bound(stats: ErrorStats, step: float | None) -> str:
    """What a failed comparison exceeded, in words."""
    if stats.reason:
        return stats.reason
    return f"rel err {stats.rel_err:.2e} > {stats.tolerance:.0e}" if not step \
        else f"max abs err {stats.max_abs:.3g} > {stats.tolerance:.3g}"


# -- the batch dimension ------------------------------------------------------------------------
_FIXED_BATCH_HINT = ("the graph holds the batch size as a constant (e.g. x.view(int(x.size(0)), "
                     "-1) or a shape computed in Python): export_onnx(..., dynamic_batch=False) "
                     "writes a file for the example batch only, or flatten with "
                     "x.flatten(1) / x.view(x.size(0), -1)")


def _outputs_list(reference: Any) -> list:
    return list(reference) if isinstance(reference, (tuple, list)) else [reference]


def _io_names(inputs: tuple, outputs: list, input_names, output_names) -> tuple[list, list]:
    """The names the file's inputs and outputs get: the user's, then input/input_1/... for the
    tensor inputs and output/output_1/... for the outputs beyond them."""
    def defaults(stem, n):
        return [stem if i == 0 else f"{stem}_{i}" for i in range(n)]

    n_in = sum(isinstance(x, torch.Tensor) for x in inputs)
    ins = list(input_names or []) + defaults("input", n_in)[len(input_names or []):]
    outs = list(output_names or [])
    if all(isinstance(o, torch.Tensor) for o in outputs):  # flat: one file output per tensor
        outs += defaults("output", len(outputs))[len(outs):]
    return ins, outs


def _dynamic_axes(inputs, in_names, ref, ref2, out_names) -> dict:
    """{name: {0: "batch"}} for the tensor inputs with a dim 0 and the outputs whose dim 0 is
    the batch (it grows with the inputs': ``ref`` at the example batch, ``ref2`` at the
    second)."""
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    axes = {name: {0: "batch"} for name, x in zip(in_names, tensors) if x.dim() > 0}
    batch, batch2 = batch_of(inputs), batch_of(grown_inputs(inputs))
    for name, o, o2 in zip(out_names, ref, ref2):
        if isinstance(o, torch.Tensor) and isinstance(o2, torch.Tensor) and o.dim() > 0 \
                and o2.dim() > 0 and (o.shape[0], o2.shape[0]) == (batch, batch2):
            axes[name] = {0: "batch"}
    return axes


def _reference_at_second_batch(module: nn.Module, inputs: tuple) -> Any:
    try:
        return _reference(module, clone_inputs(inputs))
    except InputError as e:
        raise UnsupportedOpError(
            f"the module runs at the example batch but not at batch {batch_of(inputs)}, so its "
            f"file cannot have a dynamic batch: "
            f"{e.message.replace('the module failed on the example inputs: ', '')}",
            hint="export_onnx(..., dynamic_batch=False) writes a file for the example batch "
                 "only") from e


def export_onnx(module: nn.Module, example_inputs: Any, path: str | os.PathLike, *,
                opset: int = DEFAULT_OPSET, check: bool = True,
                input_names: list[str] | None = None,
                output_names: list[str] | None = None,
                dynamic_batch: bool = True, engine: str | None = None) -> OnnxExport:
    """Export ``module`` (an ``OptimizedModule``, a ``GraphModule`` or any module) to ``path``.

    ``check``: run the file in ONNX Runtime (when installed) and raise
    ``NumericMismatchError`` if it differs from ``module`` beyond the float tolerance; the file
    is then not written. ``onnx.checker`` always runs. ``dynamic_batch``: dim 0 of the inputs
    and outputs is the symbolic ``batch`` (checked at a second batch size, see the module
    docstring); False writes the example inputs' shapes. ``engine``: the engine the file is
    for, where the faster ONNX spelling of an op differs (``"openvino"``: Hardsigmoid as
    ``Div(Clip(Add))``, which it fuses; ``"onnxruntime"``: ONNX ``HardSigmoid``, one kernel);
    default: the module's ``target`` when it is one of them, else the OpenVINO form (both
    engines run both).
    """
    import onnx

    if not isinstance(module, nn.Module):
        raise InputError(f"module must be an nn.Module, got {type(module).__name__}",
                         hint="pass the OptimizedModule that fxopt.optimize returned")
    # Every run takes copies: a forward that writes into its input (x.mul_(gate)) must change
    # neither the caller's tensors nor the inputs of the next run (the trace, ONNX Runtime).
    inputs = clone_inputs(normalize_inputs(example_inputs))
    _check_options(opset, check, input_names, output_names, dynamic_batch)
    engine = _engine_of(module, engine)
    path = _check_path(path)
    reference = _outputs_list(_reference(module, clone_inputs(inputs)))
    dynamic_batch = dynamic_batch and batch_of(inputs) is not None
    inputs2 = grown_inputs(inputs) if dynamic_batch else None
    reference2 = _outputs_list(_reference_at_second_batch(module, inputs2)) \
        if dynamic_batch else None
    in_names, out_names = _io_names(inputs, reference, input_names, output_names)
    dynamic_axes = _dynamic_axes(inputs, in_names, reference, reference2, out_names) \
        if dynamic_batch else None
    gm = _graph_module_of(module)
    notes: list[str] = []
    step = None
    if isinstance(gm, fx.GraphModule):
        export_gm, translated, kept = decompose_fused_ops(gm)
        per_token = [n.name for n in gm.graph.nodes
                     if LinearInt8Dynamic.matches(n) and LinearInt8Dynamic.of(n).per_token]
        if per_token:
            raise UnsupportedOpError(
                f"{len(per_token)} dynamic int8 layer(s) with one grid per token (e.g. "
                f"{per_token[0]}) have no ONNX form: DynamicQuantizeLinear picks one grid per "
                f"tensor", hint="optimize with QuantConfig(mode='dynamic') (per_token=False) "
                                "to export, or export the float model")
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
                with engine_friendly_symbolics(opset, enabled=engine != "onnxruntime"):
                    torch.onnx.export(export_gm, clone_inputs(inputs), str(tmp),
                                      opset_version=opset,
                                      input_names=in_names, output_names=out_names or None,
                                      dynamic_axes=dynamic_axes, dynamo=False,
                                      do_constant_folding=True)
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
        if engine != "onnxruntime":
            openvino_linear_weights(tmp)
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as e:  # noqa: BLE001 - ValidationError, InferenceError, ...
            raise UnsupportedOpError(
                f"torch.onnx.export wrote a file that onnx.checker refuses: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                hint=f"try another opset (opset={DEFAULT_OPSET} is tested), or export the "
                     f"float model (pipeline=['cleanup']) to find the op") from e
        stats, batches = None, ()
        if check:
            try:
                import onnxruntime  # noqa: F401
            except ImportError:
                notes.append("onnxruntime is not installed: the file was not run")
            else:
                try:
                    ort_out, ort_out2 = _ort_outputs(tmp, inputs, inputs2)
                except UnsupportedOpError as e:
                    low = _reduced_dtypes(export_gm)
                    if not low:
                        raise
                    raise UnsupportedOpError(
                        f"{e.message} (the module computes in {'/'.join(low)})",
                        hint="ONNX Runtime's CPU kernels have no bfloat16 matmul or conv: "
                             "export the float32 module (optimize without precision=), run "
                             "bf16 through target='openvino' with precision='bf16', or export "
                             "with check=False to keep the file for another runtime") from e
                stats = _compare(ort_out, reference, step)
                if not stats.ok:
                    raise NumericMismatchError(
                        f"ONNX Runtime's outputs differ from the fxopt module's: "
                        f"{_bound(stats, step)}",
                        pass_name="export_onnx", passes_before=[], max_abs=stats.max_abs,
                        rel_err=stats.rel_err, tolerance=stats.tolerance, node=None,
                        module_path=None, hint=_mismatch_hint(step))
                batches = (batch_of(inputs),)
                if ort_out2 is not None:
                    stats2 = _compare(ort_out2, reference2, step)
                    if not stats2.ok:
                        raise UnsupportedOpError(
                            f"the exported file matches the module at the example batch "
                            f"{batches[0]} but not at batch {batch_of(inputs2)}: "
                            f"{_bound(stats2, step)}", hint=_FIXED_BATCH_HINT)
                    batches += (batch_of(inputs2),)
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return OnnxExport(path=path, opset=opset, translated=translated, kept=kept, check=stats,
                      notes=notes, output_step=step, dynamic_batch=dynamic_batch,
                      batches=batches)
