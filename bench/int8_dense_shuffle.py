"""fxopt int8 (target="cpu") against torch.ao FX int8 on densenet121 and shufflenet_v2_x1_0,
before and after the int8 BatchNorm (``batch_norm2d_int8``) and the int8 moves (channel shuffle,
chunk), issue 13.

Per model (random weights, BatchNorm statistics randomised: ``bench/_random_weights.py``), at
batch 1, 224x224, one thread, the variants interleaved round by round in one process (medians,
``bench/_timing.py``):

- ``fxopt``: this tree;
- ``fxopt_before``: this tree with the two plan rows switched off (the ``move`` row and the
  BatchNorm role: the plan main made), the same lowering otherwise;
- ``main`` (with ``--main PATH``): the module fxopt at PATH (a checkout) builds, saved with
  ``OptimizedModule.save`` in a subprocess and loaded here;
- ``ao``: torch.ao FX (``prepare_fx`` / ``convert_fx``, x86 qconfig: ``bench/_int8_baselines.py``).

SQNR (dB) of each variant's output against the float model on a held-out input, and the int8
op counts of fxopt's graph (quantize, dequantize, batch_norm) go in the table too.

    python bench/int8_dense_shuffle.py --rounds 15 --main /work/main --out -
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header, write_result  # noqa: E402
from _int8_baselines import ao_fx_int8, quiet_quant_warnings  # noqa: E402
from int8_coverage import model_of  # noqa: E402
from _timing import calls_per_round, median_times  # noqa: E402

__all__ = ["main", "MODELS"]

MODELS = ["densenet121", "shufflenet_v2_x1_0"]
SIZE = 224


def _data(calib: int):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, SIZE, SIZE, generator=g)
    cal = [torch.randn(1, 3, SIZE, SIZE, generator=g) for _ in range(calib)]
    held = torch.randn(1, 3, SIZE, SIZE, generator=g)
    return x, cal, held


@contextlib.contextmanager
def before_rows():
    """The plan without the ``move`` row and the BatchNorm role (what main plans)."""
    from fxopt.quant import plan, roles

    move = roles.SAME_GRID.pop("move")
    bn = plan.batch_norm_of
    plan.batch_norm_of = lambda gm, n: None
    try:
        yield
    finally:
        roles.SAME_GRID["move"] = move
        plan.batch_norm_of = bn


def _build(name: str, calib: int):
    import fxopt

    x, cal, _ = _data(calib)
    return fxopt.optimize(model_of(name, SIZE), x, quantize="int8", calibration_data=cal,
                          target="cpu", check="none")


def _main_module(name: str, calib: int, checkout: str):
    """The module ``checkout``'s fxopt builds (a subprocess with it on the path), loaded here."""
    import fxopt

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"{name}.fxopt"
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
                f"from int8_dense_shuffle import _build; "
                f"_build({name!r}, {calib}).save({str(path)!r})")
        env = {**os.environ, "PYTHONPATH": checkout, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=checkout)
        return fxopt.load(path)


def _counts(opt) -> str:
    gm = opt.graph_module
    ops = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    return ", ".join(f"{k} {sum(1 for o in ops if o.startswith('fxopt.' + k))}"
                     for k in ("cpu_quantize", "cpu_dequantize", "cpu_batch_norm2d_int8"))


def _sqnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    err = (out.double() - ref.double()).pow(2).mean()
    return float(10 * torch.log10(ref.double().pow(2).mean() / err))


def row(name: str, calib: int, rounds: int, checkout: str | None) -> dict:
    torch.set_num_threads(1)
    quiet_quant_warnings()
    x, cal, held = _data(calib)
    m = model_of(name, SIZE)
    fns = {"fxopt": _build(name, calib)}
    with before_rows():
        fns["fxopt_before"] = _build(name, calib)
    if checkout:
        fns["main"] = _main_module(name, calib, checkout)
    fns["ao"] = ao_fx_int8(m, x, cal)[0]
    with torch.no_grad():
        ref = m(held)
        sq = {k: round(_sqnr(f(held), ref), 1) for k, f in fns.items()}
    calls = max(1, min(calls_per_round(f, x, 0.3) for f in fns.values()))
    med = median_times(fns, x, rounds, calls)
    r = {"model": name, **{f"{k}_ms": round(v * 1e3, 2) for k, v in med.items()},
         **{f"{k}_sqnr": v for k, v in sq.items()},
         "ops": _counts(fns["fxopt"]), "ops_before": _counts(fns["fxopt_before"])}
    print(r, flush=True)
    del fns, m
    gc.collect()
    return r


def table(rows: list[dict]) -> str:
    variants = [k[:-3] for k in rows[0] if k.endswith("_ms")] if rows else []
    head = " | ".join(f"{v} ms (SQNR dB)" for v in variants)
    lines = [f"| model | {head} | fxopt / ao | before / ao | fxopt ops | before ops |",
             "|---" * (len(variants) + 5) + "|"]
    for r in rows:
        cells = " | ".join(f"{r[v + '_ms']:.2f} ({r[v + '_sqnr']})" for v in variants)
        lines.append(f"| {r['model']} | {cells} | {r['fxopt_ms'] / r['ao_ms']:.2f}x | "
                     f"{r['fxopt_before_ms'] / r['ao_ms']:.2f}x | {r['ops']} | "
                     f"{r['ops_before']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=MODELS)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calib", type=int, default=4)
    p.add_argument("--main", default=None, help="another fxopt checkout to time (main)")
    p.add_argument("--out", default=None, help="markdown file ('-': print only)")
    a = p.parse_args(argv)
    rows = [row(n, a.calib, a.rounds, a.main) for n in a.models]
    text = "\n".join([header("fxopt int8 vs torch.ao FX int8: densenet121, shufflenet_v2_x1_0"),
                      f"batch 1, {SIZE}x{SIZE}, 1 thread, interleaved, medians of {a.rounds} "
                      f"rounds; load average {os.getloadavg()}", "", table(rows)])
    write_result(text, a.out, "int8-dense-shuffle")


if __name__ == "__main__":
    main()
