"""bench/cpu_deploy.py (issue 13 item 7) runs end to end in its --quick mode and writes what the
issue asks of a figure in bench/results/: the date, the machine's flags, the versions, the load
average and the command, one table per model, and the "Done when" summary. A variant fxopt
refuses (an engine target this build lacks) is an ``n/a`` cell, a variant that fails while running
is an error, and neither ends the run."""
from __future__ import annotations

import json
import re

import pytest
from bench_scripts import load_bench_script  # tests/support
import torch

pytest.importorskip("torchvision")
pytest.importorskip("onnxruntime")


def _load():
    return load_bench_script("cpu_deploy")


def _run(tmp_path, variants: str, batch=("1",)) -> tuple[str, dict]:
    out = tmp_path / "deploy.md"
    text = _load().main(["--quick", "--models", "resnet18", "--size", "32", "--batch", *batch,
                         "--threads", "1", "--variants", variants, "--label", "test",
                         "--out", str(out)])
    assert out.read_text() == text
    return text, json.loads(out.with_suffix(".json").read_text())


def _row(text: str, variant: str) -> list[str]:
    lines = [ln for ln in text.splitlines() if ln.startswith(f"| {variant} |")]
    assert len(lines) == 1, (variant, lines)
    return [c.strip() for c in lines[0].strip("|").split("|")]


def test_quick_run_writes_header_tables_and_summary(tmp_path):
    text, data = _run(tmp_path, "eager,ao_int8,fxopt_ov_fp32")
    for field in ("- date: ", "- machine: ", "avx512_vnni ", "avx512_bf16 ", "amx_tile ",
                  "- versions: ", "torch ", "openvino ", "nncf ", "onnxruntime ",
                  "- fxopt commit: ", "- load average (1, 5, 15 min) before: ", ", after: ",
                  "- command: `", "--variants eager,ao_int8,fxopt_ov_fp32"):
        assert field in text, field
    assert "## resnet18" in text and "| variant | bs 1 ms | x eager | SQNR dB | size MB |" in text
    eager, ao = _row(text, "eager"), _row(text, "ao_int8")
    assert float(eager[1]) > 0 and float(ao[1]) > 0 and float(ao[4]) > 0  # ms, size MB
    assert 10 < float(ao[3]) < 80  # int8 SQNR against eager, dB
    # The engine target: a figure once fxopt has it, n/a with fxopt's reason before.
    ov = _row(text, "fxopt_ov_fp32")
    assert re.fullmatch(r"[0-9.]+", ov[1]) or (ov[1] == "n/a" and "n/a: " in ov[-1]), ov
    assert 'Done when" at batch 1' in text
    # no "ov" variant in this run: the float aim is not measured (it said "0 of 1" before)
    assert "best fxopt float <= OpenVINO default: not measured" in text
    cells = data["results"][0]["cells"]
    assert isinstance(cells["eager"]["ms"]["1"], float) and cells["ao_int8"]["sqnr"] > 10
    assert data["meta"]["machine"]["flags"].keys() >= {"avx512_vnni", "avx512_bf16", "amx_tile"}


def test_render_writes_the_markdown_again_from_the_json_keeping_the_reading(tmp_path):
    text, _ = _run(tmp_path, "eager,ao_int8,fxopt_int8")
    md = tmp_path / "deploy.md"
    md.write_text(text + "\n## Reading (added by hand)\n\n- kept\n")
    again = _load().main(["--render", str(md.with_suffix(".json"))])
    assert again == md.read_text()
    assert again.startswith(text.rstrip("\n") + "\n\n## Reading")  # the same figures and text
    assert again.endswith("- kept\n")  # and the reading kept
    assert "torch.ao int8: 1 of 1" in text or "torch.ao int8: 0 of 1" in text  # measured


def test_a_variant_that_fails_while_running_is_dropped_not_fatal():
    mod = _load()
    fns = {"ok": lambda x: x * 2, "bad": lambda x: x.view(-1, 7)}
    got = mod._time(fns, torch.ones(1, 3, 4, 4), reps=5, budget=0.1, warmup=1)
    assert isinstance(got["ok"][0], float) and got["ok"][1] >= 3
    assert got["bad"][1] == 0 and got["bad"][0].startswith("RuntimeError: ")


def test_unknown_variant_is_refused(capsys):
    with pytest.raises(SystemExit):
        _load().main(["--quick", "--variants", "eager,no_such_engine", "--out", "-"])
    assert "no_such_engine" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_run_against_openvino_nncf_and_ort(tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    text, _ = _run(tmp_path, "ov,ov_nncf_int8,ort_fp32,ort_int8,ort_int8_fxopt,fxopt_int8",
                   batch=("1", "2"))
    assert "| variant | bs 1 ms | bs 2 ms |" in text
    for v in ("ov", "ov_nncf_int8", "ort_fp32", "ort_int8", "ort_int8_fxopt", "fxopt_int8"):
        row = _row(text, v)
        assert float(row[1]) > 0 and float(row[2]) > 0, row  # both batch sizes timed
        assert float(row[4]) > 20 if v in ("ov", "ort_fp32") else float(row[4]) > 10, row
    summary = _row(text, "resnet18")  # the Done-when row: every comparison made
    assert summary[1] == "fxopt_int8" and "n/a" not in summary[2:5], summary


def test_zero_initialized_head_is_redrawn_so_sqnr_means_something():
    # torchvision's ViT zero-inits its head: every output 0, every SQNR "inf" before the fix
    model, redrawn = _load()._model("vit_b_16")
    assert redrawn == ["heads.head"]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.abs().max() > 0 and out.std() > 0
