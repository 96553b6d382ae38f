"""A differential fuzzer for fxopt (in the spirit of NNSmith): random valid networks, checked.

``grammar`` draws an eval-mode network from a seed (convs of every kind, BatchNorm with random
statistics, every activation, residual adds, concatenation, pooling, squeeze-excitation gates,
channel shuffle, flatten + Linear + BatchNorm1d, dropout, in-place ops and aliases), ``emit``
writes it as Python source; ``oracle`` checks fxopt against eager on it (the default pipeline,
pruning against its masked reference, int8 SQNR on held-out data, save/load bit for bit, ONNX
Runtime); ``minimize`` delta-debugs a failing network down to a standalone reproduction;
``campaign`` runs many seeds in worker processes. It uses fxopt's public API only, like
``fxopt.tools``.

    python -m fxopt.fuzz --n 1000 --jobs 2 --out results.json

    >>> from fxopt.fuzz import generate, check_network
    >>> check_network(generate(5)).failures
    []
"""
from fxopt.fuzz.campaign import Summary, format_summary, run_campaign
from fxopt.fuzz.emit import build, example_input, source
from fxopt.fuzz.grammar import FEATURES, Network, generate
from fxopt.fuzz.minimize import ddmin, minimize, reproduction, signature
from fxopt.fuzz.oracle import (CHECKS, FAILURES, OUTCOMES, CheckResult, NetworkResult,
                               check_network)

__all__ = ["generate", "build", "source", "example_input", "Network", "FEATURES",
           "check_network", "CheckResult", "NetworkResult", "CHECKS", "OUTCOMES", "FAILURES",
           "minimize", "ddmin", "reproduction", "signature", "run_campaign", "format_summary",
           "Summary"]
