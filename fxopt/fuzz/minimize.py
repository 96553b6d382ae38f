"""Shrinking a failing network to a small standalone reproduction (delta debugging).

Every sub-list of a network's layers is again a valid network (``fxopt.fuzz.emit``), so
``ddmin`` (Zeller and Hildebrandt) removes chunks of layers, then single layers, while the same
failure persists: the same check with the same outcome and the same signature (the pass a
``caught`` error names, the exception type of an ``untyped`` one, the kind of ``mismatch``).
The result prints as Python source that runs on its own:

    >>> small = minimize(net, "default")
    >>> print(reproduction(small, "default"))
"""
from __future__ import annotations

import re
from typing import Callable

from fxopt.fuzz.emit import source
from fxopt.fuzz.grammar import Network
from fxopt.fuzz.oracle import FAILURES, CheckResult, check_network, prune_config

__all__ = ["signature", "minimize", "ddmin", "reproduction", "checks_for", "CALLS"]

# The call each check makes, as the reproduction writes it (after ``model`` and ``x``).
CALLS = {
    "default": "opt = fxopt.optimize(model, x)\nprint(opt(x) - model(x))",
    "prune": "opt = fxopt.optimize(model, x, prune=fxopt.{config!r})",
    "int8": ("calib = [torch.randn_like(x) for _ in range(6)]\n"
             "opt = fxopt.optimize(model, x, quantize='int8', calibration_data=calib)\n"
             "held = torch.randn_like(x)\n"
             "print(fxopt.quant.measure.sqnr_db(model(held), opt(held)))"),
    "save": ("opt = fxopt.optimize(model, x)\nopt.save('/tmp/repro.fxopt')\n"
             "print(fxopt.load('/tmp/repro.fxopt')(x) - opt(x))"),
    "save_int8": ("calib = [torch.randn_like(x) for _ in range(6)]\n"
                  "opt = fxopt.optimize(model, x, quantize='int8', calibration_data=calib)\n"
                  "opt.save('/tmp/repro.fxopt')\n"
                  "held = torch.randn_like(x)\n"
                  "print(fxopt.load('/tmp/repro.fxopt')(held) - opt(held))"),
    "onnx": "opt = fxopt.optimize(model, x)\nfxopt.export_onnx(opt, x, '/tmp/repro.onnx')",
}


def _int8_save(check: str, result: CheckResult | None) -> bool:
    return check == "save" and result is not None and result.detail.startswith("int8")


def checks_for(check: str, result: CheckResult | None = None) -> tuple[str, ...]:
    """The checks to run to see ``result`` again (an int8 save needs the int8 module)."""
    return ("int8", "save") if _int8_save(check, result) else (check,)


def signature(res: CheckResult) -> tuple[str, str, str]:
    """What makes two failures "the same": check, outcome, and the culprit."""
    d = res.detail
    if res.outcome == "caught":
        m = re.search(r"pass '([^']+)'", d)
        key = m.group(1) if m else d.split(":")[0]
    elif res.outcome == "untyped":
        key = d.split(":")[0]
    elif res.outcome == "mismatch":
        key = re.sub(r"\b\d+(\.\d+)?\b", "#", d.split(":")[0])
        key = re.sub(r" (batch|on) .*", "", key)
    else:
        key = ""
    return res.check, res.outcome, key


def ddmin(items: list, fails: Callable[[list], bool]) -> list:
    """A 1-minimal sub-list of ``items`` for which ``fails`` holds (``fails(items)`` must)."""
    n = 2
    while len(items) >= 2:
        chunk = max(1, len(items) // n)
        subsets = [items[i:i + chunk] for i in range(0, len(items), chunk)]
        reduced = False
        for i in range(len(subsets)):
            complement = [x for j, s in enumerate(subsets) if j != i for x in s]
            if complement and fails(complement):
                items, n, reduced = complement, max(n - 1, 2), True
                break
        if not reduced:
            if n >= len(items):
                break
            n = min(len(items), 2 * n)
    if len(items) == 1 and fails([]):
        return []
    return items


def minimize(net: Network, check: str, target: CheckResult | None = None,
             max_tests: int = 200) -> Network:
    """The smallest network (by layers) that still fails ``check`` the way ``net`` does."""
    if target is None:
        found = [c for c in check_network(net, (check,)).checks if c.outcome in FAILURES]
        if not found:
            return net
        target = found[0]
    want = signature(target)
    tests = [0]

    def fails(candidate: Network) -> bool:
        if tests[0] >= max_tests:
            return False
        tests[0] += 1
        res = [r for r in check_network(candidate, checks_for(check, target)).checks
               if r.check == check]
        return bool(res) and signature(res[0]) == want

    if net.input_inplace:
        plain = Network(net.seed, net.input_shape, net.layers, False)
        if fails(plain):
            net = plain
    layers = ddmin(list(net.layers), lambda ls: fails(net.with_layers(ls)))
    return net.with_layers(layers)


def reproduction(net: Network, check: str, result: CheckResult | None = None) -> str:
    """Standalone Python source: the network, its input, and the fxopt call that fails."""
    head = f"# fxopt.fuzz: seed {net.seed}, check '{check}'"
    if result is not None:
        head += f": {result.outcome}: {result.detail}"
    call = CALLS["save_int8" if _int8_save(check, result) else check]
    if check == "prune":
        call = call.format(config=prune_config(net))
    return "\n".join([head, "import fxopt", "import fxopt.quant.measure", source(net), call, ""])
