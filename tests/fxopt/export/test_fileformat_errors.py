"""The ``.fxopt`` file format (``fxopt.export.fileformat``): what cannot be saved is refused at
save (leaving nothing behind), every malformed file is a typed error with a hint, and crafted
files (pickles, manifests whose names would become code) are refused, running nothing."""
from __future__ import annotations

import ast
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

import fxopt
from fxopt.export.fileformat import MANIFEST, TENSORS
from small_nets import Net, Scale, WithScale  # tests/support (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[3]


# -- save errors ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def opt():
    torch.manual_seed(0)
    return fxopt.optimize(Net().eval(), torch.randn(2, 3, 8, 8))


def test_save_to_a_folder_or_unwritable_place(opt, tmp_path):
    with pytest.raises(fxopt.FileFormatError, match="is a folder") as e:
        opt.save(tmp_path)
    assert e.value.hint
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(fxopt.FileFormatError, match="cannot write") as e:
        opt.save(blocker / "m.fxopt")
    assert e.value.hint
    with pytest.raises(fxopt.FileFormatError, match="str or a pathlib.Path"):
        opt.save(42)


def test_a_failed_save_leaves_the_old_file_and_no_temporary(opt, tmp_path):
    import copy
    path = opt.save(tmp_path / "m.fxopt")
    before = path.read_bytes()
    hooked = copy.deepcopy(opt)
    hooked.graph_module.get_submodule("fc").register_forward_hook(lambda *a: None)
    with pytest.raises(fxopt.FileFormatError, match="hooks") as e:
        hooked.save(path)
    assert e.value.hint and path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.fxopt"]


def test_a_module_whose_state_is_not_data_is_refused_at_save(tmp_path):
    m = WithScale().eval()
    opt = fxopt.optimize(m, torch.randn(1, 3, 8, 8), leaf_modules=[Scale])
    opt.graph_module.get_submodule("scale").fn = print
    with pytest.raises(fxopt.FileFormatError, match="scale.fn") as e:
        opt.save(tmp_path / "m.fxopt")
    assert e.value.hint and not list(tmp_path.iterdir())


# -- load errors: every malformed file is a FileFormatError with a hint ---------------------------
def _rewrite(path: Path, out: Path, manifest=None, tensors=None, drop=()):
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist() if n not in drop}
    if manifest is not None:
        m = json.loads(members[MANIFEST])
        manifest(m)
        members[MANIFEST] = json.dumps(m).encode()
    if tensors is not None:
        members[TENSORS] = tensors
    with zipfile.ZipFile(out, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    return out


def _deflated(path: Path, out: Path) -> Path:
    with zipfile.ZipFile(path) as z, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as o:
        for n in z.namelist():
            o.writestr(n, z.read(n))
    return out


def _without_t0(path: Path) -> bytes:
    from safetensors.torch import load, save
    with zipfile.ZipFile(path) as z:
        tensors = load(z.read(TENSORS))
    del tensors["t0"]
    return save(tensors)


def _first(m, op):
    return next(n for n in m["graph"]["nodes"] if n["op"] == op)


def _set_fn(m, name):
    _first(m, "call_function")["target"] = name


def _cases(good: Path, tmp: Path):
    raw = good.read_bytes()
    (tmp / "empty.fxopt").write_bytes(b"")
    (tmp / "trunc.fxopt").write_bytes(raw[: len(raw) // 2])
    (tmp / "random.fxopt").write_bytes(bytes(range(256)) * 40)
    torch.save({"w": torch.zeros(1)}, tmp / "torchsave.pt")
    (tmp / "pickle.pkl").write_bytes(pickle.dumps({"a": 1}))
    (tmp / "folder").mkdir()
    bad_json = tmp / "badjson.fxopt"
    with zipfile.ZipFile(bad_json, "w") as z:
        z.writestr(MANIFEST, "{not json")
        z.writestr(TENSORS, b"")
    shape = lambda m: m["tensors"]["t0"].__setitem__("shape", [1, 2, 3])  # noqa: E731
    dtype = lambda m: m["tensors"]["t0"].__setitem__("dtype", "float64")  # noqa: E731
    return [
        ("missing", tmp / "missing.fxopt", "no such file"),
        ("folder", tmp / "folder", "is a folder"),
        ("empty", tmp / "empty.fxopt", "empty"),
        ("truncated", tmp / "trunc.fxopt", "truncated"),
        ("random", tmp / "random.fxopt", "not an fxopt module file"),
        ("torch.save", tmp / "torchsave.pt", "torch.save pickle"),
        ("pickle", tmp / "pickle.pkl", "pickle"),
        ("bad json", bad_json, "not valid JSON"),
        ("no manifest", _rewrite(good, tmp / "nomanifest.fxopt", drop=[MANIFEST]),
         "no fxopt/manifest.json"),
        ("no tensors", _rewrite(good, tmp / "notensors.fxopt", drop=[TENSORS]), "missing"),
        ("newer", _rewrite(good, tmp / "newer.fxopt",
                           lambda m: m.__setitem__("format_version", 99)), "newer fxopt"),
        ("not fxopt", _rewrite(good, tmp / "fmt.fxopt", lambda m: m.__setitem__("format", "x")),
         "not an fxopt module file"),
        ("os.system", _rewrite(good, tmp / "os.fxopt", lambda m: _set_fn(m, "os.system")),
         "allowlist"),
        ("eval", _rewrite(good, tmp / "eval.fxopt", lambda m: _set_fn(m, "builtins.eval")),
         "allowlist"),
        ("torch.load", _rewrite(good, tmp / "tl.fxopt", lambda m: _set_fn(m, "torch.load")),
         "allowlist"),
        ("op namespace", _rewrite(good, tmp / "ns.fxopt",
                                  lambda m: _set_fn(m, "torch.ops.load_library")), "allowlist"),
        ("method", _rewrite(good, tmp / "meth.fxopt", lambda m: m["graph"]["nodes"].insert(
            1, {"name": "evil", "op": "call_method", "target": "__reduce_ex__",
                "args": {"tuple": [{"node": "x"}, 2]}, "kwargs": {"dict": []}})),
         "not a public Tensor method"),
        ("shape", _rewrite(good, tmp / "shape.fxopt", shape), "the manifest says"),
        ("dtype", _rewrite(good, tmp / "dtype.fxopt", dtype), "the manifest says"),
        ("missing tensor", _rewrite(good, tmp / "mt.fxopt", tensors=_without_t0(good)),
         "missing from"),
        ("corrupt tensors", _rewrite(good, tmp / "ct.fxopt", tensors=b"\x00" * 40), "corrupt"),
        ("dangling node", _rewrite(good, tmp / "dn.fxopt", lambda m: m["graph"]["nodes"].pop(0)),
         "not defined"),
        ("bad value", _rewrite(good, tmp / "bv.fxopt", lambda m: _first(m, "call_function")
                               .__setitem__("args", {"pickle": "x"})), "malformed value"),
        ("deflated", _deflated(good, tmp / "deflated.fxopt"), "compressed"),
        ("missing key", _rewrite(good, tmp / "mk.fxopt", lambda m: m.pop("graph")),
         "malformed manifest"),
    ]


def test_every_malformed_file_is_a_typed_error(opt, tmp_path):
    good = opt.save(tmp_path / "good.fxopt")
    for label, path, match in _cases(good, tmp_path):
        with pytest.raises(fxopt.FileFormatError, match=match) as e:
            fxopt.load(path)
        assert isinstance(e.value, fxopt.InputError) and e.value.hint, label
    with pytest.raises(fxopt.FileFormatError, match="str or a pathlib.Path"):
        fxopt.load(None)
    with pytest.raises(fxopt.FileFormatError, match="modules="):
        fxopt.load(good, modules=[print])


# -- crafted files: refused, nothing runs ---------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_a_crafted_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.fxopt"
    torch.save({"fxopt_format": 1, "graph_module": _Payload(marker), "report": {}}, evil)
    with pytest.raises(fxopt.FileFormatError, match="pickle") as e:
        fxopt.load(evil)
    assert "weights_only=False" in e.value.hint  # how to convert a trusted old file
    (tmp_path / "raw.fxopt").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(fxopt.FileFormatError, match="pickle"):
        fxopt.load(tmp_path / "raw.fxopt")
    assert not marker.exists()


def test_crafted_manifests_are_refused_and_run_nothing(opt, tmp_path):
    """A graph that would write a file if its names reached Python: refused before any code."""
    good = opt.save(tmp_path / "good.fxopt")
    marker = tmp_path / "marker"
    cmd = f"__import__('pathlib').Path({str(marker)!r}).write_text('x')"

    def system(m):
        node = _first(m, "call_function")
        node["target"], node["args"] = "os.system", {"tuple": [f"touch {marker}"]}

    def placeholder(m):
        _first(m, "placeholder")["target"] = f"x={cmd}"

    def get_attr(m):
        _first(m, "get_attr")["target"] = f'a"),{cmd},getattr(self,"b'

    def kwargs(m):
        _first(m, "call_function")["kwargs"] = {"dict": [[f"a={cmd},b", 1]]}

    def private(m):
        m["graph"]["nodes"].insert(1, {"name": "g", "op": "call_function",
                                       "target": "builtins.getattr",
                                       "args": {"tuple": [{"node": "x"}, "__class__"]},
                                       "kwargs": {"dict": []}})

    def module_class(m):
        m["root"]["_modules"]["dict"][0][1]["module"]["class"] = "subprocess:Popen"

    def node_name(m):
        _first(m, "call_function")["name"] = f"y = {cmd}; z"

    def root_attribute(m):
        m["root"]["forward"] = 1

    def dunder_attribute(m):
        _first(m, "get_attr")["target"] = "__class__"

    def not_a_tensor(m):
        _first(m, "get_attr")["target"] = "training"

    for i, change in enumerate((system, placeholder, get_attr, kwargs, private, module_class,
                                node_name, root_attribute, dunder_attribute, not_a_tensor)):
        path = _rewrite(good, tmp_path / f"c{i}.fxopt", change)
        refused = "refused|neither|not allowed|only tensors"
        with pytest.raises(fxopt.FileFormatError, match=refused) as e:
            back = fxopt.load(path)
            back(torch.randn(1, 3, 8, 8))
        assert e.value.hint, change.__name__
        assert not marker.exists(), change.__name__


def test_the_load_path_never_unpickles():
    """Grep-able: nothing on the load path calls torch.load, pickle, eval or exec."""
    for rel in ("fxopt/api.py", "fxopt/export/fileformat.py",
                "fxopt/export/allowlist.py", "fxopt/export/archive.py"):
        tree = ast.parse((ROOT / rel).read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
                assert not any("pickle" in n for n in names), rel
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                assert name not in ("load", "loads", "eval", "exec", "__import__") or (
                    isinstance(f, ast.Attribute) and ast.unparse(f) in ("json.loads",)
                ), f"{rel}:{node.lineno} calls {ast.unparse(f)}"


def test_manifest_deflated_bounded_and_format_2_still_read(opt, tmp_path, monkeypatch):
    """Format 3 deflates the manifest (the report's ~0.4 kB a pass had taken a small int8
    CNN's file past 1.25x torch.ao's state_dict); the tensors stay stored. A format-2 file (all
    stored) still loads; a manifest that declares, or inflates to, more than MAX_MANIFEST is
    refused before it is parsed."""
    from fxopt.export import archive

    good = opt.save(tmp_path / "good.fxopt")
    with zipfile.ZipFile(good) as z:
        methods = {i.filename: i.compress_type for i in z.infolist()}
        members = {n: z.read(n) for n in z.namelist()}
    assert methods == {MANIFEST: zipfile.ZIP_DEFLATED, TENSORS: zipfile.ZIP_STORED}
    x = torch.randn(2, 3, 8, 8)
    stored = tmp_path / "format2.fxopt"
    with zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as o:
        for name, data in members.items():
            o.writestr(name, data)
    with torch.no_grad():
        assert torch.equal(fxopt.load(stored)(x), opt(x))
    monkeypatch.setattr(archive, "MAX_MANIFEST", len(members[MANIFEST]) - 1)
    for path in (good, stored):
        with pytest.raises(fxopt.FileFormatError, match="too large|inflates past"):
            fxopt.load(path)
