"""The model zoo sweep (issue 15): every model through the default pipeline, ``prune=0.5`` and
``quantize="int8"``, on random weights and a small input, one row per model and mode.

Columns: how the model was captured (``symbolic_trace`` / ``export``; "+ N inlined by
export": untraceable modules captured with torch.export and inlined) and the modules left
opaque leaves (with the share of parameters they hold), BatchNorm left in the optimized graph
(inside opaque leaves counted apart), convolutions fused with their epilogue (``fuse_act``)
and lowered out of all convs, int8 layers (conv/linear), the parameter ratio after/before, the
error against eager (rel err; SQNR for int8) and, for a failure, the typed error. Nothing is
timed: this is a coverage sweep, not a speed benchmark.

    python bench/zoo.py                                    # the whole list below (long)
    python bench/zoo.py --resume --out bench/results/zoo-2026-12-06.md   # go on where it stopped
    python bench/zoo.py --models timm-issue15 --out -      # the issue's timm models only
    python bench/zoo.py --models resnet18,tf_efficientnet_b0 --modes default,int8

Isolation (default; ``--no-isolate`` runs everything in this process): each model runs in its
own child process (``--json-row``: the child prints its rows as JSON), so the memory one model
takes is returned before the next starts; a child that runs past ``--timeout`` seconds or whose
resident memory passes ``--mem-limit-gb`` is killed and its modes are reported as rows saying
so (with the time and peak memory measured), and the sweep goes on. Models run smallest first
(parameter count, from a meta-device build), so the very large ones come last.

The output file is written as the sweep goes: the header and the table head first, then each
row appended as it finishes, so a stopped run is still a table; ``--resume`` keeps the rows of
an existing file and runs only the models that have no row yet. When the sweep ends (or is
stopped with SIGINT/SIGTERM) a summary is appended: runs failed, and the models not run.
Writes ``bench/results/zoo-<date>.md`` (``--out -``: stdout only).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header  # noqa: E402

__all__ = ["main", "TIMM_ISSUE15", "TIMM", "torchvision_models", "MODES"]

# The timm models issue 15 names: stopped at capture; BN unfolded (shape reads); computed conv
# weights (ScaledStdConv2d).
TIMM_ISSUE15 = ["tf_efficientnet_b0", "vgg11_bn", "mobilevit_xxs", "efficientvit_b0",
                "mobilenetv2_050", "regnetx_002", "efficientnet_b0", "cspresnet50", "repvgg_a0",
                "nf_resnet26"]
# ... and the rest of the issue's timm list (pruning, transformers).
TIMM = TIMM_ISSUE15 + [
    "edgenext_xx_small", "botnet26t_256", "halonet26t", "levit_128s", "efficientformer_l1",
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224",
    "convnextv2_atto", "coatnet_0_rw_224", "skresnet18", "ecaresnet26t", "resnet18",
    "mobilenetv3_small_100", "ghostnet_100", "densenet121", "dla34", "hrnet_w18_small",
    "res2net50_26w_4s", "rexnet_100", "selecsls42b", "dpn68", "inception_v3", "xception41",
]
MODES = {"default": {}, "prune": {"prune": 0.5}, "int8": {"quantize": "int8"}}
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)


def torchvision_models() -> list[str]:
    """Every torchvision classification model (``torchvision.models.list_models``)."""
    import torchvision

    return ["tv:" + n for n in torchvision.models.list_models(module=torchvision.models)]


def _build(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name.startswith("tv:"):
        import torchvision

        model = torchvision.models.get_model(name[3:], weights=None).eval()
        fixed = any(k in name for k in ("vit_", "swin", "maxvit"))
        x = torch.randn(1, 3, 224, 224) if fixed else torch.randn(1, 3, 64, 64)
        try:
            with torch.no_grad():
                model(x)
        except Exception:  # noqa: BLE001 - too small (inception_v3): its weights' crop size
            crop = torchvision.models.get_model_weights(name[3:]).DEFAULT.transforms().crop_size
            x = torch.randn(1, 3, *(list(crop) * 2 if len(crop) == 1 else crop))
        return model, x
    import timm

    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    try:
        with torch.no_grad():
            model(x)
    except Exception:  # noqa: BLE001 - a fixed input size: the model's own
        x = torch.randn(1, *model.pretrained_cfg["input_size"])
    return model, x


def _bn_left(gm) -> int:
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is F.batch_norm:
            n += 1
        elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), _BN):
            n += 1
    return n


def _row(name: str, mode: str, model: nn.Module, x: torch.Tensor) -> list[str]:
    import fxopt

    kw = dict(MODES[mode])
    if mode == "int8":
        kw["calibration_data"] = [x]
    total_convs = sum(isinstance(m, _CONV) for m in model.modules())
    t0 = time.perf_counter()
    try:
        opt = fxopt.optimize(model, x, **kw)
    except Exception as e:  # noqa: BLE001 - the sweep reports every failure as a row
        first = str(e).splitlines()[0][:140] if str(e) else ""
        if os.environ.get("ZOO_DEBUG"):
            traceback.print_exc()
        return [name, mode] + ["-"] * 7 + [_cost(t0), f"{type(e).__name__}: {first}"]
    r = opt.report
    cap = r.capture or {}
    opaque = cap.get("opaque", [])
    params = sum(p.numel() for p in model.parameters()) or 1
    hidden = sum(o["params"] for o in opaque)
    leaves = f"{len(opaque)} ({hidden / params:.0%})" if opaque else "0"
    bn_inside = sum(o["layers"]["bn"] for o in opaque)
    bn = str(_bn_left(opt.graph_module)) + (f" (+{bn_inside} in leaves)" if bn_inside else "")
    fuse = r.record("fuse_act")
    fused = sum(v for k, v in (fuse.stats if fuse else {}).items() if k.startswith("conv"))
    lower = r.record("lower_convs")
    lowered = sum((lower.stats if lower else {}).values())
    int8 = "-"
    err = f"{r.final_rel_err:.1e}" if r.final_rel_err is not None else "-"
    q = r.record("quantize_int8")
    if q is not None:
        int8 = str(sum(q.stats.get(k, 0) for k in ("conv2d", "conv1d", "linear",
                                                   "conv_transpose2d")))
        err = f"SQNR {q.stats.get('sqnr_db', float('nan')):.1f} dB"
    ratio = f"{r.after.params / max(r.before.params, 1):.3f}"
    method = cap.get("method", "?")
    if cap.get("inlined"):
        method += f" + {len(cap['inlined'])} inlined by export"
    return [name, mode, method, leaves, bn, f"{fused}+{lowered}/{total_convs}",
            int8, ratio, err, _cost(t0), ""]


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _cost(t0: float) -> str:
    """The mode's time and the process's peak resident memory so far (model build included)."""
    return f"{time.perf_counter() - t0:.0f} s / {_peak_rss_gb():.1f} GB"


COLUMNS = ["model", "mode", "capture", "leaves (params)", "BN left", "convs fused+lowered/all",
           "int8 layers", "params ratio", "rel err / SQNR", "time / peak RSS", "error"]


def _size(name: str) -> float:
    """Parameter count from a meta-device build (no memory, no init); for the models whose
    constructor needs real tensors (torchvision's RegNets), about 5M parameters per GFLOP."""
    try:
        with torch.device("meta"):
            if name.startswith("tv:"):
                import torchvision

                model = torchvision.models.get_model(name[3:], weights=None)
            else:
                import timm

                model = timm.create_model(name, pretrained=False)
        return float(sum(p.numel() for p in model.parameters()))
    except Exception:  # noqa: BLE001 - only an ordering key
        m = re.search(r"(\d+(?:_\d+)?)(gf|mf)$", name)
        if m:
            return float(m.group(1).replace("_", ".")) * (5e6 if m.group(2) == "gf" else 5e3)
        return float("inf")


def _names(spec: str) -> list[str]:
    groups = {"timm": TIMM, "timm-issue15": TIMM_ISSUE15}
    if spec == "all":
        return TIMM + torchvision_models()
    if spec == "torchvision":
        return torchvision_models()
    return groups.get(spec) or spec.split(",")


def _run_here(name: str, modes: list[str]):
    """The model's rows, each as soon as its mode is done."""
    t0 = time.perf_counter()
    try:
        model, x = _build(name)
    except Exception as e:  # noqa: BLE001
        yield [name, "build"] + ["-"] * 7 + [_cost(t0), f"{type(e).__name__}: {e}"[:140]]
        return
    for mode in modes:
        yield _row(name, mode, model, x)


def _rss_gb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError):
        pass
    return 0.0


def _run_isolated(name: str, modes: list[str], timeout: float, mem_limit: float) -> list[list[str]]:
    """One model in a child process; a timeout, a memory overrun or a crash becomes a row per
    mode not reported, with the time and the peak resident memory the parent measured."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--models", name, "--modes",
           ",".join(modes), "--json-row", "--no-isolate", "--out", "-"]
    t0, peak, why = time.monotonic(), 0.0, ""
    with tempfile.TemporaryFile() as out:
        child = subprocess.Popen(cmd, stdout=out)
        try:
            while child.poll() is None:
                peak = max(peak, _rss_gb(child.pid))
                if time.monotonic() - t0 > timeout:
                    why = f"timeout: killed after {timeout:.0f} s"
                elif peak > mem_limit:
                    why = f"memory: killed at {peak:.1f} GB resident (limit {mem_limit:g} GB)"
                if why:
                    child.kill()
                    child.wait()
                    break
                time.sleep(0.2)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        out.seek(0)
        text = out.read().decode(errors="replace")
    rows = [json.loads(line[len(_ROW):]) for line in text.splitlines() if line.startswith(_ROW)]
    if not why and child.returncode != 0:
        sig = -child.returncode
        why = (f"crashed: signal {signal.Signals(sig).name}" if sig > 0 else
               f"crashed: exit status {child.returncode}")
    done = {r[1] for r in rows}
    if "build" in done:
        return rows
    cost = f"{time.monotonic() - t0:.0f} s / {peak:.1f} GB"
    missing = [m for m in modes if m not in done]
    return rows + [[name, m] + ["-"] * 7 + [cost, (why or "no row reported") if i == 0 else
                                            f"not run: the process was stopped in {missing[0]}"]
                   for i, m in enumerate(missing)]


_ROW = "ZOOROW "
_SUMMARY = "\n## Summary\n"


def _table_rows(text: str) -> list[list[str]]:
    """The rows of a table this script wrote (``--resume``)."""
    rows = []
    for line in text.split(_SUMMARY)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == len(COLUMNS) and cells[0] != COLUMNS[0]:
            rows.append(cells)
    return rows


def _fmt(row: list[str]) -> str:
    return "| " + " | ".join(row) + " |\n"


class _Table:
    """The markdown file, written as rows arrive; the summary goes last when the sweep ends."""

    def __init__(self, path: Path | None, preamble: str, rows: list[list[str]]):
        self.path, self.rows = path, list(rows)
        self.text = preamble + _fmt(COLUMNS) + "|" + "---|" * len(COLUMNS) + "\n"
        self.text += "".join(_fmt(r) for r in rows)
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(self.text)

    def add(self, row: list[str]) -> None:
        self.rows.append(row)
        self.text += _fmt(row)
        if self.path:
            with self.path.open("a") as f:
                f.write(_fmt(row))
        print(_fmt(row), end="", flush=True)

    def finish(self, not_run: list[str]) -> None:
        failed = [r for r in self.rows if r[-1]]
        s = _SUMMARY + f"\n{len(failed)} of {len(self.rows)} runs failed"
        models = sorted({r[0] for r in self.rows})
        s += f" ({len(models)} models).\n"
        if not_run:
            s += f"\nNot run ({len(not_run)}; the sweep was stopped first): {', '.join(not_run)}.\n"
        if self.path:
            with self.path.open("a") as f:
                f.write(s)
            print(f"wrote {self.path}")
        print(self.text + s)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="all",
                    help="'all', 'timm', 'timm-issue15', 'torchvision', or a comma list (tv:name "
                         "for torchvision)")
    ap.add_argument("--modes", default="default,prune,int8")
    ap.add_argument("--out", default=None, help="output file ('-': stdout only)")
    ap.add_argument("--no-isolate", dest="isolate", action="store_false",
                    help="run every model in this process (default: one child process each)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per model (isolated)")
    ap.add_argument("--mem-limit-gb", type=float, default=8.0,
                    help="kill a model's process past this resident memory (isolated)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows already in --out and run only the models without one")
    ap.add_argument("--json-row", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("ZOO_THREADS", "1")))
    names, modes = _names(args.models), args.modes.split(",")
    if args.json_row:  # the child of an isolated sweep
        for name in names:
            for row in _run_here(name, modes):
                print(_ROW + json.dumps(row), flush=True)
        return 0
    path = None if args.out == "-" else Path(args.out) if args.out else (
        Path(__file__).resolve().parent / "results" / f"zoo-{datetime.date.today()}.md")
    old_rows, preamble = [], ""
    if args.resume and path and path.exists():
        old = path.read_text().split(_SUMMARY)[0]
        old_rows = _table_rows(old)
        preamble = old[:old.index(_fmt(COLUMNS))].rstrip("\n") + (
            f"\n\nResumed {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}: "
            f"`python {' '.join(sys.argv)}` ({len(old_rows)} rows kept).\n\n")
    else:
        preamble = header("fxopt model zoo sweep (issue 15)") + (
            f"\nModels: `{args.models}` ({len(names)}), modes {modes}; input 1x3x64x64 (the "
            f"model's own size where it needs one); random weights; int8 calibrated on the "
            f"example input. " + (f"Each model in its own process (timeout {args.timeout:g} s, "
                                  f"resident memory limit {args.mem_limit_gb:g} GB), smallest "
                                  f"first; \"time / peak RSS\": the mode's time and the "
                                  f"process's peak resident memory so far (build included)."
                                  if args.isolate else "One process.") + "\n\n")
    done = {r[0] for r in old_rows}
    todo = [n for n in names if n not in done]
    if args.isolate:
        todo.sort(key=_size)
    table, left = _Table(path, preamble, old_rows), list(todo)

    def stop(signum, frame):
        table.finish(left)
        sys.exit(128 + signum)

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for name in todo:
            rows = (_run_isolated(name, modes, args.timeout, args.mem_limit_gb) if args.isolate
                    else list(_run_here(name, modes)))
            for row in rows:
                table.add(row)
            left.remove(name)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    table.finish(left)
    return 0


if __name__ == "__main__":
    sys.exit(main())
