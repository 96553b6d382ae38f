"""The ``fxopt`` command line, called in-process through ``main(argv)``.

Digits runs use ``--epochs 1`` (a separately cached, half-trained model) and share one cache
folder, so the suite trains once; the real recipe is tested in test_digits.py.
"""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import fxopt
from fxopt.tools import cli, digits

QUICK = ["--epochs", "1", "--finetune-epochs", "1"]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("fxopt-cache")


@pytest.fixture(autouse=True)
def cache(shared_cache, monkeypatch):
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(shared_cache))
    # 5 timed rounds: the tests are not benchmarks
    monkeypatch.setattr(cli, "LATENCY_BUDGET_S", 0.0)
    return shared_cache


def _run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_one_error(rc, out, err, *needles):
    assert rc != 0
    assert "Traceback" not in out + err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("fxopt: error: ")]
    assert len(errors) == 1, err
    assert all(ln.startswith(("fxopt: error: ", "  fix: ")) for ln in lines), err
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_default_optimize(capsys):
    rc, out, err = _run(capsys, "optimize", *QUICK)
    assert rc == 0, err
    assert "fxopt report" in out and "cleanup" in out
    # the default run prunes, fine-tunes and optimizes: every stage with its figures
    for row in ("original", "pruned + fine-tuned, optimized", "accuracy", "params", "MACs",
                "latency", "size", "optimized, int8", "quantize_int8", "lower_int8_cpu"):
        assert row in out, row
    assert out.count("%") >= 5  # accuracy at each stage, int8 last
    assert "int8: SQNR" in out
    assert "Traceback" not in err
    # Progress bars go to stderr; off a terminal each is one final line.
    assert "optimizing: done" in err


CHEAP = [*QUICK, "--no-progress", "--no-prune", "--pipeline", "cleanup"]


def test_second_run_reads_the_cache(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(tmp_path))
    rc, out, _ = _run(capsys, "optimize", *CHEAP)
    assert rc == 0 and "trained in" in out
    (path,) = tmp_path.iterdir()
    mtime = path.stat().st_mtime_ns
    rc, out, _ = _run(capsys, "optimize", *CHEAP)
    assert rc == 0 and "weights from the cache" in out and "trained in" not in out
    assert path.stat().st_mtime_ns == mtime


def test_corrupt_cache_retrains(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(tmp_path))
    trained = []

    def train(epochs, seed, progress, console):  # the weights do not matter here
        trained.append(epochs)
        return digits.TrainResult(digits.DigitsResNet().eval(), 0.1, 0.01)

    monkeypatch.setattr(digits, "train_digits_model", train)
    path = digits.cache_path(tmp_path, epochs=1)
    path.write_bytes(b"\x00garbage")
    rc, out, err = _run(capsys, "optimize", *CHEAP)
    assert trained == [1]
    assert rc == 0, err
    assert "trained in" in out
    assert digits._read_cache(path) is not None  # replaced by a good file


def test_no_prune_prints_before_and_after(capsys):
    rc, out, err = _run(capsys, "optimize", *QUICK, "--no-progress", "--no-prune")
    assert rc == 0, err
    for row in ("params", "MACs", "size", "test accuracy (359 images)", "latency",
                "measured on this machine"):
        assert row in out, row
    assert "prune_channels" not in out


def test_out_writes_report_and_a_loadable_model(capsys, tmp_path, monkeypatch):
    made = []
    real = fxopt.optimize

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(fxopt, "optimize", spy)
    rc, out, err = _run(capsys, "optimize", *QUICK, "--no-prune", "--out", str(tmp_path / "build"))
    assert rc == 0, err
    report = json.loads((tmp_path / "build" / "report.json").read_text())
    assert report["passes"] and report["before"]["macs"] > 0
    restored = fxopt.load(tmp_path / "build" / "model.fxopt")
    x = digits.load_digits_split().test_x[:32]
    with torch.no_grad():
        assert torch.equal(restored(x), made[0](x))
    assert "report.json" in out


def test_unwritable_out_is_one_line(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc, out, err = _run(capsys, "optimize", *CHEAP, "--out", str(blocker))
    _assert_one_error(rc, out, err, "cannot write to --out")


def test_options_are_passed_through(capsys, monkeypatch):
    seen = {}
    real = fxopt.optimize

    def spy(model, example, **kwargs):
        seen.update(kwargs)
        return real(model, example, **kwargs)

    monkeypatch.setattr(fxopt, "optimize", spy)
    rc, _, err = _run(capsys, "optimize", *QUICK, "--no-progress", "--no-prune",
                      "--pipeline", "cleanup", "--disable", "cse, dce", "--target", "cpu",
                      "--check", "end",
                      "--on-mismatch", "rollback", "--input-shape", "4,1,8,8")
    assert rc == 0, err
    assert seen["pipeline"] == "cleanup" and seen["disable"] == ["cse", "dce"]
    assert seen["target"] == "cpu" and seen["check"] == "end"
    assert seen["on_mismatch"] == "rollback"
    assert seen["prune"] is None and seen["quantize"] is None and seen["calibration_data"] is None


MODEL_FILE = """
import torch.nn as nn

def build():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

def not_a_module():
    return 42
"""


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "my_model.py"
    path.write_text(textwrap.dedent(MODEL_FILE))
    return path


def test_model_from_file(capsys, model_file):
    rc, out, err = _run(capsys, "optimize", "--model", f"{model_file}:build",
                        "--input-shape", "2,3,16,16")
    assert rc == 0, err
    assert "fxopt report" in out and "latency" in out and "build" in out
    assert err.startswith("optimizing: done") and err.count("\n") == 1  # one final bar line
    assert "accuracy" not in out  # no labelled data for a user's model


def test_model_file_with_declared_input_shape(capsys, model_file):
    model_file.write_text(model_file.read_text() + "\nINPUT_SHAPE = (1, 3, 8, 8)\n")
    rc, out, err = _run(capsys, "optimize", "--model", f"{model_file}:build", "--no-progress")
    assert rc == 0, err


def test_torchvision_model(capsys):
    pytest.importorskip("torchvision")
    rc, out, err = _run(capsys, "optimize", "--model", "torchvision:resnet18",
                        "--input-shape", "1,3,64,64", "--no-progress")
    assert rc == 0, err
    assert "torchvision:resnet18" in out
    assert re.search(r"params\s*│\s*11\.\d\dM", out), out  # resnet18: 11.7M parameters


@pytest.mark.parametrize("argv, needle", [
    (["--model", "nonsense"], "--model must be"),
    (["--model", "no/such/file.py:build"], "no such model file"),
    (["--model", "torchvision:no_such_net", "--input-shape", "1,3,8,8"], "no_such_net"),
    (["--pipeline", "no_such_pipeline"], "unknown pipeline"),
    (["--disable", "no_such_pass"], "no_such_pass"),
    (["--input-shape", "1,a,8"], "--input-shape"),
    (["--input-shape", "1,3,8,8"], "N,1,8,8"),
    (["--model", "torchvision:resnet18", *QUICK], "--epochs applies only"),
    pytest.param(["--target", "cuda"], "no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
])
def test_errors_are_one_clear_line(capsys, argv, needle):
    rc, out, err = _run(capsys, "optimize", "--no-progress", *argv)
    _assert_one_error(rc, out, err, needle)


def test_model_file_errors(capsys, model_file, tmp_path):
    rc, out, err = _run(capsys, "optimize", "--model", f"{model_file}:build")
    _assert_one_error(rc, out, err, "--input-shape is required")
    assert "  fix: " in err
    rc, out, err = _run(capsys, "optimize", "--model", f"{model_file}:missing",
                        "--input-shape", "1,3,8,8")
    _assert_one_error(rc, out, err, "no callable named 'missing'")
    assert "build" in err  # the hint names what is there
    rc, out, err = _run(capsys, "optimize", "--model", f"{model_file}:not_a_module",
                        "--input-shape", "1,3,8,8")
    _assert_one_error(rc, out, err, "not an nn.Module")
    broken = tmp_path / "broken.py"
    broken.write_text("import torch\nraise RuntimeError('broken on import')\n")
    rc, out, err = _run(capsys, "optimize", "--model", f"{broken}:build",
                        "--input-shape", "1,3,8,8")
    _assert_one_error(rc, out, err, "broken on import")


def test_unexpected_error_is_one_line_and_debug_shows_it(capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(fxopt, "optimize", boom)
    rc, out, err = _run(capsys, "optimize", *QUICK, "--no-progress", "--no-prune")
    _assert_one_error(rc, out, err, "RuntimeError: boom second line", "--debug")
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["optimize", *QUICK, "--no-progress", "--no-prune", "--debug"])


def test_warnings_print_as_one_line(capsys, monkeypatch):
    import warnings

    real = fxopt.optimize

    def warns(*args, **kwargs):
        warnings.warn("fxopt: rolled back pass 'x': it broke\nthe numbers", stacklevel=2)
        return real(*args, **kwargs)

    monkeypatch.setattr(fxopt, "optimize", warns)
    rc, out, err = _run(capsys, "optimize", *CHEAP)
    assert rc == 0
    assert "fxopt: warning: rolled back pass 'x': it broke the numbers\n" in err
    assert "UserWarning" not in err


def test_fxopt_error_with_debug_raises(capsys):
    with pytest.raises(fxopt.PipelineError):
        cli.main(["optimize", "--pipeline", "nope", "--debug"])


def test_usage_errors_and_help(capsys):
    assert cli.main(["optimize", "--check", "sometimes"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert cli.main(["optimize", "--prune", "1.5"]) == 2
    assert cli.main([]) == 2
    assert "optimize" in capsys.readouterr().out
    assert cli.main(["--version"]) == 0
    assert fxopt.__version__ in capsys.readouterr().out


def test_passes_lists_passes_groups_and_pipelines(capsys):
    rc, out, _ = _run(capsys, "passes")
    assert rc == 0
    assert "dce" in out and "cleanup" in out and "default" in out
    assert fxopt.PASSES["dce"].summary[:30] in out.replace("\n", " ") or "Dead code" in out


def test_progress_instrument_counts_every_pass_run():
    from rich.console import Console
    from rich.progress import Progress

    model = digits.DigitsResNet().eval()
    with Progress(console=Console(file=io.StringIO())) as bar:
        inst = cli.ProgressInstrument(bar)
        opt = fxopt.optimize(model, digits.example_batch(2), instruments=[inst])
    (task,) = bar.tasks
    runs = sum(r.iterations for r in opt.report.passes)
    assert task.completed == task.total >= runs


def test_progress_instrument_manages_its_bar():
    from rich.console import Console
    from rich.progress import Progress

    buf = io.StringIO()
    bar = Progress(console=Console(file=buf))
    inst = cli.ProgressInstrument(bar, manage=True)
    fxopt.optimize(digits.DigitsResNet().eval(), digits.example_batch(2), instruments=[inst])
    assert "optimizing: done" in buf.getvalue() and not bar.live.is_started


def test_measure_latency():
    model = torch.nn.Linear(4, 4)
    (a, b), rounds = cli.measure_latency([model, model], torch.randn(2, 4), max_runs=7, budget_s=0)
    assert rounds == 5 and a > 0 and b > 0


def test_python_dash_m_fxopt_passes():
    # One real process: the same entry point as the console script (sys.exit(main())).
    proc = subprocess.run([sys.executable, "-m", "fxopt", "passes"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "dce" in proc.stdout


def test_default_run_prunes_and_finetunes(capsys, tmp_path):
    rc, out, err = _run(capsys, "optimize", *QUICK, "--no-progress", "--log-dir",
                        str(tmp_path / "tb"))
    assert rc == 0, err
    assert "prune_channels" in out  # the pruning run's report
    assert "pruned + fine-tuned" in out and "fine-tuning:" in out
    pytest.importorskip("tensorboard")
    assert list((tmp_path / "tb").rglob("events.out.tfevents*")), "no TensorBoard event file"


def test_no_quantize_stops_at_float(capsys):
    rc, out, err = _run(capsys, "optimize", *QUICK, "--no-progress", "--no-quantize")
    assert rc == 0, err
    assert "pruned + fine-tuned, optimized" in out and "int8" not in out
    rc, out, err = _run(capsys, "optimize", *QUICK, "--no-progress", "--no-quantize",
                        "--quantize", "int8")
    _assert_one_error(rc, out, err, "contradict")


def test_prune_other_models_says_no_finetuning(capsys, tmp_path):
    rc, out, err = _run(capsys, "optimize", "--no-progress", "--model", "torchvision:resnet18",
                        "--input-shape", "1,3,32,32", "--prune", "0.25", "--pipeline", "cleanup")
    assert rc == 0, err
    assert "prune_channels" in out and "without fine-tuning" in out
