"""Cleanup passes, each exact, deterministic and idempotent, run to a fixpoint as ``cleanup``.

One module per pass:

- ``noops``: ``remove_noops``, a table of rewrite rules (eval dropout, identity, ``x*1``,
  same-shape reshapes, inverse permutes, ...) on the shared engine ``fxopt.infra.rewrite``;
- ``constant_folding``: ``constant_fold`` evaluates once what depends only on weights;
- ``common_subexpressions``: ``cse`` merges pure nodes that compute the same thing
  (``merge_duplicates``, which constant folding uses too);
- ``dead_code``: ``dce`` erases what nothing reads, then the weights nothing uses.

Exact means the graph after equals the graph before to float tolerance; in fact bit for bit,
since nothing is computed differently, up to the sign of zero: dropping ``x + 0`` keeps a
``-0.0`` that the addition would have made ``+0.0``.

The group ``cleanup`` runs them in that order until none changes the graph: no-ops first, as
they expose constants (``w.t().t() * 1``) and duplicates; dead code last, to sweep up. Worked
example, ``F.dropout(x @ self.w.t().t(), training=False) + x @ self.w``:

    remove_noops   drops the dropout and the pair of transposes: x @ w + x @ w
    constant_fold  nothing left to fold (a lone weight is not folded)
    cse            one matmul: mm = x @ w;  mm + mm
    dce            nothing is dead any more; the second round changes nothing: a fixpoint
"""
from fxopt.infra.registry import register_group
from fxopt.passes.cleanup.noops import remove_noops
from fxopt.passes.cleanup.dead_code import dce
from fxopt.passes.cleanup.common_subexpressions import cse
from fxopt.passes.cleanup.constant_folding import constant_fold

__all__ = ["dce", "cse", "constant_fold", "remove_noops", "CLEANUP"]

CLEANUP = register_group(
    "cleanup", ["remove_noops", "constant_fold", "cse", "dce"],
    "Dead code, common subexpressions, constants and no-ops, to a fixpoint.",
    max_iterations=4)
