"""``fxopt.optimize``: capture, run a checked pipeline, hand back an ``OptimizedModule``.

    >>> opt = fxopt.optimize(model.eval(), torch.randn(1, 3, 224, 224))
    >>> opt(x)                    # an nn.Module
    >>> print(opt.report)         # per pass: time, nodes, params, error against its reference
    >>> opt.save("model.fxopt"); same = fxopt.load("model.fxopt")

The user's model is copied once at this boundary; nothing below touches it, on success or error.
"""
from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from fxopt.errors import (FileFormatError, InputError, NotAvailableError, NumericMismatchError,
                          PipelineError, UnsupportedOpError, VerificationError)
from fxopt.export.engines import (NOT_SERVED, Engine, check_engine_options, deploy,
                                  installed_engines, measure, require_engine)
from fxopt.export.fileformat import FORMAT_VERSION, read_module, write_module
from fxopt.infra.cudagraph import MAX_GRAPHS, CudaGraphRunner
from fxopt.infra.direct import DirectRunner
from fxopt.infra.manager import CHECK_MODES, MISMATCH_MODES, Instrument, PassManager, debug_level
from fxopt.quant.config import QuantConfig
from fxopt.pipelines import ENGINE_TARGETS, FEATURE_PASSES, build_pipeline, expand_pipeline
from fxopt.infra.registry import PASSES, PassContext
from fxopt.infra.report import ModelStats, Report
from fxopt.infra.validate import (calibration_arg, choice_arg, concrete_args_arg,
                                  instruments_arg, leaf_modules_arg, names_arg, pipeline_arg)
from fxopt.ir.boundary import (check_model, check_static_shapes, copy_model,
                                normalize_inputs, static_input_shapes)
from fxopt.ir.export_capture import CAPTURE_METHODS, capture_with
from fxopt.ir.check import clone_inputs, conditioning_floors, seeded
from fxopt.ir.graph import count_bytes, count_nodes, count_params
from fxopt.ir.metrics import count_macs
from fxopt.ir.precision import finish_cpu_precision, resolve_precision, to_precision
from fxopt.ops.triton import triton_on_cpu
from fxopt.ir.tolerances import compare_outputs, strict_fp32

__all__ = ["optimize", "OptimizedModule", "load", "TARGETS", "FORMAT_VERSION"]

# "auto": cpu or cuda from the inputs' device, never by timing (a timed default would make every
# run nondeterministic and could hand back an engine, which does not train); "best" times fxopt's
# cpu path and each installed engine (ENGINE_TARGETS) and keeps the fastest.
TARGETS = ("auto", "cpu", "cuda") + ENGINE_TARGETS + ("best",)

class OptimizedModule(nn.Module):
    """The optimized model: an ``nn.Module`` holding the ``GraphModule`` and the report.

    With an ``engine`` (``target="openvino"``/``"onnxruntime"``, ``fxopt.export.engines``) the
    engine runs the calls in eval mode whose inputs need no gradient; in training mode, for
    inputs that need a gradient, or once the graph's weights changed, the graph runs."""

    def __init__(self, graph_module: fx.GraphModule, report: Report, target: str = "cpu",
                 engine: Engine | None = None):
        super().__init__()
        self.graph_module = graph_module
        self.report = report
        self.target = target
        self.cuda_graphs: CudaGraphRunner | None = None  # see with_cuda_graphs
        self.engine = engine
        self.direct = DirectRunner(report.notes)  # fxopt ops called past the dispatcher
        # a graph torch.export specialized (capture="export", or leaves inlined through it)
        # runs only at its example shapes: anything else is a typed error, checked per call
        self.static_shapes = (report.capture or {}).get("input_shapes")
        self.train(False)  # an inference module: optimize(opt, x) and check_model accept it

    def __copy__(self) -> "OptimizedModule":
        # copy.copy and copy.deepcopy keep what pickling leaves behind (they would go through
        # __getstate__): a shallow copy shares everything, as nn.Module's does
        new = type(self).__new__(type(self))
        new.__setstate__(dict(self.__dict__))
        return new

    def __deepcopy__(self, memo: dict) -> "OptimizedModule":
        # the engine is shared, the copy watching its own weights (Engine.__deepcopy__)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(dict(self.__dict__), memo))
        return new

    def __getstate__(self) -> dict:
        # torch.save of the whole module (pickle): an engine (a compiled OpenVINO model, an ONNX
        # Runtime session) and CUDA graphs do not pickle. The module is saved without them, as
        # fxopt.save writes it: the loaded module runs the graph (for an engine, a warning here).
        state = dict(self.__dict__)
        if state.get("engine") is not None:
            warnings.warn(f"fxopt: pickling an OptimizedModule leaves its {self.engine.name} "
                          f"engine behind: the loaded module runs the PyTorch graph (optimize "
                          f"it again with target='{self.engine.name}' to run it there)",
                          stacklevel=2)
            state["engine"] = None
        state["cuda_graphs"] = None
        return state

    def forward(self, *args, **kwargs):
        if self.static_shapes is not None:
            check_static_shapes(self.static_shapes, args)
        if self.engine is not None and not self.training:
            out = self.engine.serve(self.graph_module, args, kwargs, self.report.notes)
            if out is not NOT_SERVED:
                return out
        if torch.is_grad_enabled():
            return self.graph_module(*args, **kwargs)
        if self.cuda_graphs is not None:
            return self.cuda_graphs(*args, **kwargs)
        return self._forward_no_grad(*args, **kwargs)

    def _forward_no_grad(self, *args, **kwargs):
        # No gradient wanted (torch.no_grad): skip the autograd layer, which every fxopt op has
        # (its gradient formula) and which costs ~13 us a call even when no gradient is taken:
        # 0.53 -> 0.43 ms on 8 fused convs at 8x8 (one thread). inference_mode skips it anyway.
        # The CPU kernels are called directly where that is safe (fxopt.infra.direct).
        with torch._C._AutoDispatchBelowAutograd():
            return self.direct(self.graph_module, args, kwargs)

    def with_cuda_graphs(self, enabled: bool = True, *,
                         max_graphs: int = MAX_GRAPHS) -> "OptimizedModule":
        """This module, replayed from CUDA graphs for static shapes (``fxopt.infra.cudagraph``).

            >>> fast = fxopt.optimize(model, x, target="cuda").with_cuda_graphs()
            >>> with torch.no_grad(): y = fast(x)   # captured on the first call, then replayed

        A method rather than an ``optimize`` flag: graphs are a way to *run* the module, not
        part of what optimize computes, so turning them on needs no second ``optimize``, works
        on ``fxopt.load``'s modules too, and the file format is untouched (``save`` writes the
        graph; a loaded module runs without graphs until this is called again).

        Returns a new ``OptimizedModule`` sharing this one's graph and weights (no copy); this
        one is unchanged. One graph per input signature (shape, stride, dtype), up to
        ``max_graphs``; the results are clones of the graph's static outputs. Graphs serve only
        calls without gradients (``torch.no_grad`` / ``inference_mode``); with gradients
        enabled the module runs as before. Any capture failure falls back to the plain module
        (one warning, one line in ``report.notes``), never a wrong result. ``enabled=False``
        gives the module without graphs. Needs a module optimized with ``target="cuda"``.
        """
        if not isinstance(enabled, bool):
            raise InputError(f"with_cuda_graphs(enabled=...) must be True or False, not "
                             f"{type(enabled).__name__}", hint="pass enabled=True or False")
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise InputError(f"max_graphs must be a positive int, not {max_graphs!r}",
                             hint=f"pass max_graphs={MAX_GRAPHS} (the default) or another int "
                                  f">= 1")
        if enabled and self.target != "cuda":
            raise PipelineError(f"CUDA graphs need a module optimized for target='cuda'; this "
                                f"one is target={self.target!r}",
                                hint="optimize with target='cuda' (on a CUDA machine), or run "
                                     "this module without with_cuda_graphs()")
        if enabled and not torch.cuda.is_available():
            raise PipelineError("CUDA graphs need a CUDA device; none is available",
                                hint="run on a CUDA machine, or without with_cuda_graphs()")
        out = OptimizedModule(self.graph_module, Report.from_dict(self.report.to_dict()),
                              self.target)
        if enabled:
            out.cuda_graphs = CudaGraphRunner(out._forward_no_grad, max_graphs=max_graphs,
                                              notes=out.report.notes)
        return out

    @property
    def code(self) -> str:
        return self.graph_module.code

    def save(self, path: str | Path) -> Path:
        """Write the module (graph, weights, report) to ``path``; ``fxopt.load`` restores it.

        The file holds data only, no pickle (``fxopt.export.fileformat``): loading it never runs
        code from it. A module that cannot be written as data raises ``FileFormatError``.
        """
        return write_module(path, self.graph_module, target=self.target,
                            report=self.report.to_dict())


def load(path: str | Path, *, modules: Iterable[type] = ()) -> OptimizedModule:
    """Restore a module written by ``OptimizedModule.save`` (outputs are bitwise the same).

    Nothing in the file is run: its graph names only allowlisted torch functions and torch.nn
    module classes. ``modules``: your own leaf module classes the file may name (your code, not
    the file's). A malformed, old (pickle) or unsafe file raises ``FileFormatError``.
    """
    saved = read_module(path, modules=modules)
    try:
        report = Report.from_dict(saved.report)
    except (TypeError, ValueError, KeyError) as e:
        raise FileFormatError(f"{path}: the saved report is malformed ({e})",
                              hint="save the module again with OptimizedModule.save") from e
    return OptimizedModule(saved.graph_module, report, saved.target)


def _resolve_target(target: str, inputs: tuple) -> str:
    choice_arg(target, "target", TARGETS)
    if target in ENGINE_TARGETS:
        require_engine(target)  # NotAvailableError with the pip hint, before anything runs
    on_cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs)
    if target == "auto":
        return "cuda" if on_cuda else "cpu"
    if target == "cuda" and not torch.cuda.is_available():
        raise PipelineError("target='cuda' but no CUDA device is available",
                            hint="use target='cpu' (or 'auto')")
    return target


def _check_dynamic_batch(dynamic_batch: Any, inputs: tuple) -> None:
    if not isinstance(dynamic_batch, bool):
        raise InputError(f"dynamic_batch must be True or False, got {dynamic_batch!r}",
                         hint="dynamic_batch=True keeps dim 0 symbolic in a torch.export capture")
    small = [tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor) and x.dim()
             and x.shape[0] < 2]
    if dynamic_batch and small:
        raise InputError(f"dynamic_batch=True needs example inputs with a batch of at least 2, "
                         f"got shapes {small}: torch.export specializes a size-1 dimension",
                         hint="pass an example batch of 2 or more, e.g. torch.cat([x, x])")


def optimize(model: nn.Module, example_inputs: Any, *, pipeline: str | Sequence[str] | None = None,
             passes: Sequence[str] | None = None, disable: Iterable[str] = (), target: str = "auto",
             precision: str | None = None, prune: Any = None, quantize: Any = None,
             calibration_data: Any = None,
             check: str = "each", on_mismatch: str = "raise", leaf_modules: Iterable = (),
             concrete_args: dict | None = None,
             instruments: Sequence[Instrument] = (), capture: str = "auto",
             dynamic_batch: bool = False) -> OptimizedModule:
    """Optimize a copy of ``model`` for inference; every pass is checked against its reference.

    ``pipeline``: a name from ``fxopt.PIPELINES`` (default ``"default"``) or a list of pass names;
    ``passes``: pass names appended to it; ``disable``: pass or group names to skip (each one
    name or a list of names).
    ``prune=`` / ``quantize=`` / ``calibration_data=``: pruning ratio or config, ``"int8"`` or a
    config, and the batches to calibrate on. ``check``: ``"each"`` (default), ``"end"``,
    ``"none"``; ``on_mismatch``: ``"raise"``, ``"rollback"``, ``"warn"``.
    ``precision``: ``"fp16"``, ``"bf16"`` or ``"fp32"``, the dtype the model is converted to first
    (``target="cuda"``, or ``"bf16"`` on a CPU with native bf16, where the module still takes
    and returns float32; see ``fxopt.ir.precision``); with ``target="cuda"`` the pipeline ends with
    ``lower_to_triton`` (the fused and int8 ops onto the Triton kernels).

    ``target``: ``"auto"`` (default: ``"cuda"`` for inputs on a CUDA device, else ``"cpu"``;
    never chosen by timing, so the default is deterministic and its result trains), ``"cpu"``,
    ``"cuda"``, ``"openvino"`` / ``"onnxruntime"`` (the CPU pipeline, then the checked graph
    exported to ONNX and run by that engine behind the same module; the graph stays inside
    for save, training and export; ``precision="bf16"`` is OpenVINO's inference precision
    there; ``fxopt.export.engines``), or ``"best"``: fxopt's ``"cpu"`` path and each installed
    engine, timed briefly on the example inputs, the fastest kept (``report.engine["timings_ms"]``).
    ``capture``: ``"auto"`` (default: symbolic trace, untraceable submodules as leaves, and
    torch.export when those would hide over half the parameters), ``"symbolic_trace"`` or
    ``"export"`` (``fxopt.ir.export_capture``); ``report.capture`` says what was done.
    torch.export specializes the graph to the example inputs' shapes; the module then refuses
    any other shape with an ``InputError``. ``dynamic_batch=True`` exports dim 0 of every tensor
    input as a symbolic batch instead (the example batch must be at least 2: torch.export
    specializes a size-1 dim); a symbolically traced graph takes any batch either way.
    """
    if target == "best":
        return _optimize_best(model, example_inputs, dict(
            pipeline=pipeline, passes=passes, disable=disable, precision=precision, prune=prune,
            quantize=quantize, calibration_data=calibration_data, check=check,
            on_mismatch=on_mismatch, leaf_modules=leaf_modules, concrete_args=concrete_args,
            instruments=instruments, capture=capture, dynamic_batch=dynamic_batch))
    from fxopt import ops  # noqa: F401 - the fxopt op namespace
    from fxopt import passes as _passes  # noqa: F401 - registers the built-in passes

    t_start = time.perf_counter()
    check_model(model)
    if isinstance(model, OptimizedModule):
        model = model.graph_module  # optimize again: trace the graph, not the (*args) wrapper
    # Copies: no run inside optimize may write into the caller's tensors (x.mul_ in forward).
    inputs = clone_inputs(normalize_inputs(example_inputs))
    pipeline, extra, disable, leaf_modules, concrete_args, instruments = _check_options(
        model, inputs, pipeline, passes, disable, check, on_mismatch, leaf_modules,
        concrete_args, instruments, calibration_data)
    choice_arg(capture, "capture", CAPTURE_METHODS)
    _check_dynamic_batch(dynamic_batch, inputs)
    target = _resolve_target(target, inputs)
    engine_target = target in ENGINE_TARGETS
    if engine_target:  # the precision is the engine's; the pipeline runs in float32
        check_engine_options(target, precision)
    dtype = resolve_precision(None if engine_target else precision, target, quantize,
                              reduced_on_cpu=triton_on_cpu())
    configs = []
    for feature, value in (("prune", prune), ("quantize", quantize)):
        if value is None:
            continue
        info = PASSES.get(FEATURE_PASSES[feature])
        if info is None:
            raise NotAvailableError(f"{feature}= is not available in this build of fxopt",
                                    hint=f"leave {feature}= unset; it needs the "
                                         f"'{FEATURE_PASSES[feature]}' pass")
        configs.append(info.config.coerce(value))  # the pass's typed config
    if calibration_data is not None and quantize is None and prune is None:
        raise InputError("calibration_data was given but neither quantize= nor prune= was",
                         hint="pass quantize='int8' (or prune= with importance='taylor') with "
                              "it, or drop calibration_data")
    names = build_pipeline("default" if pipeline is None else pipeline, target=target,
                           prune=prune is not None, quantize=quantize is not None,
                           passes=extra, disable=disable)
    steps = expand_pipeline(names, disable=disable)
    manager = PassManager(steps, check=check, on_mismatch=on_mismatch, instruments=instruments)

    work = copy_model(model)  # the one copy: nothing below can reach the user's model
    user_inputs = inputs
    work, inputs, calibration_data, precision_notes = to_precision(work, inputs, calibration_data,
                                                                   dtype)
    # Checks on CUDA compare float32 math, not TF32 rounding (see tolerances.strict_fp32).
    with strict_fp32(target == "cuda"):
        t0 = time.perf_counter()
        # The capture is checked against eager like a pass (CaptureError naming the cause).
        captured = capture_with(capture, work, inputs, leaf_modules=leaf_modules,
                                concrete_args=concrete_args, check=manager.check != "none",
                                pristine=model, dynamic_batch=dynamic_batch)
        gm, eager_out = captured.gm, captured.eager_output
        # Only when a comparison fails: how much this model amplifies its own rounding.
        manager.conditioning = lambda: conditioning_floors(model, user_inputs, eager_out,
                                                           concrete_args)
        report = Report(target=target, capture_time_s=time.perf_counter() - t0)
        report.notes.extend(precision_notes + captured.notes)
        report.capture = {"method": captured.method, "inlined": captured.inlined,
                          "opaque": [leaf.to_dict() for leaf in captured.leaves]}
        if captured.method == "export" or captured.inlined:  # sizes baked in: guarded
            report.capture["input_shapes"] = static_input_shapes(
                inputs, dynamic_batch=captured.dynamic_batch and not captured.inlined)
        report.before = _model_stats(gm)
        ctx = PassContext(example_inputs=inputs, target=target, configs=configs,
                          calibration_data=calibration_data, original=model, debug=debug_level())
        # Issue 15: no name here keeps the captured graph alive while the passes run, so the
        # weights a pass replaces (fold_bn, prune_channels, the int8 rewrite) are freed once it
        # is done, not held to the end beside their replacements (a second copy of the model
        # at the int8 pass's peak). The graph goes to the manager as a value, not a name.
        held = [gm]
        del work, captured, gm
        gm, report = manager.run(held.pop(), ctx, report)
        report.after = _model_stats(gm)
        with torch.no_grad(), seeded(inputs):
            final_out = gm(*clone_inputs(inputs))
        if manager.last_output is not None:
            # The module's generated code must compute what the checked graph computed.
            stale = compare_outputs(final_out, manager.last_output)
            if not stale.ok:
                raise VerificationError(
                    f"the final module's code does not compute what its graph computes (rel err "
                    f"{stale.rel_err:.2e})",
                    pass_name=report.passes[-1].name if report.passes else "",
                    problems=["stale code"], hint="a pass changed the graph without gm.recompile()")
        final = compare_outputs(final_out, eager_out)
        exact_only = all(PASSES[r.name.split("/")[-1]].reference == "exact" for r in report.passes
                         if r.modified)
        if check != "none" and exact_only and not final.ok and not final.reason \
                and manager.floors() is not None:
            final = compare_outputs(final_out, eager_out, manager.floors())
        report.final_max_abs_err, report.final_rel_err = final.max_abs, final.rel_err
        if check != "none" and exact_only and not final.ok:
            _final_mismatch(final, report, on_mismatch, check)
        if dtype == torch.bfloat16 and target == "cpu" and not triton_on_cpu():
            # bf16 on the CPU: float32 in, float32 out (casts at the boundary; ir/precision.py)
            report.notes.extend(finish_cpu_precision(gm, dtype, user_inputs, model))
    engine = None
    if engine_target:
        engine = deploy(gm, inputs, target, precision=precision, float_model=model)
        report.engine = dict(engine.info)
    report.total_time_s = time.perf_counter() - t_start
    return OptimizedModule(gm, report, target, engine)


def _float_model(model: nn.Module) -> nn.Module:
    return model.graph_module if isinstance(model, OptimizedModule) else model


def _optimize_best(model: nn.Module, example_inputs: Any, options: dict) -> OptimizedModule:
    """``target="best"``: fxopt's cpu path and each installed engine, timed on the example
    inputs; the fastest, with the timings in its report. An engine that cannot take the model
    is left out with a note. One pipeline run serves all engines, except with ``quantize``: the
    int8 plan depends on the target (zero-point-0 grids on OpenVINO), so each engine gets its
    own."""
    inputs = clone_inputs(normalize_inputs(example_inputs))
    data = options["calibration_data"]
    if data is not None and iter(data) is data:  # an iterator: read once, used by each run
        options = dict(options, calibration_data=list(data))
    found, notes, shared = {}, [], None
    try:
        found["cpu"] = optimize(model, example_inputs, target="cpu", **_fastest_cpu(options))
    except (NotAvailableError, PipelineError) as e:  # e.g. a precision the cpu path lacks
        if not installed_engines():
            raise
        notes.append(f"target='best': cpu left out: {e.message}")
    for name in installed_engines():
        try:
            if shared is None or options["quantize"] is not None:
                found[name] = optimize(model, example_inputs, target=name, **options)
                shared = shared or found[name]
                continue
            check_engine_options(name, options["precision"])
            engine = deploy(shared.graph_module, inputs, name, precision=options["precision"],
                            float_model=_float_model(model))
        except (NotAvailableError, NumericMismatchError, UnsupportedOpError) as e:
            notes.append(f"target='best': {name} left out: {e.message}")
            continue
        report = Report.from_dict(shared.report.to_dict())
        report.target, report.engine = name, dict(engine.info)
        found[name] = OptimizedModule(shared.graph_module, report, name, engine)
    if not found:
        raise NotAvailableError("target='best' found no path that takes this model: "
                                + "; ".join(notes), hint="use target='cpu' to see why")
    timings = measure(found, inputs)
    best = min(timings, key=timings.get)
    chosen = found[best]
    chosen.report.engine = dict(chosen.report.engine, chosen_by="best",
                                timings_ms={k: round(v, 3) for k, v in timings.items()})
    chosen.report.notes.extend(notes + [
        "target='best': " + ", ".join(f"{k} {v:.2f} ms" for k, v in timings.items())
        + f" (median on the example inputs); {best} kept"])
    return chosen


def _fastest_cpu(options: dict) -> dict:
    """``options`` for ``target="best"``'s cpu path: an int8 config's ``cpu_engine="auto"`` as
    ``"fastest"`` (both lowerings timed, the faster kept), as the engines are timed."""
    if options.get("quantize") is None:
        return options
    config = QuantConfig.coerce(options["quantize"])
    if config.mode != "static" or config.cpu_engine != "auto":
        return options
    return dict(options, quantize=dataclasses.replace(config, cpu_engine="fastest"))


def _check_options(model, inputs, pipeline, passes, disable, check, on_mismatch, leaf_modules,
                   concrete_args, instruments, calibration_data):
    """``optimize``'s options checked and normalized before anything runs (infra/validate.py):
    (pipeline, passes, disable, leaf_modules, concrete_args, instruments)."""
    choice_arg(check, "check", CHECK_MODES)
    choice_arg(on_mismatch, "on_mismatch", MISMATCH_MODES)
    calibration_arg(calibration_data, inputs)
    return (pipeline_arg(pipeline), names_arg(passes, "passes"), names_arg(disable, "disable"),
            leaf_modules_arg(leaf_modules), concrete_args_arg(model, concrete_args),
            instruments_arg(instruments))


def _final_mismatch(final, report: Report, on_mismatch: str, check: str) -> None:
    """The optimized model differs from eager beyond the tolerance, though every pass was within
    it of the graph before (errors that add up): an error, a warning with on_mismatch='warn' or
    'rollback' (the passes that were kept are the user's choice)."""
    detail = final.reason or (f"rel err {final.rel_err:.2e} (max abs {final.max_abs:.2e}) "
                              f"exceeds the {final.dtype} tolerance {final.tolerance:.0e}")
    message = f"the optimized model differs from the eager model on the example inputs: {detail}"
    if on_mismatch != "raise":
        report.notes.append(message)
        warnings.warn(f"fxopt: {message}", stacklevel=3)
        return
    raise NumericMismatchError(
        message + "; each pass was within tolerance of the graph before it, their sum is not",
        pass_name="(pipeline)", passes_before=report.pipeline, max_abs=final.max_abs,
        rel_err=final.rel_err, tolerance=final.tolerance, node=None, module_path=None,
        hint="run with check='each' to name the pass that changed the numbers" if check == "end"
        else "disable passes (disable=[...]) until it matches, or pass on_mismatch='warn' to "
             "keep the model with a warning; FXOPT_DEBUG=1 shows each pass's error")


def _model_stats(gm: fx.GraphModule) -> ModelStats:
    return ModelStats(params=count_params(gm), macs=count_macs(gm), bytes=count_bytes(gm),
                      nodes=count_nodes(gm))
