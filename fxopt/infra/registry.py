"""The pass registry: what each pass is called, needs, promises, and must equal.

A pass is a plain function ``fn(gm, ctx) -> PassResult`` registered with its name, its
preconditions, its reference kind and its ordering constraints::

    @register_pass("fold_bn", requires=("eval",), reference="exact", after=("cleanup",))
    def fold_bn(gm, ctx):
        \"\"\"Fold BatchNorm into the preceding convolution.\"\"\"
        ...
        return PassResult(gm, modified=n > 0, stats={"folded": n})

Reference kinds (DESIGN.md section 4): ``"exact"`` (equal to the graph before the pass, to the
dtype's float tolerance), ``"returned"`` (equal to ``PassResult.reference``, a module the pass
builds itself: the masked model for pruning, the fake-quant model for int8) and ``"none"``.

Groups are passes run together to a fixpoint (``cleanup``); pipelines are named literal lists
of pass and group names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from fxopt.errors import PipelineError

__all__ = [
    "register_pass",
    "register_group",
    "PassInfo",
    "PassGroup",
    "PassResult",
    "PassContext",
    "PASSES",
    "GROUPS",
    "PIPELINES",
    "REQUIREMENTS",
    "expand_pipeline",
]

REQUIREMENTS = {
    "eval": "the model is in eval mode",
    "calibration_data": "calibration data was given",
    "cuda": "a CUDA device is the target",
}
REFERENCE_KINDS = ("exact", "returned", "none")


@dataclass
class PassResult:
    """What a pass hands back: the (possibly new) graph module and what it did."""

    gm: fx.GraphModule
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    reference: torch.nn.Module | None = None  # for reference="returned"
    shapes_changed: bool = False  # the manager re-propagates tensor_meta when True
    # reference="returned" only: when set, the numeric check accepts a max abs error up to
    # this bound instead of the dtype's relative tolerance (int8: one quantization step of
    # the output, DESIGN.md section 4).
    max_abs_tolerance: float | None = None


@dataclass
class PassContext:
    """Read-only facts a pass may use. Passes never touch ``original`` (the eager copy)."""

    example_inputs: tuple
    target: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)  # prune=, quantize=, precision= ...
    calibration_data: Any = None
    original: torch.nn.Module | None = None
    debug: int = 0


@dataclass(frozen=True)
class PassInfo:
    name: str
    fn: Callable[[fx.GraphModule, PassContext], PassResult]
    doc: str
    requires: tuple[str, ...] = ()
    reference: str = "exact"
    after: tuple[str, ...] = ()
    before: tuple[str, ...] = ()

    @property
    def summary(self) -> str:
        return self.doc.strip().splitlines()[0] if self.doc.strip() else ""


@dataclass(frozen=True)
class PassGroup:
    """Passes run in order, repeatedly, until none modifies the graph or ``max_iterations``."""

    name: str
    members: tuple[str, ...]
    doc: str
    max_iterations: int = 4

    @property
    def summary(self) -> str:
        return self.doc.strip().splitlines()[0]


PASSES: dict[str, PassInfo] = {}
GROUPS: dict[str, PassGroup] = {}
PIPELINES: dict[str, list[str]] = {
    "cleanup": ["cleanup"],
    "default": ["cleanup", "fold_bn", "fuse_act", "cleanup"],
}


def register_pass(name: str, *, requires: Sequence[str] = (), reference: str = "exact",
                  after: Sequence[str] = (), before: Sequence[str] = ()):
    """Decorator: register ``fn(gm, ctx) -> PassResult`` under ``name``; its docstring is its doc."""
    unknown = set(requires) - set(REQUIREMENTS)
    if unknown:
        raise PipelineError(f"pass '{name}' requires unknown conditions {sorted(unknown)}",
                            hint=f"known conditions: {sorted(REQUIREMENTS)}")
    if reference not in REFERENCE_KINDS:
        raise PipelineError(f"pass '{name}': reference must be one of {REFERENCE_KINDS}")

    def deco(fn):
        if name in PASSES or name in GROUPS:
            raise PipelineError(f"a pass or group named '{name}' is already registered")
        PASSES[name] = PassInfo(name, fn, fn.__doc__ or "", tuple(requires), reference,
                                tuple(after), tuple(before))
        return fn

    return deco


def register_group(name: str, members: Sequence[str], doc: str, *, max_iterations: int = 4) -> PassGroup:
    if name in PASSES or name in GROUPS:
        raise PipelineError(f"a pass or group named '{name}' is already registered")
    group = PassGroup(name, tuple(members), doc, max_iterations)
    GROUPS[name] = group
    return group


def _known() -> str:
    return ", ".join(sorted(PASSES) + sorted(GROUPS))


def expand_pipeline(pipeline: str | Sequence[str], *, extra: Sequence[str] = (),
                    disable: Sequence[str] = ()) -> list[str | PassGroup]:
    """Resolve a pipeline into steps (pass names and groups) and check its constraints.

    ``extra`` names are appended; ``disable`` names (passes or groups) are dropped everywhere.
    """
    if isinstance(pipeline, str):
        if pipeline not in PIPELINES:
            raise PipelineError(f"unknown pipeline '{pipeline}'",
                                hint=f"choose one of: {', '.join(sorted(PIPELINES))}")
        names = list(PIPELINES[pipeline])
    else:
        names = list(pipeline)
    names += list(extra)
    for n in list(names) + list(disable):
        if not isinstance(n, str) or (n not in PASSES and n not in GROUPS):
            raise PipelineError(f"unknown pass or group '{n}'",
                                hint=f"`fxopt passes` lists them: {_known()}")
    disabled = set(disable)
    steps: list[str | PassGroup] = []
    for n in names:
        if n in disabled:
            continue
        if n in GROUPS:
            g = GROUPS[n]
            members = tuple(m for m in g.members if m not in disabled)
            if members:
                steps.append(PassGroup(g.name, members, g.doc, g.max_iterations))
        else:
            steps.append(n)
    _check_order(steps)
    return steps


def _check_order(steps: list[str | PassGroup]) -> None:
    first: dict[str, int] = {}
    for i, s in enumerate(steps):
        members = s.members if isinstance(s, PassGroup) else (s,)
        for m in members:
            first.setdefault(m, i)
        if isinstance(s, PassGroup):
            first.setdefault(s.name, i)
    for name, i in first.items():
        info = PASSES.get(name)
        if info is None:
            continue
        for a in info.after:
            if a in first and first[a] > i:
                raise PipelineError(f"pass '{name}' must run after '{a}', but the pipeline has it first",
                                    hint=f"move '{name}' after '{a}' in the pipeline")
        for b in info.before:
            if b in first and first[b] < i:
                raise PipelineError(f"pass '{name}' must run before '{b}', but the pipeline has it after",
                                    hint=f"move '{name}' before '{b}' in the pipeline")
