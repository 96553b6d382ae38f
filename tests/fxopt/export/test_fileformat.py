"""The ``.fxopt`` file format (``fxopt.export.fileformat``): bitwise round trips (code, state,
int8 weights as plain tensors, legacy packed ones and their engines, report and outputs the same
after load); malformed and
crafted files are ``test_fileformat_errors.py``."""
from __future__ import annotations

import json
import zipfile

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.export import fileformat
from fxopt.export.fileformat import ENGINE_META, MANIFEST, TENSORS
from fxopt.ops.cpu import ONEDNN_CONV2D_INT8, ONEDNN_LINEAR_INT8
from small_nets import MobileBlock, Net, Scale, SmallCNN, WithScale  # tests/support

QUANTIZED = "fbgemm" in torch.backends.quantized.supported_engines or \
    "x86" in torch.backends.quantized.supported_engines


class Seq(nn.Module):
    """An LSTM kept as a leaf module (call_module), then a linear head."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 8, batch_first=True, num_layers=2)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.head(y[:, -1])


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


def _layers(gm) -> dict:
    """Each lowered int8 layer's kernel engine (a call argument), by node name."""
    return {n.name: n.kwargs.get("engine", "onednn") for n in gm.graph.nodes
            if n.target in (ONEDNN_CONV2D_INT8.overload, ONEDNN_LINEAR_INT8.overload)}


@pytest.mark.skipif(not QUANTIZED, reason="PyTorch's quantized CPU engine is not available")
def test_cpu_int8_is_plain_int8_tensors(tmp_path):
    """The lowered int8 module holds plain tensors (no packed ScriptObject, no quantized
    dtype): the file stores each layer's int8 weight, its scales and no float copy of it; the
    layers pack for their kernels on the first call after load: outputs bitwise equal, each
    layer on the engine it was lowered to."""
    torch.manual_seed(0)
    opt = fxopt.optimize(Net().eval(), torch.randn(2, 3, 8, 8), quantize="int8",
                         calibration_data=_batches(), target="cpu")
    gm = opt.graph_module
    assert not _packed(gm) and set(_layers(gm).values()) <= {"onednn", "fbgemm"}
    assert not any(t.is_quantized for t in gm.state_dict().values())
    inputs = _batches(n=8, seed=9) + [torch.randn(1, 3, 8, 8) * 4]
    back, path = roundtrip(opt, inputs, tmp_path)
    assert _layers(back.graph_module) == _layers(gm)
    with zipfile.ZipFile(path) as z:
        table = json.loads(z.read(MANIFEST))["tensors"]
    dtypes = sorted({e["dtype"] for e in table.values()})
    assert "int8" in dtypes and not any(d.startswith("q") for d in dtypes)
    # every conv/linear weight is int8; the float tensors are biases and grids (1-D or scalars)
    assert all(e["dtype"] == "int8" or len(e["shape"]) <= 1 for e in table.values())


@pytest.mark.skipif(not QUANTIZED, reason="PyTorch's quantized CPU engine is not available")
def test_cpu_int8_under_another_global_engine(tmp_path):
    """Loaded and run while the process's engine is another one, each layer still runs the
    kernel it was lowered to (the engine is the call's argument): outputs bitwise equal."""
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
        assert _layers(back.graph_module) == _layers(opt.graph_module)
        for x in _batches(n=4, seed=3):
            with torch.no_grad():
                assert torch.equal(back(x), opt(x))
    finally:
        torch.backends.quantized.engine = before


@pytest.mark.skipif(not QUANTIZED, reason="PyTorch's quantized CPU engine is not available")
def test_legacy_packed_weights_repack_under_their_engine(tmp_path):
    """A graph of PyTorch's quantized ops with prepacked weights (what lower_int8_cpu wrote
    before 2026-12-06, and files saved then) still saves and loads: the weights are written as
    codes with their engine and packed again under it."""
    g = torch.Generator().manual_seed(2)
    w = torch._make_per_channel_quantized_tensor(
        torch.randint(-127, 128, (8, 3, 3, 3), dtype=torch.int8, generator=g),
        torch.rand(8, generator=g, dtype=torch.float64) * 0.01 + 1e-3,
        torch.zeros(8, dtype=torch.int64), 0)
    root, graph = torch.nn.Module(), torch.fx.Graph()
    engine = "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines else None
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine or before
    try:
        root.c1_packed_0 = torch.ops.quantized.conv2d_prepack(w, torch.randn(8, generator=g),
                                                              [1, 1], [1, 1], [1, 1], 1)
    finally:
        torch.backends.quantized.engine = before
    q = graph.call_function(torch.quantize_per_tensor,
                            (graph.placeholder("x"), 0.05, 128, torch.quint8))
    packed = graph.get_attr("c1_packed_0")
    packed.meta[ENGINE_META] = engine or before
    y = graph.call_function(torch.ops.quantized.conv2d_relu, (q, packed, 0.1, 0))
    graph.output(graph.call_method("dequantize", (y,)))
    gm = torch.fx.GraphModule(root, graph)
    path = fileformat.write_module(tmp_path / "legacy.fxopt", gm, target="cpu", report={})
    back = fileformat.read_module(path).graph_module
    (name, (eng, obj)), = _packed(back).items()
    assert eng == (engine or before) and _same(_unpack(obj), _unpack(root.c1_packed_0))
    x = torch.randn(2, 3, 8, 8, generator=g)
    assert torch.equal(back(x), gm(x))


@pytest.mark.skipif(not QUANTIZED, reason="PyTorch's quantized CPU engine is not available")
def test_cpu_int8_onednn_epilogues(tmp_path):
    torch.manual_seed(0)
    opt = fxopt.optimize(MobileBlock().eval(), torch.randn(2, 3, 16, 16), quantize="int8",
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


@pytest.mark.skipif(not QUANTIZED, reason="PyTorch's quantized CPU engine is not available")
def test_int8_file_within_a_quarter_of_torch_ao_state_dict(tmp_path):
    """The saved int8 module (manifest and tensors) is at most 1.25x torch.ao FX's int8
    state_dict of the same model saved with torch.save (x86 qconfig): int8 weights, no float
    copy of a quantized layer, no packed blobs; sizes are deterministic. (resnet18 and
    mobilenet_v2: bench/results/int8-plain-lowering-2026-12-06.md.) Failed with merge_convs and
    fuse_attention in the pipeline while the manifest was stored (each pass's report record
    ~0.4 kB of JSON: 1.256x); deflated since format 3: 0.54x."""
    import copy
    import io

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(0)
    model, cal = SmallCNN().eval(), _batches(n=4, shape=(2, 3, 16, 16))
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (cal[0],))
    with torch.no_grad():
        for x in cal:
            prepared(x)
    buf = io.BytesIO()
    torch.save(convert_fx(prepared).state_dict(), buf)
    opt = fxopt.optimize(model, cal[0], quantize="int8", calibration_data=cal)
    size = opt.save(tmp_path / "small.fxopt").stat().st_size
    assert size <= 1.25 * buf.tell(), (size, buf.tell())
