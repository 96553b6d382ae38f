"""CUDA graphs for a module with static shapes: capture once per input signature, then replay.

Small batches on a GPU are bound by the host: every kernel launch costs microseconds, and a
lowered int8 model launches a few small kernels per layer. A ``torch.cuda.CUDAGraph`` records
the launches of one forward once and replays them with one call. ``CudaGraphRunner`` wraps a
forward function (``OptimizedModule.with_cuda_graphs`` builds one):

- The *signature* of a call is (shape, stride, dtype, device) of every positional input plus
  whether inference mode is on. A call whose inputs are not all CUDA tensors (or that has
  keyword arguments) has no signature and runs the plain function.
- First call with a signature: the inputs are copied into static buffers, the function runs
  ``WARMUP`` times on a side stream (Triton autotuning, cuDNN algorithm choice, lazy
  allocations happen there, not during capture), then one forward is captured into static
  outputs. Errors raised by the warm-up are the model's own and propagate unchanged.
- Every call: copy the inputs into the static buffers, replay, and return *clones* of the
  static outputs (the next replay overwrites the static outputs; a caller that kept the last
  result must not see it change). One copy per output, small next to the forward.
- Fallbacks, never a wrong result: a capture that fails (an op that synchronizes, a
  data-dependent shape, an output that is not tensors) turns the graphs off for this runner,
  which runs the plain function from then on; more than ``max_graphs`` signatures run the plain
  function for the new ones. Each kind of fallback warns once and adds one line to ``notes``
  (the module's report).

The capture backend is a small object (``TorchGraphs``: ``warmup``, ``capture``, ``replay``,
``recover``) so that the cache and fallback logic can be tested without a GPU; the real one is
the only one fxopt uses.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["CudaGraphRunner", "TorchGraphs", "signature", "MAX_GRAPHS", "WARMUP"]

MAX_GRAPHS = 4  # input signatures captured per module; later ones run without a graph
WARMUP = 2  # forwards on a side stream before a capture


def signature(args: tuple, kwargs: dict | None = None, device_type: str = "cuda") -> tuple | None:
    """The key a captured graph is kept under, or None where a graph cannot serve the call
    (keyword arguments, an input that is not a tensor on ``device_type``)."""
    if kwargs or not args:
        return None
    sig = []
    for a in args:
        if not isinstance(a, torch.Tensor) or a.device.type != device_type:
            return None
        sig.append((tuple(a.shape), a.stride(), a.dtype, a.device))
    return tuple(sig), torch.is_inference_mode_enabled()


class TorchGraphs:
    """The real backend: ``torch.cuda.CUDAGraph`` captured after a side-stream warm-up."""

    def warmup(self, fn: Callable, static: tuple, n: int = WARMUP) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(n):
                fn(*static)
        torch.cuda.current_stream().wait_stream(side)

    def capture(self, fn: Callable, static: tuple) -> tuple[Any, Any]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(*static)
        return graph, out

    def replay(self, graph: Any) -> None:
        graph.replay()

    def recover(self) -> None:
        """After a failed capture: let the device finish (errors here are the capture's)."""
        try:
            torch.cuda.synchronize()
        except RuntimeError:
            pass


@dataclass
class _Entry:
    graph: Any
    static_inputs: tuple
    static_output: Any


def _tensors_only(out: Any) -> bool:
    if isinstance(out, torch.Tensor):
        return True
    if isinstance(out, (tuple, list)):
        return all(_tensors_only(o) for o in out)
    if isinstance(out, dict):
        return all(_tensors_only(o) for o in out.values())
    return False


def _clone(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_clone(o) for o in out)
    return {k: _clone(v) for k, v in out.items()}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


class CudaGraphRunner:
    """Calls ``fn`` through CUDA graphs, one per input signature (see the module docstring).

    ``captures``, ``replays`` and ``plain_calls`` count what happened (tests, benchmarks);
    ``disabled`` is the reason the graphs were turned off, or None.
    """

    def __init__(self, fn: Callable, *, max_graphs: int = MAX_GRAPHS,
                 backend: Any = None, notes: list[str] | None = None, device_type: str = "cuda"):
        self.fn = fn
        self.device_type = device_type  # "cpu" only with a test backend
        self.max_graphs = max_graphs
        self.backend = backend if backend is not None else TorchGraphs()
        self.notes = notes if notes is not None else []
        self.entries: dict[tuple, _Entry] = {}
        self.disabled: str | None = None
        self.captures = self.replays = self.plain_calls = 0
        self._warned: set[str] = set()

    def __call__(self, *args, **kwargs):
        sig = None if self.disabled else signature(args, kwargs, self.device_type)
        entry = None if sig is None else self.entries.get(sig)
        if entry is None and sig is not None:
            if len(self.entries) >= self.max_graphs:
                self._fallback("limit", f"more than {self.max_graphs} input signatures (shape, "
                               f"stride, dtype); new ones run without a CUDA graph")
            else:
                entry = self._capture(sig, args)
        if entry is None:
            self.plain_calls += 1
            return self.fn(*args, **kwargs)
        for static, a in zip(entry.static_inputs, args):
            static.copy_(a)
        self.backend.replay(entry.graph)
        self.replays += 1
        return _clone(entry.static_output)

    def _capture(self, sig: tuple, args: tuple) -> _Entry | None:
        static = tuple(torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device)
                       .copy_(a) for a in args)
        self.backend.warmup(self.fn, static)  # the model's own errors propagate from here
        try:
            graph, out = self.backend.capture(self.fn, static)
        except Exception as e:  # noqa: BLE001 - any capture failure: run the plain module
            self.backend.recover()
            self.disabled = f"capture failed ({_first_line(e)})"
            self._fallback("capture", f"CUDA graph {self.disabled}; this module runs without "
                           f"CUDA graphs from now on")
            return None
        if not _tensors_only(out):
            self.disabled = f"the output is not tensors ({type(out).__name__})"
            self._fallback("capture", f"CUDA graphs off: {self.disabled}")
            return None
        self.captures += 1
        entry = _Entry(graph, static, out)
        self.entries[sig] = entry
        return entry

    def _fallback(self, kind: str, message: str) -> None:
        if kind in self._warned:
            return
        self._warned.add(kind)
        self.notes.append(message)
        warnings.warn(f"fxopt: {message}", RuntimeWarning, stacklevel=4)
