"""Pipelines: the one place passes are ordered, per target and per the user's options.

``PIPELINES`` are named literal lists of pass and group names (DESIGN.md section 5). What
``optimize`` runs is one of them (or the user's own list) put through a fixed sequence of
phases, each a small function that says where its passes go, the way TVM builds a pipeline per
target::

    build_pipeline("default", target="cpu", prune=True, quantize=True)
    # ['cleanup', 'fuse_attention', 'prune_channels', 'fold_bn', 'fuse_act', 'lower_convs',
    #  'to_channels_last', 'quantize_int8', 'cleanup', 'lower_int8_cpu']

1. ``prune_phase``: ``prune_channels`` right after the first ``cleanup`` (pruning sees the graph
   before folding and fusion, so the masked reference is the user's model), and after
   ``fuse_attention`` where that follows it (hand-written attention is one SDPA call by then).
2. ``engine_layout_phase``: for ``target="openvino"``, ``pointwise_convs`` right before
   ``fuse_act`` (Linear layers between a permute to channels-last and its inverse become 1x1
   convolutions, and the permutes go: OpenVINO runs ConvNeXt's MLPs without transposes).
   ``cpu_layout_phase``: on the CPU, after ``fuse_act``: ``lower_convs`` (every remaining 2-D
   convolution becomes a fused op, so oneDNN runs it with a prepacked weight) and
   ``to_channels_last`` (activations stay NHWC from one conv to the next).
3. ``quantize_phase``: ``quantize_int8`` after the last fusion step (it quantizes fused ops).
4. ``lowering_phase``: last, ``lower_int8_cpu`` (int8 on the CPU) or ``lower_to_triton``
   (``target="cuda"``, or asked for by name on the CPU: tests under the Triton interpreter),
   after ``fuse_add_layer_norm`` (a residual add and its LayerNorm: one Triton kernel; after
   quantization, which smooths LayerNorms and quantizes adds as before).
   The engine targets (``ENGINE_TARGETS``: ``"openvino"``, ``"onnxruntime"``) run the CPU
   pipeline up to here and have no lowering: the engine runs the graph's ONNX export.

A pass the user names in ``passes=`` goes to its phase's place; any other is appended.
``expand_pipeline`` then resolves names into passes and groups, drops ``disable``\\ d ones and
checks the passes' ``after``/``before`` constraints.
"""
from __future__ import annotations

import difflib
from typing import Sequence

from fxopt.errors import PipelineError
from fxopt.infra.registry import GROUPS, PASSES, PassGroup
from fxopt.infra.validate import names_arg, pipeline_arg

__all__ = ["PIPELINES", "FEATURE_PASSES", "ENGINE_TARGETS", "build_pipeline", "expand_pipeline",
           "pipeline_names", "prune_phase", "engine_layout_phase", "cpu_layout_phase",
           "quantize_phase", "lowering_phase"]

PIPELINES: dict[str, list[str]] = {
    "cleanup": ["cleanup"],
    "default": ["cleanup", "fuse_attention", "fold_bn", "merge_convs", "fuse_act", "cleanup"],
}

# optimize()'s feature options and the pass each turns on (its config class is the pass's).
FEATURE_PASSES = {"prune": "prune_channels", "quantize": "quantize_int8"}
CPU_LAYOUT_PASSES = ("lower_convs", "to_channels_last")
# Inference engines on the CPU (fxopt.export.engines): the CPU pipeline without its lowering.
ENGINE_TARGETS = ("openvino", "onnxruntime")


def pipeline_names(pipeline: str | Sequence[str]) -> list[str]:
    """The names in ``pipeline``: a name of ``PIPELINES`` (its list), or a list of names."""
    pipeline = pipeline_arg(pipeline)
    if isinstance(pipeline, str):
        if pipeline not in PIPELINES:
            raise PipelineError(f"unknown pipeline '{pipeline}'",
                                hint=f"choose one of: {', '.join(sorted(PIPELINES))}")
        return list(PIPELINES[pipeline])
    return list(pipeline)


# -- phases: (names, options) -> names ------------------------------------------------------------
def _insert(names: list[str], at: int, new: Sequence[str]) -> list[str]:
    new = [n for n in new if n not in names]
    return names[:at] + new + names[at:]


def _after_last(names: list[str], anchors: Sequence[str]) -> int | None:
    found = [i for i, n in enumerate(names) if n in anchors]
    return found[-1] + 1 if found else None


def prune_phase(names: list[str], *, prune: bool) -> list[str]:
    """``prune_channels`` after the first ``cleanup`` (first of all without one), and after
    ``fuse_attention`` when it follows that cleanup (pruning's rule sees the SDPA calls)."""
    if not prune:
        return names
    at = names.index("cleanup") + 1 if "cleanup" in names else 0
    if names[at:at + 1] == ["fuse_attention"]:
        at += 1
    return _insert(names, at, ["prune_channels"])


def engine_layout_phase(names: list[str], *, target: str, asked: bool = False) -> list[str]:
    """For OpenVINO (or asked for by name), ``pointwise_convs`` right before ``fuse_act`` (the
    1x1 convolutions it writes are fused with their activations there). By default only for
    OpenVINO: ONNX Runtime runs the two forms of ConvNeXt alike (the pass's docstring)."""
    if (target != "openvino" and not asked) or "fuse_act" not in names:
        return names
    return _insert(names, names.index("fuse_act"), ["pointwise_convs"])


def cpu_layout_phase(names: list[str], *, target: str, disable: Sequence[str] = ()) -> list[str]:
    """On the CPU, the layout passes right after ``fuse_act`` (not when it is disabled)."""
    at = _after_last(names, ("fuse_act",))
    if target not in ("cpu",) + ENGINE_TARGETS or at is None or "fuse_act" in disable:
        return names
    return _insert(names, at, CPU_LAYOUT_PASSES)


def quantize_phase(names: list[str], *, quantize: bool) -> list[str]:
    """``quantize_int8`` after the last fusion step (at the end without one)."""
    if not quantize:
        return names
    at = _after_last(names, ("fuse_act",) + CPU_LAYOUT_PASSES)
    return _insert(names, len(names) if at is None else at, ["quantize_int8"])


def lowering_phase(names: list[str], *, target: str, quantize: bool,
                   triton: bool = False, fuse_layer_norm: bool = False) -> list[str]:
    """The lowering last: Triton for ``target="cuda"`` (or when asked for by name), else the
    int8 IR onto PyTorch's CPU kernels when quantizing for the CPU."""
    if target == "cuda" or triton:
        # the add + LayerNorm fusion pays where Triton runs it: by default on CUDA; asked for
        # by name on the CPU (tests under the interpreter)
        fuse = ["fuse_add_layer_norm"] if target == "cuda" or fuse_layer_norm else []
        return _insert(names, len(names), fuse + ["lower_to_triton"])
    if quantize and target == "cpu":
        return _insert(names, len(names), ["lower_int8_cpu"])
    return names


def build_pipeline(pipeline: str | Sequence[str] = "default", *, target: str = "cpu",
                   prune: bool = False, quantize: bool = False, passes: Sequence[str] = (),
                   disable: Sequence[str] = ()) -> list[str]:
    """The pass and group names ``optimize`` runs for ``pipeline`` (a name of ``PIPELINES``
    or a list of names), the target and the options. ``passes``: names the user adds; a
    phase's own pass among them goes to its place, the rest are appended. ``disable`` is
    applied later (``expand_pipeline``); a phase only reads it to leave out passes that
    depend on a disabled one."""
    names = pipeline_names(pipeline)
    extra = names_arg(passes, "passes")
    disable = names_arg(disable, "disable")
    asked = set(extra)
    names = prune_phase(names, prune=prune or "prune_channels" in asked)
    names = engine_layout_phase(names, target=target, asked="pointwise_convs" in asked)
    names = cpu_layout_phase(names, target=target, disable=disable)
    names = quantize_phase(names, quantize=quantize or "quantize_int8" in asked)
    names = lowering_phase(names, target=target, quantize=quantize,
                           triton="lower_to_triton" in asked,
                           fuse_layer_norm="fuse_add_layer_norm" in asked)
    placed = {"prune_channels", "quantize_int8", "lower_to_triton",
              "pointwise_convs"} & set(names)
    if "lower_to_triton" in names:
        placed |= {"fuse_add_layer_norm"} & set(names)
    return names + [n for n in extra if n not in placed]


# -- resolution ---------------------------------------------------------------------------------
def _known() -> str:
    return ", ".join(sorted(PASSES) + sorted(GROUPS))


def expand_pipeline(pipeline: str | Sequence[str], *, extra: Sequence[str] = (),
                    disable: Sequence[str] = ()) -> list[str | PassGroup]:
    """Resolve a pipeline (a name of ``PIPELINES`` or a list of pass and group names) into
    steps (pass names and groups) and check its constraints.

    ``extra`` names are appended; ``disable`` names (passes or groups) are dropped everywhere.
    """
    names = pipeline_names(pipeline)
    names += names_arg(extra, "passes")
    disable = names_arg(disable, "disable")
    for n in list(names) + list(disable):
        if not isinstance(n, str) or (n not in PASSES and n not in GROUPS):
            near = difflib.get_close_matches(str(n), list(PASSES) + list(GROUPS), n=1)
            raise PipelineError(f"unknown pass or group '{n}'",
                                hint=(f"did you mean '{near[0]}'? " if near else "")
                                + f"`fxopt passes` lists them: {_known()}")
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
                raise PipelineError(f"pass '{name}' must run after '{a}', but the pipeline has "
                                    f"it first",
                                    hint=f"move '{name}' after '{a}' in the pipeline")
        for b in info.before:
            if b in first and first[b] < i:
                raise PipelineError(f"pass '{name}' must run before '{b}', but the pipeline has "
                                    f"it after",
                                    hint=f"move '{name}' before '{b}' in the pipeline")
