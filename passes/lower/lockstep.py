"""The reference of ``lower_int8_cpu``: the int8 IR run in lockstep with its lowering.

PyTorch's int8 kernels round their requantization in their own order, so a value at a
tie can land one code away from the IR's; in a deep network such a flip spreads (ResNet-50: one
flipped code in layer1 became six output steps by the logits). Comparing the lowered graph with
the IR graph end to end would blame the kernels for ties. Instead both graphs run together:
every lowered op is compared with its IR op on the same inputs, and where it is within one code
the IR run carries on from the lowered codes. A kernel off by more than one code is not carried
over, so its error reaches the output, which must equal the reference within one quantization
step of the output.

    ref = LockstepReference(ir_copy, lowered, {"conv2d_int8": "conv2d_relu", ...})
    ref(x)                 # the IR's output, following the lowered codes where they tie
    ref.flips, ref.off     # codes one step away (ties); ops further off, by name: codes

The mapping (IR node name -> name of the lowered node standing for it) is what the rewrite
engine reports as ``RewriteResult.rewrites``. ``off_kernels`` runs the lockstep at the example
batch and at one sample more and names the ops whose kernels are wrong (``lower_int8_cpu``
lowers again without them).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxopt.ir.check import batch_of, clone_inputs, grown_inputs
from fxopt.ir.graph import module_path

__all__ = ["LockstepReference", "follow_codes", "off_kernels", "first_off", "who"]


class _Follow(fx.Interpreter):
    """Runs the reference graph; after each node, ``judge(self, node, value)`` returns the value
    the run carries on with (its own, or the lowered graph's where they agree)."""

    def __init__(self, gm, lowered_env: dict, mapping: dict, judge):
        super().__init__(gm)
        self.lowered_env, self.mapping, self.judge = lowered_env, mapping, judge
        self.flips, self.off, self.off_nodes = 0, {}, set()

    def lowered(self, n: fx.Node):
        """The lowered graph's value standing for reference node ``n`` (None: none)."""
        return self.lowered_env.get(self.mapping.get(n.name))

    def run_node(self, n):
        return self.judge(self, n, super().run_node(n))


def follow_codes(follow: _Follow, n: fx.Node, out):
    """The lowered op's codes where they are within one code of the IR op's ``out`` (a tie
    rounded the other way, counted in ``follow.flips``); else ``out``, and the op is named in
    ``follow.off`` with its distance in codes."""
    low = follow.lowered(n)
    codes = low.int_repr() if isinstance(low, torch.Tensor) and low.is_quantized else low
    if not (isinstance(codes, torch.Tensor) and isinstance(out, torch.Tensor)
            and out.dtype in (torch.uint8, torch.int8) and codes.dtype == out.dtype
            and codes.shape == out.shape):
        return out
    diff = int((codes.to(torch.int64) - out.to(torch.int64)).abs().max()) if out.numel() else 0
    if diff > 1:  # not a tie rounded the other way: let the error reach the output
        follow.off[who(n)] = diff
        follow.off_nodes.add(n.name)
        return out
    follow.flips += int((codes != out).sum())
    return codes.to(out.dtype)


class LockstepReference(torch.nn.Module):
    """The int8 IR graph ``ir`` run in lockstep with its lowering ``lowered`` (``mapping``: IR
    node name -> lowered node name). After a call, ``flips`` counts the codes a lowered op put
    one step away from its IR op (ties), ``off`` names the ops off by more, with the codes.
    ``judge`` decides what the reference carries on with after each node (``follow_codes``; a
    subclass may judge float outputs: ``passes/quant/dynamic.py``). ``off_nodes``: the names of
    the IR nodes whose lowered ops were further off than a tie."""

    judge = staticmethod(follow_codes)

    def __init__(self, ir: fx.GraphModule, lowered: fx.GraphModule, mapping: dict):
        super().__init__()
        self.ir = ir
        self.__dict__["lowered"] = lowered  # not a submodule: the pass's own result
        self.mapping = dict(mapping)
        self.flips, self.off, self.off_nodes = 0, {}, set()

    def forward(self, *args):
        with torch.no_grad():
            low = fx.Interpreter(self.lowered, garbage_collect_values=False)
            # each run on copies: a graph that writes into its input (x.mul_(gate)) must not
            # hand the other run a changed input
            low.run(*clone_inputs(args))
            follow = _Follow(self.ir, {n.name: v for n, v in low.env.items()}, self.mapping,
                             self.judge)
            out = follow.run(*clone_inputs(args))
        self.flips, self.off, self.off_nodes = follow.flips, follow.off, follow.off_nodes
        return out


def who(n: fx.Node) -> str:
    """How notes name an IR node: its module path, else its node name."""
    return module_path(n) or n.name


def off_kernels(lockstep: LockstepReference, inputs: tuple) -> tuple[dict, int]:
    """``({IR node name: (who, "N codes at batch B")}, tie flips at the example inputs)``: the
    ops more than one code off whose inputs were not (``first_off``), in the lockstep run at
    the example inputs and at one sample more, where a kernel wrong at one batch size only
    shows (``fxopt/ops/onednn.py``). A graph whose shapes are fixed at the example batch does
    not run at the second (the manager's check notes it)."""
    off, flips = {}, 0
    for batch in (inputs, grown_inputs(inputs)):
        try:
            lockstep(*batch)
        except Exception:  # noqa: BLE001
            if batch is inputs:
                raise
            break
        if batch is inputs:
            flips = lockstep.flips
        for n in first_off(lockstep.ir, lockstep.off_nodes):
            off.setdefault(n.name, (who(n), f"{lockstep.off[who(n)]} codes at batch "
                                             f"{batch_of(batch)}"))
    return off, flips


def first_off(ir: fx.GraphModule, off_nodes: set) -> list[fx.Node]:
    """The ops of ``off_nodes`` none of whose inputs depends on another: where the lockstep
    run does not follow an op, every op after it reads other codes in the two graphs and may
    be off for that alone."""
    after, first = set(), []
    for n in ir.graph.nodes:
        tainted = any(a in after for a in n.all_input_nodes)
        if n.name in off_nodes and not tainted:
            first.append(n)
        if tainted or n.name in off_nodes:
            after.add(n)
    return first
