"""The differential fuzzer (fxopt/fuzz/): the generator, the oracles over a few hundred graphs,
the minimizer on an injected bug, and the command line.

The cheap oracle (the default pipeline against eager) runs on 300 seeds; the expensive ones
rotate over them (pruning's masked reference on every third graph, int8 held-out SQNR, save/load
and ONNX Runtime each on a tenth or a fifth). ``FXOPT_FUZZ_BASE=S`` moves the window to seeds
S..S+299. Every failure outcome counts (``caught``, ``untyped``, ``mismatch``, ``low_sqnr``); a
failure prints the seed and a minimized reproduction.

``KNOWN_OPEN``: grammar features left out of the default run while a bug they hit is open
(empty: the in-place ops through an alias or on the input, and ConvTranspose2d output_padding
>= stride, were fixed on main; bench/results/fuzz-findings-2026-12-06.md).
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.fx as fx

import fxopt
from fxopt.fuzz import (CHECKS, FEATURES, build, check_network, ddmin, example_input, generate,
                        minimize, reproduction, source)
from fxopt.fuzz.__main__ import main
from fxopt.fuzz.grammar import ACTIVATION_SPELLINGS, LAYER_KINDS
from fxopt.fuzz.oracle import FAILURES, classify

KNOWN_OPEN: tuple[str, ...] = ()
BASE = int(os.environ.get("FXOPT_FUZZ_BASE", "0"))


def _report(bad) -> str:
    """The failures, each with its seed and a minimized reproduction."""
    lines = []
    for seed, res in bad[:3]:
        small = minimize(generate(seed, exclude=KNOWN_OPEN), res.check, res, max_tests=60)
        lines += [f"seed {seed}: {res.check}: {res.outcome}: {res.detail}",
                  reproduction(small, res.check, res)]
    return "\n".join(lines) + f"\n({len(bad)} failures; rerun one with python -m fxopt.fuzz " \
                              f"--seed S --n 1)"


# ---- the generator --------------------------------------------------------------------------

def test_a_seed_gives_the_same_network_weights_and_input():
    a, b = generate(123), generate(123)
    assert a == b and source(a) == source(b)
    ma, mb = build(a), build(b)
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(example_input(a), example_input(b))
    assert not ma.training
    assert source(generate(124)) != source(a)


def test_the_source_is_the_network():
    net = generate(5)
    scope: dict = {}
    exec(compile(source(net), "<repro>", "exec"), scope)
    with torch.no_grad():
        assert torch.equal(scope["model"](scope["x"]), build(net)(example_input(net)))


def test_excluding_a_feature_keeps_the_rest_of_the_network():
    seeds = [s for s in range(400) if any(la.kind == "alias_inplace" for la in generate(s).layers)]
    assert seeds
    full, cut = generate(seeds[0]), generate(seeds[0], exclude=("alias_inplace",))
    assert len(full.layers) == len(cut.layers)
    for a, b in zip(full.layers, cut.layers):
        assert a == b or (a.kind == "alias_inplace" and b.kind == "dropout"
                          and b.params == {"type": "nn.Identity()"})
    assert all(la.kind != "alias_inplace" for la in cut.layers)


def test_the_grammar_reaches_every_construct_and_every_network_runs():
    kinds, acts, text = set(), set(), []
    for seed in range(300):
        net = generate(seed)
        kinds |= {la.kind for la in net.layers}
        acts |= {la.params["act"] for la in net.layers if isinstance(la.params.get("act"), str)}
        text.append(source(net))
        if seed % 3 == 0:
            with torch.no_grad():
                y = build(net)(example_input(net))
            assert torch.isfinite(y).all(), f"seed {seed}"
    assert kinds == set(LAYER_KINDS)
    assert acts == set(ACTIVATION_SPELLINGS)
    blob = "\n".join(text)
    for construct in ("groups=2", "dilation=2", "stride=2", "nn.ConvTranspose2d(",
                      "padding_mode='reflect'", "padding='same'", "_randomize_bn(nn.BatchNorm1d",
                      "nn.AdaptiveMaxPool2d(", "ceil_mode=True", "torch.cat(", ".transpose(1, 2)",
                      "x += ", ".mul_(", "inplace=True", ".relu_()", "torch.sigmoid(",
                      "F.hardsigmoid(", "nn.Linear(", "x.flatten(1)", "nn.Dropout(", "x.mul_(2.0)",
                      "= x.contiguous()"):
        assert construct in blob, construct
    # depthwise: a conv with groups equal to its input channels
    assert any(f"nn.Conv2d({c}, " in blob and f"groups={c})" in blob.replace(", bias=", ")")
               for c in range(3, 17))


# ---- the oracles ----------------------------------------------------------------------------

def _checks_of(i: int) -> tuple[str, ...]:
    """The cheap oracle on every graph; the expensive ones each on their own slice."""
    extra = {1: ("int8",), 2: ("save",), 4: ("onnx",), 7: ("int8", "save")}.get(i % 10, ())
    return ("default",) + (("prune",) if i % 3 == 0 else ()) + extra


def test_300_graphs_through_every_oracle():
    bad, seen = [], []
    for i in range(300):
        seed = BASE + i
        for res in check_network(generate(seed, exclude=KNOWN_OPEN), _checks_of(i)).checks:
            seen.append((res.check, res.outcome))
            if res.outcome in FAILURES:
                bad.append((seed, res))
    assert not bad, _report(bad)
    ok = {c: sum(1 for check, o in seen if check == c and o == "ok") for c in CHECKS}
    # the oracles really ran (a few ONNX exports are refused on purpose: adaptive pools)
    assert ok["default"] == 300 and ok["prune"] == 100 and ok["int8"] == 60
    assert ok["save"] == 60 and ok["onnx"] >= 25


def test_outcomes_of_errors():
    assert classify(ValueError("boom"))[0] == "untyped"
    assert classify(fxopt.UnsupportedOpError("no", hint="do x"))[0] == "refused"
    assert classify(fxopt.UnsupportedOpError("no"))[0] == "caught"  # a refusal needs a hint
    assert classify(fxopt.PassError("crash", pass_name="p", hint="h"))[0] == "caught"
    assert set(FAILURES) == {"caught", "untyped", "mismatch", "low_sqnr"}


# ---- the minimizer, on a bug put there on purpose -------------------------------------------

def _swap_cat_inputs(gm: fx.GraphModule, ctx) -> fxopt.PassResult:
    """A broken pass: concatenates in the wrong order (same shape, wrong numbers)."""
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.cat:
            parts = node.args[0]
            node.args = (list(reversed(parts)), *node.args[1:])
            n += 1
    gm.recompile()
    return fxopt.PassResult(gm, modified=n > 0)


@pytest.fixture
def broken_cat(monkeypatch):
    name = "test_fuzz_swap_cat"
    fxopt.register_pass(name, reference="none")(_swap_cat_inputs)
    monkeypatch.setattr(fxopt, "optimize", _with_pass(fxopt.optimize, name))
    yield name
    del fxopt.PASSES[name]


def _with_pass(optimize, name):
    def patched(*args, **kwargs):
        # check="none": no check runs, so the bug is silent (under "each" the manager's final
        # comparison of the module's code with the last checked graph would catch it)
        return optimize(*args, passes=[name], check="none", **kwargs)
    return patched


def test_ddmin_finds_a_minimal_sublist():
    assert ddmin(list(range(10)), lambda xs: 3 in xs and 7 in xs) == [3, 7]
    assert ddmin(list(range(6)), lambda xs: True) == []


def test_the_minimizer_shrinks_a_network_to_the_layer_that_breaks(broken_cat):
    nets = (generate(s, exclude=KNOWN_OPEN) for s in range(1000))
    net = next(n for n in nets if len(n.layers) >= 6 and [la.kind for la in n.layers
                                                           ].count("concat") == 1)
    seed = net.seed
    res = check_network(net, ("default",)).checks[0]
    assert res.outcome == "mismatch", res
    small = minimize(net, "default", res)
    assert len(small.layers) < len(net.layers)
    assert [la.kind for la in small.layers] == ["concat"]
    code = reproduction(small, "default", res)
    assert f"seed {seed}" in code and "torch.cat(" in code and "fxopt.optimize(model, x)" in code
    scope: dict = {}
    exec(compile(code, "<repro>", "exec"), scope)  # runs on its own, and shows the bug
    with torch.no_grad():
        assert not torch.allclose(scope["opt"](scope["x"]), scope["model"](scope["x"]))


# ---- the command line -----------------------------------------------------------------------

def test_command_line_runs_a_small_campaign(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["--n", "3", "--seed", "40", "--checks", "default,save", "--exclude",
               ",".join(KNOWN_OPEN), "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "3 graphs (seeds 40..42)" in text and "no failures" in text
    data = json.loads(out.read_text())
    assert data["counts"]["default"]["ok"] == 3 and data["seeds"] == [40, 42]


def test_command_line_rejects_unknown_checks():
    with pytest.raises(SystemExit):
        main(["--checks", "default,nope"])
    assert set(CHECKS) == {"default", "prune", "int8", "save", "onnx"}
    assert set(KNOWN_OPEN) <= set(FEATURES)


@pytest.mark.slow
def test_command_line_with_two_workers(tmp_path, capsys):
    rc = main(["--n", "6", "--jobs", "2", "--checks", "default", "--exclude",
               ",".join(KNOWN_OPEN), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "6 graphs" in text and "jobs 2" in text


# ---- seeds that found bugs (bench/results/fuzz-findings-2026-12-06.md), kept as regressions ----
# 1000 / 4 / 12: an in-place op through an alias (silent, rel err 0.64); 1013 / 10: an in-place op
# on the input; 1005: an in-place SE gate on the input (int8 lockstep, ONNX Runtime on a changed
# input); 1023 / 1220: an int8 module one output step off after save/load (packed under fbgemm,
# re-packed under the global engine); 1043: ConvTranspose2d output_padding >= stride (ORT's
# InvalidArgument untyped); 1267: MaxPool2d ceil_mode + padding (onnx.checker untyped); 75: the
# global pool on its input's grid (10.9 dB, no warning).
REGRESSION_SEEDS = (1000, 4, 12, 1013, 10, 1005, 1023, 1220, 1043, 1267, 75)


@pytest.mark.parametrize("seed", REGRESSION_SEEDS)
def test_seeds_that_found_bugs(seed):
    res = check_network(generate(seed), CHECKS)
    bad = [(seed, r) for r in res.checks if r.outcome in FAILURES]
    assert not bad, _report(bad)
