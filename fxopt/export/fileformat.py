"""The ``.fxopt`` file: an optimized module as data, with no pickle in it.

``OptimizedModule.save`` writes, and ``fxopt.load`` reads, one zip archive (the manifest
deflated, the tensors stored; the container, written atomically and checked before anything in
it is decoded, is ``fxopt.export.archive``) holding two members:

- ``fxopt/manifest.json``: the format (``"format": "fxopt"``, ``"format_version"``), the fxopt
  and torch versions that wrote it, the target, the report, the graph as a list of nodes
  (``op``, ``name``, ``target``, ``args``, ``kwargs``), the module tree (each module's class by
  qualified name and its attributes as data), and a table of the tensors (dtype, shape, strides).
- ``fxopt/tensors.safetensors``: every tensor's bytes (safetensors: a JSON header and raw data).

Values in the manifest are JSON; what JSON lacks is a one-key object: ``{"node": name}`` (an
argument that is another node's value), ``{"tensor": key}``, ``{"tuple": [...]}``,
``{"dtype": "float32"}``, ``{"device": "cpu"}``, ``{"size": [...]}``, ``{"slice": [a, b, c]}``,
``{"ellipsis": null}``, ``{"float": "inf"}``, ``{"module": {...}}``, ``{"packed": {...}}`` (a
prepacked int8 weight), ``{"fn": name}`` (an allowlisted function kept as a module attribute)
and a few more (``_Writer.value`` writes them, ``_Reader.value`` reads them). Saved, a small
float convolution's node reads::

    {"name": "c1_bn_relu", "op": "call_function",
     "target": "torch.ops.fxopt.conv2d_act.default",
     "args": {"tuple": [{"node": "contiguous"}, {"node": "c1_weight"}, ...]}, "kwargs": ...}

Safety. Loading reads JSON, zip and safetensors: nothing in the file is unpickled, ``eval``'d or
imported. A call target is a qualified name looked up in an allowlist built from the running torch
(``torch.*`` tensor ops, ``torch.nn.functional.*``, ``torch.ops`` overloads of the aten, fxopt,
quantized, onednn, prims and quantized_decomposed namespaces, Tensor methods, ``operator.*``,
``math.*``, a few builtins: ``fxopt.export.allowlist``); ``getattr`` in a graph may read public
attributes only, and a method call names a public Tensor method; every name fx writes into the
module's Python source (placeholders, attribute paths, keywords, node names) must be a plain
identifier, so no string from the file becomes code. Module classes must be ``torch.nn``'s (or
``torch.ao.nn``'s), or classes the caller passes to ``load(path, modules=[...])``: the file names a
class, it never brings one. Anything else is a :class:`FileFormatError`, as is every malformed file
(empty, truncated, not a zip, a ``torch.save`` pickle, bad JSON, a newer format, a tensor missing
or of the wrong shape or dtype).

Int8 weights prepacked for PyTorch's quantized CPU kernels (``Conv2dPackedParamsBase``,
``LinearPackedParamsBase``) are written as their int8 codes, scales and zero points with the
convolution's geometry and the quantized engine they were packed under (the lowering records
it in the ``get_attr`` node's ``meta["fxopt_engine"]``), and packed again under that engine on
load, so the loaded module runs the same kernels: outputs are bitwise the same.

Saving writes a temporary file beside the destination and renames it: a failed save leaves
nothing behind. A module that cannot be written as data (hooks, a class whose state is not
data, a function the allowlist does not know) is a ``FileFormatError`` at ``save``.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn as nn

from fxopt.errors import FileFormatError
from fxopt.export.archive import (FORMAT_VERSION, MANIFEST, TENSORS, bad, read_archive,
                                  write_archive)
from fxopt.export.allowlist import (allowed_function, function_name, public_name,
                                    tensor_method_allowed)

__all__ = ["FORMAT_VERSION", "MANIFEST", "TENSORS", "ENGINE_META", "write_module", "read_module",
           "allowed_function", "SavedModule"]

ENGINE_META = "fxopt_engine"  # get_attr node meta: the quantized engine a weight was packed for

# -- module classes -------------------------------------------------------------------------------
_HOOKS = ("_backward_hooks", "_backward_pre_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
          "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
          "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
          "_load_state_dict_post_hooks")
_TORCH_MODULES = ("torch.nn.", "torch.ao.nn.")


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _torch_class(cls: type) -> bool:
    return cls is nn.Module or cls.__module__.startswith(_TORCH_MODULES)


def _resolve_class(name: str, extra: dict[str, type]):
    """A module class by ``module:qualname``: torch.nn's from modules already imported, or one
    the caller passed; never an import."""
    if name in extra:
        return extra[name]
    mod, _, qual = name.partition(":")
    if not mod.startswith(_TORCH_MODULES) and name != _class_name(nn.Module):
        return None
    obj = sys.modules.get(mod)
    for part in qual.split("."):
        if obj is None or not part.isidentifier() or part.startswith("__"):
            return None
        obj = getattr(obj, part, None)
    if isinstance(obj, type) and issubclass(obj, nn.Module) and _torch_class(obj):
        return obj
    return None


# -- tensors --------------------------------------------------------------------------------------
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
    torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128,
    torch.float8_e4m3fn, torch.float8_e5m2)}
_QDTYPES = {"qint8": torch.qint8, "quint8": torch.quint8, "qint32": torch.qint32}
_OTHER = {"memory_format": (torch.contiguous_format, torch.channels_last, torch.channels_last_3d,
                            torch.preserve_format),
          "layout": (torch.strided, torch.sparse_coo),
          "qscheme": (torch.per_tensor_affine, torch.per_channel_affine,
                      torch.per_tensor_symmetric, torch.per_channel_symmetric)}
_OTHER_BY_NAME = {k: {str(v).removeprefix("torch."): v for v in vs} for k, vs in _OTHER.items()}


def _dense_strides(shape, stride) -> bool:
    """Whether a tensor of ``shape`` with ``stride`` covers its memory exactly once."""
    expected = 1
    for st, size in sorted((st, s) for s, st in zip(shape, stride) if s != 1):
        if st != expected:
            return False
        expected *= size
    return True


_TYPES = {"torch.Tensor": torch.Tensor, "int": int, "float": float, "bool": bool, "str": str}
_TYPE_NAMES = {v: k for k, v in _TYPES.items()}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# attribute paths: fx quotes a part as "{part}"; no dunder part (``m.__class__``)
_DOTTED = re.compile(r"(?!__)[A-Za-z0-9_]+(\.(?!__)[A-Za-z0-9_]+)*")
_PLACEHOLDER = re.compile(r"\*{0,2}[A-Za-z_][A-Za-z0-9_]*")


@contextlib.contextmanager
def _packing_engine(name: str | None):
    """PyTorch's quantized engine set to ``name`` where it is supported here (restored after);
    yields the engine in force."""
    before = torch.backends.quantized.engine
    if name and name != before and name in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = name
    try:
        yield torch.backends.quantized.engine
    finally:
        torch.backends.quantized.engine = before


# -- writing --------------------------------------------------------------------------------------
class _Writer:
    """Encodes values as JSON, collecting tensors (each object once: shared stays shared)."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self.table: dict[str, dict] = {}
        self._keys: dict[int, str] = {}
        self._keep: list = []  # objects whose id() keys a tensor
        self.engines: dict[int, str] = {}  # id of a packed weight -> its engine

    def tensor(self, t: torch.Tensor) -> dict:
        if id(t) in self._keys:
            return {"tensor": self._keys[id(t)]}
        if t.is_quantized:
            return {"qtensor": self._qtensor(t)}
        if t.layout != torch.strided or str(t.dtype).removeprefix("torch.") not in _DTYPES:
            raise FileFormatError(f"a tensor of dtype {t.dtype} and layout {t.layout} cannot be "
                                  "saved", hint="convert it to a dense tensor of a plain dtype")
        key = f"t{len(self.tensors)}"
        self._keys[id(t)] = key
        self._keep.append(t)
        # a copy: safetensors refuses tensors that share memory (a weight and its view)
        data = t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        # what is not the default (a plain CPU buffer) is written: a small int8 network's
        # scales and zero points are many small tensors, their entries a large part of the file
        entry = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        if isinstance(t, nn.Parameter):
            entry["parameter"] = True
        if t.requires_grad:
            entry["requires_grad"] = True
        if t.device.type != "cpu":
            entry["device"] = str(t.device)
        if not t.is_contiguous() and _dense_strides(t.shape, t.stride()):
            entry["stride"] = list(t.stride())
        self.tensors[key], self.table[key] = data, entry
        return {"tensor": key}

    def _qtensor(self, t: torch.Tensor) -> dict:
        q = {"dtype": str(t.dtype).removeprefix("torch."), "int_repr": self.tensor(t.int_repr()),
             "qscheme": str(t.qscheme()).removeprefix("torch.")}
        if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            q.update(scales=self.tensor(t.q_per_channel_scales()),
                     zero_points=self.tensor(t.q_per_channel_zero_points()),
                     axis=t.q_per_channel_axis())
        else:
            q.update(scale=self.value(t.q_scale()), zero_point=t.q_zero_point())
        return q

    def packed(self, obj, engine: str | None) -> dict:
        kind = obj._type().qualified_name().rsplit(".", 1)[-1]
        if kind == "Conv2dPackedParamsBase":
            w, b = torch.ops.quantized.conv2d_unpack(obj)
            geometry = {k: list(getattr(obj, k)()) for k in ("stride", "padding", "dilation",
                                                            "output_padding")}
            geometry.update(groups=int(obj.groups()), transpose=bool(obj.transpose()))
            out = {"kind": "conv2d", **geometry}
        elif kind == "LinearPackedParamsBase":
            w, b = torch.ops.quantized.linear_unpack(obj)
            out = {"kind": "linear"}
        else:
            raise FileFormatError(f"a TorchScript object of type {kind} cannot be saved",
                                  hint="fxopt saves prepacked conv2d and linear int8 weights only")
        out.update(weight=self.value(w), bias=self.value(b), engine=engine)
        return {"packed": out}

    def module(self, m: nn.Module, where: str) -> dict:
        cls = type(m)
        state = m.__getstate__()
        if not isinstance(state, dict):
            raise FileFormatError(
                f"the submodule '{where}' ({_class_name(cls)}) keeps its state in a custom "
                "__getstate__, not as data", hint="keep it out of the graph (leaf_modules) or "
                                                  "use fxopt's int8 lowering instead")
        out = {}
        for k, v in state.items():
            if k in _HOOKS:
                if v:
                    raise FileFormatError(
                        f"the submodule '{where}' has {k.strip('_').replace('_', ' ')}: hooks "
                        "are code, and the file holds no code",
                        hint="remove the hooks before saving (or trace them into the model)")
                continue
            if k == "_is_full_backward_hook":
                continue
            out[k] = self.value(v, f"{where}.{k}" if where else k)
        return {"module": {"class": _class_name(cls), "state": out}}

    def value(self, v, where: str = "") -> Any:
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, int):
            return v
        if isinstance(v, float):
            return v if math.isfinite(v) else {"float": repr(v)}
        if isinstance(v, torch.Tensor):
            return self.tensor(v)
        if isinstance(v, nn.Module):
            return self.module(v, where)
        if isinstance(v, torch.ScriptObject):
            return self.packed(v, self.engines.get(id(v)))
        if isinstance(v, torch.Size):
            return {"size": list(v)}
        if isinstance(v, tuple):
            return {"tuple": [self.value(x, where) for x in v]}
        if isinstance(v, list):
            return [self.value(x, where) for x in v]
        if isinstance(v, (set, frozenset)):
            return {"set": [self.value(x, where) for x in sorted(v, key=repr)]}
        if isinstance(v, dict):
            return {"dict": [[self.value(k, where), self.value(x, f"{where}.{k}")]
                             for k, x in v.items()]}
        if isinstance(v, fx.Node):
            return {"node": v.name}
        if isinstance(v, torch.dtype):
            return {"dtype": str(v).removeprefix("torch.")}
        if isinstance(v, torch.device):
            return {"device": str(v)}
        if isinstance(v, slice):
            return {"slice": [self.value(v.start), self.value(v.stop), self.value(v.step)]}
        if v is Ellipsis:
            return {"ellipsis": None}
        if isinstance(v, complex):
            return {"complex": [self.value(v.real), self.value(v.imag)]}
        for kind, values in _OTHER.items():
            if any(v is x for x in values):
                return {kind: str(v).removeprefix("torch.")}
        if callable(v) and function_name(v) is not None:  # F.relu kept by a TransformerLayer
            return {"fn": function_name(v)}
        raise FileFormatError(f"'{where or '(graph)'}' holds a {type(v).__qualname__}, which "
                              "the file format cannot hold as data",
                              hint="the file holds tensors, modules of torch.nn, numbers, "
                                   "strings and containers of them")


def _target(n: fx.Node, gm: fx.GraphModule) -> Any:
    if n.op == "call_function":
        name = function_name(n.target)
        if name is None:
            who = getattr(n.target, "__qualname__", repr(n.target))
            raise FileFormatError(
                f"node '{n.name}' calls {who}, which is not on the file format's allowlist of "
                "torch, operator and math functions", hint="save graphs of torch ops (fxopt's "
                "passes write only those), or wrap the call in a leaf module of torch.nn")
        return name
    if n.op == "call_method" and not tensor_method_allowed(n.target):
        raise FileFormatError(f"node '{n.name}' calls the method {n.target!r}, which is not a "
                              "public Tensor method", hint="use a torch function instead")
    return n.target


def _encode_graph(gm: fx.GraphModule, w: _Writer) -> dict:
    nodes = []
    for n in gm.graph.nodes:
        node = {"name": n.name, "op": n.op, "target": _target(n, gm),
                "args": w.value(n.args, n.name), "kwargs": w.value(n.kwargs, n.name)}
        if n.type is not None and n.type in _TYPE_NAMES:  # annotations: simple types only
            node["type"] = _TYPE_NAMES[n.type]
        nodes.append(node)
    graph = {"nodes": nodes}
    codegen = gm.graph._codegen
    if type(codegen) is not fx.graph.CodeGen:
        from torch.utils._pytree import treespec_dumps
        info = getattr(codegen, "pytree_info", None)
        if info is None:
            raise FileFormatError(f"the graph's code generator {type(codegen).__name__} cannot "
                                  "be saved", hint="capture the model with fxopt.capture")
        graph["pytree"] = {"orig_args": list(info.orig_args),
                           "in_spec": None if info.in_spec is None else
                           treespec_dumps(info.in_spec),
                           "out_spec": None if info.out_spec is None else
                           treespec_dumps(info.out_spec)}
    return graph


def _encode_root(gm: fx.GraphModule, w: _Writer) -> dict:
    """The GraphModule's own state: its parameters, buffers, submodules, and the plain
    attributes its get_attr nodes read (prepacked weights, constants)."""
    internal = set(fx.GraphModule(nn.Module(), fx.Graph()).__dict__)
    internal |= {"_in_spec", "_out_spec"}  # recompile() sets them from the graph's codegen
    state = {k: v for k, v in gm.__dict__.items() if k not in internal}
    for k in ("training", "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        state[k] = gm.__dict__[k]
    for k in _HOOKS:
        if gm.__dict__.get(k):
            raise FileFormatError(f"the module has {k.strip('_').replace('_', ' ')}: hooks are "
                                  "code, and the file holds no code",
                                  hint="remove the hooks before saving")
    return {k: w.value(v, k) for k, v in state.items()}


def _fxopt_version() -> str:
    try:
        return importlib.metadata.version("fxopt")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _report(w: _Writer, report: dict):
    """The report as tagged data (tuples stay tuples); what is not data, as its str."""
    try:
        return w.value(report, "report")
    except FileFormatError:
        return w.value(json.loads(json.dumps(report, default=str)), "report")


def write_module(path: str | os.PathLike, gm: fx.GraphModule, *, target: str,
                 report: dict) -> Path:
    """Write ``gm`` with its target and report to ``path`` (see the module docstring)."""
    from safetensors.torch import save as st_save

    if not isinstance(path, (str, os.PathLike)):
        raise FileFormatError(f"path must be a str or a pathlib.Path, got {type(path).__name__}",
                              hint="save('model.fxopt')")
    path = Path(path)
    if path.is_dir():
        raise FileFormatError(f"{path} is a folder", hint=f"save to a file: {path / 'model.fxopt'}")
    w = _Writer()
    w.engines = {id(_get_attr(gm, n.target)): n.meta[ENGINE_META] for n in gm.graph.nodes
                 if n.op == "get_attr" and ENGINE_META in n.meta}
    graph = _encode_graph(gm, w)
    root = _encode_root(gm, w)
    manifest = {"format": "fxopt", "format_version": FORMAT_VERSION, "fxopt": _fxopt_version(),
                "torch": torch.__version__, "target": target,
                "report": _report(w, report),
                "graph": graph, "root": root, "tensors": w.table}
    try:
        text = json.dumps(manifest, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise FileFormatError(f"the module's report or state is not JSON data: {e}",
                              hint="report it: fxopt writes JSON-able reports") from e
    write_archive(path, text, st_save(w.tensors) if w.tensors else b"")
    return path


# -- reading --------------------------------------------------------------------------------------
class SavedModule:
    """What ``read_module`` returns: the GraphModule, the target and the report (a dict)."""

    def __init__(self, graph_module: fx.GraphModule, target: str, report: dict, manifest: dict):
        self.graph_module, self.target, self.report, self.manifest = (graph_module, target,
                                                                      report, manifest)


class _Reader:
    def __init__(self, path: Path, manifest: dict, tensors: dict[str, torch.Tensor],
                 classes: dict[str, type]):
        self.path, self.manifest, self.raw, self.classes = path, manifest, tensors, classes
        self.table = manifest.get("tensors")
        if not isinstance(self.table, dict):
            raise bad(path, "the manifest has no tensor table")
        self.done: dict[str, torch.Tensor] = {}
        self.env: dict[str, fx.Node] = {}
        self.engine_of: dict[int, str] = {}  # id of a packed weight -> its engine
        self.keep: list = []

    def tensor(self, key: str) -> torch.Tensor:
        if key in self.done:
            return self.done[key]
        entry = self.table.get(key) if isinstance(key, str) else None
        if entry is None:
            raise bad(self.path, f"tensor {key!r} is not in the manifest's tensor table")
        if key not in self.raw:
            raise bad(self.path, f"tensor {key!r} is missing from {TENSORS}")
        t = self.raw[key]
        dtype = _DTYPES.get(entry.get("dtype"))
        if dtype is None or t.dtype != dtype or list(t.shape) != list(entry.get("shape", ())):
            raise bad(self.path, f"tensor {key!r} is {t.dtype} {list(t.shape)} in {TENSORS}, "
                       f"the manifest says {entry.get('dtype')} {entry.get('shape')}")
        if entry.get("stride") is not None:
            stride = [int(s) for s in entry["stride"]]
            if len(stride) != t.dim() or not _dense_strides(t.shape, stride):
                raise bad(self.path, f"tensor {key!r} has strides {stride} that do not fit it")
            t = torch.empty_strided(t.shape, stride, dtype=t.dtype).copy_(t)
        if entry.get("parameter"):
            t = nn.Parameter(t, requires_grad=bool(entry.get("requires_grad")))
        elif entry.get("requires_grad"):
            t.requires_grad_(True)
        self.done[key] = t
        return t

    def qtensor(self, q: dict) -> torch.Tensor:
        codes = self.value(q["int_repr"])
        want = {"qint8": torch.int8, "quint8": torch.uint8, "qint32": torch.int32}
        if q.get("dtype") not in want or codes.dtype != want[q["dtype"]]:
            raise bad(self.path, f"a quantized tensor of dtype {q.get('dtype')} has codes of "
                       f"dtype {codes.dtype}")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
            if "axis" in q:
                return torch._make_per_channel_quantized_tensor(
                    codes, self.value(q["scales"]), self.value(q["zero_points"]), int(q["axis"]))
            return torch._make_per_tensor_quantized_tensor(codes, float(self.value(q["scale"])),
                                                          int(q["zero_point"]))

    def packed(self, p: dict):
        w, b = self.value(p["weight"]), self.value(p["bias"])
        if not isinstance(w, torch.Tensor) or not w.is_quantized:
            raise bad(self.path, "a packed weight without int8 codes")
        engine = p.get("engine")
        with _packing_engine(engine) as used, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
            if engine and used != engine:
                warnings.warn(f"{self.path}: int8 weights were packed for PyTorch's '{engine}' "
                              f"quantized engine, not available here; packed for '{used}' (the "
                              "outputs may differ by one output step)", stacklevel=4)
            if p["kind"] == "conv2d":
                if p.get("transpose"):
                    obj = torch.ops.quantized.conv_transpose2d_prepack(
                        w, b, p["stride"], p["padding"], p["output_padding"], p["dilation"],
                        int(p["groups"]))
                else:
                    obj = torch.ops.quantized.conv2d_prepack(w, b, p["stride"], p["padding"],
                                                             p["dilation"], int(p["groups"]))
            elif p["kind"] == "linear":
                obj = torch.ops.quantized.linear_prepack(w, b)
            else:
                raise bad(self.path, f"unknown packed weight kind {p['kind']!r}")
        return obj, used

    def module(self, m: dict) -> nn.Module:
        name = m.get("class")
        cls = _resolve_class(name, self.classes) if isinstance(name, str) else None
        if cls is None:
            raise bad(self.path, f"a submodule of class {name!r}, which is neither torch.nn's "
                       "nor one passed in modules=",
                       f"if you trust the class, pass it: fxopt.load(path, modules=[{name}])"
                       .replace(":", "."))
        if not isinstance(m.get("state"), dict):
            raise bad(self.path, f"the state of a {name} is not a dict of names")
        state = {k: self.value(v, k) for k, v in m["state"].items()}
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        obj.__setstate__(state)
        return obj

    def value(self, v, where: str = ""):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, list):
            return [self.value(x, where) for x in v]
        if not isinstance(v, dict) or len(v) != 1:
            raise bad(self.path, f"malformed value {str(v)[:80]!r} in the manifest")
        (tag, x), = v.items()
        if tag == "node":
            if x not in self.env:
                raise bad(self.path, f"an argument names node {x!r}, not defined before it")
            return self.env[x]
        if tag == "tensor":
            return self.tensor(x)
        if tag == "qtensor":
            return self.qtensor(x)
        if tag == "tuple":
            return tuple(self.value(y, where) for y in x)
        if tag == "set":
            return {self.value(y, where) for y in x}
        if tag == "dict":
            out = {}
            for k, y in x:
                key = self.value(k, where)
                out[key] = self.value(y, f"{where}.{key}")
            return out
        if tag == "module":
            return self.module(x)
        if tag == "packed":
            obj, used = self.packed(x)
            self.engine_of[id(obj)] = used
            self.keep.append(obj)
            return obj
        if tag == "fn":
            fn = allowed_function(x)
            if fn is None:
                raise bad(self.path, f"a value names the function {x!r}, which is not on "
                           "fxopt's allowlist: refused, nothing was run")
            return fn
        if tag == "size":
            return torch.Size([int(i) for i in x])
        if tag == "dtype" and x in _DTYPES:
            return _DTYPES[x]
        if tag == "dtype" and x in _QDTYPES:
            return _QDTYPES[x]
        if tag == "device":
            return torch.device(x)
        if tag == "slice":
            return slice(*(self.value(y) for y in x))
        if tag == "ellipsis":
            return Ellipsis
        if tag == "float" and x in ("inf", "-inf", "nan"):
            return float(x)
        if tag == "complex":
            return complex(*x)
        if tag in _OTHER_BY_NAME and x in _OTHER_BY_NAME[tag]:
            return _OTHER_BY_NAME[tag][x]
        raise bad(self.path, f"malformed value {{{tag!r}: {str(x)[:60]!r}}} in the manifest")

    def node_target(self, n: dict):
        op, target = n["op"], n["target"]
        if op == "call_function":
            fn = allowed_function(target)
            if fn is None:
                raise bad(self.path, f"node {n.get('name')!r} calls {target!r}, which is not "
                           "on fxopt's allowlist of functions: refused, nothing was run")
            return fn
        # fx writes these names into the module's Python source: identifiers only
        pattern = {"placeholder": _PLACEHOLDER, "output": _IDENT, "call_method": _IDENT}.get(
            op, _DOTTED)
        if not isinstance(target, str) or not pattern.fullmatch(target):
            raise bad(self.path, f"node {n.get('name')!r} has the target {str(target)[:60]!r}, "
                       "not a name: refused, nothing was run")
        if op == "call_method" and not tensor_method_allowed(target):
            raise bad(self.path, f"node {n.get('name')!r} calls the method {target!r}, which "
                       "is not a public Tensor method: refused, nothing was run")
        if op not in ("placeholder", "get_attr", "call_method", "call_module", "output"):
            raise bad(self.path, f"node {n.get('name')!r} has an unknown op {op!r}")
        return target

    def graph(self, g: dict) -> fx.Graph:
        graph = fx.Graph()
        for n in g["nodes"]:
            target = self.node_target(n)
            args, kwargs = self.value(n["args"], n["name"]), self.value(n["kwargs"], n["name"])
            if not isinstance(args, tuple) or not isinstance(kwargs, dict):
                raise bad(self.path, f"node {n['name']!r}: args must be a tuple, kwargs a dict")
            if not all(isinstance(k, str) and _IDENT.fullmatch(k) for k in kwargs):
                raise bad(self.path, f"node {n['name']!r} has keyword names that are not "
                           "identifiers: refused, nothing was run")
            if target is getattr and not (len(args) >= 2 and isinstance(args[1], str)
                                          and public_name(args[1])):
                raise bad(self.path, f"node {n['name']!r} reads a private attribute "
                           f"({args[1:2]!r}): refused")
            node = graph.create_node(n["op"], target, args, kwargs, name=n["name"],
                                     type_expr=_TYPES.get(n.get("type")))
            if node.name != n["name"]:
                raise bad(self.path, f"node name {n['name']!r} is not a plain name, or "
                           "is used twice: refused, nothing was run")
            self.env[node.name] = node
        if "pytree" in g:
            from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
            from torch.utils._pytree import treespec_loads
            p = g["pytree"]
            if not all(isinstance(a, str) and _IDENT.fullmatch(a) for a in p["orig_args"]):
                raise bad(self.path, "the graph's argument names are not identifiers")
            graph._codegen = _PyTreeCodeGen(_PyTreeInfo(
                list(p["orig_args"]), None if p["in_spec"] is None else
                treespec_loads(p["in_spec"]),
                None if p["out_spec"] is None else treespec_loads(p["out_spec"])))
        graph.lint()
        return graph


def _build(reader: _Reader, manifest: dict) -> fx.GraphModule:
    graph = reader.graph(manifest["graph"])
    if not isinstance(manifest["root"], dict):
        raise bad(reader.path, "the manifest's root state is not a dict")
    root = {k: reader.value(v, k) for k, v in manifest["root"].items()}
    gm = fx.GraphModule(nn.Module(), fx.Graph())
    for k in ("_parameters", "_buffers", "_modules"):
        entry = root.pop(k, {})
        if not isinstance(entry, dict):
            raise bad(reader.path, f"the root's {k} is not a dict")
        getattr(gm, k).update(entry)
    gm._non_persistent_buffers_set = set(root.pop("_non_persistent_buffers_set", set()))
    gm.training = bool(root.pop("training", False))
    for k, v in root.items():
        if not _IDENT.fullmatch(k) or k.startswith("__") or k in gm.__dict__ \
                or hasattr(type(gm), k):
            raise bad(reader.path, f"the root's attribute {k!r} is not allowed")
        setattr(gm, k, v)
    gm.graph = graph  # recompiles
    for n in graph.nodes:
        if n.op not in ("get_attr", "call_module"):
            continue
        try:
            value = _get_attr(gm, n.target)
        except AttributeError as e:
            raise bad(reader.path, f"node {n.name!r} reads {n.target!r}, which the file "
                       "does not hold") from e
        if n.op == "call_module" and not isinstance(value, nn.Module):
            raise bad(reader.path, f"node {n.name!r} calls {n.target!r}, not a module")
        if not isinstance(value, (torch.Tensor, torch.ScriptObject, nn.Module)):
            raise bad(reader.path, f"node {n.name!r} reads {n.target!r}, a "
                       f"{type(value).__name__}: only tensors, packed weights and modules")
        if id(value) in reader.engine_of:
            n.meta[ENGINE_META] = reader.engine_of[id(value)]
    return gm


def _get_attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def read_module(path: str | os.PathLike, *, modules: Iterable[type] = ()) -> SavedModule:
    """Read a file written by :func:`write_module`; never runs code from it (module docstring).

    ``modules``: classes of user leaf modules the file may name (trusted code, the caller's)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    if not isinstance(path, (str, os.PathLike)):
        raise FileFormatError(f"path must be a str or a pathlib.Path, got {type(path).__name__}",
                              hint="fxopt.load('model.fxopt')")
    path = Path(path)
    classes = {}
    for cls in modules:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise FileFormatError(f"modules= takes nn.Module subclasses, got {cls!r}",
                                  hint="fxopt.load(path, modules=[MyBlock])")
        classes[_class_name(cls)] = cls
    text, blob = read_archive(path)
    try:
        manifest = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(path, f"its manifest is not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != "fxopt":
        raise bad(path, "not an fxopt module file (the manifest does not say format 'fxopt')")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 2:
        raise bad(path, f"unknown format version {version!r}")
    if version > FORMAT_VERSION:
        raise FileFormatError(f"{path} was written by a newer fxopt ({manifest.get('fxopt')}, "
                              f"format {version}; this fxopt reads up to {FORMAT_VERSION})",
                              hint="upgrade fxopt")
    try:
        tensors = st_load(blob) if blob else {}
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise bad(path, f"its tensors are corrupt ({e})",
                   "save the module again with OptimizedModule.save") from e
    reader = _Reader(path, manifest, tensors, classes)
    try:
        gm = _build(reader, manifest)
    except FileFormatError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
        raise bad(path, f"malformed manifest ({type(e).__name__}: {e})") from e
    try:
        report = reader.value(manifest.get("report", {"dict": []}), "report")
    except FileFormatError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise bad(path, f"malformed report ({type(e).__name__}: {e})") from e
    if not isinstance(report, dict):
        raise bad(path, "the manifest's report is not a dict")
    return SavedModule(gm, str(manifest.get("target", "cpu")), report, manifest)
