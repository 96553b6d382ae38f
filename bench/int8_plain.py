"""The CPU int8 lowering on plain uint8 codes against PyTorch's quantized:: path, per op kind.

``lower_int8_cpu`` writes fxopt's CPU ops (``fxopt.ops.cpu``) on plain uint8 codes instead of
PyTorch's deprecated ``quantized::`` ops on quantized tensors with packed ScriptObjects. This
benchmark measures, 1 thread, batch 1, variants interleaved round by round, medians:

Part 1, layers: every conv of resnet18 / mobilenet_v2 / mobilenet_v3_large at 224x224 (its
geometry, random int8 weights, relu), as ``quantized::conv2d_relu`` on a quint8 tensor packed
under the x86 engine and under fbgemm (the old lowering's two choices), and as
``fxopt.onednn_conv2d_int8`` on plain codes with ``engine="onednn"`` (oneDNN's
``qconv2d_pointwise``) and ``engine="fbgemm"`` (fbgemm's kernel on a view of the codes): per
model, the sum over layers of each variant, of the per-layer best, and of the lowering's
``auto`` choice; and how many layers each variant wins.

Part 2, the ops between the layers, on the same models' shapes: the residual add (``quantized::
add_relu`` on quint8, ``fxopt.cpu_add_int8`` on plain codes, the IR's reference, and conv +
add against the conv with the add fused as oneDNN's sum post-op), the SE gate product, cat,
max pool, global average pool onto its own grid, quantize (the input), dequantize (the logits),
nearest upsampling.

Part 3, whole models: fxopt int8 (this lowering) against torch.ao FX int8 (x86), latency.

Part 4, file size: ``OptimizedModule.save`` against ``torch.save`` of torch.ao FX's int8
state_dict (``get_default_qconfig_mapping("x86")``), the same model and calibration batches.

    python bench/int8_plain.py                 # writes bench/results/int8-plain-lowering-<date>.md
    python bench/int8_plain.py --parts 4 --out -
"""
from __future__ import annotations

import argparse
import copy
import io
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header, write_result  # noqa: E402
from _int8_baselines import ao_fx_int8, quiet_quant_warnings  # noqa: E402
from models import _build  # noqa: E402

__all__ = ["main"]

MODELS = ("resnet18", "mobilenet_v2", "mobilenet_v3_large")
OPS = torch.ops.fxopt


def _median_ms(fns: dict, rounds: int, calls: int = 3) -> dict[str, float]:
    """Median ms per call of each variant, interleaved round by round (2 warm-up calls)."""
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for f in fns.values():
            f()
            f()
        for _ in range(rounds):
            for k, f in fns.items():
                t0 = time.perf_counter()
                for _ in range(calls):
                    f()
                times[k].append((time.perf_counter() - t0) / calls)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def _q(codes, scale=0.05, zp=10):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch._make_per_tensor_quantized_tensor(codes, scale, zp)


def _codes(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, 128, shape, dtype=torch.uint8, generator=g)
    return c.contiguous(memory_format=torch.channels_last) if len(shape) == 4 else c


def _conv_layers(name: str) -> list[tuple]:
    """(in, out, kernel, stride, padding, groups, input shape) of every conv, in order."""
    m = _build(name)
    out = []

    def hook(mod, inp, _):
        out.append((mod.in_channels, mod.out_channels, tuple(mod.kernel_size),
                    tuple(mod.stride), tuple(mod.padding), mod.groups, tuple(inp[0].shape)))

    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            mod.register_forward_hook(hook)
    with torch.no_grad():
        m(torch.randn(1, 3, 224, 224))
    return out


def _conv_variants(layer) -> dict:
    from fxopt.passes.lower.cpu import SMALL_MACS

    ci, co, k, s, p, g, shape = layer
    gen = torch.Generator().manual_seed(co * 7 + ci)
    w = torch.randint(-127, 128, (co, ci // g, *k), dtype=torch.int8, generator=gen)
    ws = torch.rand(co, generator=gen) * 0.01 + 1e-3
    b = torch.randn(co, generator=gen)
    x = _codes(shape)
    qx = _q(x)
    fns = {}
    for engine in ("x86", "fbgemm"):
        torch.backends.quantized.engine = engine
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wq = torch._make_per_channel_quantized_tensor(
                w, ws.double(), torch.zeros(co, dtype=torch.int64), 0)
            packed = torch.ops.quantized.conv2d_prepack(wq, b, list(s), list(p), [1, 1], g)
        fns[f"quantized:: {engine}"] = (
            lambda pk=packed: torch.ops.quantized.conv2d_relu(qx, pk, 0.1, 0))
    torch.backends.quantized.engine = "x86"
    for engine in ("onednn", "fbgemm"):
        fns[f"plain {engine}"] = (lambda e=engine: OPS.onednn_conv2d_int8(
            x, w, ws, b, list(s), list(p), [1, 1], g, 0.05, 10, 0.1, 0, act="relu", engine=e))
    out_hw = [(shape[2 + i] + 2 * p[i] - k[i]) // s[i] + 1 for i in range(2)]
    macs = out_hw[0] * out_hw[1] * w[0].numel() * co
    return fns, ("plain fbgemm" if macs <= SMALL_MACS else "plain onednn")


def part_layers(rounds: int) -> str:
    lines = ["## 1. Conv layers (relu), batch 1, 1 thread: sum of per-layer medians, ms", "",
             "| model | layers | quantized:: x86 | quantized:: fbgemm | old lowering (auto) "
             "| plain onednn | plain fbgemm | plain auto (the lowering) | plain per-layer best "
             "| layers won: onednn / fbgemm (plain) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in MODELS:
        layers = _conv_layers(name)
        sums: dict[str, float] = {}
        auto = best = old = 0.0
        won = {"plain onednn": 0, "plain fbgemm": 0}
        for layer in layers:
            fns, choice = _conv_variants(layer)
            t = _median_ms(fns, rounds)
            for k, v in t.items():
                sums[k] = sums.get(k, 0.0) + v
            auto += t[choice]
            old += t["quantized:: fbgemm" if choice == "plain fbgemm" else "quantized:: x86"]
            plain = {k: v for k, v in t.items() if k.startswith("plain")}
            fastest = min(plain, key=plain.get)
            won[fastest] += 1
            best += plain[fastest]
        lines.append(f"| {name} | {len(layers)} | {sums['quantized:: x86']:.2f} | "
                     f"{sums['quantized:: fbgemm']:.2f} | {old:.2f} | {sums['plain onednn']:.2f} "
                     f"| {sums['plain fbgemm']:.2f} | {auto:.2f} | {best:.2f} | "
                     f"{won['plain onednn']} / {won['plain fbgemm']} |")
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def _between_cases() -> list[tuple[str, str, dict]]:
    """(op kind, shape label, {variant: fn})."""
    s = torch.tensor(0.05)
    z = torch.tensor(10)
    sy, zy = torch.tensor(0.08), torch.tensor(0)
    cases = []
    for shape in ((1, 64, 56, 56), (1, 128, 28, 28), (1, 256, 14, 14), (1, 512, 7, 7),
                  (1, 24, 56, 56), (1, 96, 14, 14), (1, 160, 7, 7)):
        a, b = _codes(shape, 1), _codes(shape, 2)
        qa, qb = _q(a), _q(b)
        cases.append(("add relu", str(list(shape)), {
            "quantized:: (quint8)": lambda qa=qa, qb=qb: torch.ops.quantized.add_relu(
                qa, qb, 0.08, 0),
            "plain cpu_add_int8": lambda a=a, b=b: OPS.cpu_add_int8(a, s, z, b, s, z, sy, zy,
                                                                    act="relu"),
            "plain IR reference": lambda a=a, b=b: OPS.add_int8(a, s, z, b, s, z, sy, zy,
                                                                act="relu")}))
    for c, hw in ((72, 28), (120, 28), (480, 14), (672, 14), (960, 7)):
        a, gate = _codes((1, c, hw, hw), 3), _codes((1, c, 1, 1), 4)
        qa, qg = _q(a), _q(gate, 0.004, 0)
        g_s, g_z = torch.tensor(0.004), torch.tensor(0)
        cases.append(("mul (SE gate)", f"[1, {c}, {hw}, {hw}] x [1, {c}, 1, 1]", {
            "quantized:: (quint8)": lambda qa=qa, qg=qg: torch.ops.quantized.mul(qa, qg, 0.05,
                                                                                  10),
            "plain cpu_mul_int8": lambda a=a, g=gate: OPS.cpu_mul_int8(a, s, z, g, g_s, g_z, s, z),
            "plain IR reference": lambda a=a, g=gate: OPS.mul_int8(a, s, z, g, g_s, g_z, s, z)}))
    a, b = _codes((1, 64, 28, 28), 5), _codes((1, 64, 28, 28), 6)
    qa, qb = _q(a), _q(b, 0.06, 12)
    s2, z2 = torch.tensor(0.06), torch.tensor(12)
    cases.append(("cat", "2 x [1, 64, 28, 28]", {
        "quantized:: (quint8)": lambda: torch.ops.quantized.cat([qa, qb], 1, 0.08, 0),
        "plain cpu_cat_int8": lambda: OPS.cpu_cat_int8([a, b], [s, s2], [z, z2], 1, sy, zy, 0,
                                                      255),
        "plain IR reference": lambda: OPS.cat_int8([a, b], [s, s2], [z, z2], 1, sy, zy, 0, 255)}))
    x = _codes((1, 64, 112, 112), 7)
    qx = _q(x)
    cases.append(("max pool 3x3/2", "[1, 64, 112, 112]", {
        "quantized:: (quint8)": lambda: F.max_pool2d(qx, 3, 2, 1),
        "plain cpu_max_pool2d_int8": lambda: OPS.cpu_max_pool2d_int8(x, [3, 3], [2, 2], [1, 1],
                                                                    [1, 1], False),
        "plain IR reference": lambda: OPS.max_pool2d_int8(x, [3, 3], [2, 2], [1, 1], [1, 1],
                                                          False)}))
    for shape in ((1, 512, 7, 7), (1, 960, 7, 7)):
        x = _codes(shape, 8)
        qx = _q(x)
        cases.append(("global avg pool, own grid", str(list(shape)), {
            "quantized:: (quint8)": lambda qx=qx: torch.quantize_per_tensor(
                F.adaptive_avg_pool2d(qx.dequantize(), 1), 0.02, 0, torch.quint8),
            "plain cpu_adaptive_avg_pool2d_int8": lambda x=x: OPS.cpu_adaptive_avg_pool2d_int8(
                x, [1, 1], s, z, 0, 255, sy, zy),
            "plain IR reference": lambda x=x: OPS.adaptive_avg_pool2d_int8(x, [1, 1], s, z, 0,
                                                                           255, sy, zy)}))
    xf = torch.randn(1, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    cases.append(("quantize (input)", "[1, 3, 224, 224]", {
        "quantized:: (quint8)": lambda: torch.quantize_per_tensor(xf, 0.05, 10, torch.quint8),
        "plain cpu_quantize": lambda: OPS.cpu_quantize(xf, s, z, 0, 255),
        "plain IR reference": lambda: OPS.quantize(xf, s, z, 0, 255)}))
    logits = _codes((1, 1000), 9)
    ql = _q(logits)
    cases.append(("dequantize (logits)", "[1, 1000]", {
        "quantized:: (quint8)": lambda: ql.dequantize(),
        "plain cpu_dequantize": lambda: OPS.cpu_dequantize(logits, s, z),
        "plain IR reference": lambda: OPS.dequantize(logits, s, z)}))
    x = _codes((1, 64, 28, 28), 10)
    qx = _q(x)
    cases.append(("upsample nearest x2", "[1, 64, 28, 28]", {
        "quantized:: (quint8)": lambda: F.interpolate(qx, scale_factor=2.0, mode="nearest"),
        "plain cpu_upsample_nearest2d_int8": lambda: OPS.cpu_upsample_nearest2d_int8(
            x, None, [2.0, 2.0], s, z, 0, 255),
        "plain IR reference": lambda: OPS.upsample_nearest2d_int8(x, None, [2.0, 2.0], s, z, 0,
                                                                  255)}))
    return cases


def _residual_cases() -> list[tuple[str, dict]]:
    """conv then a separate add against the conv with the add fused (sum post-op)."""
    out = []
    for ci, hw in ((64, 56), (128, 28), (256, 14), (512, 7)):
        gen = torch.Generator().manual_seed(ci)
        w = torch.randint(-127, 128, (ci, ci, 3, 3), dtype=torch.int8, generator=gen)
        ws, b = torch.rand(ci, generator=gen) * 0.01 + 1e-3, torch.randn(ci, generator=gen)
        x, r = _codes((1, ci, hw, hw), 11), _codes((1, ci, hw, hw), 12)
        qr = _q(r, 0.05, 10)
        s, z, sy, zy = torch.tensor(0.05), torch.tensor(10), torch.tensor(0.08), torch.tensor(0)
        torch.backends.quantized.engine = "x86"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            packed = torch.ops.quantized.conv2d_prepack(torch._make_per_channel_quantized_tensor(
                w, ws.double(), torch.zeros(ci, dtype=torch.int64), 0), b, [1, 1], [1, 1],
                [1, 1], 1)
        qx = _q(x)

        def conv(x=x, w=w, ws=ws, b=b):
            return OPS.onednn_conv2d_int8(x, w, ws, b, [1, 1], [1, 1], [1, 1], 1, 0.05, 10,
                                          0.06, 128)

        out.append((f"[1, {ci}, {hw}, {hw}] 3x3", {
            "quantized:: conv2d + add_relu": lambda pk=packed, qx=qx, qr=qr:
                torch.ops.quantized.add_relu(torch.ops.quantized.conv2d(qx, pk, 0.06, 128), qr,
                                             0.08, 0),
            "plain conv + cpu_add_int8": lambda conv=conv, r=r, s=s, z=z, sy=sy, zy=zy:
                OPS.cpu_add_int8(conv(), torch.tensor(0.06), torch.tensor(128), r, s, z, sy, zy,
                                 act="relu"),
            "plain conv with sum post-op": lambda w=w, ws=ws, b=b, x=x, r=r:
                OPS.onednn_conv2d_int8(x, w, ws, b, [1, 1], [1, 1], [1, 1], 1, 0.05, 10, 0.08,
                                       0, r, 0.05, 10, act="relu")}))
    return out


def part_between(rounds: int) -> str:
    lines = ["## 2. Ops between the layers, batch 1, 1 thread: median ms per call", "",
             "| op | shape | quantized:: on quint8 | fxopt CPU op on plain codes (lowered) "
             "| IR reference on plain codes |", "|---|---|---|---|---|"]
    for kind, shape, fns in _between_cases():
        t = list(_median_ms(fns, rounds, calls=10).values())
        lines.append(f"| {kind} | {shape} | {t[0]:.4f} | {t[1]:.4f} | {t[2]:.4f} |")
        print(lines[-1], flush=True)
    lines += ["", "Residual add: quantized:: conv2d then add_relu, the plain conv then "
              "cpu_add_int8, and the plain conv with the add fused (oneDNN's sum post-op, "
              "what the lowering writes where the grids allow), ms:", "",
              "| conv | quantized:: conv + add | plain conv + add | plain conv, add fused |",
              "|---|---|---|---|"]
    for label, fns in _residual_cases():
        t = list(_median_ms(fns, rounds).values())
        lines.append(f"| {label} | {t[0]:.3f} | {t[1]:.3f} | {t[2]:.3f} |")
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def _calibration(n: int, shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def part_models(rounds: int) -> str:
    import fxopt

    lines = ["## 3. Whole models, batch 1, 1 thread: median ms per call", "",
             "| model | torch.ao FX int8 (x86) | fxopt int8 (plain lowering) | ao / fxopt |",
             "|---|---|---|---|"]
    for name in MODELS:
        model = _build(name)
        cal = _calibration(4, (1, 3, 224, 224))
        ao, _, _ = ao_fx_int8(model, cal[0], cal)
        opt = fxopt.optimize(model, cal[0], quantize="int8", calibration_data=cal)
        x = cal[1]
        t = _median_ms({"ao": lambda: ao(x), "fxopt": lambda: opt(x)}, rounds, calls=1)
        lines.append(f"| {name} | {t['ao']:.2f} | {t['fxopt']:.2f} | "
                     f"{t['ao'] / t['fxopt']:.2f} |")
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


class SmallCNN(nn.Module):
    """The small net of tests/fxopt/export/test_fileformat.py (residual, cat, pools, SE)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.c1, self.c2 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(16, 8, 1), nn.Conv2d(16, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        y = torch.relu(self.c2(torch.relu(self.c1(y))) + y)
        y = torch.cat([F.relu(self.b1(y)), F.relu6(self.b2(y))], 1)
        y = F.max_pool2d(y, 2)
        g = torch.sigmoid(self.fc2(torch.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y * g, 1), 1))


def part_sizes() -> str:
    import zipfile

    import fxopt

    lines = ["## 4. File size: fxopt.save against torch.save(torch.ao FX int8 state_dict)", "",
             "| model | torch.ao state_dict bytes | .fxopt bytes (manifest + tensors) | ratio "
             "| layers kept float |", "|---|---|---|---|---|"]
    for name in ("small_cnn", "resnet18", "mobilenet_v2"):
        torch.manual_seed(0)
        if name == "small_cnn":
            model, cal = SmallCNN().eval(), _calibration(4, (2, 3, 16, 16))
        else:
            model, cal = _build(name), _calibration(4, (1, 3, 224, 224))
        ao, _, _ = ao_fx_int8(copy.deepcopy(model), cal[0], cal)
        buf = io.BytesIO()
        torch.save(ao.state_dict(), buf)
        opt = fxopt.optimize(model, cal[0], quantize="int8", calibration_data=cal)
        with tempfile.TemporaryDirectory() as d:
            path = opt.save(os.path.join(d, "m.fxopt"))
            size = path.stat().st_size
            with zipfile.ZipFile(path) as z:
                parts = [i.file_size for i in z.infolist()]
        kept = opt.report.record("quantize_int8").stats.get("kept_float", 0)
        lines.append(f"| {name} | {buf.tell()} | {size} ({parts[0]} + {parts[1]}) | "
                     f"{size / buf.tell():.3f} | {kept} |")
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", type=int, default=[1, 2, 3, 4])
    p.add_argument("--rounds", type=int, default=15, help="timed rounds per variant")
    p.add_argument("--out", default=None, help="markdown path ('-': print only)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    quiet_quant_warnings()
    warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
    text = header("Int8 CPU lowering on plain codes against the quantized:: path") + \
        f"- load average at the start: {os.getloadavg()[0]:.2f}\n\n"
    parts = {1: lambda: part_layers(args.rounds), 2: lambda: part_between(args.rounds),
             3: lambda: part_models(args.rounds), 4: part_sizes}
    for i in args.parts:
        text += parts[i]() + "\n"
    text += f"- load average at the end: {os.getloadavg()[0]:.2f}\n"
    write_result(text, args.out, "int8-plain-lowering")


if __name__ == "__main__":
    main()
