"""The markdown of ``bench/cpu_deploy.py``: a table per model and the issue 13 "Done when" table
(medians, and for each speed aim the paired rounds and a sign test that calls a tie a tie)."""
from __future__ import annotations

import math

from _deploy_variants import FXOPT_FLOAT, FXOPT_INT8, FXOPT_INT8_CPU

__all__ = ["markdown", "fmt_ms"]


def fmt_ms(v) -> str:
    if isinstance(v, float):
        return f"{v:.2f}" if v < 100 else f"{v:.1f}"
    return "error" if v else "n/a"


def _best(cells: dict, names: list[str], batch) -> tuple[str | None, float | None]:
    got = [(c["ms"][batch], v) for v in names if (c := cells.get(v)) and c["status"] == "ok"
           and isinstance(c["ms"].get(batch), float)]
    if not got:
        return None, None
    ms, v = min(got)
    return v, ms


def _paired(cells: dict, a: str | None, b: str | None, batch) -> tuple[int, int] | None:
    """In how many of the rounds both ran was ``a`` faster than ``b`` (the variants take turns
    round by round, so round i of one is beside round i of the other): (wins, rounds)."""
    if a is None or b is None or a not in cells or b not in cells:
        return None
    sa = cells[a].get("samples", {}).get(batch) or []
    sb = cells[b].get("samples", {}).get(batch) or []
    n = min(len(sa), len(sb))
    return (sum(x < y for x, y in zip(sa[:n], sb[:n])), n) if n else None


def _tie(pair: tuple[int, int] | None) -> bool:
    """Whether a paired comparison is within the noise: a two-sided sign test at 5% cannot
    tell the two apart (each round a fair coin)."""
    if pair is None:
        return False
    wins, n = pair
    k = min(wins, n - wins)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    return p > 0.05


def _aims(results: list[dict], batch) -> tuple[list[str], dict]:
    """The issue's "Done when", model by model, at ``batch``."""
    rows, counts = [], {"int8_speed": 0, "int8_within": 0, "sqnr": 0, "float": 0, "ao": 0,
                        "ao_best": 0, "int8_speed_tie": 0, "float_tie": 0}

    def ms(cells, v):
        c = cells.get(v)
        return c["ms"].get(batch) if c and isinstance(c["ms"].get(batch), float) else None

    for r in results:
        cells = r["cells"]
        q_v, q_ms = _best(cells, FXOPT_INT8, batch)
        f_v, f_ms = _best(cells, FXOPT_FLOAT, batch)
        nncf, ov, ao = ms(cells, "ov_nncf_int8"), ms(cells, "ov"), ms(cells, "ao_int8")
        own = _best(cells, FXOPT_INT8_CPU, batch)[1]  # fxopt's own CPU module, either lowering
        q_sq = cells[q_v]["sqnr"] if q_v else None
        n_sq = cells.get("ov_nncf_int8", {}).get("sqnr")

        def le(a, b, slack=1.0):
            return None if a is None or b is None else a <= b * slack

        checks = {"int8_speed": le(q_ms, nncf), "int8_within": le(q_ms, nncf, 1.1),
                  "sqnr": le(n_sq, q_sq), "float": le(f_ms, ov), "ao": le(own, ao),
                  "ao_best": le(q_ms, ao)}
        for k, ok in checks.items():
            counts[k] += bool(ok)
            counts[k + "_n"] = counts.get(k + "_n", 0) + (ok is not None)  # measured at all
        pairs = {"int8_speed": _paired(cells, q_v, "ov_nncf_int8", batch),
                 "float": _paired(cells, f_v, "ov", batch)}
        for k, pair in pairs.items():
            counts[k + "_tie"] += _tie(pair)

        def yn(ok, a, b, unit="ms", pair=None):
            if ok is None:
                return "n/a"
            db = "" if unit == "ms" else " dB"
            rounds = (f"; faster in {pair[0]} of {pair[1]} rounds"
                      f"{', a tie' if _tie(pair) else ''}") if pair else ""
            return f"{'yes' if ok else 'no'} ({_num(a)} vs {_num(b)}{db}{rounds})"

        within = {None: "n/a", True: "yes", False: "no"}[checks["int8_within"]]
        rows.append(
            f"| {r['model']} | {q_v or 'n/a'} | "
            f"{yn(checks['int8_speed'], q_ms, nncf, pair=pairs['int8_speed'])} | {within}"
            f" | {yn(checks['sqnr'], q_sq, n_sq, 'dB')} | {f_v or 'n/a'} | "
            f"{yn(checks['float'], f_ms, ov, pair=pairs['float'])} | {yn(checks['ao'], own, ao)} | "
            f"{yn(checks['ao_best'], q_ms, ao)} |")
    return rows, counts


def _num(v) -> str:
    return "n/a" if v is None else (f"{v:.2f}" if abs(v) < 100 else f"{v:.1f}")


def markdown(meta: dict, results: list[dict], args) -> str:
    m, ver = meta["machine"], meta["versions"]
    flags = ", ".join(f"{f} {'yes' if on else 'no'}" for f, on in m["flags"].items())
    lines = [f"# CPU deployment: fxopt against torch.compile, torch.ao, OpenVINO(+NNCF) and "
             f"ONNX Runtime{' (' + args.label + ')' if args.label else ''}", "",
             f"- date: {meta['date']}",
             f"- machine: {m['cpu']}, {m['cores']} cores; flags: {flags}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in ver.items() if k != "fxopt"),
             f"- fxopt commit: {ver['fxopt']}",
             f"- threads: {args.threads} (torch.set_num_threads, OpenVINO INFERENCE_NUM_THREADS, "
             f"ORT intra_op_num_threads)",
             f"- load average (1, 5, 15 min) before: {meta['load_before']}, after: "
             f"{meta['load_after']}",
             f"- command: `{meta['command']}`",
             f"- duration: {meta['duration_s'] / 60:.1f} min", "",
             f"Inputs {args.size}x{args.size}, random torchvision weights (seeded, BatchNorm "
             f"statistics randomized). Int8 variants calibrated on the same {args.calib} random "
             f"images (batches of 1); SQNR of each variant's output against eager float32 on "
             f"{args.heldout} other (held-out) images. Latency: median ms per call, variants "
             f"interleaved round by round in a new order each round, each timed call after a "
             f"{getattr(args, 'pause', 0) * 1e3:g} ms pause and {args.settle} untimed call(s) of "
             f"the same variant (up to {args.reps} rounds or ~{args.budget:g} s per "
             f"variant and batch size, after {args.warmup} warm-up calls); `x eager`: eager's "
             f"time over the variant's at batch {min(args.batch)}. Size: the deployed file "
             f"(see bench/cpu_deploy.py's docstring). `n/a`: fxopt refused the option (the reason "
             f"is in the last column); `error`: the variant failed (first line of the error).", ""]
    for r in results:
        lines += _model_table(r, args)
    b1 = 1 if 1 in args.batch else min(args.batch)
    rows, counts = _aims(results, b1)

    def of(key, tie=None):
        """``k of m`` over the models where both sides were measured; says so where none."""
        m = counts.get(key + "_n", 0)
        if not m:
            return "not measured (a variant it compares is not in this run)"
        ties = f"; ties by the sign test: {counts[tie]} of {m}" if tie else ""
        return f"{counts[key]} of {m}{ties}"

    lines += [f"## Issue 13 \"Done when\" at batch {b1}", "",
              "Best fxopt int8 = the fastest of " + ", ".join(FXOPT_INT8) + "; best fxopt float "
              "= the fastest of " + ", ".join(FXOPT_FLOAT) + ". SQNR: of that fastest fxopt int8 "
              "variant. \"faster in k of n rounds\": the variants took turns round by round; "
              "\"a tie\": a two-sided sign test at 5% cannot tell the two apart.", "",
              "| model | best fxopt int8 | <= OV+NNCF int8 | within 1.1x | SQNR >= NNCF's | "
              "best fxopt float | <= OV default | fxopt int8 (cpu) <= torch.ao | "
              "best fxopt int8 <= torch.ao |",
              "|---|---|---|---|---|---|---|---|---|", *rows, "",
              f"- fxopt int8 (best target) <= OpenVINO+NNCF int8: "
              f"{of('int8_speed', 'int8_speed_tie')} (aim: 6 of 8, the rest within 1.1x; "
              f"within 1.1x: {of('int8_within')})",
              f"- SQNR >= NNCF's: {of('sqnr')} (aim: 6 of 8)",
              f"- best fxopt float <= OpenVINO default: {of('float', 'float_tie')} (aim: 6 of 8)",
              f"- fxopt int8 (target cpu: the faster of {', '.join(FXOPT_INT8_CPU)}) <= "
              f"torch.ao int8: {of('ao')}; best fxopt int8 <= torch.ao: {of('ao_best')} "
              f"(aim: every model)", ""]
    return "\n".join(lines)


def _model_table(r: dict, args) -> list[str]:
    cells = r["cells"]
    b0 = min(args.batch)
    eager = cells.get("eager", {}).get("ms", {}).get(b0)
    head = "| variant | " + " | ".join(f"bs {b} ms" for b in args.batch) + \
        " | x eager | SQNR dB | size MB | build s | notes |"
    out = [f"## {r['model']}", ""]
    if r.get("redrawn"):
        out += [f"Zero-initialized weights redrawn from N(0, 0.02) (seeded) so the outputs are "
                f"not constant: {', '.join(r['redrawn'])}.", ""]
    out += [head, "|" + "---|" * (len(args.batch) + 6)]
    for v, c in cells.items():
        if c["status"] != "ok":
            out.append(f"| {v} | " + " | ".join(c["status"] for _ in args.batch) +
                       f" | | | | {c['build_s']:.1f} | {c['status']}: {_md(c['reason'])} |")
            continue
        ms = [c["ms"].get(b) for b in args.batch]
        errs = [f"bs {b}: {x}" for b, x in zip(args.batch, ms) if isinstance(x, str)]
        t0 = ms[0] if isinstance(ms[0], float) else None
        ratio = f"{eager / t0:.2f}x" if eager and t0 else ""
        size = f"{c['size'] / 1e6:.1f}" if c["size"] else "n/a"
        sq = "" if c["sqnr"] is None else ("inf" if c["sqnr"] == float("inf") else
                                           f"{c['sqnr']:.1f}")
        note = "; ".join(filter(None, [c["note"], *errs]))
        out.append(f"| {v} | " + " | ".join(fmt_ms(x) for x in ms) +
                   f" | {ratio} | {sq} | {size} | {c['build_s']:.1f} | {_md(note)} |")
    return out + [""]


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
