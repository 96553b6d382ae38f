"""The ``fxopt`` command line: optimize a model and show what every pass did.

    $ fxopt optimize                                   # the built-in digits ResNet (trained
                                                       # once, cached): pruned, fine-tuned,
                                                       # fused, then int8
    $ fxopt optimize --model torchvision:resnet18      # random weights, input 1,3,224,224
    $ fxopt optimize --model my_model.py:build --input-shape 1,3,64,64 --out build/
    $ fxopt passes                                     # registered passes, groups, pipelines

``optimize`` prints the per-pass report, then params / MACs / size / test accuracy (digits only)
and latency before and after, measured on this machine. ``--out DIR`` writes ``report.json``
and ``model.fxopt`` (restore it with ``fxopt.load``).

Errors print as one line, ``fxopt: error: <what failed>``, and a ``  fix: <how>`` line when
fxopt knows the fix; the exit status is non-zero. ``--debug`` shows the full traceback instead.
Progress bars go to stderr and are drawn only on a terminal: in a CI log each one becomes a
single final line, and stdout holds only the results.

``main(argv)`` returns the exit status instead of exiting, so tests call it in-process.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

import fxopt
from fxopt.api import TARGETS
from fxopt.errors import FxoptError, InputError, PipelineError
from fxopt.infra.manager import CHECK_MODES, MISMATCH_MODES
from fxopt.tools.cli_progress import ProgressInstrument, pipeline_progress
from fxopt.tools.latency import measure_latency
from fxopt.tools.model_spec import LoadedSpec, load_model_spec, parse_input_shape
from fxopt.tools.tradeoff import TRADEOFF_RATIOS

__all__ = ["main", "build_parser", "ProgressInstrument", "LoadedSpec", "load_model_spec",
           "parse_input_shape", "measure_latency"]

# Latency: at most this many timed rounds, stopping once the budget is spent (>= 5 rounds).
LATENCY_MAX_RUNS = 30
LATENCY_BUDGET_S = 1.0
QUANTIZE_CHOICES = ("int8", "int8_dynamic")
# The default run shows pruning too: half the channels, then fine-tuning with distillation.
DIGITS_PRUNE = 0.5


# -- the parser -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxopt", description="A compiler for trained PyTorch models: every pass is checked "
                                  "against eager.",
        epilog="environment: FXOPT_CACHE_DIR (where the default model's weights are cached; "
               "default $XDG_CACHE_HOME/fxopt or ~/.cache/fxopt), FXOPT_DEBUG=1|2 (log each pass; "
               "2: graphs too).")
    parser.add_argument("--version", action="version", version=f"fxopt {fxopt.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    opt = sub.add_parser("optimize", help="optimize a model and report what each pass did",
                         description="Optimize a model (default: the built-in digits ResNet) and "
                                     "print the per-pass report, accuracy and latency.")
    opt.add_argument("--model", default="digits", metavar="SPEC",
                     help="'digits' (default: a small ResNet trained on scikit-learn's digits), "
                          "'torchvision:NAME' (random weights) or 'path/to/file.py:factory' "
                          "(factory() returns the nn.Module)")
    opt.add_argument("--input-shape", metavar="N,C,H,W",
                     help="shape of one example input batch (default 1,3,224,224 for torchvision; "
                          "required for a model from a file unless the file sets INPUT_SHAPE)")
    opt.add_argument("--pipeline", default="default", metavar="NAME",
                     help="a pipeline from `fxopt passes` (default: 'default', the fullest)")
    opt.add_argument("--disable", default="", metavar="A,B",
                     help="comma-separated pass or group names to skip")
    opt.add_argument("--target", default="auto", choices=TARGETS,
                     help="where the model runs (default auto: cpu; cuda moves model and inputs "
                          "to the GPU)")
    opt.add_argument("--check", default="each", choices=CHECK_MODES,
                     help="check against eager after each pass (default), at the end, or never")
    opt.add_argument("--on-mismatch", default="raise", choices=MISMATCH_MODES,
                     help="on a failed check: stop (default), drop the pass and go on, or warn")
    opt.add_argument("--prune", type=_ratio, metavar="RATIO",
                     help="prune this fraction of channels (0 < RATIO < 1); the digits model is "
                          f"pruned by {DIGITS_PRUNE} and fine-tuned unless --no-prune")
    opt.add_argument("--no-prune", action="store_true",
                     help="digits model: skip the default pruning and fine-tuning")
    opt.add_argument("--finetune-epochs", type=_positive_int, default=8, metavar="N",
                     help="digits model: fine-tune the pruned model for at most N epochs "
                          "(distillation from the unpruned model, early stopping; default 8)")
    opt.add_argument("--log-dir", metavar="DIR",
                     help="digits model: write TensorBoard logs of the fine-tuning to DIR")
    opt.add_argument("--quantize", choices=QUANTIZE_CHOICES,
                     help="quantize to int8 (static, calibrated; int8_dynamic: Linear layers "
                          "only, no calibration). The digits model's default run ends with int8")
    opt.add_argument("--no-quantize", action="store_true",
                     help="digits model: stop at the float model (no int8 stage)")
    opt.add_argument("--out", metavar="DIR", help="write DIR/report.json and DIR/model.fxopt "
                                                 "(and graph_before.png / graph_after.png)")
    opt.add_argument("--tradeoff", action=argparse.BooleanOptionalAction, default=None,
                     help="with --out, digits model: also measure pruning ratios "
                          f"{', '.join(f'{r:g}' for r in TRADEOFF_RATIOS)} (short fine-tuning "
                          "each) and write DIR/tradeoff.png and tradeoff.json (default: on for "
                          "the digits model unless --no-prune)")
    opt.add_argument("--onnx", metavar="PATH", help="export the optimized model to ONNX (float "
                                                    "ops; int8 as QDQ), checked in ONNX Runtime")
    opt.add_argument("--epochs", type=_positive_int, default=None, metavar="N",
                     help="train the digits model for N epochs instead of the recipe's default "
                          "(quick runs and tests; cached separately)")
    opt.add_argument("--no-progress", action="store_true", help="no progress bars")
    opt.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    opt.set_defaults(func=cmd_optimize)

    ls = sub.add_parser("passes", help="list the registered passes, groups and pipelines")
    ls.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    ls.set_defaults(func=cmd_passes)
    return parser


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number between 0 and 1, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


# -- entry point ----------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 error, 2 usage, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help, --version and usage errors
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    if args.command is None:
        parser.print_help()
        return 2
    from fxopt.infra import progress as _progress

    # --no-progress also silences the bars inside passes (calibration, sensitivity).
    _progress.set_enabled(False if getattr(args, "no_progress", False) else None)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        _error_line("interrupted")
        return 130
    except FxoptError as e:
        if args.debug:
            raise
        _error_line(e.message, e.hint)
        return 1
    except Exception as e:  # noqa: BLE001 - a bug: one line here, the traceback with --debug
        if args.debug:
            raise
        _error_line(f"unexpected {type(e).__name__}: {e} (run again with --debug for the "
                    f"full traceback)")
        return 1
    finally:
        _progress.set_enabled(None)


def _error_line(message: str, hint: str | None = None) -> None:
    # Plain print, not rich: messages hold brackets (disable=['dce']) that rich would read as
    # markup, and a log line must never be wrapped.
    print(f"fxopt: error: {_one_line(message)}", file=sys.stderr)
    if hint:
        print(f"  fix: {_one_line(hint)}", file=sys.stderr)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _console(stderr: bool = False):
    """A rich console; off a terminal: no colour, no live redraws, and wide enough for tables."""
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=stderr, highlight=False, width=140)
    return console


# -- commands -----------------------------------------------------------------------------------
def cmd_optimize(args) -> int:
    out, err = _console(), _console(stderr=True)
    progress = not args.no_progress
    disable = [d.strip() for d in args.disable.split(",") if d.strip()]
    # Fail on a misspelt pipeline or pass name before (possibly) training for seconds.
    fxopt.expand_pipeline(args.pipeline, disable=disable)
    _check_tradeoff_args(args)
    _check_output_args(args)
    target = args.target
    if target == "cuda" and not torch.cuda.is_available():
        raise PipelineError("--target cuda but no CUDA device is available",
                            hint="use --target cpu (or auto)")

    spec = load_model_spec(args.model, args.input_shape, epochs=args.epochs, progress=progress,
                           console=err)
    device = torch.device("cuda" if target == "cuda" else "cpu")
    model, example = spec.model.to(device), spec.example.to(device)
    quantize = args.quantize
    if spec.name == "digits" and quantize is None and not args.no_quantize \
            and not args.no_prune and target != "cuda":
        quantize = "int8"  # the default run shows the whole pipeline, int8 last
    calibration = None
    if quantize == "int8":
        calibration = [b.to(device) for b in spec.calibration]
    out.print(f"model: {spec.name} - {spec.description}", markup=False)

    prune = args.prune
    if spec.name == "digits" and prune is None and not args.no_prune:
        prune = DIGITS_PRUNE
    recipe = spec.name == "digits" and prune is not None and target != "cuda"
    # Warnings (a rolled-back pass, --on-mismatch warn) become one plain line each, not
    # Python's "file:line: UserWarning:" pair.
    bar = pipeline_progress(err) if progress else None
    instruments = [ProgressInstrument(bar, manage=True)] if bar is not None else []
    result = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if recipe:
                # Prune, fine-tune with distillation from the unpruned model, then the pipeline.
                from fxopt.tools.recipes import prune_and_finetune_digits

                result = prune_and_finetune_digits(
                    prune, epochs=args.finetune_epochs, model=model, pipeline=args.pipeline,
                    disable=disable, progress=progress, console=err, log_dir=args.log_dir,
                    check=args.check, on_mismatch=args.on_mismatch, instruments=instruments,
                    quantize=quantize)
                opt = result.final
            else:
                opt = fxopt.optimize(model, example, pipeline=args.pipeline, disable=disable,
                                     target=target, check=args.check,
                                     on_mismatch=args.on_mismatch, prune=prune,
                                     quantize=quantize, calibration_data=calibration,
                                     instruments=instruments)
    finally:
        # On an error too: the terminal must get its cursor back. Only a started bar: stopping
        # one that never started (or twice) makes rich print an empty render.
        if bar is not None and bar.live.is_started:
            bar.stop()
    for message in dict.fromkeys(_one_line(w.message) for w in caught):
        print(f"fxopt: warning: {message.removeprefix('fxopt: ')}", file=sys.stderr)

    report = opt.report
    if result is not None:
        out.print(result.pruned_report.table())
    out.print(report.table())
    for note in report.notes:
        out.print(f"note: {note}", markup=False)
    if result is not None:
        out.print(result.table())
        for note in result.notes:
            out.print(f"note: {note}", markup=False)
    elif prune is not None:
        out.print("note: pruned without fine-tuning (fine-tuning data exists only for the digits "
                  "model); accuracy will have dropped", markup=False)
    if result is None:  # the recipe's table already compares every stage with the original
        table, latency_note = _summary(spec, model, opt, example, device)
        out.print(table)
        out.print(latency_note, markup=False)
    if args.out:
        out_dir = Path(args.out)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "report.json").write_text(report.to_json() + "\n")
            opt.save(out_dir / "model.fxopt")
        except OSError as e:
            raise InputError(f"cannot write to --out {out_dir}: {e.strerror or e}",
                             hint="pass a folder you can write to") from e
        out.print(f"wrote {out_dir / 'report.json'} and {out_dir / 'model.fxopt'}", markup=False)
        _write_pictures(out, model, example, opt, out_dir)
        if _wants_tradeoff(args, spec, target):
            _write_tradeoff(out, err, args, model, example, prune, opt, out_dir, progress)
    if args.onnx:
        exported = fxopt.export_onnx(opt, example, args.onnx)
        err_note = f", ONNX Runtime rel err {exported.check.rel_err:.1e}" if exported.check else ""
        if exported.output_step is not None:  # int8: QDQ, checked within one output step
            err_note = ", int8 as QDQ" + (
                f", ONNX Runtime max abs err {exported.check.max_abs:.2g} (one output step: "
                f"{exported.output_step:.2g})" if exported.check and exported.output_step else
                err_note)
        out.print(f"wrote {exported.path} (opset {exported.opset}{err_note})", markup=False)
        for what in exported.kept:
            out.print(f"note: kept as is in ONNX: {what}", markup=False)
    return 0


def _write_pictures(out, model: nn.Module, example: torch.Tensor, opt, out_dir: Path) -> None:
    """DIR/graph_before.png (the captured graph) and DIR/graph_after.png (the optimized one)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        out.print("note: no graph pictures: pip install 'fxopt[draw]'", markup=False)
        return
    fxopt.draw(fxopt.capture(model, example), out_dir / "graph_before.png", title="before")
    fxopt.draw(opt, out_dir / "graph_after.png", title="after")
    out.print(f"wrote {out_dir / 'graph_before.png'} and {out_dir / 'graph_after.png'}",
              markup=False)


def _check_output_args(args) -> None:
    """Contradicting flags and unusable output paths fail before the model is loaded."""
    if args.no_quantize and args.quantize:
        raise InputError("--quantize and --no-quantize contradict each other",
                         hint="pass one of them")
    if args.prune is not None and args.no_prune:
        raise InputError("--prune and --no-prune contradict each other", hint="pass one of them")
    for flag, value in (("--out", args.out), ("--log-dir", args.log_dir)):
        if value and Path(value).exists() and not Path(value).is_dir():
            raise InputError(f"cannot write to {flag} {value}: it is a file, not a folder",
                             hint=f"pass a folder for {flag} (it is created if missing)")
    if args.onnx and Path(args.onnx).is_dir():
        raise InputError(f"--onnx {args.onnx} is a folder; it names the file to write",
                         hint=f"e.g. --onnx {Path(args.onnx) / 'model.onnx'}")


def _check_tradeoff_args(args) -> None:
    """An explicit --tradeoff needs --out and the digits model (its test split and fine-tuning)."""
    if not args.tradeoff:
        return
    if not args.out:
        raise InputError("--tradeoff writes DIR/tradeoff.png: it needs --out DIR",
                         hint="add --out DIR")
    if args.model != "digits" or args.target == "cuda":
        raise InputError("--tradeoff measures accuracy at several pruning ratios, which needs the "
                         "digits model's test split and fine-tuning data, on the CPU",
                         hint="drop --tradeoff, or use --model digits --target cpu")


def _wants_tradeoff(args, spec: LoadedSpec, target: str) -> bool:
    if args.tradeoff is not None:
        return args.tradeoff
    return spec.name == "digits" and target != "cuda" and not args.no_prune


def _write_tradeoff(out, err, args, model: nn.Module, example: torch.Tensor, prune, opt,
                    out_dir: Path, progress: bool) -> None:
    """DIR/tradeoff.png and tradeoff.json: accuracy against latency and size by pruning ratio.

    The run's own model is one of the points, not measured twice: a float run at ratio r stands
    for r; an int8 run adds an int8 point beside the float ones.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        out.print("note: no trade-off plot: pip install 'fxopt[draw]'", markup=False)
        return
    import json

    from fxopt.tools.digits import test_loader
    from fxopt.tools.tradeoff import (TRADEOFF_EPOCHS, measure_pruning_tradeoff, model_precision,
                                      plot_tradeoff, tradeoff_row, tradeoff_table)

    ratio = float(prune or 0.0)
    int8 = model_precision(opt) == "int8"
    own = tradeoff_row(opt, example[:1], ratio=ratio, test=test_loader(),
                       label=f"{ratio:g}{' int8' if int8 else ''} (this run)")
    own["this_run"] = True
    ratios = [r for r in TRADEOFF_RATIOS if int8 or r != ratio]
    rows = measure_pruning_tradeoff(ratios, model=model,
                                    epochs=min(args.finetune_epochs, TRADEOFF_EPOCHS),
                                    check=args.check, progress=progress, console=err)
    rows = sorted([*rows, own], key=lambda r: (r["ratio"], r["precision"]))
    png, js = out_dir / "tradeoff.png", out_dir / "tradeoff.json"
    try:
        js.write_text(json.dumps(rows, indent=1) + "\n")
    except OSError as e:
        raise InputError(f"cannot write to --out {out_dir}: {e.strerror or e}",
                         hint="pass a folder you can write to") from e
    plot_tradeoff(rows, png, title=f"digits ResNet: accuracy against latency and size by "
                                   f"pruning ratio (the other ratios fine-tuned at most "
                                   f"{TRADEOFF_EPOCHS} epochs)")
    out.print(tradeoff_table(rows))
    out.print(f"wrote {png} and {js}", markup=False)


def _summary(spec: LoadedSpec, model: nn.Module, opt: nn.Module, example: torch.Tensor, device):
    from rich.table import Table

    from fxopt.infra.report import format_bytes, format_count

    before, after = opt.report.before, opt.report.after
    batch = example.shape[0]
    t = Table(title="before and after", title_justify="left")
    for col, just in (("", "left"), ("before", "right"), ("after", "right"), ("change", "right")):
        t.add_column(col, justify=just)

    def ratio(b, a):
        return f"{a / b:.2f}x" if b else "-"

    t.add_row("params", format_count(before.params), format_count(after.params),
              ratio(before.params, after.params))
    t.add_row(f"MACs (batch of {batch})", format_count(before.macs), format_count(after.macs),
              ratio(before.macs, after.macs))
    t.add_row("size (weights)", format_bytes(before.bytes), format_bytes(after.bytes),
              ratio(before.bytes, after.bytes))
    t.add_row("graph nodes", str(before.nodes), str(after.nodes),
              f"{after.nodes - before.nodes:+d}")
    if spec.test_loader is not None:
        from fxopt.tools.digits import evaluate

        acc_b = evaluate(model, spec.test_loader, device=device)
        acc_a = evaluate(opt, spec.test_loader, device=device)
        n = len(spec.test_loader.dataset)
        t.add_row(f"test accuracy ({n} images)", f"{acc_b:.2%}", f"{acc_a:.2%}",
                  f"{(acc_a - acc_b) * 100:+.2f} pt")
    (lat_b, lat_a), rounds = measure_latency([model, opt], example, max_runs=LATENCY_MAX_RUNS,
                                             budget_s=LATENCY_BUDGET_S)
    where = "cuda" if example.is_cuda else f"cpu, {torch.get_num_threads()} threads"
    speed = "-" if not (lat_a and lat_b) else (
        f"{lat_b / lat_a:.2f}x faster" if lat_a <= lat_b else f"{lat_a / lat_b:.2f}x slower")
    t.add_row(f"latency (batch of {batch})", _ms(lat_b), _ms(lat_a), speed)
    note = (f"latency: median of {rounds} runs each after warm-up, measured on this machine "
            f"({where}); expect noise on a busy machine")
    return t, note


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds < 0.01 else f"{seconds * 1e3:.1f} ms"


def _cells(*values):
    """Table cells as plain text: docstrings may hold brackets that rich would read as markup."""
    from rich.text import Text

    return [Text(str(v)) for v in values]


def cmd_passes(args) -> int:
    from rich.table import Table

    out = _console()
    passes = Table(title="passes", title_justify="left")
    for col in ("name", "what it does", "reference", "requires", "config", "order"):
        passes.add_column(col, overflow="fold")
    for name in sorted(fxopt.PASSES):
        info = fxopt.PASSES[name]
        order = ", ".join([f"after {a}" for a in info.after]
                          + [f"before {b}" for b in info.before])
        passes.add_row(*_cells(name, info.summary, info.reference,
                                ", ".join(p.doc for p in info.requires) or "-",
                                info.config.__name__ if info.config else "-", order or "-"))
    groups = Table(title="groups (run to a fixpoint)", title_justify="left")
    for col in ("name", "members", "what it does"):
        groups.add_column(col, overflow="fold")
    for name in sorted(fxopt.GROUPS):
        g = fxopt.GROUPS[name]
        groups.add_row(*_cells(name, ", ".join(g.members), g.summary))
    pipelines = Table(title="pipelines (--pipeline)", title_justify="left")
    for col in ("name", "steps"):
        pipelines.add_column(col, overflow="fold")
    for name in sorted(fxopt.PIPELINES):
        pipelines.add_row(*_cells(name, ", ".join(fxopt.PIPELINES[name])))
    for table in (passes, groups, pipelines):
        out.print(table)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
