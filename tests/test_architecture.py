"""The package's shape, checked: no import cycle, dependencies one way, no private names across
modules (ARCHITECTURE.md, "Layers").

The import graph is read from the source (every ``import`` and ``from ... import`` statement,
inside functions too: a late import still makes two modules depend on each other), with
``passes/`` and ``triton_kernels/`` under their installed names ``fxopt.passes`` and
``fxopt.triton_kernels``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"fxopt": ROOT / "fxopt", "fxopt.passes": ROOT / "passes",
           "fxopt.triton_kernels": ROOT / "triton_kernels"}

# Each layer may import only from itself and the layers listed after it (a module's layer is
# that of the longest prefix below); fxopt/__init__.py, the facade, may import anything.
LAYERS = {
    "fxopt.triton_kernels": [],
    "fxopt.errors": [],
    "fxopt.ir": ["fxopt.errors"],
    "fxopt.ops": ["fxopt.ir", "fxopt.errors", "fxopt.triton_kernels"],
    "fxopt.infra": ["fxopt.ir", "fxopt.ops", "fxopt.errors"],
    "fxopt.quant": ["fxopt.infra", "fxopt.ir", "fxopt.ops", "fxopt.errors"],
    "fxopt.prune": ["fxopt.infra", "fxopt.ir", "fxopt.ops", "fxopt.errors"],
    "fxopt.pipelines": ["fxopt.infra", "fxopt.errors"],
    "fxopt.passes": ["fxopt.quant", "fxopt.prune", "fxopt.infra", "fxopt.ir", "fxopt.ops",
                     "fxopt.errors", "fxopt.triton_kernels"],
    "fxopt.export.allowlist": ["fxopt.ops", "fxopt.errors"],
    "fxopt.export.archive": ["fxopt.errors"],
    "fxopt.export.fileformat": ["fxopt.export.allowlist", "fxopt.export.archive", "fxopt.ir",
                                "fxopt.ops", "fxopt.errors"],
    # the ONNX export and the engines it feeds (fxopt.export.engines) sit below the api:
    # optimize(target="openvino") deploys through them
    "fxopt.export": ["fxopt.export.fileformat", "fxopt.quant", "fxopt.infra", "fxopt.ir",
                     "fxopt.ops", "fxopt.errors"],
    "fxopt.api": ["fxopt.export", "fxopt.export.fileformat", "fxopt.pipelines", "fxopt.passes",
                  "fxopt.quant", "fxopt.prune", "fxopt.infra", "fxopt.ir", "fxopt.ops",
                  "fxopt.errors"],
    "fxopt.train": ["fxopt.api", "fxopt.pipelines", "fxopt.quant", "fxopt.prune",
                    "fxopt.infra", "fxopt.ir", "fxopt.ops", "fxopt.errors"],
    "fxopt.tools": ["fxopt.train", "fxopt.export", "fxopt.api", "fxopt.pipelines",
                    "fxopt.quant", "fxopt.prune", "fxopt.infra", "fxopt.ir", "fxopt.ops",
                    "fxopt.errors", "fxopt"],
    "fxopt.fuzz": ["fxopt.export", "fxopt.api", "fxopt.quant", "fxopt.infra", "fxopt.ir",
                   "fxopt.errors", "fxopt"],
    "fxopt.__main__": ["fxopt.tools"],
}


def _modules() -> dict[str, Path]:
    out = {}
    for prefix, root in SOURCES.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("").parts
            name = ".".join((prefix, *rel))
            out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import statement in ``name``."""
    tree = ast.parse(MODULES[name].read_text())
    pkg = name if _is_package(name) else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            for a in node.names:  # ``from pkg import module`` imports that module
                sub = f"{mod}.{a.name}"
                out.append((sub, [], node.lineno) if sub in MODULES else
                           (mod, [a.name], node.lineno))
    return [(m, names, line) for m, names, line in out if m in MODULES]


def import_graph() -> nx.DiGraph:
    g = nx.DiGraph()
    g.add_nodes_from(MODULES)
    for name in MODULES:
        for target, _, line in _imports(name):
            if target != name:
                g.add_edge(name, target, line=line)
    return g


def _layer(name: str) -> str | None:
    best = None
    for layer in LAYERS:
        inside = name == layer or name.startswith(layer + ".")
        if inside and (best is None or len(layer) > len(best)):
            best = layer
    return best


def test_the_package_has_no_import_cycle():
    cycles = list(nx.simple_cycles(import_graph()))
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c + [c[0]]) for c in cycles[:5])


def test_dependencies_point_one_way():
    wrong = []
    for a, b, data in import_graph().edges(data=True):
        if a == "fxopt" or b == "fxopt" and a.startswith(("fxopt.tools", "fxopt.fuzz")):
            continue  # the facade re-exports; the command line and the fuzzer use the facade
        la, lb = _layer(a), _layer(b)
        assert la is not None, f"{a} belongs to no layer: add it to LAYERS"
        if lb != la and lb not in LAYERS[la]:
            wrong.append(f"{a}:{data['line']} imports {b} ({la} may not depend on {lb})")
    assert wrong == []


def test_nothing_outside_the_passes_imports_a_particular_pass():
    # the core reaches passes through the registry; importing the package registers them all
    wrong = [f"{a}:{data['line']} imports {b}" for a, b, data in import_graph().edges(data=True)
             if b.startswith("fxopt.passes.") and not a.startswith("fxopt.passes")]
    assert wrong == []


def test_no_private_name_is_imported_across_modules():
    crossing = [f"{name}:{line} imports {n} from {mod}"
                for name in MODULES for mod, names, line in _imports(name)
                for n in names if n.startswith("_") and not n.startswith("__")]
    assert crossing == []


def test_every_module_declares_all():
    missing = [name for name, path in MODULES.items()
               if "__all__" not in path.read_text() and not _is_package(name)]
    assert missing == []


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_every_layer_exists(layer):
    assert any(m == layer or m.startswith(layer + ".") for m in MODULES)
