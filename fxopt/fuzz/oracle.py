"""The oracles: what must hold for every generated network, each check run on its own.

    >>> result = check_network(generate(5), checks=("default", "save"))
    >>> [(c.check, c.outcome) for c in result.checks]
    [('default', 'ok'), ('save', 'ok')]

Checks (each on a fresh build of the network; eager is run on copies of the inputs, so a
network that writes into its input still has a clean reference):

- ``default``: ``fxopt.optimize(model, x)`` equals eager on ``x`` and on held-out batches
  (``compare_outputs``: the float tolerance), and leaves the user's model and ``x`` bitwise
  untouched.
- ``prune``: ``optimize(model, x, prune=prune_config(net))`` (a ratio, scope, criterion, ratio
  kind and rounding drawn from the seed) equals the pass's own reference (the graph that
  reached ``prune_channels`` with the removed channels masked to zero: the pass is run again,
  through the public registry, on the graph an ``Instrument`` saw) on held-out batches, not only
  on ``x`` where the manager already checked it.
- ``int8``: ``quantize="int8"`` with calibration batches from the generator; the SQNR against
  eager on held-out batches is at least ``SQNR_FLOOR_DB``, or fxopt said why (a warning or a
  report note that names the SQNR).
- ``save``: ``OptimizedModule.save`` then ``fxopt.load`` gives bitwise equal outputs (the float
  model, and the int8 one when ``int8`` ran).
- ``onnx``: ``fxopt.export_onnx`` (a dynamic batch; a network that fixes its batch is refused
  with the ``dynamic_batch=False`` hint, and then exported so) then a real ONNX Runtime session
  equals the module on held-out batches within the float tolerance.

Outcomes: ``ok``; ``refused`` (a typed, documented refusal: an ``FxoptError`` of a refusal class
with a hint); ``caught`` (an ``FxoptError`` that reports a bug fxopt found in itself: a pass's
numeric mismatch, a broken graph, a crashing pass, or a typed error without a hint);
``untyped`` (any other exception); ``mismatch`` (no error, wrong result); ``low_sqnr`` (int8
under the floor, nothing said); ``skipped`` (a check it depends on did not give a module).
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
import random
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx

import fxopt
from fxopt.fuzz.emit import batches, build, example_input
from fxopt.fuzz.grammar import Network
from fxopt.ir.tolerances import compare_outputs
from fxopt.quant.measure import sqnr_db

__all__ = ["CHECKS", "OUTCOMES", "FAILURES", "SQNR_FLOOR_DB", "CheckResult", "NetworkResult",
           "check_network", "classify", "run_check", "prune_config"]

CHECKS = ("default", "prune", "int8", "save", "onnx")
OUTCOMES = ("ok", "refused", "caught", "untyped", "mismatch", "low_sqnr", "skipped")
FAILURES = ("caught", "untyped", "mismatch", "low_sqnr")
SQNR_FLOOR_DB = 15.0
HELD_OUT = 3
CALIBRATION = 6
REFUSALS = (fxopt.UnsupportedOpError, fxopt.PreconditionError, fxopt.NotAvailableError,
            fxopt.CaptureError, fxopt.InputError, fxopt.ModelTypeError, fxopt.PipelineError)


@dataclass
class CheckResult:
    check: str
    outcome: str
    detail: str = ""
    seconds: float = 0.0


@dataclass
class NetworkResult:
    seed: int
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if c.outcome in FAILURES]


class _Mismatch(Exception):
    """Raised inside a check: the result is wrong and fxopt said nothing."""


class _LowSqnr(Exception):
    pass


def classify(err: BaseException) -> tuple[str, str]:
    """(outcome, one-line detail) of an exception raised by fxopt's public API."""
    if isinstance(err, _Mismatch):
        return "mismatch", str(err)
    if isinstance(err, _LowSqnr):
        return "low_sqnr", str(err)
    first = str(err).splitlines()[0] if str(err) else ""
    if isinstance(err, fxopt.FxoptError):
        if isinstance(err, REFUSALS) and err.hint:
            return "refused", f"{type(err).__name__}: {first}"
        why = "" if err.hint else " (no hint)"
        return "caught", f"{type(err).__name__}{why}: {first}"
    where = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    at = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
    return "untyped", f"{type(err).__name__}{at}: {first}"


def prune_config(net: Network) -> fxopt.PruneConfig:
    """The pruning settings the ``prune`` check uses for ``net`` (drawn from its seed)."""
    r = random.Random(net.seed * 31 + 17)
    return fxopt.PruneConfig(ratio=r.choice((0.25, 0.5, 0.5, 0.75)),
                             by=r.choice(("channels", "channels", "macs")),
                             importance=r.choice(("l1", "l1", "l2", "bn_scale", "random")),
                             scope=r.choice(("uniform", "uniform", "global")),
                             round_to=r.choice((1, 1, 2, 4)), seed=r.randrange(100))


# ---- helpers --------------------------------------------------------------------------------

def _eager(model, x: torch.Tensor):
    with torch.no_grad():
        return model(x.clone())


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, before: dict) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(
        now[k].shape == before[k].shape and torch.equal(now[k], before[k]) for k in before)


def _expect_close(what: str, out, ref) -> None:
    stats = compare_outputs(out, ref)
    if not stats.ok:
        raise _Mismatch(f"{what}: rel err {stats.rel_err:.2e} (max abs {stats.max_abs:.2e}) "
                        f"over the tolerance {stats.tolerance:.0e}"
                        + (f"; {stats.reason}" if stats.reason else ""))


@contextlib.contextmanager
def _quiet():
    """stdout and stderr closed at the file descriptors (the ONNX exporter prints the TorchScript
    graph on a failure, ONNX Runtime logs from C++): the check's outcome says what happened."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


class _Keep(fxopt.Instrument):
    """Keeps a copy of the graph that reaches one pass."""

    def __init__(self, name: str):
        self.name = name
        self.gm: fx.GraphModule | None = None

    def before_pass(self, name, gm):
        if name.split("/")[-1] == self.name and self.gm is None:
            self.gm = copy.deepcopy(gm)


# ---- the checks -----------------------------------------------------------------------------

class _Run:
    """One network's state across its checks (the optimized modules later checks reuse)."""

    def __init__(self, net: Network, tmp: Path):
        self.net = net
        self.tmp = tmp
        self.x = example_input(net)
        self.held = batches(net, HELD_OUT, stream=2)
        self.float_opt = None
        self.int8_opt = None

    def model(self):
        return build(self.net)

    def default(self) -> str:
        model = self.model()
        before, x = _state(model), self.x.clone()
        ref = _eager(model, x)
        opt = fxopt.optimize(model, x)
        if not torch.equal(x, self.x):
            raise _Mismatch("optimize() changed the example input in place")
        if not _same_state(model, before) or model.training:
            raise _Mismatch("optimize() changed the user's model")
        with torch.no_grad():
            _expect_close("optimized vs eager on the example input", opt(self.x.clone()), ref)
            for i, b in enumerate(self.held):
                _expect_close(f"optimized vs eager on held-out batch {i}", opt(b.clone()),
                              _eager(model, b))
        self.float_opt = opt
        return f"final rel err {opt.report.final_rel_err:.1e}"

    def prune(self) -> str:
        model = self.model()
        keep = _Keep("prune_channels")
        config = prune_config(self.net)
        opt = fxopt.optimize(model, self.x.clone(), prune=config, instruments=[keep])
        rec = next((r for r in opt.report.passes if r.name.endswith("prune_channels")), None)
        if keep.gm is None or rec is None:
            return "prune_channels did not run"
        ctx = fxopt.PassContext(example_inputs=(self.x.clone(),), target="cpu",
                                configs=[config], original=model)
        again = fxopt.PASSES["prune_channels"].fn(keep.gm, ctx)
        if not again.modified or again.reference is None:
            return f"nothing pruned ({rec.stats.get('pruned', 0)} groups)"
        reference = again.reference
        with torch.no_grad():
            _expect_close("pruned vs its masked reference on the example input",
                          opt(self.x.clone()), reference(self.x.clone()))
            for i, b in enumerate(self.held):
                _expect_close(f"pruned vs its masked reference on held-out batch {i}",
                              opt(b.clone()), reference(b.clone()))
        before, after = rec.params_before, rec.params_after
        return f"params {before} -> {after}"

    def int8(self) -> str:
        model = self.model()
        calib = batches(self.net, CALIBRATION, stream=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = fxopt.optimize(model, self.x.clone(), quantize="int8",
                                 calibration_data=[b.clone() for b in calib])
        self.int8_opt = opt
        with torch.no_grad():
            ref = torch.cat([_eager(model, b).reshape(-1) for b in self.held])
            out = torch.cat([opt(b.clone()).reshape(-1) for b in self.held])
        db = sqnr_db(ref, out)
        if db >= SQNR_FLOOR_DB:
            return f"held-out SQNR {db:.1f} dB"
        said = [str(w.message) for w in caught if "sqnr" in str(w.message).lower()]
        said += [n for n in opt.report.notes if "held" in n.lower() and "sqnr" in n.lower()]
        if said:
            return f"held-out SQNR {db:.1f} dB, and fxopt said: {said[0][:120]}"
        raise _LowSqnr(f"held-out SQNR {db:.1f} dB < {SQNR_FLOOR_DB} dB with no warning")

    def save(self) -> str:
        done = []
        for name, opt in (("float", self.float_opt), ("int8", self.int8_opt)):
            if opt is None:
                continue
            path = self.tmp / f"{name}.fxopt"
            opt.save(path)
            loaded = fxopt.load(path)
            with torch.no_grad():
                for i, b in enumerate([self.x] + self.held):
                    a, c = opt(b.clone()), loaded(b.clone())
                    if not torch.equal(a, c):
                        raise _Mismatch(f"{name} model after save/load differs on batch {i}: "
                                        f"max abs {float((a - c).abs().max()):.3g}")
            done.append(name)
        if not done:
            raise _Skip("no optimized module to save")
        return "bitwise: " + ", ".join(done)

    def onnx(self) -> str:
        if self.float_opt is None:
            raise _Skip("no optimized module to export")
        import onnxruntime as ort

        opt = self.float_opt
        path = self.tmp / "model.onnx"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 4
        kind = "dynamic batch"
        with _quiet():
            try:
                fxopt.export_onnx(opt, self.x.clone(), path)  # a dynamic batch by default
            except fxopt.UnsupportedOpError as e:
                if "dynamic_batch=False" not in (e.hint or ""):
                    raise
                # the network fixes its batch (the grammar writes x.reshape(N, C)): refused
                # with that hint, typed; the file with the example's batch must still be right
                fxopt.export_onnx(opt, self.x.clone(), path, dynamic_batch=False)
                kind = "fixed batch (the network fixes it)"
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            name = sess.get_inputs()[0].name
            got = [torch.from_numpy(sess.run(None, {name: b.numpy()})[0]) for b in self.held]
        with torch.no_grad():
            for i, b in enumerate(self.held):
                got_i = got[i]
                _expect_close(f"ONNX Runtime vs the module on held-out batch {i}", got_i,
                              opt(b.clone()))
        return kind


class _Skip(Exception):
    pass


def run_check(run: _Run, check: str) -> CheckResult:
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            detail = getattr(run, check)()
        outcome = "ok"
    except _Skip as e:
        outcome, detail = "skipped", str(e)
    except Exception as e:  # noqa: BLE001 - every exception is an outcome
        outcome, detail = classify(e)
    return CheckResult(check, outcome, detail, time.perf_counter() - t0)


def check_network(net: Network, checks=CHECKS) -> NetworkResult:
    """Run ``checks`` (in ``CHECKS`` order: save and onnx reuse the modules of default/int8)."""
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise fxopt.InputError(f"unknown fuzz checks {unknown}", hint=f"choose from {CHECKS}")
    result = NetworkResult(net.seed)
    with tempfile.TemporaryDirectory(prefix="fxopt-fuzz-") as tmp:
        run = _Run(net, Path(tmp))
        wanted = set(checks)
        if wanted & {"save", "onnx"}:
            wanted.add("default")  # they need its module; reported only when asked
        for check in CHECKS:
            if check in wanted:
                res = run_check(run, check)
                if check in checks:
                    result.checks.append(res)
    return result


