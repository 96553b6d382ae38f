"""What each pass did, how long it took, and the error it introduced.

``Report`` prints as a table (``print(opt.report)``) and ``to_dict()`` gives JSON-ready data::

    pass         time    nodes     params       modified  rel err vs ref  ...
    cleanup/dce  1.2 ms  71 -> 69  11.7M->11.7M yes       0
"""
from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["PassRecord", "ModelStats", "Report", "format_count", "format_bytes"]


@dataclass
class PassRecord:
    name: str
    time_s: float = 0.0  # the pass itself
    check_s: float = 0.0  # verifying and checking it
    nodes_before: int = 0
    nodes_after: int = 0
    params_before: int = 0
    params_after: int = 0
    modified: bool = False
    iterations: int = 1
    reference: str = "exact"
    max_abs_err: float | None = None  # against the pass's reference
    rel_err: float | None = None
    tolerance: float | None = None
    status: str = "ok"  # ok | rolled back | mismatch kept | not checked
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class ModelStats:
    params: int = 0
    macs: int = 0
    bytes: int = 0
    nodes: int = 0


@dataclass
class Report:
    pipeline: list[str] = field(default_factory=list)
    target: str = "cpu"
    passes: list[PassRecord] = field(default_factory=list)
    before: ModelStats = field(default_factory=ModelStats)
    after: ModelStats = field(default_factory=ModelStats)
    total_time_s: float = 0.0
    capture_time_s: float = 0.0
    # final model against the eager model (reported; asserted only when every pass is exact)
    final_max_abs_err: float | None = None
    final_rel_err: float | None = None
    notes: list[str] = field(default_factory=list)
    # the engine that runs the model (target="openvino"/"onnxruntime"/"best"): its name,
    # version, precision, threads, the check against the graph, and target="best"'s timings
    engine: dict[str, Any] = field(default_factory=dict)
    # how the model was captured: "method" ("symbolic_trace" or "export"), "inlined" (modules
    # symbolic tracing could not go through, captured with torch.export and inlined) and
    # "opaque" (the modules left as leaves: path, type, reason, layers inside, params)
    capture: dict[str, Any] = field(default_factory=dict)

    def record(self, name: str) -> PassRecord | None:
        for r in self.passes:
            if r.name == name:
                return r
        return None

    @property
    def int8(self) -> dict[str, Any] | None:
        """The int8 figures of the run (``quantize_int8``'s record), None without one:
        ``sqnr_db``, ``max_abs_err``, ``top1_agreement`` (int8 against float), ``measured_on``
        (``"held_out"``: batches held out of calibration; ``"example_inputs"``; or
        ``"calibration"``: the calibration batches themselves, which overstate the accuracy on
        fresh data), ``held_out`` (whether the data was not calibrated on),
        ``measured_batches``, ``calibration_batches``, ``sqnr_floor_db`` (under it the run
        warned) and ``worst_layers_db`` (when it did)."""
        rec = self.record("quantize_int8")
        if rec is None or "sqnr_db" not in rec.stats:
            return None
        keys = ("sqnr_db", "max_abs_err", "top1_agreement", "measured_on", "measured_batches",
                "calibration_batches", "sqnr_floor_db", "worst_layers_db")
        out = {k: rec.stats[k] for k in keys if k in rec.stats}
        if "measured_on" in out:
            out["held_out"] = out["measured_on"] != "calibration"
        return out

    @property
    def rolled_back(self) -> list[str]:
        return [r.name for r in self.passes if r.status == "rolled back"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str, **kw)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Report":
        d = dict(d)
        d["passes"] = [PassRecord(**p) for p in d.get("passes", [])]
        d["before"] = ModelStats(**d.get("before", {}))
        d["after"] = ModelStats(**d.get("after", {}))
        return cls(**d)

    def table(self):
        """A ``rich.table.Table`` of the passes and the totals."""
        from rich.table import Table

        t = Table(title=f"fxopt report (target {self.target})", title_justify="left")
        for col, just in (("pass", "left"), ("time", "right"), ("nodes", "right"),
                          ("params", "right"), ("changed", "center"), ("rel err vs ref", "right"),
                          ("max abs", "right"), ("status", "left"), ("what it did", "left")):
            t.add_column(col, justify=just, overflow="fold")
        for r in self.passes:
            did = ", ".join(f"{k} {v}" for k, v in r.stats.items() if v)
            if r.notes:
                did = "; ".join([did] + r.notes) if did else "; ".join(r.notes)
            t.add_row(
                r.name + (f" x{r.iterations}" if r.iterations > 1 else ""),
                _ms(r.time_s),
                f"{r.nodes_before}->{r.nodes_after}",
                f"{format_count(r.params_before)}->{format_count(r.params_after)}",
                "yes" if r.modified else "-",
                _err(r.rel_err), _err(r.max_abs_err), r.status, did,
            )
        t.add_section()
        t.add_row("total", _ms(self.total_time_s), f"{self.before.nodes}->{self.after.nodes}",
                  f"{format_count(self.before.params)}->{format_count(self.after.params)}", "",
                  _err(self.final_rel_err),
                  _err(self.final_max_abs_err), "vs eager",
                  f"MACs {format_count(self.before.macs)}->{format_count(self.after.macs)}, "
                  f"size {format_bytes(self.before.bytes)}->{format_bytes(self.after.bytes)}")
        return t

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        Console(file=buf, width=140, color_system=None).print(self.table())
        if self.engine:
            buf.write("engine: " + ", ".join(f"{k} {v}" for k, v in self.engine.items()
                                             if k != "onnx_ops") + "\n")
        for n in self.notes:
            buf.write(f"note: {n}\n")
        return buf.getvalue()

    __repr__ = __str__


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def format_count(n: int | float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def format_bytes(n: int) -> str:
    for unit, div in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _err(e: float | None) -> str:
    if e is None:
        return "n/a"
    return "0" if e == 0 else f"{e:.1e}"
