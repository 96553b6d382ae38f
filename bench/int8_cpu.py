"""Int8 benchmark on the CPU: float eager vs torch.ao FX int8 (x86) vs fxopt int8.

Part 1, latency, torchvision models (random weights, BatchNorm statistics randomized as in
``bench/models.py``, 224x224) at each batch size, in one run: the float eager model (plain
NCHW, what a user runs; channels_last eager is timed too, for information), torch.ao's FX graph
mode int8 (``prepare_fx``/``convert_fx``, x86 backend, ``get_default_qconfig_mapping("x86")``)
and ``fxopt.optimize(model, x, quantize="int8", calibration_data=batches)``, both int8 models
calibrated on the same batches (random inputs). Variants interleaved round by round, median
per-call time under ``torch.inference_mode()``. Speedups are over plain eager; ``fxopt vs ao``
is torch.ao's time over fxopt's (above 1: fxopt faster; the aim is at least 1 on every row).

Part 2, accuracy, the digits ResNet (``fxopt.digits``, trained; the ``fxopt optimize`` default
model): both int8 models calibrated on the same batches of the training split, evaluated on the
test split: top-1 accuracy of float and both int8 models, and SQNR (dB) of their logits against
the float model's (``fxopt.quant.measure.sqnr_db``).

    python bench/int8_cpu.py                     # writes bench/results/int8_cpu-<date>.md
    python bench/int8_cpu.py --quick             # smoke run: resnet18 b1, few rounds, prints only
    python bench/int8_cpu.py --models resnet18 --batch-sizes 1 --repeats 10 --out -

torch.ao.quantization is deprecated in torch 2.1x; its warnings are kept out of the output and
listed once in the notes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header, write_result  # noqa: E402
from _int8_baselines import ao_fx_int8, channels_last, quiet_quant_warnings  # noqa: E402
from _timing import calls_per_round, median_times  # noqa: E402
from models import _build  # noqa: E402 - the same torchvision models as bench/models.py

__all__ = ["main"]

MODELS = ["resnet18", "resnet50", "mobilenet_v2"]
VARIANTS = ("eager", "eager-cl", "ao", "fxopt")


def _fxopt_int8(model, example, batches, check: str, notes: list[str], label: str):
    """fxopt int8 of ``model``: ``(module, seconds, check_used)``, or ``(None, 0, error)``.

    When the checked run fails (an int8 pass off its reference), the row is built again with
    ``check="none"`` so its latency is still measured, and the notes say so.
    """
    import fxopt
    from fxopt.errors import FxoptError

    for chk in dict.fromkeys([check, "none"]):
        t0 = time.perf_counter()
        try:
            opt = fxopt.optimize(model, example, quantize="int8", calibration_data=batches,
                                 check=chk)
            return opt, time.perf_counter() - t0, chk
        except FxoptError as e:
            first = str(e).splitlines()[0].split("; passes before it")[0]
            notes.append(f"{label}: fxopt int8 with check={chk!r} failed: "
                         f"{type(e).__name__}: {first[:300]}" +
                         ("; built again with check='none'" if chk != "none" else ""))
        except Exception as e:  # noqa: BLE001 - report and go on with the other rows
            notes.append(f"{label}: fxopt int8 failed: {type(e).__name__}: {str(e)[:300]}")
            break
    return None, 0.0, "failed"


def _ao_int8(model, example, batches, notes: list[str], warned: list[str], label: str):
    try:
        q, seconds, msgs = ao_fx_int8(model, example, batches)
    except Exception as e:  # noqa: BLE001
        notes.append(f"{label}: torch.ao FX int8 failed: {type(e).__name__}: "
                     f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}")
        return None, 0.0
    warned.extend(m for m in msgs if m not in warned)
    return q, seconds


def _sqnr(ref, out) -> float:
    from fxopt.quant.measure import sqnr_db

    return sqnr_db(ref, out)


def _latency_rows(args, calib_size: int, notes: list[str], warned: list[str]) -> list[dict]:
    rows = []
    for name in args.models:
        model = _build(name)
        gen = torch.Generator().manual_seed(1)
        batches = [torch.randn(calib_size, 3, args.size, args.size, generator=gen)
                   for _ in range(args.calib_batches)]
        for batch in args.batch_sizes:
            label = f"{name} b{batch}"
            x = torch.randn(batch, 3, args.size, args.size, generator=gen)
            ao, ao_s = _ao_int8(model, x, batches, notes, warned, label)
            fx, fx_s, fx_check = _fxopt_int8(model, x, batches, args.fxopt_check, notes, label)
            fns = {"eager": model, "eager-cl": channels_last(model)}
            if ao is not None:
                fns["ao"] = ao
            if fx is not None:
                fns["fxopt"] = fx
            sq = {}
            with torch.inference_mode():
                ref = model(x)
                for k in ("ao", "fxopt"):
                    if k in fns:
                        sq[k] = _sqnr(ref, fns[k](x))
                calls = args.calls if args.calls > 0 else calls_per_round(model, x, 0.1)
                med = median_times(fns, x, args.repeats, calls, warmup=max(3, calls))
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            row = dict(name=name, batch=batch, med=med, sqnr=sq, ao_s=ao_s, fx_s=fx_s,
                       fx_check=fx_check, load=load)
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def _ms(med: dict, k: str) -> str:
    return f"{med[k] * 1e3:.2f}" if k in med else "failed"


def _ratio(num: float | None, den: float | None) -> str:
    return f"{num / den:.2f}x" if num and den else "n/a"


def _line(r: dict) -> str:
    med = r["med"]
    e = med["eager"]
    parts = [f"{r['name']:13s} b{r['batch']:<2d}"]
    for k in VARIANTS:
        parts.append(f"{k} {_ms(med, k):>8s} ms" + (f" ({_ratio(e, med.get(k))})" if k != "eager"
                                                    else ""))
    parts.append(f"fxopt vs ao {_ratio(med.get('ao'), med.get('fxopt'))}")
    parts.append(f"(load {r['load']:.1f})")
    return "  ".join(parts)


def _digits_part(args, notes: list[str], warned: list[str]) -> dict:
    from fxopt.tools import digits

    loaded = digits.load_or_train_default(progress=False)
    model = loaded.model.eval()
    data = digits.load_digits_split()
    calib = digits.calibration_batches(args.calib_batches, args.digits_calib_size)
    example = digits.example_batch()
    ao, ao_s = _ao_int8(model, example, calib, notes, warned, "digits")
    fx, fx_s, fx_check = _fxopt_int8(model, example, calib, args.fxopt_check, notes, "digits")
    out = dict(calib=f"{len(calib)} batches of {args.digits_calib_size} training images",
               n_test=len(data.test_y), trained=loaded.trained, fx_check=fx_check,
               ao_s=ao_s, fx_s=fx_s, rows={})
    with torch.inference_mode():
        ref = torch.cat([model(c) for c in data.test_x.split(256)])
        for k, m in (("float", model), ("ao", ao), ("fxopt", fx)):
            if m is None:
                continue
            logits = ref if k == "float" else torch.cat([m(c) for c in data.test_x.split(256)])
            pred = logits.argmax(1)
            out["rows"][k] = dict(
                acc=float((pred == data.test_y).float().mean()),
                sqnr=None if k == "float" else _sqnr(ref, logits),
                max_abs=None if k == "float" else float((ref - logits).abs().max()),
                agree=None if k == "float" else float((pred == ref.argmax(1)).float().mean()))
    for k, r in out["rows"].items():
        extra = "" if k == "float" else (f"  SQNR {r['sqnr']:.2f} dB  max abs {r['max_abs']:.3f}"
                                         f"  top-1 agreement {r['agree']:.2%}")
        print(f"digits {k:6s} accuracy {r['acc']:.2%}{extra}", flush=True)
    return out


def _markdown(args, calib_size: int, rows: list[dict], dig: dict | None, notes: list[str],
              warned: list[str]) -> str:
    lines = [header("Int8 on the CPU: float eager vs torch.ao FX int8 (x86) vs fxopt int8"), ""]
    if rows:
        lines += [
            f"Part 1, latency. torchvision models with random weights (BatchNorm statistics "
            f"randomized), input {args.size}x{args.size}, {args.threads} threads, "
            f"`torch.inference_mode()`. Both int8 models calibrated on the same "
            f"{args.calib_batches} batches of {calib_size} random images. Median per-call time "
            f"over {args.repeats} interleaved rounds. Speedups over plain eager (NCHW float32, "
            f"what a user runs; eager-cl: the same in channels_last, input converted per call). "
            f"`fxopt vs ao`: torch.ao's time over fxopt's (above 1: fxopt faster). SQNR: int8 "
            f"logits against float on the timed input (random weights: a sanity figure, not "
            f"accuracy). `build s`: prepare + calibrate + convert (torch.ao), "
            f"`fxopt.optimize` (fxopt, check as given). `load`: the 1-minute load average when "
            f"the row finished ({os.cpu_count()} cores).", "",
            "| model | batch | eager ms | eager-cl ms | ao int8 ms | fxopt int8 ms | "
            "ao vs eager | fxopt vs eager | fxopt vs ao | ao SQNR dB | fxopt SQNR dB | "
            "ao build s | fxopt build s (check) | load |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            med, sq = r["med"], r["sqnr"]
            e = med["eager"]
            lines.append(
                f"| {r['name']} | {r['batch']} | {_ms(med, 'eager')} | {_ms(med, 'eager-cl')} | "
                f"{_ms(med, 'ao')} | {_ms(med, 'fxopt')} | {_ratio(e, med.get('ao'))} | "
                f"{_ratio(e, med.get('fxopt'))} | {_ratio(med.get('ao'), med.get('fxopt'))} | "
                f"{_db(sq.get('ao'))} | {_db(sq.get('fxopt'))} | {r['ao_s']:.1f} | "
                f"{r['fx_s']:.1f} ({r['fx_check']}) | {r['load']:.1f} |")
        lines.append("")
    if dig is not None:
        lines += [
            f"Part 2, accuracy. The digits ResNet (`fxopt.digits`, "
            f"{'trained by this run' if dig['trained'] else 'read from the cache'}); both int8 "
            f"models calibrated on {dig['calib']} (`digits.calibration_batches`), evaluated on "
            f"the {dig['n_test']} images of the test split. SQNR, max abs error and top-1 "
            f"agreement: int8 logits against the float model's. fxopt check: "
            f"{dig['fx_check']}.", "",
            "| model | top-1 accuracy | SQNR dB | max abs err | top-1 agreement with float |",
            "|---|---|---|---|---|"]
        names = {"float": "float eager", "ao": "torch.ao FX int8", "fxopt": "fxopt int8"}
        for k in ("float", "ao", "fxopt"):
            r = dig["rows"].get(k)
            if r is None:
                lines.append(f"| {names[k]} | failed | | | |")
            elif k == "float":
                lines.append(f"| {names[k]} | {r['acc']:.2%} | | | |")
            else:
                lines.append(f"| {names[k]} | {r['acc']:.2%} | {_db(r['sqnr'])} | "
                             f"{r['max_abs']:.3f} | {r['agree']:.2%} |")
        lines.append("")
    lines += _aims(rows, dig)
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    if warned:
        lines += ["Warnings torch gave during the torch.ao conversions (suppressed above):", ""]
        lines += [f"- {w}" for w in warned] + [""]
    return "\n".join(lines)


def _aims(rows: list[dict], dig: dict | None) -> list[str]:
    """The issue's aims, met or not: latency at least torch.ao's on every row, digits SQNR at
    least torch.ao's."""
    out = []
    if rows:
        met = [r for r in rows if "ao" in r["med"] and "fxopt" in r["med"]
               and r["med"]["fxopt"] <= r["med"]["ao"]]
        out.append(f"- latency at least torch.ao's (fxopt vs ao >= 1.00x): {len(met)} of "
                   f"{len(rows)} rows")
    if dig is not None and {"ao", "fxopt"} <= set(dig["rows"]):
        a, f = dig["rows"]["ao"]["sqnr"], dig["rows"]["fxopt"]["sqnr"]
        out.append(f"- digits SQNR at least torch.ao's: {'yes' if f >= a else 'no'} "
                   f"({f:.2f} vs {a:.2f} dB)")
    return ["Aims (issue 5):", ""] + out + [""] if out else []


def _db(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=None, help=f"default: {' '.join(MODELS)}")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="default: 1 8")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 30)")
    p.add_argument("--calls", type=int, default=0, help="calls per round (0: about 0.1 s worth)")
    p.add_argument("--calib-batches", type=int, default=None,
                   help="calibration batches (default 8)")
    p.add_argument("--calib-batch-size", type=int, default=None,
                   help="images per calibration batch, torchvision models (default 8)")
    p.add_argument("--digits-calib-size", type=int, default=32,
                   help="images per calibration batch, digits model")
    p.add_argument("--fxopt-check", default="each", choices=["each", "end", "none"],
                   help="fxopt.optimize(check=...); on a failed check the row is rebuilt with "
                        "'none' and the notes say so")
    p.add_argument("--no-digits", action="store_true", help="skip the accuracy part")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: resnet18 b1, 3 rounds, 2 calibration batches of 2, no file")
    p.add_argument("--out", default=None, help="markdown file to write ('-': print only)")
    args = p.parse_args(argv)
    quick = dict(models=["resnet18"], batch_sizes=[1], repeats=3, calib_batches=2,
                 calib_batch_size=2, out="-")
    full = dict(models=MODELS, batch_sizes=[1, 8], repeats=30, calib_batches=8,
                calib_batch_size=8, out=None)
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.quick:
        args.digits_calib_size = min(args.digits_calib_size, 8)

    quiet_quant_warnings()
    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = "x86"
    notes: list[str] = []
    warned: list[str] = []
    rows = _latency_rows(args, args.calib_batch_size, notes, warned)
    dig = None if args.no_digits else _digits_part(args, notes, warned)
    text = _markdown(args, args.calib_batch_size, rows, dig, notes, warned)
    write_result(text, args.out, "int8_cpu")
    return text


if __name__ == "__main__":
    main()
