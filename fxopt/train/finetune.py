"""Fine-tuning after pruning: a plain PyTorch loop with knowledge distillation and early stopping.

Pruning removes channels that mattered a little; a few epochs of training bring most of the
accuracy back, faster with the unpruned model as a teacher (Hinton et al. 2015): the loss is
``kd_alpha * T^2 * KL(student/T || teacher/T) + (1 - kd_alpha) * cross_entropy(student, y)``.
The validation loss (plain cross-entropy) picks the best epoch and stops early after
``patience`` epochs without improvement; the best weights are restored at the end.

    >>> pruned = fxopt.optimize(model, x, prune=0.5, pipeline=["cleanup"]).graph_module
    >>> result = fxopt.finetune(pruned, train_loader, val_loader, epochs=10, teacher=model,
    ...                         lr=1e-3, patience=3, log_dir="runs/prune50")
    >>> result.history[-1]      # {'epoch': 10, 'train_loss': ..., 'val_loss': ..., ...}

The data: a DataLoader (or any iterable) of ``(x, y)`` batches, or simply the tensors
``(inputs, targets)``, which are batched here (``batch_size``, shuffled with ``seed``).

Any float graph trains: the optimized one (``fxopt.optimize(model, x, prune=0.5).graph_module``,
fused ops and all: they have gradients, see ``fxopt.ops.schema``) gives the same weights as the
pruned model before fusion, so fine-tune whichever you have. An int8 graph is refused with the
way to train it (``fxopt.prepare_qat``).
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from torch.utils.data import DataLoader, TensorDataset

from fxopt.errors import InputError, ModelTypeError, NotAvailableError, UnsupportedOpError
from fxopt.ir.check import run_in_eval
from fxopt.ir.graph import packed_weights
from fxopt.ops.schema import QAT_HINT, schema_of

__all__ = ["finetune", "FinetuneResult", "distillation_loss", "evaluate_loss", "frozen_teacher",
           "split_batch", "as_batches", "check_trainable", "make_optimizer", "cosine_schedule",
           "check_settings", "check_models", "OPTIMIZERS", "SCHEDULES", "DEFAULT_BATCH_SIZE"]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant")
DEFAULT_BATCH_SIZE = 64
_DATA_HINT = ("pass a DataLoader of (inputs, targets) batches, or the tensors themselves: "
              "(inputs, targets) with targets the class indices (an integer tensor [N])")


@dataclass
class FinetuneResult:
    model: nn.Module  # the same object that was passed, trained, in eval mode
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0  # 1-based; 0 when there was no validation data
    best_val_loss: float | None = None
    stopped_early: bool = False
    seconds: float = 0.0


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                      target: torch.Tensor | None, *, alpha: float,
                      temperature: float) -> torch.Tensor:
    """Hinton's loss; ``alpha=0`` or no teacher: cross-entropy; no target: distillation only."""
    parts = []
    if teacher_logits is not None and alpha > 0:
        t = temperature
        kd = F.kl_div(F.log_softmax(student_logits / t, dim=-1),
                      F.log_softmax(teacher_logits / t, dim=-1), reduction="batchmean",
                      log_target=True) * (t * t)
        if target is None:
            return kd
        parts.append(alpha * kd)
    if target is None:
        raise InputError("fine-tuning without targets needs a teacher (and kd_alpha > 0)")
    w = 1.0 - alpha if (teacher_logits is not None and alpha > 0) else 1.0
    parts.append(w * F.cross_entropy(student_logits, target))
    return sum(parts)


def split_batch(batch: Any, device) -> tuple[tuple, torch.Tensor | None]:
    """``(inputs, target)`` of a training batch, moved to ``device``: ``(x, y)`` or
    ``(x1, x2, ..., y)`` pairs, or a bare input tensor (target None: distillation only)."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        *xs, y = batch
        if not isinstance(y, torch.Tensor) or not any(isinstance(x, torch.Tensor) for x in xs):
            raise InputError(f"training batches must be (inputs, target) tensors, got "
                             f"({', '.join(type(v).__name__ for v in batch)})",
                             hint="e.g. a DataLoader over a TensorDataset(x, y), or the tensors "
                                  "(x, y)")
        return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in xs), y.to(device)
    if isinstance(batch, torch.Tensor):
        return (batch.to(device),), None
    raise InputError(f"training batches must be (inputs, target) pairs, got "
                     f"{type(batch).__name__}",
                     hint="e.g. a DataLoader over a TensorDataset(x, y)")


def _is_tensor_dataset(data: Any) -> bool:
    """``(inputs, ..., targets)``: tensors of one length, the targets integer class indices."""
    if not (isinstance(data, (tuple, list)) and len(data) >= 2
            and all(isinstance(t, torch.Tensor) for t in data)):
        return False
    y = data[-1]
    return (y.dim() == 1 and not y.is_floating_point() and not y.is_complex()
            and all(t.dim() >= 1 and t.shape[0] == y.shape[0] for t in data))


def as_batches(data: Any, *, name: str = "train_data", batch_size: int = DEFAULT_BATCH_SIZE,
               shuffle: bool = False, seed: int | None = 0) -> Iterable | None:
    """``data`` as an iterable of batches: ``(inputs, targets)`` tensors become a DataLoader
    over a TensorDataset (``shuffle``d with ``seed``); a DataLoader or other iterable of batches
    is returned as it is; a lone tensor, a dict, a string or a non-iterable is an
    ``InputError`` saying what to pass. None stays None."""
    if data is None:
        return None
    if _is_tensor_dataset(data):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}",
                             hint="e.g. batch_size=64")
        gen = torch.Generator().manual_seed(seed if seed is not None else 0)
        return DataLoader(TensorDataset(*data), batch_size=batch_size, shuffle=shuffle,
                          generator=gen if shuffle else None)
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor)
                                                        for t in data):
        shapes = ", ".join(f"{t.dtype} {tuple(t.shape)}" for t in data)
        raise InputError(f"{name} is a {type(data).__name__} of tensors ({shapes}) that is not "
                         f"(inputs, targets): the tensors must have one length and the targets "
                         f"be integer class indices [N]", hint=_DATA_HINT)
    if isinstance(data, (torch.Tensor, dict, str, bytes)) or not hasattr(data, "__iter__"):
        raise InputError(f"{name} must be batches of (inputs, targets), got "
                         f"{type(data).__name__}", hint=_DATA_HINT)
    return data


def check_trainable(model: nn.Module) -> None:
    """``UnsupportedOpError`` when ``model`` holds int8 ops or packed int8 weights (they have
    no gradient), ``InputError`` when it has no trainable parameters."""
    int8 = [f"fxopt.{sch.name}" for m in model.modules() if isinstance(m, fx.GraphModule)
            for n in m.graph.nodes if n.op == "call_function"
            for sch in [schema_of(n.target)] if sch is not None and sch.quantized]
    if int8 or next(iter(packed_weights(model)), None) is not None:
        what = ", ".join(sorted(set(int8))) or "packed int8 weights"
        raise UnsupportedOpError(f"the model is an int8 graph ({what}): int8 ops have no "
                                 f"gradient, so it cannot be fine-tuned", hint=QAT_HINT)
    if not any(p.requires_grad for p in model.parameters()):
        raise InputError("the model has no trainable parameters",
                         hint="pass the float model (or set requires_grad=True on the "
                              "parameters to train)")


@torch.no_grad()
def evaluate_loss(model: nn.Module, data: Iterable, device=None) -> tuple[float, float]:
    """(mean cross-entropy, top-1 accuracy) of ``model`` (in eval mode) over ``data``."""
    device = device or _device_of(model)
    was = model.training
    model.eval()
    total = correct = 0
    loss = 0.0
    try:
        for batch in data:
            xs, y = split_batch(batch, device)
            out = model(*xs)
            loss += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(dim=-1) == y).sum())
            total += len(y)
    finally:
        model.train(was)
    if total == 0:
        raise InputError("the validation data is empty",
                         hint="pass val_data=None, or batches (inputs, targets)")
    return loss / total, correct / total


def _device_of(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def make_optimizer(optimizer: str | Callable, params, lr: float, weight_decay: float):
    """The optimizer named in ``OPTIMIZERS`` (``sgd``: momentum 0.9, Nesterov) over ``params``,
    or ``optimizer(params)`` for a callable."""
    if callable(optimizer) and not isinstance(optimizer, str):
        return optimizer(params)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay,
                               nesterov=True)
    raise InputError(f"optimizer must be one of {OPTIMIZERS} or a callable(params), "
                     f"got {optimizer!r}",
                     hint="e.g. optimizer='adamw', or optimizer=lambda p: torch.optim.SGD(p, 0.1)")


@contextlib.contextmanager
def _writer(log_dir):
    if log_dir is None:
        yield None
        return
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # tensorboard is an optional dependency
        raise NotAvailableError("log_dir= needs the tensorboard package",
                                hint="pip install tensorboard (or fxopt[tensorboard])") from e
    w = SummaryWriter(log_dir=str(log_dir))
    try:
        yield w
    finally:
        w.close()


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int):
    """A per-step schedule from the optimizer's learning rate down to zero over ``total_steps``
    (half a cosine), flat at zero after."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps)))


@contextlib.contextmanager
def _progress(console, total: int | None):
    """(bar, task) of a rich progress bar on ``console``; (None, None) without a console."""
    if console is None:
        yield None, None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=console.is_terminal) as bar:
        yield bar, bar.add_task("fine-tuning", total=total)


def check_settings(epochs, kd_alpha, kd_temperature, lr, weight_decay, patience,
                   schedule) -> None:
    """``InputError`` naming the first fine-tuning setting out of range, with a hint (the plain
    loop and the Lightning module take the same ones)."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise InputError(f"epochs must be an integer >= 1, got {epochs!r}", hint="e.g. epochs=5")
    _number("kd_alpha", kd_alpha, lambda v: 0.0 <= v <= 1.0, "in [0, 1]",
            "e.g. kd_alpha=0.5 (0: no distillation)")
    _number("kd_temperature", kd_temperature, lambda v: v > 0, "> 0", "e.g. kd_temperature=4.0")
    _number("lr", lr, lambda v: v > 0, "> 0", "e.g. lr=1e-3")
    _number("weight_decay", weight_decay, lambda v: v >= 0, ">= 0", "e.g. weight_decay=1e-4")
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int)
                                 or patience < 1):
        raise InputError(f"patience must be an integer >= 1 or None, got {patience!r}",
                         hint="e.g. patience=3 (None: no early stopping)")
    if schedule not in SCHEDULES:
        raise InputError(f"schedule must be one of {SCHEDULES}, got {schedule!r}",
                         hint="pass schedule=" + " or ".join(repr(k) for k in SCHEDULES))


def _number(name: str, value, ok: Callable[[float], bool], what: str, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or not ok(value):
        raise InputError(f"{name} must be a number {what}, got {value!r}", hint=hint)


def check_models(model, teacher, what: str = "model") -> None:
    """``ModelTypeError`` unless ``model`` (and ``teacher``, when given) is an ``nn.Module``."""
    for name, m in ((what, model), ("teacher", teacher)):
        if (m is not None or name == what) and not isinstance(m, nn.Module):
            raise ModelTypeError(f"{name} must be an nn.Module, got {type(m).__name__}",
                                 hint=f"pass the torch.nn.Module to train as {name}=")


def finetune(model: nn.Module, train_data: Iterable, val_data: Iterable | None = None, *,
             epochs: int = 5, teacher: nn.Module | None = None, kd_alpha: float = 0.5,
             kd_temperature: float = 4.0, optimizer: str | Callable = "adam", lr: float = 1e-3,
             weight_decay: float = 0.0, patience: int | None = None, schedule: str = "cosine",
             augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
             log_dir: str | None = None, progress: bool = True, console=None,
             device: str | torch.device | None = None, seed: int | None = 0,
             num_threads: int | None = None,
             batch_size: int = DEFAULT_BATCH_SIZE) -> FinetuneResult:
    """Train ``model`` in place on ``train_data`` (batches ``(x, y)``, or the tensors
    ``(inputs, targets)``: batched by ``batch_size``, shuffled with ``seed``) and return it in
    eval mode.

    teacher / kd_alpha / kd_temperature: knowledge distillation from ``teacher`` (the unpruned
    model); ``kd_alpha=0`` or no teacher is plain cross-entropy. optimizer: ``"adam"``,
    ``"adamw"``, ``"sgd"`` (momentum 0.9) or ``callable(params) -> Optimizer``; schedule:
    ``"cosine"`` (per step, to zero) or ``"constant"``. patience: early stopping on the
    validation loss (needs ``val_data``); the best epoch's weights are restored.
    augment: applied to each training input batch. log_dir: TensorBoard scalars
    (``train/loss``, ``val/loss``, ``val/accuracy``, ``lr``). progress: a rich progress bar and
    one line of metrics per epoch on ``console`` (stderr by default). num_threads: torch's CPU
    threads while training (restored after); small models train faster on one.
    """
    train_data = as_batches(train_data, name="train_data", batch_size=batch_size, shuffle=True,
                            seed=seed)
    val_data = as_batches(val_data, name="val_data", batch_size=batch_size)
    before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _finetune(model, train_data, val_data, epochs, teacher, kd_alpha, kd_temperature,
                         optimizer, lr, weight_decay, patience, schedule, augment, log_dir,
                         progress, console, device, seed)
    finally:
        torch.set_num_threads(before)


def frozen_teacher(teacher: nn.Module) -> nn.Module:
    """A frozen copy of ``teacher`` (eval mode, no gradients): the caller's model (usually the
    user's unpruned model) keeps its device, training flag and ``requires_grad`` flags."""
    return copy.deepcopy(teacher).eval().requires_grad_(False)


def _preflight(model: nn.Module, train_data, val_data, device) -> None:
    """Fail before training changes anything: empty validation data, or a first training batch
    the model cannot run on (wrong shape, dtype, not tensors). The first batch is run once in
    eval mode without gradients (no BatchNorm statistics move; every training flag is put back);
    a one-pass iterator is not read ahead."""
    if val_data is not None and hasattr(val_data, "__len__") and len(val_data) == 0:
        raise InputError("the validation data is empty",
                         hint="pass val_data=None, or batches (inputs, targets)")
    if iter(train_data) is train_data:  # a generator: reading ahead would lose a batch
        return
    first = next(iter(train_data), None)
    if first is None:
        raise InputError("the training data is empty",
                         hint="pass batches (inputs, targets), or the tensors (inputs, targets)")
    dev = torch.device(device) if device is not None else _device_of(model)
    xs, _ = split_batch(first, dev)
    run_in_eval(model, xs, what="the model cannot run on the first training batch",
                hint="each batch is (inputs, targets), the inputs shaped like the model's example "
                     "inputs")


def _finetune(model, train_data, val_data, epochs, teacher, kd_alpha, kd_temperature, optimizer,
              lr, weight_decay, patience, schedule, augment, log_dir, progress, console, device,
              seed) -> FinetuneResult:
    check_settings(epochs, kd_alpha, kd_temperature, lr, weight_decay, patience, schedule)
    check_models(model, teacher)
    if patience is not None and val_data is None:
        raise InputError("patience= needs val_data: early stopping watches the validation loss",
                         hint="pass val_data=... or patience=None")
    _preflight(model, train_data, val_data, device)
    if seed is not None:
        torch.manual_seed(seed)
    device = torch.device(device) if device is not None else _device_of(model)
    model.to(device)
    if teacher is not None:
        teacher = frozen_teacher(teacher).to(device)
    check_trainable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError("the model has no trainable parameters",
                         hint="unfreeze what should train: model.requires_grad_(True)")
    opt = make_optimizer(optimizer, params, lr, weight_decay)
    try:
        steps_per_epoch = len(train_data)  # type: ignore[arg-type]
    except TypeError:
        steps_per_epoch = None
    total = steps_per_epoch * epochs if steps_per_epoch else None
    sched = cosine_schedule(opt, total) if schedule == "cosine" and total else None
    result = FinetuneResult(model)
    best_state = None
    best_loss = math.inf
    since_best = 0
    t0 = time.perf_counter()
    step = 0
    out_console = None
    if progress:
        from rich.console import Console
        out_console = console if console is not None else Console(stderr=True)
    with _writer(log_dir) as writer, _progress(out_console, total) as (bar, task):
        for epoch in range(1, epochs + 1):
            model.train()
            te = time.perf_counter()
            run_loss = 0.0
            seen = 0
            for batch in train_data:
                xs, y = split_batch(batch, device)
                if augment is not None:
                    xs = (augment(xs[0]),) + xs[1:]
                t_logits = None
                if teacher is not None and kd_alpha > 0:
                    with torch.no_grad():
                        t_logits = teacher(*xs)
                out = model(*xs)
                loss = distillation_loss(out, t_logits, y, alpha=kd_alpha,
                                         temperature=kd_temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                n = len(y) if y is not None else xs[0].shape[0]
                loss_value = float(loss.detach())
                run_loss += loss_value * n
                seen += n
                step += 1
                if writer is not None:
                    writer.add_scalar("train/step_loss", loss_value, step)
                if bar is not None:
                    bar.update(task, advance=1, description=f"fine-tuning (epoch {epoch}/"
                                                            f"{epochs}, loss {loss_value:.3f})")
            entry = {"epoch": epoch, "train_loss": run_loss / max(seen, 1),
                     "lr": opt.param_groups[0]["lr"]}
            if val_data is not None:
                vl, va = evaluate_loss(model, val_data, device)
                entry.update(val_loss=vl, val_accuracy=va)
            entry["seconds"] = time.perf_counter() - te
            result.history.append(entry)
            if writer is not None:
                for k in ("train_loss", "val_loss", "val_accuracy", "lr"):
                    if k in entry:
                        writer.add_scalar({"train_loss": "train/loss", "val_loss": "val/loss",
                                           "val_accuracy": "val/accuracy", "lr": "lr"}[k],
                                          entry[k], epoch)
            if out_console is not None:
                line = f"epoch {epoch}/{epochs}: train loss {entry['train_loss']:.4f}"
                if "val_loss" in entry:
                    line += (f", val loss {entry['val_loss']:.4f}, "
                             f"val acc {entry['val_accuracy']:.2%}")
                out_console.print(line + f", lr {entry['lr']:.1e}")
            if val_data is not None:
                if entry["val_loss"] < best_loss - 1e-6:
                    best_loss = entry["val_loss"]
                    best_state = copy.deepcopy(model.state_dict())
                    result.best_epoch = epoch
                    since_best = 0
                else:
                    since_best += 1
                    if patience is not None and since_best >= patience:
                        result.stopped_early = epoch < epochs
                        break
    if best_state is not None:
        model.load_state_dict(best_state)
        result.best_val_loss = best_loss
    model.eval()
    result.seconds = time.perf_counter() - t0
    return result
