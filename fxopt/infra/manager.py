"""The pass manager: runs a pipeline, verifies and checks after every pass, names the culprit.

After each pass that modified the graph:
1. the structural verifier (``verify.py``) runs, and a recorded run refreshes or checks
   ``tensor_meta``;
2. with ``check="each"`` the new graph's output is compared with the pass's reference (the graph
   before it for ``reference="exact"``, the module the pass returned for ``"returned"``) under the
   tolerance table; on a mismatch the first diverging node is found from the recorded values.

A float32 comparison that fails the table tolerance is retried with the model's conditioning
allowance when the caller gave one (``conditioning``: a function returning, per output leaf,
``CONDITIONING_FACTOR`` times the model's own float32-vs-float64 spread; ``optimize`` computes
it from the eager model the first time it is needed), so an ill-conditioned model (GroupNorm
over near-constant channels) does not get a pass blamed for its own rounding noise.

A failure raises (``on_mismatch="raise"``), restores the graph from before the pass and goes on
(``"rollback"``, recorded in the report), or keeps it with a warning (``"warn"``, numeric only).

    >>> pm = PassManager(expand_pipeline("default"), check="each", on_mismatch="rollback")
    >>> # expand_pipeline: fxopt.pipelines
    >>> gm, report = pm.run(gm, ctx)

Instruments get ``before_pass``/``after_pass`` calls (``FXOPT_DEBUG=1`` logs each pass, ``=2``
also prints the graph before and after).
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import os
import time
import warnings
from typing import Any, Callable, Sequence

import torch.fx as fx

from fxopt.errors import (FxoptError, NumericMismatchError, PassError, PipelineError,
                          PreconditionError, VerificationError)
from fxopt.infra.registry import PASSES, PassContext, PassGroup, PassInfo, PassResult
from fxopt.infra.report import PassRecord, Report
from fxopt.ir.check import (RecordedRun, batch_of, clone_inputs, describe_node,
                             first_divergence, grown_inputs, record_run, seeded)
from fxopt.ir.graph import count_bytes, count_nodes, count_params, module_path
from fxopt.ir.tolerances import CONDITIONING_FACTOR, compare_outputs
from fxopt.ir.verify import verify_structure as verify_structure_fn

__all__ = ["PassManager", "Instrument", "DebugInstrument", "CHECK_MODES", "MISMATCH_MODES",
           "COLLECT_BYTES"]

log = logging.getLogger("fxopt")
CHECK_MODES = ("each", "end", "none")
MISMATCH_MODES = ("raise", "rollback", "warn")
# Models holding at least this many bytes of weights get a full garbage collection before each
# step (a collection takes ~0.2 s: noise next to a pass on such a model, not on a small one).
COLLECT_BYTES = 2 ** 28


class Instrument:
    """Hooks around every pass run (override what you need)."""

    def on_start(self, steps: Sequence[str | PassGroup]) -> None: ...
    def before_pass(self, name: str, gm: fx.GraphModule) -> None: ...
    def after_pass(self, name: str, gm: fx.GraphModule, record: PassRecord) -> None: ...
    def on_end(self, report: Report) -> None: ...


class DebugInstrument(Instrument):
    """``FXOPT_DEBUG=1``: one log line per pass; ``=2``: the graph before and after too."""

    def __init__(self, level: int):
        self.level = level
        if not log.handlers:
            h = logging.StreamHandler()
            h.setFormatter(logging.Formatter("[fxopt] %(message)s"))
            log.addHandler(h)
        log.setLevel(logging.DEBUG)

    def before_pass(self, name, gm):
        if self.level >= 2:
            log.debug("graph before %s:\n%s", name, gm.graph)

    def after_pass(self, name, gm, record):
        log.debug("%s: %s in %.1f ms, nodes %d->%d, params %d->%d, rel err %s, %s", name,
                  "modified" if record.modified else "unchanged", record.time_s * 1e3,
                  record.nodes_before, record.nodes_after, record.params_before,
                  record.params_after, record.rel_err, record.status)
        if self.level >= 2 and record.modified:
            log.debug("graph after %s:\n%s", name, gm.graph)


def debug_level() -> int:
    try:
        return int(os.environ.get("FXOPT_DEBUG", "0") or 0)
    except ValueError:
        return 0


def _signature(gm: fx.GraphModule) -> list:
    return [(n.op, str(n.target), str(n.args), str(n.kwargs)) for n in gm.graph.nodes]


class PassManager:
    def __init__(self, steps: Sequence[str | PassGroup], *, check: str = "each",
                 on_mismatch: str = "raise", instruments: Sequence[Instrument] = (),
                 conditioning: Callable[[], list[float] | None] | None = None):
        if check not in CHECK_MODES:
            raise PipelineError(f"check must be one of {CHECK_MODES}, got {check!r}")
        if on_mismatch not in MISMATCH_MODES:
            raise PipelineError(f"on_mismatch must be one of {MISMATCH_MODES}, got {on_mismatch!r}")
        self.steps = list(steps)
        self.check = check
        self.on_mismatch = on_mismatch
        self.instruments = list(instruments)
        level = debug_level()
        if level > 0:
            self.instruments.append(DebugInstrument(level))
        self._ran: list[str] = []
        self.last_output: Any = None
        self._last: RecordedRun | None = None
        self._dropped: set[str] = set()
        self.conditioning = conditioning
        self._floors: list[float] | None = None
        self._floors_known = False

    def floors(self) -> list[float] | None:
        """The conditioning allowance per output leaf (computed once, on first need)."""
        if not self._floors_known and self.conditioning is not None:
            self._floors = self.conditioning()
            self._floors_known = True
        return self._floors

    # -- running ------------------------------------------------------------------------
    def run(self, gm: fx.GraphModule, ctx: PassContext, report: Report | None = None):
        report = report or Report()
        report.pipeline = [s.name if isinstance(s, PassGroup) else s for s in self.steps]
        inputs = ctx.example_inputs
        if self.check == "each":
            self._last = record_run(gm, inputs, keep_values=True, refresh_meta=True)
        for inst in self.instruments:
            inst.on_start(self.steps)
        big = count_bytes(gm) >= COLLECT_BYTES
        for step in self.steps:
            if big:
                # A graph a pass replaced (and its weights) sits in reference cycles (fx graphs,
                # interpreters) that only the cycle collector frees; on a big model, collect
                # before each step so they do not pile up beside their replacements (issue 15:
                # regnet_y_128gf default 9.8 -> 7.9 GB resident)
                gc.collect()
            if isinstance(step, PassGroup):
                gm = self._run_group(step, gm, ctx, report)
            else:
                gm, rec = self._run_pass(step, gm, ctx, report)
                report.passes.append(rec)
        # Keep only the last checked output (the caller compares the module's code with it).
        self.last_output = self._last.output if self._last is not None else None
        self._last = None  # drop recorded activations
        if big:
            gc.collect()
        for inst in self.instruments:
            inst.on_end(report)
        return gm, report

    def _run_group(self, group: PassGroup, gm, ctx, report: Report):
        records: dict[str, PassRecord] = {}
        for it in range(group.max_iterations):
            changed = False
            for name in group.members:
                if name in self._dropped:
                    continue
                gm, rec = self._run_pass(name, gm, ctx, report, label=f"{group.name}/{name}")
                changed |= rec.modified and rec.status == "ok"
                prev = records.get(name)
                if prev is None:
                    records[name] = rec
                else:
                    _merge(prev, rec)
            if not changed:
                break
        else:
            report.notes.append(f"group '{group.name}' did not converge in {group.max_iterations} "
                                f"iterations")
        report.passes.extend(records.values())
        return gm

    def _run_pass(self, name: str, gm: fx.GraphModule, ctx: PassContext, report: Report,
                  label: str | None = None) -> tuple[fx.GraphModule, PassRecord]:
        info = PASSES[name]
        label = label or name
        self._check_requires(info, gm, ctx)
        rec = PassRecord(name=label, reference=info.reference,
                         nodes_before=count_nodes(gm), params_before=count_params(gm))
        snapshot = copy.deepcopy(gm) if self.on_mismatch == "rollback" else None
        sig = _signature(gm)
        for inst in self.instruments:
            inst.before_pass(label, gm)
        t0 = time.perf_counter()
        try:
            # Copies of the inputs: a pass that runs a graph writing into its input (x.mul_)
            # must not change what the checks run on.
            result = info.fn(gm, dataclasses.replace(
                ctx, example_inputs=clone_inputs(ctx.example_inputs)))
        except Exception as e:  # noqa: BLE001 - any pass bug is reported by pass name
            err = e if isinstance(e, FxoptError) else PassError(
                f"pass '{label}' failed: {type(e).__name__}: {e}", pass_name=label,
                hint=f"disable it with disable=['{name}'] (and please report it)")
            if snapshot is None or not isinstance(err, PassError):
                raise err from (None if err is e else e)
            # Rollback mode: a crashing pass may have half-rewritten the graph; drop it whole.
            rec.time_s = time.perf_counter() - t0
            gm = self._on_failure(err, name, snapshot, gm, rec)
            rec.nodes_after, rec.params_after = count_nodes(gm), count_params(gm)
            self._ran.append(label)
            return gm, rec
        rec.time_s = time.perf_counter() - t0
        if not isinstance(result, PassResult):
            raise PassError(f"pass '{label}' returned {type(result).__name__}, not a PassResult",
                            pass_name=label)
        new_gm = result.gm
        rec.modified = bool(result.modified)
        rec.stats = dict(result.stats)
        rec.notes = list(result.notes)
        t1 = time.perf_counter()
        try:
            if not rec.modified:
                if _signature(new_gm) != sig:
                    raise self._structural(label, ["the pass reported modified=False but changed "
                                                   "the graph"])
                rec.status = "ok" if self.check == "each" else "not checked"
            else:
                new_gm = self._verify_and_check(label, info, new_gm, result, ctx, rec)
        except (VerificationError, NumericMismatchError) as err:
            new_gm = self._on_failure(err, name, snapshot, new_gm, rec)
        rec.check_s = time.perf_counter() - t1
        rec.nodes_after = count_nodes(new_gm)
        rec.params_after = count_params(new_gm)
        self._ran.append(label)
        for inst in self.instruments:
            inst.after_pass(label, new_gm, rec)
        return new_gm, rec

    # -- checks -------------------------------------------------------------------------
    def _check_requires(self, info: PassInfo, gm: fx.GraphModule, ctx: PassContext) -> None:
        for pre in info.requires:
            problem = pre.check(gm, ctx)
            if problem is not None:
                raise PreconditionError(f"pass '{info.name}' needs {pre.doc}: {problem}",
                                        hint=pre.hint)

    def _structural(self, label: str, problems: list[str]) -> VerificationError:
        before = ", ".join(self._ran) or "none"
        return VerificationError(
            f"pass '{label}' left a broken graph: " + "; ".join(problems) +
            f" (passes before it: {before})", pass_name=label, problems=problems,
            hint=f"disable it with disable=['{label.split('/')[-1]}'] (and please report it)")

    def _verify_and_check(self, label: str, info: PassInfo, gm: fx.GraphModule,
                          result: PassResult, ctx: PassContext, rec: PassRecord) -> fx.GraphModule:
        problems = verify_structure_fn(gm, require_meta=not result.shapes_changed)
        if problems:
            raise self._structural(label, problems)
        inputs = ctx.example_inputs
        numeric = self.check == "each" and info.reference != "none"
        if not numeric and not result.shapes_changed:
            rec.status = "not checked"
            return gm
        try:
            run = record_run(gm, inputs, keep_values=numeric, refresh_meta=result.shapes_changed)
        except Exception as e:  # noqa: BLE001
            raise self._structural(
                label, [f"the graph no longer runs: {type(e).__name__}: {e}"]) from e
        if run.stale_meta:
            raise self._structural(label, ["stale tensor_meta (say shapes_changed=True): " +
                                           "; ".join(run.stale_meta[:3])])
        if result.shapes_changed:
            problems = verify_structure_fn(gm, require_meta=True)
            if problems:
                raise self._structural(label, problems)
        if not numeric:
            rec.status = "not checked"
            return gm
        if info.reference == "exact":
            ref = self._last
        else:
            if result.reference is None:
                raise PassError(f"pass '{label}' declares reference='returned' but returned none",
                                pass_name=label)
            ref_module = result.reference
            ref = record_run(ref_module, inputs, keep_values=True) if isinstance(
                ref_module, fx.GraphModule) else RecordedRun(_call(ref_module, inputs))
        stats = self._judge(run.output, ref.output, info, result, rec)
        rec.max_abs_err, rec.rel_err, rec.tolerance = stats.max_abs, stats.rel_err, stats.tolerance
        if not stats.ok:
            blame = first_divergence(gm, run.by_node, ref.values)
            raise self._mismatch(label, info, stats, blame, run)
        if info.batch_check:
            self._check_second_batch(label, info, gm, result, ctx, rec, run)
        rec.status = "ok"
        self._last = run
        return gm

    def _judge(self, out, ref_out, info: PassInfo, result: PassResult, rec: PassRecord):
        """The outputs against the reference's: the dtype's tolerance (or this model's own
        float32 rounding), or the pass's absolute bound where it states one."""
        stats = compare_outputs(out, ref_out)
        bounded = result.max_abs_tolerance is not None and info.reference == "returned"
        if not stats.ok and not stats.reason and not bounded and self.floors() is not None:
            stats = compare_outputs(out, ref_out, self.floors())
            if stats.ok:
                note = (f"rel err {stats.rel_err:.1e} is above the table tolerance but within "
                        f"this model's own float32 rounding (x{CONDITIONING_FACTOR:g}): "
                        f"tolerance {stats.tolerance:.1e}")
                if note not in rec.notes:
                    rec.notes.append(note)
        if bounded and not stats.reason:
            # The pass states an absolute bound (int8: one quantization step of the output).
            stats.tolerance = float(result.max_abs_tolerance)
            stats.ok = stats.max_abs <= stats.tolerance
            if not stats.ok:
                stats.reason = (f"max abs error {stats.max_abs:.3g} exceeds the pass's bound "
                                f"{stats.tolerance:.3g} (one quantization step of the output)")
        return stats

    def _mismatch(self, label: str, info: PassInfo, stats, blame, run,
                  batch: str = "") -> NumericMismatchError:
        node = blame[0] if blame else None
        where = f"; first diverging node: {describe_node(node)} (rel err {blame[1]:.2e})" \
            if blame else ""
        before = ", ".join(self._ran) or "none"
        detail = stats.reason or (f"relative error {stats.rel_err:.2e} (max abs "
                                  f"{stats.max_abs:.2e}) exceeds the {stats.dtype} tolerance "
                                  f"{stats.tolerance:.0e}")
        err = NumericMismatchError(
            f"pass '{label}' changed the model's numbers against its reference "
            f"({info.reference}){batch}: {detail}{where}; passes before it: {before}",
            pass_name=label, passes_before=list(self._ran), max_abs=stats.max_abs,
            rel_err=stats.rel_err, tolerance=stats.tolerance,
            node=node.name if node is not None else None,
            module_path=module_path(node) if node is not None else None,
            hint=f"disable it with disable=['{label.split('/')[-1]}'], or pass "
                 f"on_mismatch='rollback' to drop it and go on")
        err.run = run  # for on_mismatch="warn"
        return err

    def _check_second_batch(self, label: str, info: PassInfo, gm: fx.GraphModule,
                            result: PassResult, ctx: PassContext, rec: PassRecord, run) -> None:
        """A ``batch_check`` pass: its graph against its reference once more, at one more sample
        than the example inputs (their first sample repeated). A graph whose shapes are fixed at
        the example batch is not checked there, and the record says so."""
        inputs = grown_inputs(ctx.example_inputs)
        n = batch_of(inputs)
        if n is None:
            rec.notes.append("not checked at a second batch size: no input has a batch "
                             "dimension")
            return
        try:
            ref_out = _call(result.reference, inputs)
        except Exception as e:  # noqa: BLE001 - shapes fixed at the example batch
            first = (str(e).splitlines() or [""])[0][:120]
            rec.notes.append(f"not checked at batch {n}: the reference does not run there "
                             f"({type(e).__name__}: {first})")
            return
        try:
            out = _call(gm, inputs)
        except Exception as e:  # noqa: BLE001
            raise self._structural(label, [f"the graph no longer runs at batch {n} (its "
                                           f"reference does): {type(e).__name__}: {e}"]) from e
        stats = self._judge(out, ref_out, info, result, rec)
        if not stats.ok:
            raise self._mismatch(label, info, stats, None, run,
                                 batch=f" at batch {n} (the example inputs and their first "
                                       f"sample again; at batch {batch_of(ctx.example_inputs)} "
                                       f"they agreed)")
        if stats.max_abs > (rec.max_abs_err or 0.0):
            rec.max_abs_err, rec.rel_err = stats.max_abs, max(rec.rel_err or 0.0, stats.rel_err)
        rec.stats["checked_batches"] = f"{batch_of(ctx.example_inputs)}, {n}"

    def _on_failure(self, err, name: str, snapshot, new_gm, rec: PassRecord):
        if self.on_mismatch == "rollback" and snapshot is not None:
            rec.status = "rolled back"
            rec.modified = False
            rec.notes.append(err.message)
            self._dropped.add(name)
            warnings.warn(f"fxopt: rolled back pass '{rec.name}': {err.message}", stacklevel=3)
            return snapshot
        if self.on_mismatch == "warn" and isinstance(err, NumericMismatchError):
            rec.status = "mismatch kept"
            rec.notes.append(err.message)
            warnings.warn(f"fxopt: {err.message}", stacklevel=3)
            self._last = err.run
            return new_gm
        raise err


def _call(module, inputs):
    import torch

    with torch.no_grad(), seeded(inputs):
        return module(*clone_inputs(inputs))


def _merge(prev: PassRecord, rec: PassRecord) -> None:
    prev.iterations += 1
    prev.time_s += rec.time_s
    prev.check_s += rec.check_s
    prev.nodes_after = rec.nodes_after
    prev.params_after = rec.params_after
    prev.modified |= rec.modified
    for k, v in rec.stats.items():
        if isinstance(v, (int, float)) and isinstance(prev.stats.get(k), (int, float)):
            prev.stats[k] += v
        else:
            prev.stats.setdefault(k, v)
    prev.notes.extend(n for n in rec.notes if n not in prev.notes)
    if rec.rel_err is not None:
        prev.rel_err = max(prev.rel_err or 0.0, rec.rel_err)
        prev.max_abs_err = max(prev.max_abs_err or 0.0, rec.max_abs_err or 0.0)
        prev.tolerance = rec.tolerance
    if rec.status != "ok" and prev.status == "ok":
        prev.status = rec.status

