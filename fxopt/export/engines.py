"""Engine-backed runtimes: the checked graph run by OpenVINO or ONNX Runtime on the CPU.

``fxopt.optimize(model, x, target="openvino")`` (or ``"onnxruntime"``) runs the CPU pipeline
(pruning, folding, fusion, int8 calibration and plan) and then, instead of lowering onto
PyTorch's kernels, hands the checked graph to an inference engine the user already runs:

1. ``export_onnx`` writes the graph as ONNX (float ops decomposed, int8 as QDQ, dynamic batch)
   into a temporary folder; its own ONNX Runtime run is skipped, the engine's check below is
   the one that counts.
2. The engine loads the file: ``openvino.Core().read_model`` + ``compile_model(..., "CPU")``
   with ``INFERENCE_PRECISION_HINT`` ``f32`` (``bf16`` only for ``precision="bf16"``); it
   also compiles a second file exported at the example shapes (``dynamic_batch=False``),
   which runs the calls at those shapes (static shapes are faster there), or
   ``onnxruntime.InferenceSession`` on the ``CPUExecutionProvider``; both with as many threads
   as ``torch.get_num_threads()``.
3. The engine is checked against the graph it was built from like any lowering, at the
   example batch and at one more sample (the batch is dynamic): float within the float32
   tolerance (bf16's with ``precision="bf16"``), int8 within one output step. A mismatch is a
   ``NumericMismatchError`` whose ``pass_name`` names the engine (``deploy:openvino``).

   One allowance for int8, measured: ONNX Runtime reproduces fxopt's int8 graph bit for bit,
   but OpenVINO turns each QuantizeLinear into its own FakeQuantize arithmetic, which rounds
   some codes the other way at every layer; over a ResNet-18 those add up to 3-6 output steps
   (its error against the float model is the same as fxopt's: 25.55 against 25.59 dB). So an
   int8 engine that is not within one output step passes when ``float_model`` is given and its
   relative error against the float model is at most ``INT8_ACCURACY_SLACK`` times that of the
   graph (an engine no less accurate than fxopt's int8, up to rounding); a real fault (a wrong
   scale, zero point or layout) is far outside that and still fails. Likewise for bf16: an
   engine beyond the bf16 tolerance of the float32 graph passes when it is at most
   ``INT8_ACCURACY_SLACK`` times as far from it as the graph itself run in bfloat16 (a
   12-block ViT is ~1.3e-2 from float32 in bf16, whoever computes it). An int8 model with
   ``precision="bf16"`` (OpenVINO: the layers left in float run in bf16, OpenVINO's own
   default for an NNCF model on this CPU) is held to the int8 allowance: on vit_b_16 it is
   3.9 output steps from the graph, 26.5 against the graph's 26.8 dB, and 3.5% faster than
   with float32 (61.0 against 63.2 ms, bs 1, 2 threads). ``info["check"]`` says which bound
   held (``measure``).

The result is an :class:`Engine`: called with tensors like the module (tensors out, in the
dtype and on the device of the first floating-point input). ``OptimizedModule`` keeps the
``GraphModule`` beside it for save, training and export, and runs the engine in eval mode for
inputs that need no gradient while the graph's weights are the ones it was built from
(:meth:`Engine.serves`).

    >>> eng = deploy(opt.graph_module, (x,), "openvino")
    >>> eng(x).shape, eng.info["version"], eng.info["check"]["max_abs"]

:func:`measure` times candidates (interleaved medians on the example inputs) for
``target="best"``. The default ``target="auto"`` never times anything (see ``fxopt.api``).

An engine called right after PyTorch's own ops shares the cores with them for a while:
PyTorch's OpenMP threads spin for some milliseconds after each parallel region. Measured on
this project's 2-core CPU, OpenVINO's mobilenet_v2 at bs 1 took 3.70 ms right after a PyTorch
model and 2.46 ms after a 20 ms pause. ``OMP_WAIT_POLICY=PASSIVE`` (set before PyTorch is
imported) removes the spin, but made PyTorch's own bf16 mobilenet_v2 2.3x slower (13.4 ->
31.0 ms); where a process alternates PyTorch work and engine calls on few cores, time the
pipeline as a whole.
"""
from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from fxopt.errors import InputError, NotAvailableError, NumericMismatchError, UnsupportedOpError
from fxopt.export.onnx import DEFAULT_OPSET, export_onnx, saturation_hint
from fxopt.export.qdq import compare_within_step
from fxopt.export.watch import WeightWatch
from fxopt.infra.timing import measure
from fxopt.ir.check import clone_inputs, grown_inputs, run_in_eval
from fxopt.ir.tolerances import ErrorStats, compare_outputs, rel_err

__all__ = ["ENGINES", "NOT_SERVED", "INT8_ACCURACY_SLACK", "Engine", "deploy", "installed_engines",
           "require_engine", "check_engine", "check_engine_options", "engine_version", "measure"]

INT8_ACCURACY_SLACK = 1.5

# target name -> (module to import, how a user installs it)
ENGINES: dict[str, tuple[str, str]] = {
    "openvino": ("openvino", "pip install 'fxopt[deploy]' (or: pip install openvino)"),
    "onnxruntime": ("onnxruntime", "pip install onnxruntime"),
}
_TITLES = {"openvino": "OpenVINO", "onnxruntime": "ONNX Runtime"}


def require_engine(name: str):
    """The engine's Python module, imported; ``NotAvailableError`` with a pip hint if absent."""
    module, pip = ENGINES[name]
    try:
        return __import__(module)
    except ImportError as e:
        raise NotAvailableError(f"target='{name}' runs the model on {_TITLES[name]}, which is "
                                f"not installed ({e})",
                                hint=f"{pip}; or use target='cpu'") from e


def installed_engines() -> list[str]:
    """The engines of ``ENGINES`` that import here, in table order."""
    out = []
    for name in ENGINES:
        try:
            require_engine(name)
        except NotAvailableError:
            continue
        out.append(name)
    return out


def engine_version(name: str) -> str:
    return str(getattr(require_engine(name), "__version__", "unknown"))


def check_engine_options(name: str, precision: str | None) -> None:
    """Refuse what an engine target cannot do, before anything runs: ``precision`` other than
    fp32/bf16 (bf16 on OpenVINO only). With ``quantize=``, ``precision="bf16"`` on OpenVINO
    runs the layers fxopt left in float (attention matmuls, LayerNorm, softmax, gates) in
    bf16, as OpenVINO's own default does for an NNCF model on a CPU with native bf16; its check
    is then the int8 accuracy allowance (module docstring), not one output step."""
    if precision in (None, "fp32"):
        return
    if precision != "bf16" or name != "openvino":
        raise NotAvailableError(f"precision='{precision}' is not available on target='{name}'",
                                hint="use precision='bf16' with target='openvino', or leave "
                                     "precision unset (float32)")


# -- the engines --------------------------------------------------------------------------------
def _open_openvino(files: dict[str, Path], precision: str | None, threads: int) -> Callable:
    """Two compiled models: ``files["static"]`` (the file exported at the example shapes,
    where there is one) for calls at those shapes, and ``files["dynamic"]`` for every other
    batch. OpenVINO plans static shapes ahead: 10-20% faster at bs 1 than the dynamic-batch
    file (efficientnet_b0, regnet_x_400mf int8). The dynamic file reshaped by OpenVINO is not a
    substitute: its reshape broke the int8 matching of every conv of convnext_tiny (2.4x
    slower)."""
    ov = require_engine("openvino")
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
              "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    dynamic = core.compile_model(core.read_model(str(files["dynamic"])), "CPU", config)
    requests = {"dynamic": dynamic.create_infer_request()}
    if files.get("static"):
        static = core.compile_model(core.read_model(str(files["static"])), "CPU", config)
        shapes = tuple(tuple(port.get_shape()) for port in static.inputs)
        requests[shapes] = static.create_infer_request()
    n_outputs = len(dynamic.outputs)

    def run(feeds: list) -> list:
        request = requests.get(tuple(f.shape for f in feeds))
        if request is None:
            request = requests["dynamic"]
        # Shared memory: the engine reads the caller's arrays in place, no copy (~50 us at
        # 224x224); set_input_tensor + infer() is ~60 us faster a call than infer's dict
        # dispatch. Synchronous: start_async + wait cost ~0.3 ms more a call (1 thread).
        for i, feed in enumerate(feeds):
            request.set_input_tensor(i, ov.Tensor(feed, shared_memory=True))
        request.infer()
        return [request.get_output_tensor(i).data.copy() for i in range(n_outputs)]

    # what OpenVINO compiled with: a CPU without bf16 instructions (AVX-512 BF16, AMX) runs a
    # bf16 hint in f32, and the report and the check say so
    hint = dynamic.get_property("INFERENCE_PRECISION_HINT")
    run.precision = "bf16" if "bf16" in str(hint).lower() else "f32"
    return run


def _open_onnxruntime(files: dict[str, Path], precision: str | None,
                      threads: int) -> Callable:
    ort = require_engine("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(files["dynamic"]), options,
                                   providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(feeds: list) -> list:
        return session.run(None, dict(zip(names, feeds)))

    return run


_OPEN = {"openvino": _open_openvino, "onnxruntime": _open_onnxruntime}
_STATIC_TOO = {"openvino"}  # engines also given a file at the example shapes


NOT_SERVED = object()  # Engine.serve: the graph runs this call


class Engine:
    """An ONNX file compiled by an engine, called like the module it came from.

    ``info``: the engine, its version, precision, threads, opset and the check's figures (what
    ``optimize`` puts in ``report.engine``). Immutable once built, so a deep copy of the module
    holding it shares it.
    """

    def __init__(self, name: str, run: Callable, spec: pytree.TreeSpec, n_inputs: int,
                 module: nn.Module, info: dict):
        self.name, self.info = name, info
        self._run, self._spec, self._n_inputs = run, spec, n_inputs
        self._watch(module)

    def _watch(self, module: nn.Module) -> None:
        # O(1) a call: the weights move into shared storages (fxopt.export.watch); the module
        # is the checked graph module, fxopt's own
        self._module, self._warned = module, False
        self._weights = WeightWatch(module)

    def _unchanged(self) -> bool:
        return self._weights.unchanged()

    def __deepcopy__(self, memo):
        """The compiled engine is shared; a copy made with its module watches the copy."""
        copied = memo.get(id(self._module))
        if copied is None:
            return self
        out = copy.copy(self)
        out._watch(copied)
        return out

    def __repr__(self) -> str:
        return f"Engine({self.name} {self.info.get('version', '')}, " \
               f"{self.info.get('precision', 'f32')})"

    def __call__(self, *args) -> Any:
        tensors = [x for x in args if isinstance(x, torch.Tensor)]
        if len(tensors) != len(args) or len(args) != self._n_inputs:
            raise InputError(f"the {_TITLES[self.name]} engine takes {self._n_inputs} tensor "
                             f"input(s), got {len(args)} argument(s)",
                             hint="call it with the inputs the model was optimized with")
        return self._outputs(args)

    def _outputs(self, args: tuple) -> Any:
        """The engine's outputs for tensor ``args``, in the module's output structure, on the
        inputs' device and float dtype."""
        like = next((x for x in args if x.is_floating_point()), None)
        feeds = [(x.detach().float() if x.is_floating_point() else x.detach()).cpu()
                 .contiguous().numpy() for x in args]
        outs = [torch.from_numpy(o) for o in self._run(feeds)]
        if like is not None:
            outs = [o.to(like.device, like.dtype) if o.is_floating_point() else o.to(like.device)
                    for o in outs]
        return pytree.tree_unflatten(outs, self._spec)

    def serve(self, graph_module: nn.Module, args: tuple, kwargs: dict,
              notes: list | None = None) -> Any:
        """The engine's outputs for a call with ``args``, or ``NOT_SERVED`` where the graph
        must run: inputs other than tensors, or needing a gradient, or the graph's weights no
        longer the ones the engine was built from (the same module; none written in place or
        replaced: then one warning, the engine is stale; ``fxopt.export.watch``, O(1))."""
        if not self._takes(args, kwargs):
            return NOT_SERVED
        if graph_module is not self._module or not self._unchanged():
            return self._stale(notes)
        return self._outputs(args)

    def serves(self, graph_module: nn.Module, args: tuple, kwargs: dict,
               notes: list | None = None) -> bool:
        """Whether ``serve`` would run the engine for this call (without running it)."""
        if not self._takes(args, kwargs):
            return False
        if graph_module is self._module and self._unchanged():
            return True
        self._stale(notes)
        return False

    def _takes(self, args: tuple, kwargs: dict) -> bool:
        """Tensor inputs only, as many as the file has, none needing a gradient."""
        return not kwargs and len(args) == self._n_inputs and all(
            isinstance(x, torch.Tensor) and not x.requires_grad for x in args)

    def _stale(self, notes: list | None) -> object:
        if not self._warned:
            self._warned = True
            message = (f"the weights changed since the {_TITLES[self.name]} engine was built "
                       f"(or the graph module was replaced); "
                       f"the PyTorch graph runs instead (optimize again with "
                       f"target='{self.name}' to rebuild the engine)")
            if notes is not None:
                notes.append(message)
            warnings.warn(f"fxopt: {message}", stacklevel=4)
        return NOT_SERVED


def _flat(value) -> list:
    return [t.detach().cpu() for t in pytree.tree_leaves(value)]


def _compare(out: list, ref: list, step: float | None, precision: str | None) -> ErrorStats:
    if step:
        return compare_within_step(out, ref, step)
    if precision == "bf16":
        return compare_outputs([o.to(torch.bfloat16) for o in out],
                               [r.to(torch.bfloat16) for r in ref])
    return compare_outputs(out, ref)


def _allowed(stats: ErrorStats, theirs: float, bound: float, measure: str,
             why: str) -> ErrorStats:
    """``stats`` judged by an allowance instead: the engine's error ``theirs`` against
    ``bound``; ``measure`` says which bound, ``why`` why it failed."""
    ok = theirs <= bound
    return ErrorStats(max_abs=stats.max_abs, rel_err=theirs, tolerance=bound, ok=ok,
                      dtype=measure, reason="" if ok else why)


def _as_accurate(out: list, ref: list, float_model: nn.Module | None, batch: tuple,
                 stats: ErrorStats) -> ErrorStats:
    """The int8 allowance (module docstring): ``out`` against the float model's outputs no
    worse than ``INT8_ACCURACY_SLACK`` times ``ref``'s; ``stats`` updated to say so."""
    if float_model is None or stats.reason:
        return stats
    exact = _flat(run_in_eval(float_model, clone_inputs(batch), what="the float model failed",
                              hint="pass inputs the model takes"))
    if len(exact) != len(out):
        return stats
    ours = max(rel_err(r, e) for r, e in zip(ref, exact))
    theirs = max(rel_err(o, e) for o, e in zip(out, exact))
    return _allowed(stats, theirs, INT8_ACCURACY_SLACK * ours + 1e-6,
                    f"int8: rel err vs the float model {theirs:.3g} <= {INT8_ACCURACY_SLACK} x "
                    f"fxopt's {ours:.3g} (max abs vs the graph {stats.max_abs:.3g}, "
                    f"{stats.max_abs / stats.tolerance:.1f} steps)",
                    f"rel err against the float model {theirs:.3g} > {INT8_ACCURACY_SLACK} x "
                    f"fxopt's int8 {ours:.3g}, and max abs {stats.max_abs:.3g} > one output "
                    f"step {stats.tolerance:.3g}")


def _as_accurate_bf16(out: list, ref: list, module: nn.Module, batch: tuple,
                      stats: ErrorStats) -> ErrorStats:
    """The bf16 allowance: ``out`` (the engine at bf16) against the float32 graph's ``ref`` no
    worse than ``INT8_ACCURACY_SLACK`` times the graph itself run in bfloat16 (what
    ``precision="bf16"`` on fxopt's own path computes; its passes are checked in bf16 against
    a bf16 reference, never against float32). A 12-block ViT in bf16 is ~1.3e-2 from float32
    whoever computes it: OpenVINO's static-shape attention kernels were 1.31e-2 off, PyTorch's
    bf16 of the same graph about as far. ``stats`` updated to say which bound held."""
    if stats.reason:
        return stats
    try:
        low = copy.deepcopy(module).to(torch.bfloat16)
        cast = tuple(x.to(torch.bfloat16) if x.is_floating_point() else x for x in batch)
        ours_out = _flat(run_in_eval(low, clone_inputs(cast), what="the graph failed in bf16",
                                     hint="optimize with target='cpu' to see why"))
    except Exception:  # noqa: BLE001 - no bf16 reference: the plain bound stands
        return stats
    if len(ours_out) != len(ref):
        return stats
    ours = max(rel_err(o.float(), r) for o, r in zip(ours_out, ref))
    theirs = max(rel_err(o, r) for o, r in zip(out, ref))
    return _allowed(stats, theirs, max(INT8_ACCURACY_SLACK * ours, stats.tolerance),
                    f"bf16: rel err vs the float32 graph {theirs:.3g} <= {INT8_ACCURACY_SLACK} x "
                    f"the graph's own in bfloat16 {ours:.3g}",
                    f"rel err {theirs:.3g} against the float32 graph > {INT8_ACCURACY_SLACK} x "
                    f"the graph's own in bfloat16 ({ours:.3g}) and > {stats.tolerance:.0e}")


def check_engine(engine: Engine, module: nn.Module, inputs: tuple, *,
                 float_model: nn.Module | None = None) -> dict:
    """The engine against ``module`` at the example batch and one more sample (float: the
    tolerance of its precision; int8: one output step, or the allowance of the module
    docstring); the figures of the worse, or ``NumericMismatchError`` naming the engine."""
    title = _TITLES[engine.name]
    step = engine.info.get("output_step")
    precision = engine.info.get("asked_precision") or engine.info.get("precision")
    worst, batches = ErrorStats(), []
    for batch in (inputs, grown_inputs(inputs)):
        ref = _flat(run_in_eval(module, clone_inputs(batch), what="the graph failed",
                                hint="optimize with target='cpu' to see why"))
        with torch.no_grad():
            out = _flat(engine(*clone_inputs(batch)))
        stats = _compare(out, ref, step, precision)
        if step and not stats.ok:
            stats = _as_accurate(out, ref, float_model, batch, stats)
        elif precision == "bf16" and not stats.ok:
            stats = _as_accurate_bf16(out, ref, module, batch, stats)
        batches.append(int(batch[0].shape[0]) if batch[0].dim() else 1)
        if not stats.ok:
            bound = stats.reason or (f"max abs err {stats.max_abs:.3g} > one output step "
                                     f"{stats.tolerance:.3g}" if step else
                                     f"rel err {stats.rel_err:.2e} > {stats.tolerance:.0e}")
            grids = saturation_hint(title) if step else None  # int8 on a CPU without VNNI
            raise NumericMismatchError(
                f"{title}'s outputs differ from the checked graph's at batch {batches[-1]}: "
                f"{bound}", pass_name=f"deploy:{engine.name}", passes_before=[],
                max_abs=stats.max_abs, rel_err=stats.rel_err, tolerance=stats.tolerance,
                node=None, module_path=None,
                hint=(f"{grids}; or " if grids else "") + "use target='cpu' (fxopt's own "
                     "kernels), or export the file with fxopt.export_onnx and report the "
                     "engine's difference")
        if stats.max_abs >= worst.max_abs or not worst.dtype:
            worst = stats
    return {"max_abs": worst.max_abs, "rel_err": worst.rel_err, "tolerance": worst.tolerance,
            "measure": worst.dtype, "batches": batches}


def deploy(module: nn.Module, inputs: tuple, name: str, *, precision: str | None = None,
           threads: int | None = None, float_model: nn.Module | None = None) -> Engine:
    """``module`` (the checked ``GraphModule``) exported to ONNX, compiled by engine ``name``
    (a key of ``ENGINES``) and checked against ``module`` on ``inputs`` (a tuple of tensors).
    ``float_model``: the model before quantization, for the int8 allowance (module docstring);
    it is run in eval mode without gradients and not changed."""
    if name not in ENGINES:
        raise InputError(f"unknown engine {name!r}", hint=f"choose one of {tuple(ENGINES)}")
    require_engine(name)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise NotAvailableError(f"target='{name}' needs tensor inputs only (the file takes "
                                f"tensors; other arguments would be baked in)",
                                hint="pass tensors as example inputs, or use target='cpu'")
    threads = threads or torch.get_num_threads()
    reference = run_in_eval(module, clone_inputs(inputs), what="the graph failed",
                            hint="optimize with target='cpu' to see why")
    leaves, spec = pytree.tree_flatten(reference)
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        raise NotAvailableError(f"target='{name}' needs a model whose outputs are tensors "
                                f"(in tuples, lists or dicts)",
                                hint="use target='cpu'")
    title = _TITLES[name]
    with tempfile.TemporaryDirectory(prefix="fxopt-deploy-") as folder:
        files = {"dynamic": Path(folder) / "model.onnx"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # kept ops come back as the engine's refusal
            export = export_onnx(module, inputs, files["dynamic"], check=False, engine=name)
            if name in _STATIC_TOO and export.dynamic_batch:
                files["static"] = Path(folder) / "static.onnx"
                export_onnx(module, inputs, files["static"], check=False, dynamic_batch=False,
                            engine=name)
        try:
            run = _OPEN[name](files, precision, threads)
        except NotAvailableError:
            raise
        except Exception as e:  # noqa: BLE001 - the engines raise classes of their own
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UnsupportedOpError(f"{title} cannot load fxopt's ONNX file: {first}",
                                     hint="use target='cpu', or the other engine") from e
    info = {"engine": name, "version": engine_version(name), "threads": threads,
            "precision": getattr(run, "precision", "bf16" if precision == "bf16" else "f32"),
            "opset": DEFAULT_OPSET,
            "int8": export.output_step is not None, "output_step": export.output_step,
            "onnx_ops": dict(export.translated)}
    if precision == "bf16" and info["precision"] != "bf16":
        # checked against what was asked: f32 is within bf16's tolerance of the graph
        info["asked_precision"] = "bf16"
        info["note"] = (f"precision='bf16' asked, but this CPU has no bf16 instructions "
                        f"(AVX-512 BF16 or AMX): {title} runs f32")
    engine = Engine(name, run, spec, len(inputs), module, info)
    info["check"] = check_engine(engine, module, inputs, float_model=float_model)
    return engine
