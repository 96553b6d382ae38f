"""bench/zoo.py (issue 15): each model in its own process; a model past the timeout becomes rows
saying so and the sweep goes on; the file holds the table as rows arrive and ``--resume`` keeps
them and runs only the models without a row."""
from __future__ import annotations

import sys

import pytest
from bench_scripts import load_bench_script  # tests/support

pytest.importorskip("torchvision")


def _load():
    return load_bench_script("zoo")


@pytest.fixture(autouse=True)
def _restore_sys_path():
    path = list(sys.path)
    yield
    sys.path[:] = path


@pytest.mark.slow
def test_isolated_timeout_rows_then_resume(tmp_path):
    zoo = _load()
    out = tmp_path / "zoo.md"
    # 1 s is too short even to import torch in the child: every mode is a row saying why
    assert zoo.main(["--models", "tv:squeezenet1_1", "--out", str(out), "--timeout", "1"]) == 0
    rows = zoo._table_rows(out.read_text())
    assert [r[1] for r in rows] == ["default", "prune", "int8"]
    assert rows[0][-1].startswith("timeout: killed after 1 s")
    assert all(r[-1].startswith("not run: the process was stopped") for r in rows[1:])
    assert "3 of 3 runs failed" in out.read_text()
    # --resume keeps those rows, runs the model without one, and writes one summary
    assert zoo.main(["--models", "tv:squeezenet1_1,tv:squeezenet1_0", "--out", str(out),
                     "--resume", "--modes", "default"]) == 0
    text = out.read_text()
    rows = zoo._table_rows(text)
    assert [(r[0], r[1]) for r in rows[3:]] == [("tv:squeezenet1_0", "default")]
    assert rows[3][-1] == "" and rows[3][2] == "symbolic_trace"
    assert text.count("## Summary") == 1 and "3 of 4 runs failed" in text
    assert "Resumed" in text and "(3 rows kept)" in text
