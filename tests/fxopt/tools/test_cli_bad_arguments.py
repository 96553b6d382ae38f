"""Bad arguments to the ``fxopt`` command line (``main(argv)``, in-process): each exits non-zero
with one ``fxopt: error:`` line (``fix:`` where fxopt knows the fix) or argparse's usage error,
never a traceback. (Bad inputs to the Python API: ``tests/fxopt/test_bad_inputs.py``.)
"""
from __future__ import annotations

import pytest

from fxopt.tools.cli import main as cli_main

CLI_CASES = {
    "no-command": [],
    "unknown-command": ["compile"],
    "unknown-flag": ["optimize", "--fast"],
    "prune-two": ["optimize", "--prune", "2"],
    "prune-text": ["optimize", "--prune", "half"],
    "quantize-int4": ["optimize", "--quantize", "int4"],
    "target-tpu": ["optimize", "--target", "tpu"],
    "check-typo": ["optimize", "--check", "every"],
    "on-mismatch-typo": ["optimize", "--on-mismatch", "ignore"],
    "epochs-zero": ["optimize", "--epochs", "0"],
    "finetune-epochs-text": ["optimize", "--finetune-epochs", "many"],
    "pipeline-unknown": ["optimize", "--pipeline", "fastest"],
    "disable-unknown": ["optimize", "--disable", "fold_bns"],
    "tradeoff-without-out": ["optimize", "--tradeoff"],
    "model-spec-unknown": ["optimize", "--model", "resnet18"],
    "model-file-missing": ["optimize", "--model", "no_such_file.py:build"],
    "torchvision-unknown": ["optimize", "--model", "torchvision:resnet_nope"],
    "input-shape-text": ["optimize", "--model", "torchvision:resnet18", "--input-shape", "1,x"],
    "epochs-not-digits": ["optimize", "--model", "torchvision:resnet18", "--epochs", "2"],
    "quantize-and-no-quantize": ["optimize", "--quantize", "int8", "--no-quantize"],
    "prune-and-no-prune": ["optimize", "--prune", "0.5", "--no-prune"],
    "onnx-is-a-folder": ["optimize", "--onnx", "{tmp}"],
    "out-is-a-file": ["optimize", "--out", "{tmp}/file.txt"],
    "log-dir-is-a-file": ["optimize", "--log-dir", "{tmp}/file.txt"],
}


@pytest.mark.parametrize("name", sorted(CLI_CASES))
def test_cli_bad_arguments(name, capsys, tmp_path):
    (tmp_path / "file.txt").write_text("not a folder\n")
    rc = cli_main([a.replace("{tmp}", str(tmp_path)) for a in CLI_CASES[name]])
    out, err = capsys.readouterr()
    assert rc != 0
    assert "Traceback" not in out + err
    if rc == 2 and name != "no-command":  # argparse's usage error
        assert "usage:" in err and "error:" in err
    elif rc == 1:
        assert err.startswith("fxopt: error: ") and "\n  fix: " in err, err
        assert "unexpected" not in err
