"""The ``.fxopt`` file format (``fxopt.export.fileformat``): no pickle, bitwise round trips,
typed errors for every malformed file, and crafted files refused without running anything."""
from __future__ import annotations

import ast
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.export import fileformat
from fxopt.export.fileformat import ENGINE_META, MANIFEST, TENSORS

ROOT = Path(__file__).resolve().parents[3]
QUANTIZED = "fbgemm" in torch.backends.quantized.supported_engines or \
    "x86" in torch.backends.quantized.supported_engines


class Net(nn.Module):
    """conv-bn-relu, a residual block, a max pool, global pooling and a classifier."""

    def __init__(self, c=8):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(c, 10)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        y = F.relu(self.bn1(self.c1(x)))
        y = self.pool(torch.relu(self.bn2(self.c2(y)) + y))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class Mobile(nn.Module):
    """Epilogues only oneDNN's int8 kernels fuse: conv + hardswish, depthwise + SiLU, GELU."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1, stride=2)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 10)

    def forward(self, x):
        y = F.silu(self.dw(F.hardswish(self.c1(x))))
        return self.fc2(F.gelu(self.fc1(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))))


class Seq(nn.Module):
    """An LSTM kept as a leaf module (call_module), then a linear head."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 8, batch_first=True, num_layers=2)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.head(y[:, -1])


class Scale(nn.Module):
    """A user leaf module (importable: defined in this test module)."""

    def __init__(self, c):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, c).view(1, c, 1, 1))
        self.power = 2

    def forward(self, x):
        return x * self.gain ** self.power


class WithScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.scale = nn.Conv2d(3, 4, 3), Scale(4)

    def forward(self, x):
        return self.scale(F.relu(self.conv(x)))


def _batches(n=3, shape=(4, 3, 8, 8), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def _state(m: nn.Module) -> dict:
    out = {}
    for kind, items in (("p", m.named_parameters()), ("b", m.named_buffers())):
        for name, t in items:
            out[f"{kind}:{name}"] = t
    return out


def _packed(gm) -> dict:
    out = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            v = getattr(gm, n.target) if "." not in n.target else gm.get_parameter(n.target)
            if isinstance(v, torch.ScriptObject):
                out[n.target] = (n.meta.get(ENGINE_META), v)
    return out


def _unpack(obj):
    kind = obj._type().qualified_name().rsplit(".", 1)[-1]
    if kind == "Conv2dPackedParamsBase":
        return torch.ops.quantized.conv2d_unpack(obj)
    return torch.ops.quantized.linear_unpack(obj)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        if a.is_quantized:
            return (b.is_quantized and a.qscheme() == b.qscheme()
                    and torch.equal(a.int_repr(), b.int_repr())
                    and torch.equal(a.dequantize(), b.dequantize()))
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def roundtrip(opt, inputs, tmp_path, name="m.fxopt", **load_kw):
    """Save, load, and check: same code, same state (bit for bit, Parameter-ness,
    requires_grad, strides), same packed weights and engines, same report, same outputs."""
    path = opt.save(tmp_path / name)
    with zipfile.ZipFile(path) as z:
        assert sorted(z.namelist()) == sorted([MANIFEST, TENSORS])
        assert not any(n.endswith(".pkl") for n in z.namelist())
    engine = torch.backends.quantized.engine
    back = fxopt.load(path, **load_kw)
    assert torch.backends.quantized.engine == engine  # restored after repacking
    assert back.code == opt.code and back.target == opt.target
    assert back.report.to_dict() == opt.report.to_dict()
    sa, sb = _state(opt), _state(back)
    assert sa.keys() == sb.keys()
    for k in sa:
        a, b = sa[k], sb[k]
        assert type(a) is type(b) and a.requires_grad == b.requires_grad, k
        assert a.dtype == b.dtype and a.stride() == b.stride() and torch.equal(a, b), k
    pa, pb = _packed(opt.graph_module), _packed(back.graph_module)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k][0] == pb[k][0], k  # the engine it was packed for
        assert _same(_unpack(pa[k][1]), _unpack(pb[k][1])), k
    for x in inputs:
        with torch.no_grad():
            want, got = opt(*x) if isinstance(x, tuple) else opt(x), \
                back(*x) if isinstance(x, tuple) else back(x)
        assert _same(want, got)
    return back, path


# -- bitwise round trips ---------------------------------------------------------------------------
def test_cpu_float(tmp_path):
    torch.manual_seed(0)
    opt = fxopt.optimize(Net().eval(), torch.randn(2, 3, 8, 8), target="cpu")
    back, _ = roundtrip(opt, _batches(seed=5), tmp_path)
    # save(load(save)) is the same file content (manifest and tensors)
    again = back.save(tmp_path / "again.fxopt")
    with zipfile.ZipFile(tmp_path / "m.fxopt") as a, zipfile.ZipFile(again) as b:
        assert a.read(TENSORS) == b.read(TENSORS)
        ma, mb = json.loads(a.read(MANIFEST)), json.loads(b.read(MANIFEST))
        assert ma["graph"] == mb["graph"] and ma["root"] == mb["root"]


def test_pruned(tmp_path):
    torch.manual_seed(0)
    opt = fxopt.optimize(Net(16).eval(), torch.randn(2, 3, 8, 8), prune=0.5)
    assert opt.report.record("prune_channels").modified
    roundtrip(opt, _batches(seed=6), tmp_path)


@pytest.mark.skipif(not QUANTIZED, reason="PyTorch's quantized CPU engine is not available")
def test_cpu_int8_packed_weights_keep_their_engine(tmp_path):
    """Small layers are packed under fbgemm (the lowering's choice), the rest under the global
    engine: the file records which, load packs each under it again: outputs bitwise equal."""
    torch.manual_seed(0)
    opt = fxopt.optimize(Net().eval(), torch.randn(2, 3, 8, 8), quantize="int8",
                         calibration_data=_batches(), target="cpu")
    packed = _packed(opt.graph_module)
    assert packed and all(engine is not None for engine, _ in packed.values())
    inputs = _batches(n=8, seed=9) + [torch.randn(1, 3, 8, 8) * 4]
    roundtrip(opt, inputs, tmp_path)


@pytest.mark.skipif(not QUANTIZED, reason="PyTorch's quantized CPU engine is not available")
def test_cpu_int8_under_another_global_engine(tmp_path):
    """Loaded while the process's engine is another one, the weights still pack as saved."""
    torch.manual_seed(1)
    opt = fxopt.optimize(Net().eval(), torch.randn(2, 3, 8, 8), quantize="int8",
                         calibration_data=_batches(), target="cpu")
    path = opt.save(tmp_path / "m.fxopt")
    others = [e for e in ("onednn", "x86", "fbgemm") if e in
              torch.backends.quantized.supported_engines and e != torch.backends.quantized.engine]
    if not others:
        pytest.skip("one quantized engine only")
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = others[0]
    try:
        back = fxopt.load(path)
        assert torch.backends.quantized.engine == others[0]
    finally:
        torch.backends.quantized.engine = before
    assert {k: e for k, (e, _) in _packed(back.graph_module).items()} == \
        {k: e for k, (e, _) in _packed(opt.graph_module).items()}
    for x in _batches(n=4, seed=3):
        with torch.no_grad():
            assert torch.equal(back(x), opt(x))


@pytest.mark.skipif(not QUANTIZED, reason="PyTorch's quantized CPU engine is not available")
def test_cpu_int8_onednn_epilogues(tmp_path):
    torch.manual_seed(0)
    opt = fxopt.optimize(Mobile().eval(), torch.randn(2, 3, 16, 16), quantize="int8",
                         calibration_data=_batches(shape=(4, 3, 16, 16)))
    roundtrip(opt, _batches(n=4, shape=(2, 3, 16, 16), seed=4), tmp_path)


def test_dynamic_int8(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    opt = fxopt.optimize(m, torch.randn(3, 16), quantize="int8_dynamic")
    roundtrip(opt, [torch.randn(5, 16) for _ in range(3)], tmp_path)


def test_lstm_leaf_module(tmp_path):
    torch.manual_seed(0)
    opt = fxopt.optimize(Seq().eval(), torch.randn(2, 5, 6))
    assert any(n.op == "call_module" and isinstance(opt.graph_module.get_submodule(n.target),
                                                    nn.LSTM) for n in opt.graph_module.graph.nodes)
    back, _ = roundtrip(opt, [torch.randn(3, 7, 6)], tmp_path)
    lstm = back.graph_module.get_submodule("lstm")
    assert [p.data_ptr() for p in lstm._flat_weights] == \
        [p.data_ptr() for p in lstm.parameters()]  # the flat weights are the parameters


def test_transformer_layer_with_a_function_attribute(tmp_path):
    """nn.TransformerEncoderLayer keeps ``activation=F.gelu``: saved as an allowlisted name."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.TransformerEncoderLayer(
        16, 2, 32, dropout=0.0, activation=F.gelu, batch_first=True)).eval()
    opt = fxopt.optimize(m, torch.randn(2, 5, 16))
    back, _ = roundtrip(opt, [torch.randn(3, 4, 16)], tmp_path)
    assert any(getattr(mod, "activation", None) is F.gelu for mod in back.modules())


def test_user_leaf_module_needs_the_class_from_the_caller(tmp_path):
    torch.manual_seed(0)
    opt = fxopt.optimize(WithScale().eval(), torch.randn(1, 3, 8, 8), leaf_modules=[Scale])
    path = opt.save(tmp_path / "m.fxopt")
    with pytest.raises(fxopt.FileFormatError, match="Scale") as e:
        fxopt.load(path)
    assert "modules=" in e.value.hint
    roundtrip(opt, [torch.randn(2, 3, 8, 8)], tmp_path, modules=[Scale])


@pytest.mark.slow
@pytest.mark.parametrize("arch,size", [("resnet18", 32), ("mobilenet_v3_small", 64)])
def test_torchvision(arch, size, tmp_path):
    import torchvision
    torch.manual_seed(0)
    m = getattr(torchvision.models, arch)().eval()
    x = torch.randn(1, 3, size, size)
    roundtrip(fxopt.optimize(m, x), [torch.randn(2, 3, size, size)], tmp_path)
    if QUANTIZED and arch == "resnet18":
        cal = [torch.randn(2, 3, size, size) for _ in range(2)]
        opt = fxopt.optimize(m, x, quantize="int8", calibration_data=cal)
        roundtrip(opt, [torch.randn(2, 3, size, size)], tmp_path, name="q.fxopt")


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.randn(5))

    def forward(self, x):
        return x * self.p


def test_shared_strided_and_tied_tensors(tmp_path):
    """A channels-last buffer, a strided non-persistent view of it, a parameter under two
    names, a plain tensor attribute: the same objects, strides and kinds after loading."""
    gm = torch.fx.symbolic_trace(Tied())
    gm.register_buffer("w", torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last))
    gm.register_buffer("v", gm.w[0], persistent=False)
    gm.q = gm.p
    gm.c = torch.arange(3)
    path = fileformat.write_module(tmp_path / "g.fxopt", gm, target="cpu", report={"a": (1, 2)})
    saved = fileformat.read_module(path)
    back = saved.graph_module
    assert saved.report == {"a": (1, 2)} and back.code == gm.code
    assert back.p is back.q and isinstance(back.p, nn.Parameter) and back.p.requires_grad
    assert back.w.stride() == gm.w.stride() and back.v.stride() == gm.v.stride()
    assert torch.equal(back.w, gm.w) and torch.equal(back.v, gm.v)
    assert back._non_persistent_buffers_set == {"v"} and "c" not in dict(back.named_buffers())
    assert torch.equal(back.c, gm.c)
    x = torch.randn(3, 5)
    assert torch.equal(back(x), gm(x))


class Pairs(nn.Module):
    def forward(self, xs):
        a, b = xs
        return {"s": a + b, "d": [a - b, a.shape[0]]}


class MaybeBias(nn.Module):
    def forward(self, x, z=None):
        return x if z is None else x + z


def test_pytree_inputs_outputs_and_constant_arguments(tmp_path):
    """concrete_args: a None argument (fx asserts it) and a tuple input (pytree code)."""
    gm = torch.fx.symbolic_trace(Pairs(), concrete_args={"xs": (torch.fx.PH, torch.fx.PH)})
    assert type(gm.graph._codegen).__name__ == "_PyTreeCodeGen"
    path = fileformat.write_module(tmp_path / "p.fxopt", gm, target="cpu", report={})
    back = fileformat.read_module(path).graph_module
    xs = (torch.randn(3), torch.randn(3))
    assert back.code == gm.code
    want, got = gm(xs), back(xs)
    assert torch.equal(want["s"], got["s"]) and torch.equal(want["d"][0], got["d"][0])
    assert got["d"][1] == 3
    gm = torch.fx.symbolic_trace(MaybeBias(), concrete_args={"z": None})
    assert "_assert_is_none" in gm.code
    back = fileformat.read_module(fileformat.write_module(tmp_path / "n.fxopt", gm, target="cpu",
                                                          report={})).graph_module
    assert back.code == gm.code and torch.equal(back(xs[0]), xs[0])


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
    for rel in ("fxopt/api.py", "fxopt/export/fileformat.py"):
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


def test_the_allowlist():
    allowed = fileformat.allowed_function
    assert allowed("torch.ops.fxopt.conv2d_act.default") is torch.ops.fxopt.conv2d_act.default
    assert allowed("torch.ops.quantized.conv2d") is torch.ops.quantized.conv2d
    assert allowed("torch.flatten") is torch.flatten and allowed("operator.add") is not None
    assert allowed("torch.nn.functional.relu") is F.relu
    for name in ("os.system", "builtins.eval", "builtins.exec", "builtins.open", "torch.load",
                 "torch.save", "torch.from_file", "torch.hub.load", "operator.attrgetter",
                 "operator.call", "torch.ops.load_library", "torch.ops.aten.from_file",
                 "torch.ops.myns.op", "torch.fx.graph_module._exec_with_source",
                 "torch.Tensor.__reduce_ex__", "builtins.__import__", None, 3):
        assert allowed(name) is None, name
