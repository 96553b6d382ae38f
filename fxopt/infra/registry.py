"""The pass registry: what each pass is called, needs, promises, configures and must equal.

A pass is a plain function ``fn(gm, ctx) -> PassResult`` registered with its name, its
preconditions (``fxopt.infra.preconditions``), its typed config, its reference kind and its
ordering constraints::

    @register_pass("quantize_int8", requires=(EVAL_MODE,), config=QuantConfig,
                   reference="returned", after=("fuse_act",))
    def quantize_int8(gm, ctx):
        \"\"\"Post-training int8.\"\"\"
        cfg = ctx.config(QuantConfig)          # the user's quantize=, coerced; or the defaults
        ...
        return PassResult(gm, modified=n > 0, stats={"conv2d": n})

Reference kinds (DESIGN.md section 4): ``"exact"`` (equal to the graph before the pass, to the
dtype's float tolerance), ``"returned"`` (equal to ``PassResult.reference``, a module the pass
builds itself: the masked model for pruning, the fake-quant model for int8) and ``"none"``.

A config class has ``coerce(value)`` (the user's spelling: ``prune=0.5``, ``quantize="int8"``,
a dict of fields or an instance; ``None``: the defaults). Groups are passes run together to a
fixpoint (``cleanup``); the pipelines that order passes are in ``fxopt.pipelines``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.fx as fx

from fxopt.errors import PipelineError
from fxopt.infra.preconditions import PRECONDITIONS, Precondition, precondition

__all__ = ["register_pass", "register_group", "PassInfo", "PassGroup", "PassResult", "PassContext",
           "PASSES", "GROUPS", "REFERENCE_KINDS"]

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
    """Read-only facts a pass may use. Passes never touch ``original`` (the eager copy).

    ``configs``: the typed configs of this run (``optimize(prune=0.5)`` gives a
    ``PruneConfig``), given as instances (or a dict keyed by class); a pass reads its own with
    ``ctx.config(PruneConfig)``.
    """

    example_inputs: tuple
    target: str = "cpu"
    configs: Any = ()
    calibration_data: Any = None
    original: torch.nn.Module | None = None
    debug: int = 0

    def __post_init__(self):
        given = self.configs.values() if isinstance(self.configs, dict) else self.configs
        self.configs = {type(c): c for c in given}

    def config(self, cls: type[C]) -> C:
        """The run's config of type ``cls``, or ``cls.coerce(None)`` (its defaults)."""
        found = self.configs.get(cls)
        return found if found is not None else cls.coerce(None)


@dataclass(frozen=True)
class PassInfo:
    """A registered pass: its function and what it declared."""

    name: str
    fn: Callable[[fx.GraphModule, PassContext], PassResult]
    doc: str
    requires: tuple[Precondition, ...] = ()
    reference: str = "exact"
    after: tuple[str, ...] = ()
    before: tuple[str, ...] = ()
    config: type | None = None
    batch_check: bool = False  # also checked at a second batch size (kernels' lowerings)

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


C = TypeVar("C")

PASSES: dict[str, PassInfo] = {}
GROUPS: dict[str, PassGroup] = {}


def register_pass(name: str, *, requires: Sequence[str | Precondition] = (),
                  reference: str = "exact", after: Sequence[str] = (),
                  before: Sequence[str] = (), config: type | None = None,
                  batch_check: bool = False):
    """Decorator: register ``fn(gm, ctx) -> PassResult`` under ``name``; its docstring is its doc.

    ``requires``: preconditions (objects, or names of ``PRECONDITIONS``); ``config``: the typed
    config class the pass reads with ``ctx.config(cls)``; ``after``/``before``: pass names it
    must follow or precede when both are in a pipeline. ``batch_check`` (``reference=
    "returned"`` only): the numeric check also runs the graph and its reference at one more
    sample than the example inputs, for passes that put kernels in the graph (a kernel can be
    right at one batch size and wrong at another)."""
    try:
        pres = tuple(precondition(r) for r in requires)
    except KeyError as e:
        raise PipelineError(f"pass '{name}' requires unknown precondition {e.args[0]!r}",
                            hint=f"known: {sorted(PRECONDITIONS)}, or pass a Precondition"
                            ) from None
    if reference not in REFERENCE_KINDS:
        raise PipelineError(f"pass '{name}': reference must be one of {REFERENCE_KINDS}")
    if batch_check and reference != "returned":
        raise PipelineError(f"pass '{name}': batch_check needs reference='returned' (the "
                            f"reference is run at the second batch)")
    if config is not None and not callable(getattr(config, "coerce", None)):
        raise PipelineError(f"pass '{name}': config {config!r} has no coerce(value) classmethod")

    def deco(fn):
        if name in PASSES or name in GROUPS:
            raise PipelineError(f"a pass or group named '{name}' is already registered")
        PASSES[name] = PassInfo(name, fn, fn.__doc__ or "", pres, reference, tuple(after),
                                tuple(before), config, batch_check)
        return fn

    return deco


def register_group(name: str, members: Sequence[str], doc: str, *,
                   max_iterations: int = 4) -> PassGroup:
    """Register passes run in order, repeatedly, to a fixpoint, under one name."""
    if name in PASSES or name in GROUPS:
        raise PipelineError(f"a pass or group named '{name}' is already registered")
    group = PassGroup(name, tuple(members), doc, max_iterations)
    GROUPS[name] = group
    return group
